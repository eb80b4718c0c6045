"""The local steps of the sparse allreduce: index regions, buckets, the owner's choice.

`exchange.sparse_mean(..., scheme="sparse_allreduce")` splits each row's index space
[0, n) into P regions, region r owned by device r of the axis. Region r holds the
positions i with i mod P = r, at local position i // P (``region_size(n, P)`` of
them): strided rather than contiguous, so that a hot block of the gradient (a layer's
busy rows, an image's centre) is spread over every owner instead of filling one
owner's buckets while the others idle. These functions do everything but the two
collectives, with static shapes throughout:

- `region_order`: a row's selected positions sorted by (region, local position), the
  order the payload is built in;
- `bucket`: each device puts its k selected slots in P buckets of
  ``bucket_capacity(k, P)`` slots, one per region: the region's first positions in
  index order; what does not fit is not sent (it stays in the sender's residual);
- `reselect`: the owner, given the mean of its region's received contributions, keeps
  the ``region_share(k, P)`` largest |mean| among the positions it received;
- `delivered`: each device finds which of the slots it sent are in the final set
  (nonzero in the exchanged mean).

References:
  Li & Hoefler, `Near-Optimal Sparse Allreduce for Distributed Deep Learning
  <https://arxiv.org/abs/2201.07598>`_, PPoPP 2022 (Ok-Topk)
"""

import math

import jax
import jax.numpy as jnp

from hggjax.kernels import bits
from hggjax.kernels import topk as topk_kernels

# c: bucket slots per region, as a multiple of the even load k / P. Strided regions
# split a device's k positions about evenly (k / P each, give or take its square
# root), so 1.5 overflows only for selections concentrated on one residue mod P.
# The all_to_all moves about c k (P - 1) / P slots per device.
CAPACITY = 1.5
# s: positions each owner keeps, as a multiple of k / P: s k in all. Ok-Topk and
# gTop-k keep k; keeping 1.5 k, with c = 1.5, moves the same 3k (P - 1) / P slots as
# c = 2, s = 1 and trained closer to "allgather" (docs/exchange.md). The all_gather
# moves about s k (P - 1) / P slots.
SHARE = 1.5


def region_size(n: int, p: int) -> int:
  """Positions per region: ceil(n / P) (the last regions may hold one fewer)."""
  return max(1, -(-n // p))


def bucket_capacity(k: int, p: int) -> int:
  """Slots each device may send to each region: ceil(CAPACITY * k / P), at most k."""
  return max(1, min(k, math.ceil(CAPACITY * k / p)))


def region_share(k: int, p: int) -> int:
  """Positions each owner keeps of its region: ceil(SHARE * k / P)."""
  return max(1, math.ceil(SHARE * k / p))


def _keys(indices: jax.Array, n: int, p: int) -> jax.Array:
  """int32 (region, local position) keys: region * size + i // P; unused (n) -> P * size,
  after every used key."""
  size = region_size(n, p)
  return jnp.where(indices < n, (indices % p) * size + indices // p, p * size)


def region_order(indices: jax.Array, n: int, p: int) -> jax.Array:
  """int32[m, C]: each row's positions sorted by (region, local position), unused (n)
  last. One single-operand sort of the keys (XLA:CPU sorts (index, value) pairs
  several times slower), so the payload's values are read after it, in this order."""
  size = region_size(n, p)
  keys = jnp.sort(_keys(indices, n, p), axis=-1)
  return jnp.where(keys < p * size, (keys % size) * p + keys // size, n).astype(jnp.int32)


def bucket(values: jax.Array, indices: jax.Array, n: int, p: int,
           cap: int) -> tuple[jax.Array, jax.Array]:
  """One device's send buffers: its [m, C] slots sorted into P regions of `cap` slots.

  Args:
    values: [m, C] wire dtype, 0 in unused slots.
    indices: int32[m, C] distinct positions per row in `region_order`, unused (n)
      last.
    n: row length.
    p: devices on the axis (regions).
    cap: slots per region (`bucket_capacity`).

  Returns:
    (values [P, m, cap], int32 indices [P, m, cap]): row r holds region r's first
    `cap` positions in index order, n and 0 in unused slots; positions past a
    region's capacity are not in the buffer (they are not sent).
  """
  m, _ = indices.shape
  size = region_size(n, p)
  # Region r's slots start at the first key >= r * size and end at the next's.
  bounds = jnp.arange(p + 1, dtype=jnp.int32) * size
  starts = jax.vmap(jnp.searchsorted, (0, None))(_keys(indices, n, p), bounds)  # [m, P + 1]
  at = starts[:, :-1, None] + jnp.arange(cap, dtype=jnp.int32)                   # [m, P, cap]
  inside = at < starts[:, 1:, None]
  row = jnp.arange(m)[:, None, None]
  buf_indices = jnp.where(inside, indices.at[row, at].get(mode="fill", fill_value=n), n)
  buf_values = jnp.where(inside, values.at[row, at].get(mode="fill", fill_value=0), 0)
  return buf_values.transpose(1, 0, 2), buf_indices.transpose(1, 0, 2)


def local_positions(indices: jax.Array, n: int, p: int) -> jax.Array:
  """Local positions (i // P) of received global indices of one region; region_size
  for unused slots (dropped by a scatter into the region)."""
  return jnp.where(indices < n, indices // p, region_size(n, p))


def reselect(region_mean: jax.Array, local: jax.Array, n: int, p: int, owner: jax.Array,
             share: int) -> tuple[jax.Array, jax.Array]:
  """The owner's choice: the `share` largest |mean| among the positions it received.

  Args:
    region_mean: float32[m, size], the mean over devices of what arrived for this
      region, by local position (zeros elsewhere).
    local: int32[S, m, cap] received local positions (`local_positions`), S senders;
      several senders may name the same position.
    n, p: row length and devices.
    owner: int32[], this device's region.
    share: positions kept per row (`region_share`).

  Returns:
    (float32 values [m, share], int32 global indices [m, share]), n and 0 in unused
    slots. Ties at the cut go to the lower position. A position whose mean is
    exactly 0 is never kept: it carries nothing, its senders keep what they sent in
    their residuals, and so every kept value is nonzero (`delivered` relies on it).
  """
  size = region_size(n, p)
  s, m, cap = local.shape
  # Sorted, each received position once: the first of equal neighbours. A
  # single-operand sort; unused slots (size) sort last.
  pos = jnp.sort(local.transpose(1, 0, 2).reshape(m, s * cap), axis=1)
  unique = (pos < size) & (pos != jnp.pad(pos[:, :-1], ((0, 0), (1, 0)), constant_values=-1))
  value = jnp.take_along_axis(region_mean, jnp.minimum(pos, size - 1), axis=1)
  keys = jnp.where(unique, bits.magnitude_keys(value), -1)
  slots = jnp.arange(s * cap, dtype=jnp.int32)
  # Exact, by radix select; key 1 (the smallest subnormal) as floor keeps no zero.
  take = lambda k: topk_kernels.take_largest(k, slots, share, jnp.int32(1), s * cap)  # noqa: E731
  at = jax.vmap(take)(keys)
  kept = at < s * cap
  at = jnp.minimum(at, s * cap - 1)
  indices = jnp.where(kept, jnp.take_along_axis(pos, at, axis=1) * p + owner, n)
  values = jnp.where(kept, jnp.take_along_axis(value, at, axis=1), 0.0)
  return values, indices.astype(jnp.int32)


def delivered(buf_values: jax.Array, buf_indices: jax.Array,
              mean: jax.Array) -> tuple[jax.Array, jax.Array]:
  """What of this device's buffers reached the mean: (values, indices) [m, P * cap].

  Args:
    buf_values, buf_indices: [P, m, cap], what this device sent to each region
      (`bucket`).
    mean: float32[m, n], the exchange's result: nonzero exactly at the positions
      the owners kept (`reselect` keeps no zero; every other position is 0).

  The slots whose position was not kept come back empty (0, n).
  """
  p, m, cap = buf_indices.shape
  n = mean.shape[1]
  rows = lambda x: x.transpose(1, 0, 2).reshape(m, p * cap)  # noqa: E731
  values, indices = rows(buf_values), rows(buf_indices)
  kept = jnp.take_along_axis(mean, indices, axis=1, mode="fill", fill_value=0) != 0
  return jnp.where(kept, values, 0), jnp.where(kept, indices, n)
