"""HGG-TopK: a history-guided, log-domain histogram threshold search.

Steps per selection group, all inside one jitted function:
  1. a = |acc| (acc = gradient + residual, formed by the transform).
  2. History: count a >= the previous step's cut (the carry). Accept that cut
     when the count is within tol_k = max(1, floor(tolerance * k)) of k (and not 0).
  3. Otherwise search a histogram. Bins are uniform in u = log1p(gamma * a):
     bin(a) = floor(B * (u(a) - u(lo)) / (u(hi) - u(lo))). With a previous cut the
     range [lo, hi] is a window of +-`window` of the full log range around it (B
     finer bins where the answer probably is); the full range [0, max|a|] is
     searched when the window misses k or on a cold start.
  4. Suffix sums S[i] = #(a in bins >= i) + #(a > hi). A bin edge with
     k <= S[i] <= k + tol_k is taken as the cut; else the cut interpolates inside the
     bin holding the k-th element: lower + width * (1 - k_remain / count) * beta.
  5. Select a >= cut, keep the k largest (trim). When the cut passes fewer than
     max(1, k - tol_k) (ties, or one bin holding most of the vector: the histogram cannot
     resolve it), the exact k largest are sent instead, so a selection never falls
     short of its tolerance. The transform keeps acc - sent as the new residual;
     the smallest magnitude sent is the next step's carry.
Only one branch of each ``lax.cond`` runs, so an accepted history costs one
counting pass instead of a histogram.

How it is made fast without changing the answer (vectors on the fast path,
`kernels.topk.fast_path`; the one exception is the sample's rejection of a
history, below):
  * Step 2 packs the mask a >= prev into bits in one pass (`bits.pack`); the
    popcount is the count, and on acceptance the same words are compacted into
    k + tol_k candidates (`topk.compact`), so an accepted history is one pass
    over a plus work on n/32 words (and no trim when at most k passed). When
    the sample drawn for step 3 already puts the count at prev more than Z
    binomial sd (plus tol_k) from k, the history is rejected on the sample (the
    exact count would reject it too unless the sample is off by Z sd) and the
    one pass packs the low cut's mask instead: only a history that the sample
    could not reject but the count did costs a second pass.
  * Steps 3-4 histogram only the candidates: a low cut from a sample of a
    (`sampling.low_cut`) lets between k and K elements through w.h.p.; those K
    are compacted out, and the log1p histogram is built over them alone. For
    every bin whose lower edge is >= the low cut, S[i] over the candidates equals
    S[i] over all of a, and the bin holding the k-th element always has an exact
    upper suffix (S[i + 1] < k). The search therefore gives the whole-vector cut
    unless that bin straddles the low cut (its count would be partial): then the
    exact top-k of the candidates is sent (they hold it). When the count misses
    [k, K] (the sample missed, rare) a ``lax.cond`` takes ``lax.top_k`` of the
    whole vector. max|a| is the largest candidate, so no separate max pass is needed.
  * Step 5 trims among the candidates with an exact radix select (`topk.take_largest`).
log1p is evaluated on K ~ 1.4k candidates only, never per element of a, and in
a form that cannot overflow (gamma * |a| can exceed float32 for |a| > 3.4e38 / gamma).

That is the CPU's path. On accelerators (``lax.platform_dependent``) the previous
cut centres a fixed number of branch-free counting passes instead
(`on_accelerator`, `hggjax.kernels.counting`), which send the exact top-k.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from hggjax.kernels import bits, counting, sampling
from hggjax.kernels import topk as topk_kernels
from hggjax.kernels.bits import MIN_FAST_N
from hggjax.payload import Selection
from hggjax.selectors.base import Selector, candidate_capacity, varying_like


class History(NamedTuple):
  """HGG-TopK's carry: what the previous step sent, per selection group."""
  cut: jax.Array  # float32[G]: smallest magnitude sent last step; 0 = no step yet


# Above this, log1p(y) equals log(y) to float32 precision, and gamma * a may overflow.
_LOG_BIG = 1e30


def _to_log(a, gamma):
  """u = log1p(gamma * a), without overflow for any finite a >= 0."""
  big = a * (gamma / _LOG_BIG) > 1.0
  safe = jnp.where(big, 1.0, a)
  return jnp.where(big, math.log(gamma) + jnp.log(safe), jnp.log1p(gamma * safe))


def _from_log(u, gamma):
  """a with u = log1p(gamma * a): the inverse of `_to_log` (inf only beyond float32)."""
  big = u > math.log(_LOG_BIG)
  return jnp.where(big, jnp.exp(jnp.where(big, u, 0.0) - math.log(gamma)),
                   jnp.expm1(jnp.where(big, 0.0, u)) / gamma)


def _histogram_cut(a, k, lo, hi, num_bins, gamma, beta, tol_k, floor=None):
  """(cut float32[], ok bool[], exact bool[]): the histogram estimate of the k-th largest a.

  Bins are uniform in log1p(gamma * a) over [lo, hi]. ok is False when the range
  cannot hold the k-th element (more than k above hi, or fewer than k above lo).

  `a` may hold only the elements >= `floor` of the vector (padding = 0, never
  counted): suffix sums at edges >= floor are then exact, and exact says whether
  the cut only used those (else the caller must redo the search on everything).
  """
  u_lo, u_hi = _to_log(lo, gamma), _to_log(hi, gamma)
  span = jnp.maximum(u_hi - u_lo, jnp.finfo(jnp.float32).tiny)
  b = jnp.floor((_to_log(a, gamma) - u_lo) * (num_bins / span)).astype(jnp.int32)
  b = jnp.clip(b, 0, num_bins - 1)
  # Slot num_bins counts "above hi"; slot num_bins + 1 is out of range (dropped):
  # below lo, or zero (zeros are never sent).
  b = jnp.where(a > hi, num_bins, jnp.where((a < lo) | (a <= 0), num_bins + 1, b))
  hist = jnp.zeros(num_bins + 1, jnp.int32).at[b].add(1, mode="drop")
  suffix = jnp.cumsum(hist[::-1])[::-1]  # suffix[i] = S[i]; suffix[num_bins] = #above
  ok = (suffix[num_bins] < k) & (suffix[0] >= k)

  def edge(i):
    return _from_log(u_lo + i.astype(jnp.float32) * (span / num_bins), gamma)

  # A bin edge passing k to k + tol_k is an exact cut: no interpolation error, and
  # the trim sends exactly the k largest. Edges below k are not taken: the
  # interpolation below, lowered by beta, covers those cases with at least k passing.
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
    u_prev, u_top = _to_log(prev_threshold, gamma), _to_log(top, gamma)
    lo = _from_log(jnp.maximum(u_prev - window * u_top, 0.0), gamma)
    hi = _from_log(jnp.minimum(u_prev + window * u_top, u_top), gamma)
    cut, ok, exact = _histogram_cut(a, k, lo, hi, num_bins, gamma, beta, tol_k, floor)
    return jax.lax.cond(ok, lambda: (cut, exact), full_search)

  return jax.lax.cond(prev_threshold > 0, window_search, full_search)


def on_accelerator(x: jax.Array, k: int, prev_threshold: jax.Array) -> Selection:
  """HGG-TopK off the CPU: the previous cut centres the first of a fixed number of
  counting passes (`kernels.counting`), which then send the exact top-k; the
  history counts as used when the k-th largest fell inside its window. No
  ``lax.cond``, so no device-to-host round trip."""
  idx, candidates, guided = counting.top_k(x, k, hint=prev_threshold)
  return Selection(idx, candidates, topk_kernels.smallest_sent(x, idx), guided)


def hgg_topk(
    num_bins: int = 1024,
    gamma: float = 1000.0,
    tolerance: float = 0.01,
    beta: float = 0.98,
    window: float = 0.05,
    min_fast_n: int = MIN_FAST_N,
) -> Selector:
  """The HGG-TopK selector; arguments as in `hggjax.hggtopk`.

  `window` is the half-width of the history window as a share of the log range;
  vectors off the fast path always take the whole-vector path (the steps above),
  the others the candidate path described above.
  """

  def init(num_groups: int) -> History:
    return History(cut=jnp.zeros((num_groups,), jnp.float32))

  def whole_vector(x, k, prev_threshold):
    """Steps 2-5 on the whole vector (short vectors, and the fast path's fallback)."""
    n = x.shape[0]
    a = jnp.abs(x)
    top = jnp.max(a)
    tol_k = max(1, math.floor(tolerance * k))
    # Step 2: history.
    known = prev_threshold > 0
    count = bits.count_at_least(a, prev_threshold)
    hit = known & (jnp.abs(count - k) <= tol_k) & (count >= 1)

    def search():
      return _search(a, k, top, prev_threshold, num_bins, gamma, beta, tol_k, window)[0]

    # Steps 3-4: histogram search, unless the history was accepted.
    cut = jax.lax.cond(hit, lambda: prev_threshold, search)
    # Step 5: select and trim. A cut that passes fewer than k - tol_k (the histogram
    # cannot resolve ties or a bin holding most of the vector) or more than the
    # candidates kept gives way to the exact top-k.
    idx, passed, sent_cut = topk_kernels.largest_above(
        a, cut, k, candidate_capacity(n, k), at_least=max(1, k - tol_k))
    return Selection(idx, passed, sent_cut, hit)

  def fast(x, k, prev_threshold):
    n = x.shape[0]
    tol_k = max(1, math.floor(tolerance * k))
    cap = max(sampling.low_cut_capacity(n, k), k + tol_k)

    # Step 2: history, one packed pass; accepted within tolerance. The low cut's
    # sample sees the previous cut first: when its count there is more than Z
    # binomial sd (plus the tolerance) from k, the history is rejected without
    # counting, and the one pass packs |x| >= the low cut instead. Only a history
    # the sample could not reject but the exact count did costs a second pass.
    known = prev_threshold > 0
    s = jnp.abs(sampling.blocked_sample(x, sampling.low_cut_rate(k)))  # low_cut's sample
    mu = k * s.shape[0] / n
    seen = jnp.sum(s >= prev_threshold, dtype=jnp.int32).astype(jnp.float32)
    plausible = known & (jnp.abs(seen - mu) <= sampling.Z * math.sqrt(mu) + tol_k * mu / k + 1)

    def low_cut():
      return sampling.low_cut(x, k, s)[0]

    # One pass either way: at prev when the sample leaves a hit possible, else at the low cut.
    first = jax.lax.cond(plausible, lambda: prev_threshold, low_cut)
    words = bits.pack(jnp.abs(x) >= first)
    count = jnp.sum(bits.popcounts(words))
    hit = plausible & (jnp.abs(count - k) <= tol_k) & (count >= 1)
    count = jnp.where(plausible, count, -1)

    def second_pass():
      low = low_cut()
      return bits.pack(jnp.abs(x) >= low), low

    # The candidates: everything >= the accepted cut (at most k + tol_k), or
    # everything >= a sampled low cut (between k and cap, w.h.p.).
    words, floor = jax.lax.cond(plausible & ~hit, second_pass, lambda: (words, first))
    pos, n_floor = topk_kernels.compact(words, n, cap)
    keys = jnp.where(pos < n, bits.magnitude_keys(x.at[pos].get(mode="fill", fill_value=0)), -1)
    a = jnp.where(keys >= 0, bits.key_to_float(keys), 0.0)

    def search():
      # Steps 3-4 on the candidates; max|x| is the largest of them.
      return _search(a, k, jnp.max(a), prev_threshold, num_bins, gamma, beta, tol_k,
                     window, floor)

    accepted = varying_like(jnp.bool_(True), x, prev_threshold)
    cut, exact = jax.lax.cond(hit, lambda: (prev_threshold, accepted), search)
    # Between k and cap candidates (the sample did not miss): they hold the exact top-k.
    enough = (n_floor >= k) & (n_floor <= cap)
    passed = jnp.where(hit, count, jnp.sum(a >= cut, dtype=jnp.int32))
    # The cut is used when the histogram resolved it (its bin counted in full) and it
    # passes at least max(1, k - tol_k); otherwise (a bin straddling the low cut, ties,
    # one bin holding most candidates) every candidate competes: the exact top-k.
    use_cut = hit | (exact & (passed >= max(1, k - tol_k)))
    passed = jnp.where(use_cut, passed, n_floor)

    def finish():
      # Step 5: the k largest of the candidates >= cut (or of all candidates).
      # An accepted history passing at most k needs no trim: its candidates are it.
      floor_key = jnp.where(use_cut, bits.float_to_key(cut), 0)
      idx = jax.lax.cond(
          hit & (count <= k), lambda: pos[:k],
          lambda: topk_kernels.take_largest(keys, pos, k, floor_key, n))
      return Selection(idx, passed, topk_kernels.smallest_sent(x, idx), hit)

    def exact_top_k():
      # The sample missed (rare): the exact k largest of the whole vector.
      idx = jax.lax.top_k(jnp.abs(x), k)[1].astype(jnp.int32)
      return Selection(idx, varying_like(jnp.int32(k), x), topk_kernels.smallest_sent(x, idx),
                       varying_like(jnp.bool_(False), x))

    return jax.lax.cond(hit | enough, finish, exact_top_k)

  def on_cpu(x, prev_threshold, k):
    n = x.shape[0]
    if topk_kernels.fast_path(n, k, sampling.low_cut_capacity(n, k), min_fast_n):
      return fast(x, k, prev_threshold)
    return whole_vector(x, k, prev_threshold)

  def select(x, k, carry: History, key):
    del key
    selection = jax.lax.platform_dependent(
        x, carry.cut, cpu=lambda x, prev: on_cpu(x, prev, k),
        default=lambda x, prev: on_accelerator(x, k, prev))
    return selection, History(cut=selection.threshold)

  return Selector(init, select)
