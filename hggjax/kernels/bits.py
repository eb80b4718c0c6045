"""Float bit patterns as keys, and masks packed into uint32 words and counted.

For float32 a >= 0 the int32 bit pattern orders exactly like a, so magnitudes are
ranked and compared as integers (radix select, no log, no sort).

Layout of `pack`: blocks of 256 elements, 8 lanes of 32 bits. Element
i = 256 * g + 8 * b + l is bit b of word [g, l], so one step of the packing loop
compares 8 consecutive floats (one AVX2 vector) and ORs them into 8 words. XLA
vectorises this loop; packing 32 consecutive elements per word needs an inner
reduction that it does not vectorise (docs/benchmarks.md has both timings).
"""

import jax
import jax.numpy as jnp

from hggjax.kernels.scan import materialize

LANES = 8           # words per block: one AVX2 vector of uint32
BLOCK = 32 * LANES  # elements per block
# Below this many elements, counts and compaction use plain reductions and
# ``jnp.nonzero``: the packed path's fixed costs are not worth paying.
MIN_FAST_N = 1 << 16


def exp2(e: jax.Array) -> jax.Array:
  """float32 2^e for integer e in [-126, 127], built from its bits: exact, where
  XLA:CPU's ``jnp.exp2`` misses most powers of two by an ulp."""
  return jax.lax.bitcast_convert_type((e.astype(jnp.int32) + 127) << 23, jnp.float32)


def magnitude_keys(x: jax.Array) -> jax.Array:
  """int32[n]: the bits of |x|, ordered like |x| (NaN above inf)."""
  return jax.lax.bitcast_convert_type(jnp.abs(x.astype(jnp.float32)), jnp.int32)


def key_to_float(key: jax.Array) -> jax.Array:
  return jax.lax.bitcast_convert_type(key.astype(jnp.int32), jnp.float32)


def float_to_key(a: jax.Array) -> jax.Array:
  """int32: the key of a non-negative float (its bits)."""
  return jax.lax.bitcast_convert_type(jnp.maximum(a, 0.0).astype(jnp.float32), jnp.int32)


def _pack_blocks(mask: jax.Array) -> jax.Array:
  """uint32[G, LANES] of a bool[G * BLOCK]; kept 2-D: flattened inside the same
  fusion, XLA stopped vectorising the lanes."""
  blocks = mask.shape[0] // BLOCK
  shifts = jnp.arange(32, dtype=jnp.uint32)[None, :, None]
  bits = mask.reshape(blocks, 32, LANES).astype(jnp.uint32) << shifts
  return jnp.sum(bits, axis=1, dtype=jnp.uint32)


def pack(mask: jax.Array) -> jax.Array:
  """uint32[G, LANES]: `mask` (bool[L]) as bits (layout above); G = ceil(L / 256)
  rounded up to a multiple of 4 (empty blocks), so that `topk.compact`'s rows of
  32 words need no padding.

  Whole blocks are packed in one fusion and written into place, a partial last
  block on its own: padding the mask, or the words of a row, inside the packing
  fusion made XLA index every element through the pad.
  """
  length = mask.shape[0]
  full, rest = divmod(length, BLOCK)
  blocks = -(-(full + (rest > 0)) // 4) * 4
  if full == blocks:
    return _pack_blocks(mask)
  out = jnp.zeros((blocks, LANES), jnp.uint32)
  if full:
    out = jax.lax.dynamic_update_slice(out, _pack_blocks(mask[: full * BLOCK]), (0, 0))
  if rest:
    tail = _pack_blocks(jnp.pad(mask[full * BLOCK:], (0, BLOCK - rest)))
    out = jax.lax.dynamic_update_slice(out, tail, (full, 0))
  return out


def element_of(word: jax.Array, bit: jax.Array) -> jax.Array:
  """int32: the element behind `bit` of flat word index `word` of `pack`'s output."""
  return (word // LANES) * BLOCK + bit * LANES + word % LANES


def popcounts(words: jax.Array) -> jax.Array:
  return jax.lax.population_count(words).astype(jnp.int32)


def count_at_least(a: jax.Array, threshold: jax.Array,
                   min_fast_n: int = MIN_FAST_N) -> jax.Array:
  """int32[]: #(a >= threshold and a > 0), the selectors' pass rule (zeros carry nothing).

  From `min_fast_n` elements on, on the CPU, the bits of the packed mask are
  counted: the same one fused pass as ``jnp.sum(mask)``, but XLA:CPU's boolean-sum
  reductions do not vectorise and the packed count does.
  """
  mask = (a >= threshold) & (a > 0)
  if a.shape[0] < min_fast_n:
    return jnp.sum(mask, dtype=jnp.int32)
  # Off the CPU a boolean sum is already one fused parallel reduction.
  return jax.lax.platform_dependent(
      mask, cpu=lambda m: jnp.sum(popcounts(pack(m))),
      default=lambda m: jnp.sum(m, dtype=jnp.int32))


def count_many(a: jax.Array, edges: jax.Array) -> jax.Array:
  """int32[J]: #(a >= edges[j]) for each edge, in one pass over `a` (float32[L]).

  The J masks are packed together (J words per 32 elements, one reduction, so `a`
  is read once; J = 8 is 8 uint32 lanes, one AVX2 vector) and their bits counted
  by SWAR, which XLA:CPU vectorises where a boolean sum is not. Padding is -1,
  below every edge >= 0. `edges` is materialised first: left to fusion, XLA
  recomputed their arithmetic for every element.
  """
  edges = materialize(edges.astype(a.dtype))
  length = a.shape[0]
  width = -(-length // 32)
  a = jnp.pad(a, (0, 32 * width - length), constant_values=-1.0).reshape(width, 32)
  shifts = jnp.arange(32, dtype=jnp.uint32)
  mask = a[:, None, :] >= edges[None, :, None]
  words = jnp.sum(mask.astype(jnp.uint32) << shifts, axis=-1, dtype=jnp.uint32)  # [W, J]
  # Per-byte bit counts (<= 8) summed over groups of 16 rows stay <= 128 per
  # byte, then fold to one count per word: cheaper on XLA:CPU than
  # ``population_count`` + sum, and than converting before the sum.
  group = 16
  v = words - ((words >> 1) & jnp.uint32(0x55555555))
  v = (v & jnp.uint32(0x33333333)) + ((v >> 2) & jnp.uint32(0x33333333))
  v = (v + (v >> 4)) & jnp.uint32(0x0F0F0F0F)  # four byte counts <= 8
  v = jnp.pad(v, ((0, -width % group), (0, 0))).reshape(-1, group, words.shape[1])
  t = jnp.sum(v, axis=1, dtype=jnp.uint32)  # bytes <= 128
  t = (t & jnp.uint32(0x00FF00FF)) + ((t >> 8) & jnp.uint32(0x00FF00FF))
  t = (t & jnp.uint32(0xFFFF)) + (t >> 16)
  return jnp.sum(t, axis=0, dtype=jnp.uint32).astype(jnp.int32)


def count_edges_at_least(a: jax.Array, edges: jax.Array) -> jax.Array:
  """int32[J]: #(a >= edges[j] and a > 0) for every edge in one fused reduction.

  For accelerators, where a reduction with J outputs reads `a` once; XLA:CPU would
  write the [L, J] comparison out first (it uses `count_at_least` per edge instead).
  """
  a = a[:, None]
  return jnp.sum((a >= edges[None, :]) & (a > 0), axis=0, dtype=jnp.int32)
