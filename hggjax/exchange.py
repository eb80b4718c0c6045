"""The only module that calls collectives.

A sparse exchange is an ``all_gather`` of each device's fixed-capacity payload
(values and int32 indices, [P, C] after the gather) followed by a local
scatter-add and a division by P. No dense collective of a mostly-zero tensor is
ever issued; leaves that are sent dense (the ``none`` compressor, leaves under
``min_size``) use ``pmean``.
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

  `payload` holds m rows (selection groups of n elements each) of C slots.
  """
  values, indices = payload.values.astype(jnp.float32), payload.indices
  devices = 1
  if axis_name is not None:
    # "invarying": the gathered payload is the same on every device, so the
    # result is too, and shard_map's check_vma accepts it as a replicated output.
    values = jax.lax.all_gather(values, axis_name, to="invarying")    # [P, m, C]
    indices = jax.lax.all_gather(indices, axis_name, to="invarying")  # [P, m, C]
    devices = values.shape[0]
  m = values.shape[-2]
  row = jnp.broadcast_to(jnp.arange(m)[:, None], indices.shape)
  total = jnp.zeros((m, n), jnp.float32).at[row, indices].add(values, mode="drop")
  return total if devices == 1 else total / devices


def dense_mean(x: jax.Array, axis_name: str | None) -> jax.Array:
  """The plain mean over devices (identity without an axis)."""
  return x if axis_name is None else jax.lax.pmean(x, axis_name)
