"""Selection kernels: a flat vector in, k positions out. No collectives here.

Each factory returns ``select(x, k, prev_threshold, key) -> Selection`` where
``x`` is float32[n] (the error-compensated gradient), ``k`` a Python int
(capacity C = k), ``prev_threshold`` float32[] (this group's threshold from the
previous step) and ``key`` a PRNG key that differs per device and per step.
A selection reports as its threshold the cut in effect: the smallest magnitude
it sends (0 for random selection). All loops are Python loops over a fixed
number of steps, unrolled at trace time: no data-dependent ``while_loop``, no
host sync.
"""

from collections.abc import Callable
import math
from statistics import NormalDist

import jax
import jax.numpy as jnp

from hggjax import compaction, radix
from hggjax.payload import Selection

Selector = Callable[[jax.Array, int, jax.Array, jax.Array], Selection]

# Threshold methods may let a few more than k through; the k largest of up to
# this many candidates are kept (see compaction.largest_above).
CANDIDATE_FACTOR = 2


def _candidates(n: int, k: int, factor: int = CANDIDATE_FACTOR) -> int:
  return min(n, factor * k)


def _no_history() -> jax.Array:
  return jnp.zeros((), bool)


def exact_topk(min_fast_n: int = radix.MIN_FAST_N) -> Selector:
  """The exact k largest |x| (Aji & Heafield 2017).

  From `min_fast_n` elements on, `radix.top_k` (sample, packed-mask compaction,
  radix select; exact, with a ``lax.top_k`` fallback) instead of ``lax.top_k``,
  which XLA CPU runs as a single-threaded partial sort (measured 10-30x slower
  at n = 1e7, docs/benchmarks.md).
  """

  def select(x, k, prev_threshold, key):
    del prev_threshold, key
    idx = radix.top_k(x, k, min_fast_n)
    sent = jnp.abs(x.at[idx].get(mode="fill", fill_value=jnp.inf))
    return Selection(idx, jnp.int32(k), jnp.min(sent), _no_history())

  return select


def strided_sample(key: jax.Array, n: int, m: int) -> jax.Array:
  """int32[m] distinct positions in [0, n), each included with probability m/n.

  Stratified: m windows of width s = n // m starting at a random rotation, one
  uniform pick per window. O(m) instead of the O(n log n) of a permutation;
  positions are not independent of each other (one per window).
  """
  s = n // m
  k_off, k_rot = jax.random.split(key)
  offsets = jax.random.randint(k_off, (m,), 0, s, dtype=jnp.int32)
  rotation = jax.random.randint(k_rot, (), 0, n, dtype=jnp.int32)
  idx = jnp.arange(m, dtype=jnp.int32) * s + offsets + rotation
  return jnp.where(idx >= n, idx - n, idx)


def random_k() -> Selector:
  """k positions drawn uniformly (each with probability k/n, no duplicates)."""

  def select(x, k, prev_threshold, key):
    del prev_threshold
    idx = strided_sample(key, x.shape[0], k)
    return Selection(idx, jnp.int32(k), jnp.float32(0), _no_history())

  return select


def _adjust(a, threshold, k, steps, low, high, down, up):
  """`steps` count-and-adjust rounds: scale the threshold while the count is outside [low*k, high*k]."""
  for _ in range(steps):
    c = compaction.count_at_least(a, threshold)
    factor = jnp.where(c < low * k, down, jnp.where(c > high * k, up, 1.0))
    threshold = threshold * factor
  return threshold


def gaussian(refine_steps: int = 3) -> Selector:
  """Gaussian-k (Shi et al. 2019).

  Treats x as N(mean, std): the cut that leaves a share `k/n` in both tails is
  |mean| + std * z with z = Phi^-1(1 - k/(2n)). Then `refine_steps` rounds of the
  paper's correction: halve the cut below 2k/3 passing, x1.5 above 4k/3.
  """

  def select(x, k, prev_threshold, key):
    del prev_threshold, key
    n = x.shape[0]
    a = jnp.abs(x)
    z = NormalDist().inv_cdf(max(1.0 - k / (2.0 * n), 0.5))
    threshold = jnp.abs(jnp.mean(x)) + jnp.std(x) * z
    threshold = _adjust(a, threshold, k, refine_steps, 2 / 3, 4 / 3, 0.5, 1.5)
    idx, passed, cut = compaction.largest_above(a, threshold, k, _candidates(n, k))
    return Selection(idx, passed, cut, _no_history())

  return select


def dgc_sampling(
    sample_ratio: float = 0.01, min_sample: int = 1024, refine_steps: int = 2
) -> Selector:
  """DGC (Lin et al. 2018): threshold from the top of a random sample.

  The sample holds max(min_sample, ceil(sample_ratio * n)) positions (all of x
  when n is smaller); the threshold is the ceil(k * m / n)-th largest sampled
  magnitude. `refine_steps` rounds then scale it by 1.3 above 1.3k passing and by
  0.7 below 0.7k (0 disables the refinement).
  """

  def select(x, k, prev_threshold, key):
    del prev_threshold
    n = x.shape[0]
    a = jnp.abs(x)
    m = min(n, max(min_sample, math.ceil(sample_ratio * n)))
    sample = a if m == n else a[strided_sample(key, n, m)]
    k_sample = max(1, math.ceil(k * m / n))
    threshold = jnp.min(jax.lax.top_k(sample, k_sample)[0])
    threshold = _adjust(a, threshold, k, refine_steps, 0.7, 1.3, 0.7, 1.3)
    idx, passed, cut = compaction.largest_above(a, threshold, k, _candidates(n, k))
    return Selection(idx, passed, cut, _no_history())

  return select


def redsync(search_steps: int = 12) -> Selector:
  """RedSync's threshold binary search (Fang et al. 2019).

  The cut moves between mean(|x|) and max(|x|): t(r) = mean + r * (max - mean).
  `search_steps` bisection rounds on r keep the lowest r found with at least k
  passing, so the cut ends within (max - mean) / 2**steps above the k-th
  magnitude; the k largest of those are sent.
  """

  def select(x, k, prev_threshold, key):
    del prev_threshold, key
    n = x.shape[0]
    a = jnp.abs(x)
    mean, top = jnp.mean(a), jnp.max(a)
    lo, hi = jnp.float32(0), jnp.float32(1)
    for _ in range(search_steps):
      mid = 0.5 * (lo + hi)
      enough = compaction.count_at_least(a, mean + mid * (top - mean)) >= k
      lo, hi = jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)
    threshold = mean + lo * (top - mean)
    idx, passed, cut = compaction.largest_above(a, threshold, k, _candidates(n, k))
    return Selection(idx, passed, cut, _no_history())

  return select


def redsync_trim(trim_steps: int = 10) -> Selector:
  """RedSync's trimmed top-k (Fang et al. 2019).

  Lower the cut from max(|x|) towards mean(|x|) in `trim_steps` equal steps,
  t_j = max - j/steps * (max - mean), and keep the first (highest) cut with at
  least k passing: that trims away most of x. Then take the exact top-k of the
  survivors (up to 4k of them are considered).
  """

  def select(x, k, prev_threshold, key):
    del prev_threshold, key
    n = x.shape[0]
    a = jnp.abs(x)
    mean, top = jnp.mean(a), jnp.max(a)
    fractions = jnp.arange(1, trim_steps + 1, dtype=jnp.float32) / trim_steps
    cuts = top - fractions * (top - mean)
    counts = jnp.stack([compaction.count_at_least(a, cuts[j]) for j in range(trim_steps)])
    first_enough = jnp.argmax(counts >= k)
    threshold = jnp.where(jnp.any(counts >= k), cuts[first_enough], mean)
    idx, passed, cut = compaction.largest_above(
        a, threshold, k, _candidates(n, k, factor=4))
    return Selection(idx, passed, cut, _no_history())

  return select
