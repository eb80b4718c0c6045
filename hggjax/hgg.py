"""HGG-TopK: histogram-guided threshold search with history (the seed's algorithm).

Steps per selection group, all inside one jitted function:
  1. a = |acc| (acc = gradient + residual, formed by the transform).
  2. History: count a >= the previous step's cut (one fused pass). Accept that cut
     when the count is within tol_k = max(1, floor(tolerance * k)) of k.
  3. Otherwise search a histogram. Bins are uniform in u = log1p(gamma * a):
     bin(a) = floor(B * (u(a) - u(lo)) / (u(hi) - u(lo))). With a previous cut the
     range [lo, hi] is a window of +-`window` of the full log range around it (B
     finer bins where the answer probably is); the full range [0, max|a|] is
     searched when the window misses k or on a cold start.
  4. Suffix sums S[i] = #(a in bins >= i) + #(a > hi). A bin edge with
     k <= S[i] <= k + tol_k is taken as the cut; else the cut interpolates inside the
     bin holding the k-th element: lower + width * (1 - k_remain / count) * beta.
  5. Select a >= cut, keep the k largest (trim). The transform keeps acc - sent
     as the new residual.
Only one branch of each ``lax.cond`` runs, so an accepted history costs one
counting pass instead of a histogram.

How it is made fast without changing the answer (vectors of >= `min_fast_n`;
the one exception is the sample's rejection of a history, below):
  * Step 2 packs the mask a >= prev into bits in one pass (`radix.pack`); the
    popcount is the count, and on acceptance the same words are compacted into
    k + tol_k candidates (`radix.compact`), so an accepted history is one pass
    over a plus work on n/32 words (and no trim when at most k passed). When
    the 1/r sample drawn for step 3 already puts the count at prev more than Z
    binomial sd (plus tol_k) from k, the history is rejected on the sample (the
    exact count would reject it too unless the sample is off by Z sd) and the
    one pass packs the low cut's mask instead: only a history that the sample
    could not reject but the count did costs a second pass.
  * Steps 3-4 histogram only the candidates: a low cut from a 1/r sample of a
    (`radix.low_cut`) lets between k and K elements through w.h.p.; those K are
    compacted out, and the seed's log1p histogram is built over them alone. For
    every bin whose lower edge is >= the low cut, S[i] over the candidates equals
    S[i] over all of a, and the bin holding the k-th element always has an exact
    upper suffix (S[i + 1] < k). The search therefore gives the seed's cut unless
    that bin straddles the low cut (its count would be partial) or the count
    misses [k, K]: then a ``lax.cond`` runs the seed's full-vector histogram.
    max|a| is the largest candidate, so no separate max pass is needed.
  * Step 5 trims among the candidates with an exact radix select (`radix.take_largest`).
log1p is evaluated on K ~ 1.4k candidates only, never per element of a.
"""

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from hggjax import compaction, radix
from hggjax.payload import Selection
from hggjax.selectors import Selector, _candidates


def _varying_like(tree, *refs):
  """`tree` (constants) typed like values computed from `refs`.

  Under ``shard_map`` both branches of a ``lax.cond`` must agree on which mesh
  axes their outputs vary over; a branch that returns constants must say so.
  ``zeros_like`` keeps its argument's type, and ``where`` joins the types; XLA
  folds the no-op away. Outside ``shard_map`` nothing changes.
  """
  anchor = sum(jnp.zeros_like(r.ravel()[0] if r.ndim else r, jnp.int32) for r in refs) == 0
  return jax.tree.map(lambda v: jnp.where(anchor, v, v), tree)


def _histogram_cut(a, k, lo, hi, num_bins, gamma, beta, tol_k, floor=None):
  """(cut float32[], ok bool[], exact bool[]): the histogram estimate of the k-th largest a.

  Bins are uniform in log1p(gamma * a) over [lo, hi]. ok is False when the range
  cannot hold the k-th element (more than k above hi, or fewer than k above lo).

  `a` may hold only the elements >= `floor` of the vector (padding = 0, never
  counted): suffix sums at edges >= floor are then exact, and exact says whether
  the cut only used those (else the caller must redo the search on everything).
  """
  u_lo, u_hi = jnp.log1p(gamma * lo), jnp.log1p(gamma * hi)
  span = jnp.maximum(u_hi - u_lo, jnp.finfo(jnp.float32).tiny)
  b = jnp.floor((jnp.log1p(gamma * a) - u_lo) * (num_bins / span)).astype(jnp.int32)
  b = jnp.clip(b, 0, num_bins - 1)
  # Slot num_bins counts "above hi"; slot num_bins + 1 is out of range (dropped):
  # below lo, or zero (zeros are never sent).
  b = jnp.where(a > hi, num_bins, jnp.where((a < lo) | (a <= 0), num_bins + 1, b))
  hist = jnp.zeros(num_bins + 1, jnp.int32).at[b].add(1, mode="drop")
  suffix = jnp.cumsum(hist[::-1])[::-1]  # suffix[i] = S[i]; suffix[num_bins] = #above
  ok = (suffix[num_bins] < k) & (suffix[0] >= k)

  def edge(i):
    return jnp.expm1(u_lo + i.astype(jnp.float32) * (span / num_bins)) / gamma

  # A bin edge passing k to k + tol_k is an exact cut: no interpolation error, and
  # the trim sends exactly the k largest. (The seed also took edges up to tol_k
  # below k, sending as few as 0.99k on a cold start; the interpolation below,
  # lowered by beta, covers those cases with at least k passing.)
  gap = jnp.where(suffix >= k, suffix - k, jnp.iinfo(jnp.int32).max)
  if floor is not None:
    counted = edge(jnp.arange(num_bins + 1)) >= floor
    gap = jnp.where(counted, gap, jnp.iinfo(jnp.int32).max)
  best_edge = jnp.argmin(gap)
  # Else the k-th element lies in bin i: S[i] >= k > S[i + 1].
  i = jnp.clip(jnp.sum(suffix[:num_bins] >= k) - 1, 0, num_bins - 1)
  k_remain = (k - suffix[i + 1]).astype(jnp.float32)
  in_bin = jnp.maximum(hist[i], 1).astype(jnp.float32)
  lower, upper = edge(i), edge(i + 1)
  interpolated = lower + (upper - lower) * (1.0 - k_remain / in_bin) * beta
  on_edge = gap[best_edge] <= tol_k
  cut = jnp.where(on_edge, edge(best_edge), interpolated)
  exact = jnp.bool_(True) if floor is None else on_edge | (lower >= floor)
  return jnp.maximum(cut, lo).astype(jnp.float32), ok, exact


def _search(a, k, top, prev_threshold, num_bins, gamma, beta, tol_k, window, floor=None):
  """Steps 3-4: (cut, exact): window search around a previous cut, else the full range."""

  def full_search():
    cut, _, exact = _histogram_cut(
        a, k, jnp.float32(0), top, num_bins, gamma, beta, tol_k, floor)
    return cut, exact

  def window_search():
    u_prev, u_top = jnp.log1p(gamma * prev_threshold), jnp.log1p(gamma * top)
    lo = jnp.expm1(jnp.maximum(u_prev - window * u_top, 0.0)) / gamma
    hi = jnp.expm1(jnp.minimum(u_prev + window * u_top, u_top)) / gamma
    cut, ok, exact = _histogram_cut(a, k, lo, hi, num_bins, gamma, beta, tol_k, floor)
    return jax.lax.cond(ok, lambda: (cut, exact), full_search)

  return jax.lax.cond(prev_threshold > 0, window_search, full_search)


def hgg_topk(
    num_bins: int = 1024,
    gamma: float = 1000.0,
    tolerance: float = 0.01,
    beta: float = 0.98,
    window: float = 0.05,
    min_fast_n: int = radix.MIN_FAST_N,
) -> Selector:
  """The HGG-TopK selector; arguments as in `hggjax.hggtopk`.

  `window` is the half-width of the history window as a share of the log range;
  vectors shorter than `min_fast_n` always take the reference path (the steps
  above on the whole vector), longer ones the candidate path described above.
  """

  def reference(x, k, prev_threshold):
    """The seed's steps 2-5 on the whole vector (small vectors, fallback)."""
    n = x.shape[0]
    a = jnp.abs(x)
    top = jnp.max(a)
    tol_k = max(1, math.floor(tolerance * k))
    # Step 2: history.
    known = prev_threshold > 0
    hit = known & (jnp.abs(compaction.count_at_least(a, prev_threshold) - k) <= tol_k)

    def search():
      return _search(a, k, top, prev_threshold, num_bins, gamma, beta, tol_k, window)[0]

    # Steps 3-4: histogram search, unless the history was accepted.
    cut = jax.lax.cond(hit, lambda: prev_threshold, search)
    # Step 5: select and trim.
    idx, passed, sent_cut = compaction.largest_above(a, cut, k, _candidates(n, k))
    return Selection(idx, passed, sent_cut, hit)

  def fast(x, k, prev_threshold):
    n = x.shape[0]
    tol_k = max(1, math.floor(tolerance * k))
    cap = max(radix.low_cut_capacity(n, k), k + tol_k)

    # Step 2: history, one packed pass; accepted within tolerance. The low cut's
    # sample sees the previous cut first: when its count there is more than Z
    # binomial sd (plus the tolerance) from k, the history is rejected without
    # counting, and the one pass packs |x| >= the low cut instead. Only a history
    # the sample could not reject but the exact count did costs a second pass.
    known = prev_threshold > 0
    s = jnp.abs(radix.sample(x, radix.sample_rate(k)))  # low_cut's sample
    mu = k * s.shape[0] / n
    seen = jnp.sum(s >= prev_threshold, dtype=jnp.int32).astype(jnp.float32)
    plausible = known & (jnp.abs(seen - mu) <= radix.Z * math.sqrt(mu) + tol_k * mu / k + 1)

    def low_cut():
      return radix.low_cut(x, k, s)[0]

    # One pass either way: at prev when the sample leaves a hit possible, else at the low cut.
    first = jax.lax.cond(plausible, lambda: prev_threshold, low_cut)
    words = radix.pack(jnp.abs(x) >= first)
    count = jnp.sum(radix.popcounts(words))
    hit = plausible & (jnp.abs(count - k) <= tol_k)
    count = jnp.where(plausible, count, -1)

    def second_pass():
      low = low_cut()
      return radix.pack(jnp.abs(x) >= low), low

    # The candidates: everything >= the accepted cut (at most k + tol_k), or
    # everything >= a sampled low cut (between k and cap, w.h.p.).
    words, floor = jax.lax.cond(plausible & ~hit, second_pass, lambda: (words, first))
    pos, n_floor = radix.compact(words, n, cap)
    keys = jnp.where(pos < n, radix.magnitude_keys(x.at[pos].get(mode="fill", fill_value=0)), -1)
    a = jnp.where(keys >= 0, radix.key_to_float(keys), 0.0)

    def search():
      # Steps 3-4 on the candidates; max|x| is the largest of them.
      return _search(a, k, jnp.max(a), prev_threshold, num_bins, gamma, beta, tol_k,
                     window, floor)

    accepted = _varying_like(jnp.bool_(True), x, prev_threshold)
    cut, exact = jax.lax.cond(hit, lambda: (prev_threshold, accepted), search)
    usable = hit | ((n_floor >= k) & (n_floor <= cap) & exact)
    passed = jnp.where(hit, count, jnp.sum(a >= cut, dtype=jnp.int32))

    def finish():
      # Step 5: the k largest of the candidates >= cut.
      # An accepted history passing at most k needs no trim: its candidates are it.
      idx = jax.lax.cond(
          hit & (count <= k), lambda: pos[:k],
          lambda: radix.take_largest(keys, pos, k, radix.float_to_key(cut), n))
      sent = jnp.abs(x.at[idx].get(mode="fill", fill_value=jnp.inf))
      sent_cut = jnp.min(sent)
      sent_cut = jnp.where(jnp.isfinite(sent_cut), sent_cut, 0.0).astype(jnp.float32)
      return Selection(idx, passed, sent_cut, hit)

    # A sample that missed, or a cut in a bin straddling the low cut: the seed's
    # search on the whole vector (exact, slower, rare).
    return jax.lax.cond(usable, finish, lambda: reference(x, k, prev_threshold))

  def select(x, k, prev_threshold, key):
    del key
    n = x.shape[0]
    if n < min_fast_n or k > n // 4 or radix.low_cut_capacity(n, k) >= n // 2:
      return reference(x, k, prev_threshold)
    return fast(x, k, prev_threshold)

  return select


# --- Pipelined HGG-TopK: hggtopk(pipeline=True) -----------------------------------
#
# Steps per group, one jitted function, no host sync, no data-dependent loop:
#   1. The carried threshold t (last step's k-th largest |acc|, exact or
#      interpolated) and slope s = -d ln(count) / d ln(threshold) around it
#      (measured by last step's pass) are corrected for the new scale on a
#      1/r sample of cache-line blocks: counts at 8 probe thresholds
#      t * exp(-o / s), o in ln(count) units, two rounds (coarse, then fine),
#      interpolated in log-log to where the sample count is k * m / n.
#   2. One pass over |acc| packs the mask |acc| >= a low edge set 3 sigma of the
#      estimate's error (plus one tolerance) below it, so that between k and `cap`
#      elements pass w.h.p.; they are compacted out with their values (the
#      candidates, ~1.1k). This step's histogram is counted on them: EDGES
#      thresholds spanning the estimate's +-3 sigma, then EDGES more between the
#      two that bracket k. Above the low edge these counts are exact counts over
#      all of |acc|; the outer ones give the next step's slope.
#   3. Path 0 (one pass): an edge passes between k - tol and k elements: the
#      candidates >= it are sent (no trim).
#      Path 1 (one pass + trim): no edge lands there (ties at the k-th value, or
#      tol = 0): the k largest candidates are kept (`radix.take_largest`), exactly k.
#      Path 2 (bounded second pass): fewer than k or more than `cap` passed the low
#      edge (or a cold start): a second pass packs |acc| >= a low cut from a larger
#      sample (`radix.low_cut`: between k and K pass, 5 sigma), and the k largest
#      of those are kept, exactly the top k. Path 3 flags the rare step where that
#      sample missed: the k largest of the first K candidates (`radix.compact`'s
#      order), or all of them when fewer than k passed.
#      One ``lax.switch`` picks the path; only the taken branch runs under jit.
#   4. The next carry: the k-th largest estimate (the cut sent on paths 1-2,
#      the log-log crossing of k between the fine edges on path 0) and the slope
#      from the outer edges' counts (geometric mean with the old one).

EDGES = 16  # thresholds per counting round on the candidates (two rounds)
# Probe offsets in ln(count) for the sample rounds, ascending threshold. The coarse
# round covers a count off by up to e^2 = 7.4x (the default training run's fc1 missed
# last step's threshold by 33% in count at the median, ~3x at the 99th percentile);
# the fine round brackets the sample's own noise around the coarse answer.
COARSE = (2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, -3.0)  # 0.0: the carried threshold itself
FINE = (0.24, 0.12, 0.06, 0.02, -0.02, -0.06, -0.12, -0.24)
DEFAULT_SLOPE = 4.0  # before any measurement (the default run's median was 3.6-8)
SLOPE_RANGE = (0.25, 64.0)
SAMPLE_HITS = 2048   # the sample holds ~this many of the k largest: rate r = k / 2048 ...
MAX_RATE = 64        # ... at most 1/64 of the blocks
SIGMA_FLOOR = 0.01   # ln(count) error of the estimate besides the sample's binomial noise


class PipelineCarry(NamedTuple):
  """What a pipelined step leaves for the next, per selection group.

  In `hggjax.CompressionState.pipeline` every field is an array over the G
  groups (float32[G] / int32[G], plus the leading device axis with an axis).
  """
  center: jax.Array  # float32[]: last step's k-th largest |acc| (exact or interpolated); 0 = none yet
  slope: jax.Array   # float32[]: -d ln(count)/d ln(threshold) near it, from the last pass; 0 = unknown
  path: jax.Array    # int32[]: how the last step selected: 0 one pass, 1 one pass + trim,
                     # 2 second pass (fallback, or cold start), 3 second pass whose
                     # sample missed (best effort); -1 = no step yet


class PipelinedSelector(NamedTuple):
  """`init(G)` -> a PipelineCarry of [G] arrays; `select(x, k, carry) -> (Selection, carry)`."""
  init: Callable[[int], PipelineCarry]
  select: Callable[[jax.Array, int, PipelineCarry], tuple[Selection, PipelineCarry]]


def sample_rate(k: int) -> int:
  """r: the pipelined sample reads one 64-byte block in r, r = 2^floor(log2(k / 2048)) in [1, 64]."""
  return int(min(MAX_RATE, max(1, 2 ** math.floor(math.log2(max(k / SAMPLE_HITS, 1))))))


def plan(n: int, k: int, tolerance: float) -> dict:
  """Static layout of one pipelined selection (Python numbers, fixed at trace time).

  tol: accepted shortfall (path 0 sends k - tol to k elements); f: one tolerance
  in ln(count) (at least one element); sigma: expected ln(count) error of the
  sample estimate; low: ln(count) offset of the packed low edge above the
  estimate's count; cap: most candidates it may pass (k * e^(low + 3 sigma));
  offsets: the first counting round's EDGES offsets, from `low` down to `-low`.
  """
  tol = math.floor(tolerance * k)
  f = max(tol, 1) / k
  rate = sample_rate(k)
  m = radix.sample_size(n, rate)
  sigma = math.sqrt(1.0 / max(k * m / n, 1.0) + SIGMA_FLOOR**2)
  low = 3.0 * sigma + f
  cap = min(n, -(-(math.ceil(k * math.exp(low + 3.0 * sigma) * 1.02) + 32) // 32) * 32)
  offsets = tuple(low * (1.0 - 2.0 * i / (EDGES - 1)) for i in range(EDGES))
  return dict(tol=tol, f=f, rate=rate, m=m, sigma=sigma, low=low, cap=cap, offsets=offsets)


def crossing(edges: jax.Array, counts: jax.Array, target, slope: jax.Array) -> jax.Array:
  """float32[]: where count(threshold) crosses `target`, interpolated in log-log.

  `edges` ascending (> 0) with non-increasing `counts`; between the two edges
  that bracket `target` the interpolation is linear in (ln edge, ln count);
  outside them it extrapolates with `slope`.
  """
  lc = jnp.log(counts.astype(jnp.float32) + 0.5)
  le = jnp.log(edges)
  lt = jnp.log(jnp.float32(target))
  last = edges.shape[0] - 1
  i = jnp.sum(lc >= lt, dtype=jnp.int32) - 1  # last edge passing at least target
  j = jnp.clip(i, 0, last - 1)
  w = (lc[j] - lt) / jnp.maximum(lc[j] - lc[j + 1], 1e-6)
  inside = le[j] + jnp.clip(w, 0.0, 1.0) * (le[j + 1] - le[j])
  lower = le[0] + (lc[0] - lt) / slope        # every edge passes fewer: go lower
  higher = le[last] + (lc[last] - lt) / slope  # every edge passes more: go higher
  return jnp.exp(jnp.where(i < 0, lower, jnp.where(i >= last, higher, inside)))


def _measured_slope(edges: jax.Array, counts: jax.Array, old: jax.Array) -> jax.Array:
  """The outer edges' log-log slope, averaged (geometrically) with `old`; `old` if uninformative."""
  lo, hi = counts[0], counts[-1]
  span = jnp.log(edges[-1]) - jnp.log(edges[0])
  meas = (jnp.log(lo + 0.5) - jnp.log(hi + 0.5)) / jnp.maximum(span, 1e-12)
  valid = (hi >= 1) & (lo > hi) & (span > 0)
  new = jnp.where(valid, jnp.sqrt(old * jnp.maximum(meas, 1e-6)), old)
  return jnp.clip(new, *SLOPE_RANGE).astype(jnp.float32)


def hgg_topk_pipelined(tolerance: float = 0.01, min_fast_n: int = radix.MIN_FAST_N) -> PipelinedSelector:
  """The pipelined HGG-TopK selector (steps above); `tolerance` as in `hggjax.hggtopk`.

  `tolerance` sets the accepted shortfall of path 0.
  """

  def init(num_groups: int) -> PipelineCarry:
    return PipelineCarry(center=jnp.zeros((num_groups,), jnp.float32),
                         slope=jnp.zeros((num_groups,), jnp.float32),
                         path=jnp.full((num_groups,), -1, jnp.int32))

  def select(x: jax.Array, k: int, carry: PipelineCarry) -> tuple[Selection, PipelineCarry]:
    n = x.shape[0]
    p = plan(n, k, tolerance)
    cap = p["cap"]
    fast = n >= min_fast_n and k <= n // 4 and cap < n // 2
    x = x.astype(jnp.float32)
    # |x| is formed inside each consumer: one shared jnp.abs(x) made XLA write it
    # out in full before the cond (an extra pass over n, measured).
    slope = jnp.where(carry.slope > 0, carry.slope, DEFAULT_SLOPE).astype(jnp.float32)

    def with_cut(idx):
      """(idx, the smallest |x| sent): zeros carry nothing and are never sent."""
      sent = jnp.abs(x.at[idx].get(mode="fill", fill_value=0.0))
      low = jnp.min(jnp.where(sent > 0, sent, jnp.inf))
      cut = jnp.where(jnp.isfinite(low), low, 0.0).astype(jnp.float32)
      return jnp.where(sent > 0, idx, n).astype(jnp.int32), cut

    def second_pass():
      """Paths 2-3: (idx, cut, passed, missed) of a sampled top-k over the whole vector.

      No full-length fallback: a ``lax.top_k`` over all n elements (radix.top_k's)
      or the whole-vector histogram (hgg_topk's), present in a branch that never
      ran, made every call 5-9 ms slower at n = 1e7 (measured).
      """
      if not fast:
        exact = with_cut(jax.lax.top_k(jnp.abs(x), k)[1].astype(jnp.int32))
        return (*exact, *_varying_like((jnp.int32(k), jnp.bool_(False)), x))
      low, cap2 = radix.low_cut(x, k)
      pos, keys, count = radix.candidates(x, low, cap2)
      idx, cut = with_cut(radix.take_largest(keys, pos, k, jnp.int32(0), n))
      return idx, cut, count, (count < k) | (count > cap2)

    def estimate():
      """Step 1: the carried threshold corrected on the sample (two probe rounds)."""
      s = jnp.abs(radix.sample(x, p["rate"]) if fast else x)
      m = s.shape[0]
      target = k * m / n
      probes = carry.center * jnp.exp(-jnp.asarray(COARSE, jnp.float32) / slope)
      counts = radix.count_many(s, probes)
      est = crossing(probes, counts, target, slope)
      probes = est * jnp.exp(-jnp.asarray(FINE, jnp.float32) / slope)
      est = crossing(probes, radix.count_many(s, probes), target, slope)
      # The carried threshold stays when the sample cannot tell it from the truth
      # (its count within 2 binomial sd of target): on a slowly changing gradient
      # it is far more precise than the sample.
      noise = math.sqrt(target * (1.0 - m / n))
      at_center = counts[COARSE.index(0.0)].astype(jnp.float32)
      return jnp.where(jnp.abs(at_center - target) <= 2.0 * noise + 0.5, carry.center, est)

    def warm():
      # Step 2: one pass packs everything >= the low edge; the candidates' counts
      # at EDGES thresholds, then EDGES more between the two around k.
      edges = estimate() * jnp.exp(-jnp.asarray(p["offsets"], jnp.float32) / slope)
      mask = jnp.abs(x) >= edges[0]
      if fast:
        pos, count = radix.compact(radix.pack(mask), n, cap)
      else:
        pos, count = compaction.first_true(mask, cap), jnp.sum(mask, dtype=jnp.int32)
      values = jnp.where(pos < n, jnp.abs(x.at[pos].get(mode="fill", fill_value=0.0)), -1.0)
      counts = radix.count_many(values, edges)
      i = jnp.sum(counts >= k, dtype=jnp.int32) - 1  # highest edge passing >= k
      below = edges[jnp.clip(i, 0, EDGES - 1)]
      above = jnp.where(i + 1 < EDGES, edges[jnp.clip(i + 1, 0, EDGES - 1)], jnp.max(values))
      fine = below * (above / below) ** jnp.linspace(0.0, 1.0, EDGES, dtype=jnp.float32)
      fine_counts = radix.count_many(values, fine)
      # Step 3: the path.
      cuts = jnp.concatenate([edges, fine])
      passing = jnp.concatenate([counts, fine_counts])
      within = (passing >= k - p["tol"]) & (passing <= k)
      j = jnp.argmax(jnp.where(within, passing, -1)).astype(jnp.int32)
      enough = (count >= k) & (count <= cap)
      path = jnp.where(enough, jnp.where(jnp.any(within), 0, 1), 2).astype(jnp.int32)
      not_missed = _varying_like(jnp.bool_(False), x)

      def one_pass():
        # Every candidate >= cuts[j] (k - tol to k of them) is sent; cuts[j] is the cut.
        return radix.place(values >= cuts[j], pos, k, n), cuts[j], passing[j], not_missed

      def trim():
        keys = jnp.where(values >= 0, radix.float_to_key(values), -1)
        return (*with_cut(radix.take_largest(keys, pos, k, jnp.int32(0), n)), count, not_missed)

      idx, cut, passed, missed = jax.lax.switch(path, (one_pass, trim, second_pass))
      path = jnp.where(missed, 3, path).astype(jnp.int32)
      # Step 4: the next carry. Paths 1-2 sent the largest (k of them on path 1),
      # so their cut is the k-th largest or next to it; path 0 interpolates it
      # between the fine edges.
      center = jnp.where(path == 0, crossing(fine, fine_counts, k, slope), cut)
      return idx, cut, passed, path, center, _measured_slope(edges, counts, slope)

    def cold():
      idx, cut, passed, missed = second_pass()
      path = jnp.where(missed, 3, 2).astype(jnp.int32)
      return idx, cut, passed, path, cut, slope

    idx, cut, passed, path, center, new_slope = jax.lax.cond(carry.center > 0, warm, cold)
    selection = Selection(idx, passed.astype(jnp.int32), cut, path <= 1)
    return selection, PipelineCarry(center.astype(jnp.float32), new_slope, path)

  return PipelinedSelector(init, select)
