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

How it is made fast without changing the answer (vectors of >= `min_fast_n`):
  * Step 2 packs the mask a >= prev into bits in one pass (`radix.pack`); the
    popcount is the count, and on acceptance the same words are compacted into
    k + tol_k candidates (`radix.compact`), so an accepted history is one pass
    over a plus work on n/32 words.
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

    # Step 2: history, one packed pass; accepted within tolerance.
    known = prev_threshold > 0

    def count_prev():
      words = radix.pack(jnp.abs(x) >= prev_threshold)
      return words, jnp.sum(radix.popcounts(words))

    def cold():
      return _varying_like((jnp.zeros(-(-n // 32), jnp.uint32), jnp.int32(-1)), x, prev_threshold)

    words, count = jax.lax.cond(known, count_prev, cold)
    hit = known & (jnp.abs(count - k) <= tol_k)

    def sample_low_cut():
      low, _ = radix.low_cut(x, k)
      return radix.pack(jnp.abs(x) >= low), low

    # The candidates: everything >= the accepted cut (at most k + tol_k), or
    # everything >= a sampled low cut (between k and cap, w.h.p.).
    words, floor = jax.lax.cond(hit, lambda: (words, prev_threshold), sample_low_cut)
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
      idx = radix.take_largest(keys, pos, k, radix.float_to_key(cut), n)
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
