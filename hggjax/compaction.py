"""Turning a mask or a set of scores into a fixed number of positions.

Everything here is static-shaped: capacities are Python ints fixed at trace time,
and unused slots hold the out-of-range index n so that a later
``.at[...].add(..., mode="drop")`` ignores them.
"""

import jax
import jax.numpy as jnp


def first_true(mask: jax.Array, size: int) -> jax.Array:
  """int32[size]: positions of the first `size` True entries of `mask`, padded with n."""
  n = mask.shape[0]
  (idx,) = jnp.nonzero(mask, size=size, fill_value=n)
  return idx.astype(jnp.int32)


def largest_above(
    a: jax.Array, threshold: jax.Array, k: int, candidates: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Positions of the (at most) k largest `a` among those with a >= threshold.

  Args:
    a: float32[n], non-negative magnitudes.
    threshold: float32[], the cut. Zeros never pass: they carry nothing.
    k: how many positions to return (the payload's capacity).
    candidates: how many passing positions are considered (>= k). When more pass,
      the first `candidates` in index order are kept, so a threshold that lets far
      too many through costs recall; selectors aim their thresholds close to k.

  Returns:
    (indices int32[k] padded with n, passed int32[] = number of a >= threshold,
    cut float32[] = the smallest magnitude returned, 0 when none is).
  """
  n = a.shape[0]
  mask = (a >= threshold) & (a > 0)
  passed = jnp.sum(mask, dtype=jnp.int32)
  idx = first_true(mask, candidates)
  if candidates > k:
    # Padding reads as -1 so it sorts below every real magnitude.
    scores = a.at[idx].get(mode="fill", fill_value=-1.0)
    top_scores, pos = jax.lax.top_k(scores, k)
    idx = jnp.where(top_scores >= 0, idx[pos], n).astype(jnp.int32)
  return idx, passed, smallest_at(a, idx)


def smallest_at(a: jax.Array, idx: jax.Array) -> jax.Array:
  """float32[]: min of a over the valid positions in idx (0 when there are none)."""
  low = jnp.min(a.at[idx].get(mode="fill", fill_value=jnp.inf))
  return jnp.where(jnp.isfinite(low), low, 0.0).astype(jnp.float32)


def count_at_least(a: jax.Array, threshold: jax.Array) -> jax.Array:
  """int32[]: elements with a >= threshold and a > 0 (the selectors' pass rule)."""
  return jnp.sum((a >= threshold) & (a > 0), dtype=jnp.int32)
