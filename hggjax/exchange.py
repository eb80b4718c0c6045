"""The only module that calls collectives.

Four ways to exchange each device's fixed-capacity payload (`SCHEMES`); all return
the mean over devices, the same on every device, and what of this device's payload
reached it (its "delivered" slots: the transform keeps the rest in the residual).

- "allgather": one ``all_gather`` of every device's payload (values and positions
  coded into one int32 row by `hggjax.wire`), a local decode, scatter-add and a
  scaling by 1/P. Every slot is delivered. Each device receives
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
- "union_mask": every device's k positions reach every device (one ``all_gather`` of
  k int32), and every device sends its own accumulated values at all of them, each
  position once (`union_positions`): one ``psum`` of P k values gives the mean there.
  Where any device selected, the mean holds every device's part, not only the
  selecting devices'. Each device sends k positions and P k values and receives
  (P - 1) k positions and 2 (P - 1) of k values. Every slot is delivered.

No dense collective of a mostly-zero tensor is ever issued; leaves that are sent
dense (the ``none`` compressor, leaves under ``min_size``, the fast axis of a
two-level ``axis_name``) use ``pmean``. `traffic` gives the bytes each scheme moves.
A payload's wire format (`hggjax.wire.WireFormat`: value dtype, scales, position code)
applies to "allgather" and "sparse_allreduce".
"""

import jax
import jax.numpy as jnp

from hggjax import regions
from hggjax import wire
from hggjax.payload import Payload

SCHEMES = ("allgather", "sparse_allreduce", "leader_mask", "union_mask")
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


def union_positions(indices: jax.Array, axis_name: str | None, n: int) -> jax.Array:
  """int32[m, P * C]: every device's `indices` on every device ("union_mask"), in
  ascending order, a position chosen by several devices kept once (its repeats become n,
  unused slots) so that no device's value there is summed twice."""
  if axis_name is None:
    return indices
  got = jax.lax.all_gather(indices, axis_name, to="invarying")  # [P, m, C]
  m = got.shape[1]
  flat = jnp.sort(got.transpose(1, 0, 2).reshape(m, -1), axis=-1)
  repeat = jnp.concatenate([jnp.zeros((m, 1), bool), flat[:, 1:] == flat[:, :-1]], axis=1)
  return jnp.where(repeat, n, flat)


def leader_count(count: jax.Array, axis_name: str | None) -> jax.Array:
  """int32[]: the largest step count over devices, the same on all (a device that skipped
  a non-finite step counts one fewer): the leader is this modulo P."""
  return count if axis_name is None else jax.lax.pmax(count, axis_name)


def sparse_mean(payload: Payload, n: int, axis_name: str | None,
                scheme: str = "allgather", positions: jax.Array | None = None,
                fmt: wire.WireFormat = wire.DEFAULT) -> tuple[jax.Array, Payload]:
  """(float32[m, n] mean over devices, this device's delivered Payload), per row.

  `payload` holds m rows (selection groups of n elements each) of C slots. They
  travel in `fmt` (`hggjax.wire`: the values' dtype and scales, the positions'
  code), rounded once before they leave. The delivered payload holds this device's
  slots that reached the mean as the receivers decoded them (float32 values), others
  empty (value 0, index n); a value that rounds to 0 is not delivered. For
  "allgather" its slots are `payload`'s; for "sparse_allreduce" it has
  P * `regions.bucket_capacity` slots per row (the send buffers, in region order),
  those that overflowed their bucket or were not kept by their region's owner left
  out. "sparse_allreduce" needs each row's indices in `regions.region_order`, and
  ``fmt.index_coding="packed"`` with "allgather" needs them sorted (build the
  payload's values after either). Without an axis there is nothing to exchange:
  the mean is this payload, rounded as it would travel, made dense, whatever the
  scheme.
  """
  if axis_name is None:
    _, decoded = wire.encode(payload.values, payload.indices, n, fmt)
    delivered = _nonzero(decoded, payload.indices, n)
    return densify_mean(delivered.values[None], delivered.indices[None], n), delivered
  if scheme == "sparse_allreduce":
    return _sparse_allreduce(payload, n, axis_name, fmt)
  if scheme in ("leader_mask", "union_mask"):  # `positions`: the same on every device
    return _leader_mean(payload, n, axis_name, positions)
  c = payload.values.shape[-1]
  words, decoded = wire.encode(payload.values, payload.indices, n, fmt)
  # "invarying": the gathered payload is the same on every device, so the
  # result is too, and shard_map's check_vma accepts it as a replicated output.
  words = jax.lax.all_gather(words, axis_name, to="invarying")  # [P, m, W]
  values, indices = wire.decode(words, c, n, payload.values.dtype, fmt)
  return densify_mean(values, indices, n), _nonzero(decoded, payload.indices, n)


def _nonzero(values: jax.Array, indices: jax.Array, n: int) -> Payload:
  """The slots whose decoded value is not 0 (the others carry nothing: index n)."""
  sent = values != 0
  return Payload(jnp.where(sent, values, 0), jnp.where(sent, indices, n))


def _sparse_allreduce(payload: Payload, n: int, axis_name: str,
                      fmt: wire.WireFormat) -> tuple[jax.Array, Payload]:
  """Ok-Topk's reduce-scatter + all_gather with static shapes (see `regions`)."""
  p = axis_size(axis_name)
  m, c = payload.values.shape
  size = regions.region_size(n, p)
  if p * size > MAX_POSITION:
    raise ValueError(f"exchange='sparse_allreduce' numbers the {n} positions of a row by "
                     f"region in int32: split leaves of more than {MAX_POSITION - p} "
                     "elements, or use exchange='allgather'.")
  cap, share = regions.bucket_capacity(c, p), regions.region_share(c, p)
  # Step 1: bucket this device's slots by region; row r of the buffer goes to device r,
  # as local positions of that region (sorted: the buckets are runs of region_order).
  buf_values, buf_indices = regions.bucket(payload.values, payload.indices, n, p, cap)
  local = regions.local_positions(buf_indices, n, p)
  words, buf_decoded = wire.encode(buf_values, local, size, fmt)
  words = jax.lax.all_to_all(words, axis_name, 0, 0)  # [P senders, m, W]
  got_values, got_local = wire.decode(words, cap, size, payload.values.dtype, fmt)
  # Step 2: the owner's region mean, summed as "allgather" sums (densify_mean), and
  # its share of the largest; float32 from here on, so the final means carry no
  # wire rounding (only the positions are coded as `fmt` says).
  owner = jax.lax.axis_index(axis_name)
  region_mean = densify_mean(got_values, got_local, size)
  top_values, top_indices = regions.reselect(region_mean, got_local, n, p, owner, share)
  # Step 3: every owner's kept means to every device; each position appears once.
  kept = wire.WireFormat(index_coding=fmt.index_coding)
  top_local = regions.local_positions(top_indices, n, p)
  if kept.packed:  # sorted for the code; the values read again in that order
    top_local = jnp.sort(top_local, axis=-1)
    top_values = jnp.where(top_local < size, jnp.take_along_axis(
        region_mean, jnp.minimum(top_local, size - 1), axis=1), 0.0)
  words, _ = wire.encode(top_values, top_local, size, kept)
  words = jax.lax.all_gather(words, axis_name, to="invarying")  # [P owners, m, W]
  final_values, final_local = wire.decode(words, share, size, jnp.float32, kept)
  region = jnp.arange(p, dtype=jnp.int32)[:, None, None]
  final_indices = jnp.where(final_local < size, final_local * p + region, n)
  rows = lambda x: x.transpose(1, 0, 2).reshape(1, m, p * share)  # noqa: E731
  mean = densify_mean(rows(final_values), rows(final_indices), n)
  # Step 4: which of this device's sent slots made it, as a payload of P * cap slots.
  sent = _nonzero(buf_decoded, buf_indices, n)
  return mean, Payload(*regions.delivered(sent.values, sent.indices, mean))


def _leader_mean(payload: Payload, n: int, axis_name: str,
                 positions: jax.Array) -> tuple[jax.Array, Payload]:
  """Every device's values at the shared `positions` (the leader's, or the union),
  summed. `payload` holds this device's values there (slots it leaves unused carry 0)."""
  p = axis_size(axis_name)
  # Summed in float32: a narrower sum would round at every hop (and XLA:CPU widens a
  # bfloat16 all-reduce to float32 anyway).
  total = jax.lax.psum(payload.values.astype(jnp.float32), axis_name) * (1.0 / p)
  return densify_mean(total[None], positions[None], n), payload


def row_bytes(c: int, n: int, itemsize: int, fmt: wire.WireFormat = wire.DEFAULT) -> int:
  """Bytes of one row of c slots of a row of n elements on the wire (`wire.row_words`)."""
  return 4 * wire.row_words(c, n, itemsize, fmt)


def traffic(scheme: str, p: int, m: int, c: int, n: int, itemsize: int,
            fmt: wire.WireFormat = wire.DEFAULT) -> tuple[int, int]:
  """(sent, received) bytes per device for m rows of c slots (of n elements each)
  exchanged over p devices, values `itemsize` bytes each on the wire
  (``fmt.dtype(payload dtype).itemsize``), positions and scales as `fmt` says.

  sent: this device's own data put on the wire (each byte counted once, however
  many devices receive it); received: other devices' data arriving here.
  - "allgather": sent m * row(C), received (P - 1) * m * row(C);
  - "sparse_allreduce": the all_to_all moves P - 1 buckets of `bucket_capacity`
    slots each way, the all_gather one row of `region_share` float32 slots out and
    P - 1 in (positions of a region, `region_size`, coded as `fmt` says);
  - "leader_mask": two reductions, of c int32 positions and c float32 values (a sum
    is kept in float32 whatever the wire dtype): sent once each, received as a ring
    all-reduce's 2 (P - 1) / P of them;
  - "union_mask": an all_gather of c int32 positions (sent once, P - 1 received) and
    a reduction of P c float32 values (sent once, 2 (P - 1) / P of them received).
  row(c) is `row_bytes`. Without an exchange (p = 1) nothing is received.
  """
  if scheme == "union_mask":
    positions, values = m * c * 4, m * c * p * 4
    return positions + values, ((p - 1) * positions + 2.0 * (p - 1) / p * values
                                if p > 1 else 0)
  if scheme == "leader_mask":
    nbytes = m * c * 8
    return nbytes, (2.0 * (p - 1) / p * nbytes if p > 1 else 0)
  if scheme == "sparse_allreduce" and p > 1:
    universe = regions.region_size(n, p)
    bucket = row_bytes(regions.bucket_capacity(c, p), universe, itemsize, fmt)
    kept = row_bytes(regions.region_share(c, p), universe, 4,
                     wire.WireFormat(index_coding=fmt.index_coding))
    return m * ((p - 1) * bucket + kept), m * (p - 1) * (bucket + kept)
  return m * row_bytes(c, n, itemsize, fmt), (p - 1) * m * row_bytes(c, n, itemsize, fmt)


def dense_traffic(p: int, nbytes: int) -> tuple[float, float]:
  """(sent, received) bytes per device for a dense mean of `nbytes` over p devices:
  sent counts the leaf once (as the sparse schemes count their own data); received
  is what a ring all-reduce (reduce-scatter + all_gather) brings in, 2 (P - 1) / P."""
  return float(nbytes), 2.0 * (p - 1) / p * nbytes


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
