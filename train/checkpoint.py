"""Orbax checkpoints of the whole train state, compressor state included.

The state is saved as its flat list of leaves: the tree structure (flax States, optax and
hggjax NamedTuples) comes back from a freshly created state of the same config, which also
supplies each leaf's sharding. Typed PRNG keys are stored as their raw key data.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

_KEEP = 2


def _is_key(x) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_saveable(tree) -> dict[str, jax.Array]:
  # Orbax refuses zero-size arrays (e.g. per-group fields with no groups); they carry no
  # data, so restore() takes them from the template.
  leaves = jax.tree.leaves(tree)
  return {f"{i:05d}": jax.random.key_data(x) if _is_key(x) else x
          for i, x in enumerate(leaves) if x.size}


def _abstract(x):
  if _is_key(x):
    x = jax.random.key_data(x)
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)


def manager(directory: str) -> ocp.CheckpointManager:
  # Synchronous saves: a run that ends right after a save must find it complete.
  options = ocp.CheckpointManagerOptions(max_to_keep=_KEEP, enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(mngr: ocp.CheckpointManager, step: int, tree) -> None:
  mngr.save(step, args=ocp.args.StandardSave(_to_saveable(tree)))
  mngr.wait_until_finished()


def latest_step(mngr: ocp.CheckpointManager) -> int | None:
  return mngr.latest_step()


def restore(mngr: ocp.CheckpointManager, step: int, template):
  """Restores `step` into the structure, dtypes and shardings of `template`."""
  leaves, treedef = jax.tree.flatten(template)
  target = {f"{i:05d}": _abstract(x) for i, x in enumerate(leaves) if x.size}
  restored = mngr.restore(step, args=ocp.args.StandardRestore(target))
  out = []
  for i, x in enumerate(leaves):
    if not x.size:
      out.append(x)
      continue
    y = restored[f"{i:05d}"]
    out.append(jax.random.wrap_key_data(y, impl=jax.random.key_impl(x)) if _is_key(x) else y)
  return jax.tree.unflatten(treedef, out)
