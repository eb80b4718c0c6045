"""RedSync's threshold selections (Fang et al., 2019): binary search, and trimmed top-k.

Counts and the compaction take the packed path from `min_fast_n` elements on.

References:
  Fang, Fu, Yang & Hsieh, `RedSync: Reducing Synchronization Traffic for
  Distributed Deep Learning <https://arxiv.org/abs/1808.04357>`_, JPDC 2019
"""

import jax
import jax.numpy as jnp

from hggjax.kernels.bits import MIN_FAST_N, count_at_least
from hggjax.kernels.topk import largest_above
from hggjax.payload import Selection
from hggjax.selectors.base import (Selector, candidate_capacity, no_history,
                                   power_of_two_scale, stateless)


def _mean(a: jax.Array, top: jax.Array) -> jax.Array:
  """mean(a) for a >= 0, scaled by a power of two so that the float32 sum cannot
  overflow (the same bits as ``jnp.mean(a)`` wherever that one does not)."""
  scale = power_of_two_scale(top)
  return jnp.mean(a * scale) / scale


def redsync(search_steps: int = 12, min_fast_n: int = MIN_FAST_N) -> Selector:
  """RedSync's threshold binary search.

  The cut moves between mean(|x|) and max(|x|): t(r) = mean + r * (max - mean).
  `search_steps` bisection rounds on r keep the lowest r found with at least k
  passing, so the cut ends within (max - mean) / 2**steps above the k-th
  magnitude; the k largest of those are sent.
  """

  def select(x, k, key):
    del key
    n = x.shape[0]
    a = jnp.abs(x)
    top = jnp.max(a)
    mean = _mean(a, top)
    lo, hi = jnp.float32(0), jnp.float32(1)
    for _ in range(search_steps):
      mid = 0.5 * (lo + hi)
      enough = count_at_least(a, mean + mid * (top - mean), min_fast_n) >= k
      lo, hi = jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)
    threshold = mean + lo * (top - mean)
    idx, passed, cut = largest_above(a, threshold, k, candidate_capacity(n, k), min_fast_n)
    return Selection(idx, passed, cut, no_history())

  return stateless(select)


def redsync_trim(trim_steps: int = 10, min_fast_n: int = MIN_FAST_N) -> Selector:
  """RedSync's trimmed top-k.

  Lower the cut from max(|x|) towards mean(|x|) in `trim_steps` equal steps,
  t_j = max - j/steps * (max - mean), and keep the first (highest) cut with at
  least k passing: that trims away most of x. Then take the exact top-k of the
  survivors. When more than 4k survive (ties, coarse steps) or even the mean
  passes fewer than k, the exact top-k of the whole vector is taken instead: the
  k largest are always sent.
  """

  def select(x, k, key):
    del key
    n = x.shape[0]
    a = jnp.abs(x)
    top = jnp.max(a)
    mean = _mean(a, top)
    fractions = jnp.arange(1, trim_steps + 1, dtype=jnp.float32) / trim_steps
    cuts = top - fractions * (top - mean)
    counts = jnp.stack([count_at_least(a, cuts[j], min_fast_n) for j in range(trim_steps)])
    first_enough = jnp.argmax(counts >= k)
    threshold = jnp.where(jnp.any(counts >= k), cuts[first_enough], mean)
    idx, passed, cut = largest_above(a, threshold, k, candidate_capacity(n, k, factor=4),
                                     min_fast_n, at_least=k)
    return Selection(idx, passed, cut, no_history())

  return stateless(select)
