"""The only module that calls collectives.

Two ways to exchange each device's fixed-capacity payload (`SCHEMES`); both return
the mean over devices, the same on every device, and what of this device's payload
reached it (its "delivered" slots: the transform keeps the rest in the residual).

- "allgather": one ``all_gather`` of every device's payload (values and int32
  indices packed into int32 words, [P, C] each after the gather), a local
  scatter-add and a scaling by 1/P. Every slot is delivered. Each device receives
  (P - 1) * C slots.
- "sparse_allreduce" (Ok-Topk's shape, static): each device sends each region of the
  index space (`regions`: positions i with i mod P = r belong to device r) its slots
  there (``all_to_all``, at most `regions.bucket_capacity` per
  region), each owner averages its region and keeps its ``regions.region_share``
  largest, and one ``all_gather`` of those float32 means gives every device the
  result. Each device receives about 3k (P - 1) / P slots instead of (P - 1) k. A
  slot is delivered when it fit its bucket and its position was kept.
- "leader_mask" (ScaleCom's cyclic top-k, Chen et al. 2020): one device, the leader
  (a different one each step, in turn), chooses the k positions of every device: its
  selection reaches all by a ``psum`` in which the others add zeros
  (`leader_positions`), each device reads its own accumulated values there, and one
  ``psum`` of k values gives the mean. The exchange is a reduction of fixed size,
  the same whatever P: 2 (P - 1) / P of k values and k positions received per device.
  Every slot is delivered.

No dense collective of a mostly-zero tensor is ever issued; leaves that are sent
dense (the ``none`` compressor, leaves under ``min_size``, the fast axis of a
two-level ``axis_name``) use ``pmean``. `traffic` gives the bytes each scheme moves.
"""

import jax
import jax.numpy as jnp

from hggjax import regions
from hggjax.payload import Payload

SCHEMES = ("allgather", "sparse_allreduce", "leader_mask")
MAX_POSITION = 2**31 - 1  # positions and region keys travel as int32


def split_axes(axis_name) -> tuple[str | None, str | None]:
  """(slow, fast) axis names: ("data", None) for "data"; ("hosts", "local") for that
  pair, where the dense mean runs over "local" first; (None, None) without an axis."""
  if isinstance(axis_name, tuple):
    return axis_name[0], axis_name[1]
  return axis_name, None


def axis_size(axis_name: str | None) -> int:
  """Devices on `axis_name` (1 without one), a Python int at trace time."""
  return 1 if axis_name is None else int(jax.lax.axis_size(axis_name))


def device_index(axis_name: str) -> jax.Array:
  """int32[]: this device's position on `axis_name`, with an error that says what to do."""
  try:
    return jax.lax.axis_index(axis_name)
  except NameError as e:
    raise ValueError(
        f"axis_name={axis_name!r} is not bound here: call the update inside "
        f"jax.shard_map or jax.pmap over an axis named {axis_name!r}, or build "
        "the compressor with axis_name=None to compress without exchanging."
    ) from e


def leader_positions(indices: jax.Array, leader: jax.Array, axis_name: str | None) -> jax.Array:
  """int32[m, C]: the leader device's `indices` on every device ("leader_mask")."""
  if axis_name is None:
    return indices
  mine = jnp.where(jax.lax.axis_index(axis_name) == leader, indices, 0)
  return jax.lax.psum(mine, axis_name)


def leader_count(count: jax.Array, axis_name: str | None) -> jax.Array:
  """int32[]: the largest step count over devices, the same on all (a device that skipped
  a non-finite step counts one fewer): the leader is this modulo P."""
  return count if axis_name is None else jax.lax.pmax(count, axis_name)


def sparse_mean(payload: Payload, n: int, axis_name: str | None,
                scheme: str = "allgather",
                positions: jax.Array | None = None) -> tuple[jax.Array, Payload]:
  """(float32[m, n] mean over devices, this device's delivered Payload), per row.

  `payload` holds m rows (selection groups of n elements each) of C slots. Values
  travel in their wire dtype (2 bytes for bfloat16) and are widened after they
  arrive. The delivered payload holds this device's slots that reached the mean,
  others empty (value 0, index n): for "allgather" it is `payload` itself; for
  "sparse_allreduce" it has P * `regions.bucket_capacity` slots per row (the
  send buffers, in region order), those that overflowed their bucket or were not
  kept by their region's owner left out. "sparse_allreduce" needs each row's
  indices in `regions.region_order` (build the payload's values after it). Without
  an axis there is nothing to exchange: the mean is this payload made dense,
  whatever the scheme.
  """
  values, indices = payload.values, payload.indices
  if axis_name is None:
    return densify_mean(values[None], indices[None], n), payload
  if scheme == "sparse_allreduce":
    return _sparse_allreduce(payload, n, axis_name)
  if scheme == "leader_mask":  # `positions`: `leader_positions`, the same on every device
    return _leader_mean(payload, n, axis_name, positions)
  # "invarying": the gathered payload is the same on every device, so the
  # result is too, and shard_map's check_vma accepts it as a replicated output.
  gather = lambda x: jax.lax.all_gather(x, axis_name, to="invarying")  # noqa: E731
  values, indices = _over_wire(gather, values, indices)  # [P, m, C] each
  return densify_mean(values, indices, n), payload


def _sparse_allreduce(payload: Payload, n: int, axis_name: str) -> tuple[jax.Array, Payload]:
  """Ok-Topk's reduce-scatter + all_gather with static shapes (see `regions`)."""
  p = axis_size(axis_name)
  m, c = payload.values.shape
  if p * regions.region_size(n, p) > MAX_POSITION:
    raise ValueError(f"exchange='sparse_allreduce' numbers the {n} positions of a row by "
                     f"region in int32: split leaves of more than {MAX_POSITION - p} "
                     "elements, or use exchange='allgather'.")
  cap, share = regions.bucket_capacity(c, p), regions.region_share(c, p)
  # Step 1: bucket this device's slots by region; row r of the buffer goes to device r.
  buf_values, buf_indices = regions.bucket(payload.values, payload.indices, n, p, cap)
  to_owner = lambda x: jax.lax.all_to_all(x, axis_name, 0, 0)  # noqa: E731
  got_values, got_indices = _over_wire(to_owner, buf_values, buf_indices)  # [P senders, m, cap]
  # Step 2: the owner's region mean, summed as "allgather" sums (densify_mean), and
  # its share of the largest; float32 from here on, so the final means carry no
  # wire rounding.
  owner = jax.lax.axis_index(axis_name)
  local = regions.local_positions(got_indices, n, p)
  region_mean = densify_mean(got_values, local, regions.region_size(n, p))
  top_values, top_indices = regions.reselect(region_mean, local, n, p, owner, share)
  # Step 3: every owner's kept means to every device; each position appears once.
  gather = lambda x: jax.lax.all_gather(x, axis_name, to="invarying")  # noqa: E731
  final_values, final_indices = _over_wire(gather, top_values, top_indices)  # [P owners, m, share]
  rows = lambda x: x.transpose(1, 0, 2).reshape(1, m, p * share)  # noqa: E731
  mean = densify_mean(rows(final_values), rows(final_indices), n)
  # Step 4: which of this device's sent slots made it, as a payload of P * cap slots.
  return mean, Payload(*regions.delivered(buf_values, buf_indices, mean))


def _leader_mean(payload: Payload, n: int, axis_name: str,
                 positions: jax.Array) -> tuple[jax.Array, Payload]:
  """ScaleCom's reduction: every device's values at the leader's `positions`, summed.
  `payload` holds this device's values there (slots it leaves unused carry 0)."""
  p = axis_size(axis_name)
  # Summed in float32: a narrower sum would round at every hop (and XLA:CPU widens a
  # bfloat16 all-reduce to float32 anyway).
  total = jax.lax.psum(payload.values.astype(jnp.float32), axis_name) * (1.0 / p)
  return densify_mean(total[None], positions[None], n), payload


def _over_wire(collective, values: jax.Array, indices: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(values, indices) through `collective`, packed into one int32 array (`_pack`) when
  the value width allows; float64 (x64 mode) takes two."""
  if values.dtype.itemsize not in (2, 4):
    return collective(values), collective(indices)
  words = collective(_pack(values, indices))
  return _unpack(words, values.dtype, values.shape[-1])


def row_bytes(c: int, itemsize: int) -> int:
  """Bytes of one row of c slots on the wire: values packed into int32 words (a
  2-byte value pads the row to a whole word) and c int32 indices."""
  if itemsize not in (2, 4):
    return c * (itemsize + 4)
  return 4 * (-(-c * itemsize // 4) + c)


def traffic(scheme: str, p: int, m: int, c: int, itemsize: int) -> tuple[int, int]:
  """(sent, received) bytes per device for m rows of c slots exchanged over p devices.

  sent: this device's own data put on the wire (each byte counted once, however
  many devices receive it); received: other devices' data arriving here.
  - "allgather": sent m * row(C), received (P - 1) * m * row(C);
  - "sparse_allreduce": the all_to_all moves P - 1 buckets of `bucket_capacity`
    slots each way, the all_gather one row of `region_share` float32 slots out and
    P - 1 in;
  - "leader_mask": two reductions, of c int32 positions and c float32 values (a sum
    is kept in float32 whatever the wire dtype): sent once each, received as a ring
    all-reduce's 2 (P - 1) / P of them.
  row(c) is `row_bytes`. Without an exchange (p = 1) nothing is received.
  """
  if scheme == "leader_mask":
    nbytes = m * c * 8
    return nbytes, (2.0 * (p - 1) / p * nbytes if p > 1 else 0)
  if scheme == "sparse_allreduce" and p > 1:
    bucket = row_bytes(regions.bucket_capacity(c, p), itemsize)
    kept = row_bytes(regions.region_share(c, p), 4)
    return m * ((p - 1) * bucket + kept), m * (p - 1) * (bucket + kept)
  return m * row_bytes(c, itemsize), (p - 1) * m * row_bytes(c, itemsize)


def dense_traffic(p: int, nbytes: int) -> tuple[float, float]:
  """(sent, received) bytes per device for a dense mean of `nbytes` over p devices:
  sent counts the leaf once (as the sparse schemes count their own data); received
  is what a ring all-reduce (reduce-scatter + all_gather) brings in, 2 (P - 1) / P."""
  return float(nbytes), 2.0 * (p - 1) / p * nbytes


def _pack(values: jax.Array, indices: jax.Array) -> jax.Array:
  """int32[..., W + C]: the values' bits (W words) then the indices, for one collective.

  One collective instead of two halves the per-collective latency (gloo, NCCL), and
  the bitcast keeps narrow values narrow on the wire: XLA:CPU otherwise moves the
  widening convert in front of a bfloat16 all_gather and sends 4 bytes per value.
  """
  *lead, c = values.shape
  ratio = 4 // values.dtype.itemsize  # 1 (float32) or 2 (bfloat16, float16)
  padded = -(-c // ratio) * ratio
  if padded != c:
    values = jnp.pad(values, [(0, 0)] * len(lead) + [(0, padded - c)])
  if ratio > 1:
    values = values.reshape(*lead, padded // ratio, ratio)
  words = jax.lax.bitcast_convert_type(values, jnp.int32)
  return jnp.concatenate([words, indices], axis=-1)


def _unpack(words: jax.Array, dtype, c: int) -> tuple[jax.Array, jax.Array]:
  """Inverse of `_pack` on [..., W + C] words: (values [..., C], int32 indices [..., C])."""
  *lead, total = words.shape
  values = jax.lax.bitcast_convert_type(words[..., :total - c], dtype)
  return values.reshape(*lead, -1)[..., :c], words[..., total - c:]


def densify_mean(values: jax.Array, indices: jax.Array, n: int) -> jax.Array:
  """float32[m, n]: the mean over the leading axis of P sparse payloads made dense.

  Args:
    values: [P, m, C] floating; 0 in unused slots.
    indices: int32[P, m, C] positions in [0, n); n (or more) marks an unused slot.
    n: row length.

  The result is bit-identical to scattering all P payloads into zeros in device order
  and multiplying by 1/P (what XLA makes of a division by P). It costs one zero-fill
  of the output plus a scatter of P * C elements, because (docs/multihost.md, XLA:CPU):
  - the scaling happens on the P * C values, not on the m * n output, when P is a
    power of two: x * 2^-j is exact, so the sum of scaled values equals the scaled sum
    bit for bit (down to subnormals); other P scale the output (one more pass);
  - a single row (the common case: one leaf per size) scatters with 1-D indices; the
    2-D (row, index) form builds an [P * m * C, 2] index array first.
  """
  p, m, _ = values.shape
  values = values.astype(jnp.float32)
  power_of_two = p & (p - 1) == 0
  if power_of_two and p > 1:
    values = values * (1.0 / p)
  zeros = jnp.zeros((m, n), jnp.float32)
  if m == 1:
    total = zeros[0].at[indices.reshape(-1)].add(values.reshape(-1), mode="drop")[None]
  else:
    row = jnp.broadcast_to(jnp.arange(m)[:, None], indices.shape)
    total = zeros.at[row, indices].add(values, mode="drop")
  return total if power_of_two else total * (1.0 / p)


def dense_mean(x: jax.Array, axis_name: str | None) -> jax.Array:
  """The plain mean over devices (identity without an axis)."""
  return x if axis_name is None else jax.lax.pmean(x, axis_name)
