"""RedSync's threshold selections (Fang et al., 2019): binary search, and trimmed top-k.

Counts and the compaction take the packed path from `min_fast_n` elements on, on
the CPU; on accelerators the counts of a search or a trim are fused passes of many
cuts at once (the same answers).

References:
  Fang, Fu, Yang & Hsieh, `RedSync: Reducing Synchronization Traffic for
  Distributed Deep Learning <https://arxiv.org/abs/1808.04357>`_, JPDC 2019
"""

import jax
import jax.numpy as jnp

from hggjax.kernels.bits import MIN_FAST_N, count_at_least, count_edges_at_least
from hggjax.kernels.topk import largest_above
from hggjax.payload import Selection
from hggjax.selectors.base import (Selector, candidate_capacity, no_history,
                                   power_of_two_scale, stateless)


def _mean(a: jax.Array, top: jax.Array) -> jax.Array:
  """mean(a) for a >= 0, scaled by a power of two so that the float32 sum cannot
  overflow (the same bits as ``jnp.mean(a)`` wherever that one does not)."""
  scale = power_of_two_scale(top)
  return jnp.mean(a * scale) / scale


def _bisect(a, k, mean, top, steps, min_fast_n):
  """The largest r on the 2^-steps grid (below 1) with k passing t(r), by bisection:
  one counting pass per step (the CPU's packed count)."""
  lo, hi = jnp.float32(0), jnp.float32(1)
  for _ in range(steps):
    mid = 0.5 * (lo + hi)
    enough = count_at_least(a, mean + mid * (top - mean), min_fast_n) >= k
    lo, hi = jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)
  return lo


GRID_BITS = 6  # r's bits resolved per counting pass on accelerators (64 cuts)


def _grid(a, k, mean, top, steps):
  """`_bisect`'s answer from ceil(steps / GRID_BITS) fused passes of 2^GRID_BITS cuts:
  the count is monotone in r, so the largest grid point with k passing is the same."""
  lo, done = jnp.float32(0), 0
  while done < steps:
    width = min(GRID_BITS, steps - done)
    done += width
    r = lo + jnp.arange(1 << width, dtype=jnp.float32) * (2.0 ** -done)
    counts = count_edges_at_least(a, mean + r * (top - mean))
    lo = jnp.max(jnp.where(counts >= k, r, lo))
  return lo


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
    if n < min_fast_n:
      lo = _bisect(a, k, mean, top, search_steps, min_fast_n)
    else:
      lo = jax.lax.platform_dependent(
          a, mean, top, cpu=lambda a, m, t: _bisect(a, k, m, t, search_steps, min_fast_n),
          default=lambda a, m, t: _grid(a, k, m, t, search_steps))
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
    if n < min_fast_n:
      counts = jnp.stack([count_at_least(a, cuts[j], min_fast_n) for j in range(trim_steps)])
    else:  # on accelerators every cut in one fused counting pass
      counts = jax.lax.platform_dependent(
          a, cuts, cpu=lambda a, c: jnp.stack([count_at_least(a, c[j], min_fast_n)
                                               for j in range(trim_steps)]),
          default=count_edges_at_least)
    first_enough = jnp.argmax(counts >= k)
    threshold = jnp.where(jnp.any(counts >= k), cuts[first_enough], mean)
    idx, passed, cut = largest_above(a, threshold, k, candidate_capacity(n, k, factor=4),
                                     min_fast_n, at_least=k)
    return Selection(idx, passed, cut, no_history())

  return stateless(select)
