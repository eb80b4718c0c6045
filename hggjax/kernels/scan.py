"""Exact prefix sums of int32 counts, and a way to keep XLA:CPU from recomputing a value."""

import jax
import jax.numpy as jnp


def cumsum(v: jax.Array, max_entry: int = 2**31 - 1) -> jax.Array:
  """Inclusive prefix sum of a 1-D int32 array of non-negative counts (total < 2**31).

  Blocked: each row of 32 is summed by a matmul with a triangular matrix of
  ones, and the row totals recursively (log32(L) levels of a few ops each).
  Exact: when 32 * `max_entry` (a static bound on the entries) reaches 2**24,
  entries are split into 12-bit halves so every float32 partial sum stays below
  2**24. XLA:CPU's ``jnp.cumsum`` (a reduce-window) is several times slower, and
  an ``associative_scan`` about as fast but with ~20x the ops, which makes
  compiling slow (docs/benchmarks.md).
  """
  length = v.shape[0]
  rows = -(-length // 32)
  r = jnp.pad(v, (0, rows * 32 - length)).reshape(rows, 32)
  tri = jnp.triu(jnp.ones((32, 32), jnp.float32))
  hp = jax.lax.Precision.HIGHEST
  if 32 * max_entry < 2**24:
    inc = jnp.dot(r.astype(jnp.float32), tri, precision=hp).astype(jnp.int32)
  else:
    halves = jnp.concatenate([r & 4095, r >> 12]).astype(jnp.float32)
    inc = jnp.dot(halves, tri, precision=hp).astype(jnp.int32)
    inc = inc[:rows] + (inc[rows:] << 12)
  if rows > 1:
    # Materialised: fused into the add below, every level's reshape and offset
    # were recomputed per element.
    totals = materialize(cumsum(inc[:, -1], min(2**31 - 1, 32 * max_entry)))
    inc = inc + jnp.pad(totals[:-1], (1, 0))[:, None]
  return inc.reshape(-1)[:length]


def materialize(x):
  """`x`, computed into a buffer: XLA:CPU does not fuse through a reduce.

  Left to fusion, a value read by several later steps (the binary searches in
  `topk.compact`, threshold arithmetic read per element) is recomputed at every
  read. ``lax.optimization_barrier`` is dropped by the CPU compiler here, so a
  max with the type's lowest value stands in for it.
  """
  def one(v):
    low = jnp.finfo(v.dtype).min if jnp.issubdtype(v.dtype, jnp.floating) else jnp.iinfo(v.dtype).min
    floor = jnp.full_like(v, low)
    return jnp.max(jnp.stack([v, floor], axis=1), axis=1)

  return jax.tree.map(one, x)
