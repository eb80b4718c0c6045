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
     |S[i] - k| <= tol_k is taken as the cut; else the cut interpolates inside the
     bin holding the k-th element: lower + width * (1 - k_remain / count) * beta.
  5. Select a >= cut, keep the k largest (trim). The transform keeps acc - sent
     as the new residual.
Only one branch of each ``lax.cond`` runs, so an accepted history costs one
counting pass instead of a histogram.
"""

import math

import jax
import jax.numpy as jnp

from hggjax import compaction
from hggjax.payload import Selection
from hggjax.selectors import Selector, _candidates


def _histogram_cut(a, k, lo, hi, num_bins, gamma, beta, tol_k):
  """(cut float32[], ok bool[]): the histogram estimate of the k-th largest a in [lo, hi].

  ok is False when the range cannot hold the k-th element (more than k above hi,
  or fewer than k above lo).
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

  # A bin edge close enough to k is an exact cut: no interpolation error.
  gap = jnp.abs(suffix - k)
  best_edge = jnp.argmin(gap)
  # Else the k-th element lies in bin i: S[i] >= k > S[i + 1].
  i = jnp.clip(jnp.sum(suffix[:num_bins] >= k) - 1, 0, num_bins - 1)
  k_remain = (k - suffix[i + 1]).astype(jnp.float32)
  in_bin = jnp.maximum(hist[i], 1).astype(jnp.float32)
  lower, upper = edge(i), edge(i + 1)
  interpolated = lower + (upper - lower) * (1.0 - k_remain / in_bin) * beta
  cut = jnp.where(gap[best_edge] <= tol_k, edge(best_edge), interpolated)
  return jnp.maximum(cut, lo).astype(jnp.float32), ok


def hgg_topk(
    num_bins: int = 1024,
    gamma: float = 1000.0,
    tolerance: float = 0.01,
    beta: float = 0.98,
    window: float = 0.05,
) -> Selector:
  """The HGG-TopK selector; arguments as in `hggjax.hggtopk`."""

  def select(x, k, prev_threshold, key):
    del key
    n = x.shape[0]
    a = jnp.abs(x)
    top = jnp.max(a)
    tol_k = max(1, math.floor(tolerance * k))

    def full_search():
      cut, _ = _histogram_cut(a, k, jnp.float32(0), top, num_bins, gamma, beta, tol_k)
      return cut

    def window_search():
      u_prev, u_top = jnp.log1p(gamma * prev_threshold), jnp.log1p(gamma * top)
      lo = jnp.expm1(jnp.maximum(u_prev - window * u_top, 0.0)) / gamma
      hi = jnp.expm1(jnp.minimum(u_prev + window * u_top, u_top)) / gamma
      cut, ok = _histogram_cut(a, k, lo, hi, num_bins, gamma, beta, tol_k)
      return jax.lax.cond(ok, lambda: cut, full_search)

    def search():
      return jax.lax.cond(prev_threshold > 0, window_search, full_search)

    known = prev_threshold > 0
    hit = known & (jnp.abs(compaction.count_at_least(a, prev_threshold) - k) <= tol_k)
    cut = jax.lax.cond(hit, lambda: prev_threshold, search)
    idx, passed, sent_cut = compaction.largest_above(a, cut, k, _candidates(n, k))
    return Selection(idx, passed, sent_cut, hit)

  return select
