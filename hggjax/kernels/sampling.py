"""Samples of a vector, and the low cut a sample gives with binomial margins.

Two samplers: `strided_sample` draws positions (one per window, for random-k and
DGC's sample), `blocked_sample` reads whole 64-byte cache lines (for threshold
estimates, where reading m/n of the memory matters more than independence).
Both read a share 1/r of the vector, r from the one rule `sample_rate`.
"""

import math

import jax
import jax.numpy as jnp

# Standard deviations of margin in the sample bounds; a miss costs speed, not exactness.
Z = 5.0
LINE = 16  # float32 elements per 64-byte cache line


def sample_rate(k: int, hits: int, max_rate: int) -> int:
  """r: read one block in r so that about `hits` of the k largest land in the sample.

  r = 2^floor(log2(k / hits)), clipped to [1, max_rate]: a power of two keeps the
  sample's shape simple, and `max_rate` bounds how sparse a sample may get.
  """
  return int(min(max_rate, max(1, 2 ** math.floor(math.log2(max(k / hits, 1))))))


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
  idx = jnp.arange(m, dtype=jnp.int32) * s + offsets  # < n
  # idx + rotation wraps around n; written so that no sum reaches 2n (int32 for n > 2**30).
  return jnp.where(idx >= n - rotation, idx - (n - rotation), idx + rotation)


def blocked_sample(a: jax.Array, rate: int) -> jax.Array:
  """float32[m * 16]: one 16-element (64-byte) block of `a` out of every `rate` blocks.

  The block taken in each group of `rate` varies by a fixed hash, so data with a
  period (channels) is not sampled at one phase only. Reads m/n of the cache lines.
  """
  n = a.shape[0]
  if rate == 1:
    return a
  groups = n // (LINE * rate)
  blocks = a[: groups * LINE * rate].reshape(groups * rate, LINE)
  g = jnp.arange(groups, dtype=jnp.uint32)
  phase = ((g * jnp.uint32(2654435761)) >> 16) % jnp.uint32(rate)
  rows = g.astype(jnp.int32) * rate + phase.astype(jnp.int32)
  return blocks[rows].reshape(-1)


def blocked_sample_size(n: int, rate: int) -> int:
  """Elements `blocked_sample(a, rate)` returns for a of n elements (a Python int)."""
  return n if rate == 1 else (n // (LINE * rate)) * LINE


def sample_bounds(n: int, m: int, k: int, z: float = Z) -> tuple[int, int]:
  """(j, K): take the j-th largest of an m-sample as the low cut; at most K pass.

  With p = m / n, the j-th sampled value has >= k elements above it unless the
  sample holds >= j of the top k (Poisson mean p*k, margin z sigma), and at most K
  above it unless it holds < j of the top K.
  """
  mu = k * m / n
  j = min(m, math.ceil(mu + z * math.sqrt(mu) + 1))
  y = (z + math.sqrt(z * z + 4 * j)) / 2
  cap = math.ceil(y * y * n / m) + 32
  return j, min(n, -(-cap // 32) * 32)


# The low cut's sample holds about this many of the k largest, reading at most
# one cache line in LOW_CUT_MAX_RATE.
LOW_CUT_HITS = 64
LOW_CUT_MAX_RATE = 128


def low_cut_rate(k: int) -> int:
  return sample_rate(k, LOW_CUT_HITS, LOW_CUT_MAX_RATE)


def low_cut_capacity(n: int, k: int) -> int:
  """K of `low_cut(x, k)` for x of n elements (a Python int, known at trace time)."""
  return sample_bounds(n, blocked_sample_size(n, low_cut_rate(k)), k)[1]


def low_cut(x: jax.Array, k: int, s: jax.Array | None = None) -> tuple[jax.Array, int]:
  """(low float32[] > 0, capacity K): between k and K of |x| are >= low, w.h.p.

  `s`: ``|blocked_sample(x, low_cut_rate(k))|`` when the caller has drawn it already.
  """
  n = x.shape[0]
  s = jnp.abs(blocked_sample(x, low_cut_rate(k))) if s is None else s
  j, cap = sample_bounds(n, s.shape[0], k)
  # top_k on float32 (on int32 keys XLA:CPU is far slower), read with min: indexing
  # the last element makes XLA fall back to a full sort.
  low = jnp.min(jax.lax.top_k(s, j)[0])
  return jnp.maximum(low, jnp.finfo(jnp.float32).tiny), cap  # zeros never pass
