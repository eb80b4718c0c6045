"""The only module that calls collectives.

A sparse exchange is one ``all_gather`` of each device's fixed-capacity payload
(values and int32 indices packed into int32 words, [P, C] each after the gather)
followed by a local scatter-add and a scaling by 1/P. No dense collective of a
mostly-zero tensor is ever issued; leaves that are sent dense (the ``none``
compressor, leaves under ``min_size``) use ``pmean``.
"""

import jax
import jax.numpy as jnp

from hggjax.payload import Payload


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


def sparse_mean(payload: Payload, n: int, axis_name: str | None) -> jax.Array:
  """float32[m, n]: per row, the mean over devices of every device's decompressed payload.

  `payload` holds m rows (selection groups of n elements each) of C slots. Values
  travel in their wire dtype (2 bytes for bfloat16) and are widened after the gather.
  """
  values, indices = payload.values, payload.indices
  if axis_name is None:
    return densify_mean(values[None], indices[None], n)
  # "invarying": the gathered payload is the same on every device, so the
  # result is too, and shard_map's check_vma accepts it as a replicated output.
  if values.dtype.itemsize not in (2, 4):  # float64 (x64 mode): two gathers
    values = jax.lax.all_gather(values, axis_name, to="invarying")    # [P, m, C]
    indices = jax.lax.all_gather(indices, axis_name, to="invarying")  # [P, m, C]
    return densify_mean(values, indices, n)
  words = jax.lax.all_gather(_pack(values, indices), axis_name, to="invarying")
  values, indices = _unpack(words, values.dtype, values.shape[-1])  # [P, m, C] each
  return densify_mean(values, indices, n)


def _pack(values: jax.Array, indices: jax.Array) -> jax.Array:
  """int32[m, W + C]: the values' bits (W words) then the indices, for one all_gather.

  One collective instead of two halves the per-collective latency (gloo, NCCL), and
  the bitcast keeps narrow values narrow on the wire: XLA:CPU otherwise moves the
  widening convert in front of a bfloat16 all_gather and sends 4 bytes per value.
  """
  m, c = values.shape
  ratio = 4 // values.dtype.itemsize  # 1 (float32) or 2 (bfloat16, float16)
  padded = -(-c // ratio) * ratio
  if padded != c:
    values = jnp.pad(values, ((0, 0), (0, padded - c)))
  if ratio > 1:
    values = values.reshape(m, padded // ratio, ratio)
  words = jax.lax.bitcast_convert_type(values, jnp.int32)
  return jnp.concatenate([words, indices], axis=-1)


def _unpack(words: jax.Array, dtype, c: int) -> tuple[jax.Array, jax.Array]:
  """Inverse of `_pack` on the gathered [P, m, W + C]: (values [P, m, C], int32 indices)."""
  p, m, total = words.shape
  values = jax.lax.bitcast_convert_type(words[..., :total - c], dtype)
  return values.reshape(p, m, -1)[..., :c], words[..., total - c:]


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
