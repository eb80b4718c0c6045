"""The device mesh of a run and moving data onto it and back.

One 1-D mesh over the devices, axis "data": every batch is split along it, and the
compressor's state has a leading device axis sharded over it. With `hosts` a 2-D mesh
(hosts, local) instead: batches are split over both axes, the compressor averages over
"local" (fast, inside a host) before it compresses and exchanges over "hosts".
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"
TWO_LEVEL = ("hosts", "local")  # (slow, fast): hggjax's two-level axis_name


def make_mesh(n_devices: int, hosts: int | None = None) -> jax.sharding.Mesh:
  devices = jax.devices()
  if n_devices > len(devices):
    raise ValueError(f"{n_devices} devices requested, {len(devices)} available")
  if hosts is None:
    return jax.make_mesh((n_devices,), (AXIS,), devices=devices[:n_devices])
  return jax.make_mesh((hosts, n_devices // hosts), TWO_LEVEL, devices=devices[:n_devices])


def config_axes(hosts: int | None):
  """The axes a run's batch is split and its gradients averaged over: "data", or
  ("hosts", "local") with `hosts` (a two-level mesh)."""
  return AXIS if hosts is None else TWO_LEVEL


def data_axes(mesh: jax.sharding.Mesh):
  """What the batch is split over and gradients are averaged over: "data" on a 1-D
  mesh, ("hosts", "local") on a two-level one."""
  return AXIS if tuple(mesh.axis_names) == (AXIS,) else tuple(mesh.axis_names)


def process_rows(mesh: jax.sharding.Mesh, batch_size: int) -> slice:
  """The rows of a global batch sharded over "data" that live on this process's devices.

  One process: every row. Several (jax.distributed): a contiguous block, this process's
  share, which it alone reads and feeds (`shard_batch`).
  """
  index = NamedSharding(mesh, P(data_axes(mesh))).addressable_devices_indices_map((batch_size,))
  blocks = sorted({s[0].indices(batch_size)[:2] for s in index.values()})
  if any(a[1] != b[0] for a, b in zip(blocks, blocks[1:])):
    raise ValueError(f"this process's devices hold non-contiguous rows {blocks} of the batch: "
                     "build the mesh with jax.make_mesh so each process's devices are adjacent")
  return slice(blocks[0][0], blocks[-1][1])


def shard_batch(mesh: jax.sharding.Mesh, batch_size: int, *local: np.ndarray) -> tuple:
  """Global arrays sharded P("data") from this process's rows (`process_rows`) only."""
  sharding = NamedSharding(mesh, P(data_axes(mesh)))
  return tuple(jax.make_array_from_process_local_data(sharding, x, (batch_size,) + x.shape[1:])
               for x in local)


def host_value(x: jax.Array) -> np.ndarray:
  """A (possibly multi-process, sharded) array on this host; collective when not local."""
  if getattr(x, "is_fully_addressable", True) or x.is_fully_replicated:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
