"""Orbax checkpoints of the whole train state, each verified before it is used.

The state is saved as its flat list of leaves: the tree structure (flax States, optax and
hggjax NamedTuples) comes back from a freshly created state of the same config, which also
supplies each leaf's sharding. Typed PRNG keys are stored as their raw key data.

Orbax writes a step into a temporary directory and renames it when complete. Once it
has, process 0 writes `checksums.json` into the step's directory: the SHA-256 of every
file there. A checkpoint counts only with that file and every checksum matching, so a
save that died before the end, a damaged or truncated file and an empty step directory
are all refused the same way. `restore_latest` walks back from the newest step to the
newest one that passes, and moves each refused one to `<checkpoint dir>-damaged/` (so
that the resumed run can save that step again, and a person can look at it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from train.errors import UsageError

CHECKSUMS = "checksums.json"


def _is_key(x) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_saveable(tree) -> dict[str, jax.Array]:
  # Orbax refuses zero-size arrays (e.g. per-group fields with no groups); they carry no
  # data, so restore() takes them from the template.
  leaves = jax.tree.leaves(tree)
  return {f"{i:05d}": jax.random.key_data(x) if _is_key(x) else x
          for i, x in enumerate(leaves) if x.size}


def _abstract(x, stored_shape=None):
  """What orbax restores for template leaf `x`: its shape and sharding, or a leaf saved with
  another leading length (another device count) whole and replicated, for `adapt`."""
  if _is_key(x):
    x = jax.random.key_data(x)
  if stored_shape is not None and tuple(stored_shape) != x.shape and len(stored_shape) == x.ndim:
    return jax.ShapeDtypeStruct(tuple(stored_shape), x.dtype,
                                sharding=NamedSharding(x.sharding.mesh, P()))
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)


def _place(x, like):
  """`x` (a host or replicated value of `like`'s shape) with `like`'s sharding; each
  process fills only its own devices, as hggjax.shard_state does."""
  if isinstance(x, jax.Array) and not _is_key(x) and x.sharding == like.sharding:
    return x
  key = _is_key(like)
  data = np.asarray(jax.random.key_data(x) if key else x)
  shape = data.shape
  out = jax.make_array_from_callback(shape, like.sharding, lambda index: data[index])
  return jax.random.wrap_key_data(out, impl=jax.random.key_impl(like)) if key else out


@contextlib.contextmanager
def _quiet():
  """Orbax logs every failure it raises as pages of absl ERROR lines; the caller reports
  it in one line instead."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    logger.setLevel(level)


def manager(directory: str, keep: int = 2) -> ocp.CheckpointManager:
  # Synchronous saves: a run that ends right after a save must find it complete.
  # cleanup_tmp_directories: a save killed half-way leaves a temporary directory.
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False,
                                         cleanup_tmp_directories=True)
  # The handler named up front: item_metadata (the saved shapes, for `restore`) needs it.
  with _quiet():
    return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                 item_handlers=ocp.StandardCheckpointHandler())


def step_dir(mngr: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(mngr.directory), str(step))


def _digest(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _files(directory: str) -> list[str]:
  out = []
  for root, _, names in os.walk(directory):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), directory)
      if rel not in (CHECKSUMS, CHECKSUMS + ".tmp"):
        out.append(rel)
  return sorted(out)


def write_checksums(directory: str) -> None:
  sums = {rel: _digest(os.path.join(directory, rel)) for rel in _files(directory)}
  tmp = os.path.join(directory, CHECKSUMS + ".tmp")
  with open(tmp, "w") as f:
    json.dump(sums, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(directory, CHECKSUMS))  # atomic: all checksums or none


def verify(directory: str) -> str | None:
  """None when the checkpoint in `directory` is whole, else what is wrong with it."""
  path = os.path.join(directory, CHECKSUMS)
  if not os.path.isfile(path):
    return "no checksums.json: its save did not finish"
  try:
    with open(path) as f:
      sums = json.load(f)
  except (OSError, ValueError) as err:
    return f"checksums.json unreadable ({type(err).__name__})"
  files = _files(directory)
  missing = sorted(set(sums) - set(files))
  if missing:
    return f"{missing[0]} is missing"
  for rel in files:
    if rel not in sums:
      return f"{rel} was not part of the save"
    if _digest(os.path.join(directory, rel)) != sums[rel]:
      return f"{rel} does not match its checksum"
  return None


def _os_reason(err: BaseException) -> str | None:
  """The operating-system error inside `err` (tensorstore reports it as os_error_code)."""
  if isinstance(err, OSError) and err.errno:
    return os.strerror(err.errno)
  code = re.search(r"os_error_code='?(\d+)", str(err))
  return os.strerror(int(code.group(1))) if code else None


def save(mngr: ocp.CheckpointManager, step: int, tree) -> None:
  """Saves `tree` as `step`; a save the filesystem refuses is a one-line UsageError, and
  what it had written is removed."""
  try:
    with _quiet():
      mngr.save(step, args=ocp.args.StandardSave(_to_saveable(tree)))
      mngr.wait_until_finished()
    if jax.process_index() == 0:
      write_checksums(step_dir(mngr, step))
  except Exception as err:  # noqa: BLE001 - sorted below: the filesystem's, or a bug
    reason = _os_reason(err)
    if jax.process_index() == 0:
      _remove_partial(mngr, step)
    if reason is None:
      raise
    raise UsageError(f"could not save the checkpoint of step {step} in {mngr.directory}: "
                     f"{reason}") from None


def _remove_partial(mngr: ocp.CheckpointManager, step: int) -> None:
  """Removes what a failed save of `step` left: orbax's temporary directory, and the step
  directory unless it verifies (a good checkpoint is never removed)."""
  root = str(mngr.directory)
  for name in os.listdir(root) if os.path.isdir(root) else []:
    path = os.path.join(root, name)
    if name.startswith(f"{step}.orbax-checkpoint-tmp") or (
        name == str(step) and verify(path) is not None):
      shutil.rmtree(path, ignore_errors=True)
  with _quiet():
    mngr.reload()


def _candidates(mngr: ocp.CheckpointManager) -> list[int]:
  """Every step directory, newest first: orbax's own list and any directory named as a
  step (an empty one included: it must be refused, not skipped over silently)."""
  root = str(mngr.directory)
  named = {int(n) for n in os.listdir(root) if n.isdigit()} if os.path.isdir(root) else set()
  return sorted(named | set(mngr.all_steps()), reverse=True)


def _set_aside(mngr: ocp.CheckpointManager, step: int) -> str:
  """Moves a refused step out of orbax's directory; returns where it went."""
  root = str(mngr.directory).rstrip(os.sep)
  dest = os.path.join(root + "-damaged", str(step))
  n = 1
  while os.path.exists(dest):
    n += 1
    dest = os.path.join(root + "-damaged", f"{step}-{n}")
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.move(step_dir(mngr, step), dest)
  return dest


def restore_latest(mngr: ocp.CheckpointManager, template, report: Callable[[str], None],
                   adapt: Callable[[Any], Any] | None = None) -> tuple[int, Any] | None:
  """The newest checkpoint that passes `verify` and restores, as (step, state); None when
  there is none. Each refused one is reported through `report` in one line. `adapt`: as
  `restore`'s."""
  found = None
  for step in _candidates(mngr):
    reason = verify(step_dir(mngr, step))
    if reason is None:
      try:
        found = (step, restore(mngr, step, template, adapt))
        break
      except Exception as err:  # noqa: BLE001 - orbax raises many kinds; each is reported
        reason = f"it does not restore: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
    dest = _set_aside(mngr, step)
    report(f"checkpoint of step {step} refused ({reason}); moved to {dest}")
  if jax.process_count() > 1:  # every process must see the moves before it saves again
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices("train.checkpoint.restore_latest")
  with _quiet():
    mngr.reload()
  return found


def restore(mngr: ocp.CheckpointManager, step: int, template,
            adapt: Callable[[Any], Any] | None = None):
  """Restores `step` into the structure, dtypes and shardings of `template`.

  With `adapt`, a leaf saved with another leading length than `template`'s (per-device
  state saved on another number of devices) is read whole on every process, and
  `adapt(tree)` must return the tree in `template`'s shapes (host values are then placed
  with `template`'s shardings); any other difference still fails to restore.
  """
  leaves, treedef = jax.tree.flatten(template)
  stored = {}
  if adapt is not None:
    with _quiet():
      stored = {k: v.shape for k, v in mngr.item_metadata(step).items()}
  target = {f"{i:05d}": _abstract(x, stored.get(f"{i:05d}")) for i, x in enumerate(leaves)
            if x.size}
  with _quiet():
    restored = mngr.restore(step, args=ocp.args.StandardRestore(target))
  out = []
  for i, x in enumerate(leaves):
    if not x.size:
      out.append(x)
      continue
    y = restored[f"{i:05d}"]
    out.append(jax.random.wrap_key_data(y, impl=jax.random.key_impl(x)) if _is_key(x) else y)
  if all(target[f"{i:05d}"].shape == x.shape for i, x in enumerate(leaves) if x.size):
    return jax.tree.unflatten(treedef, out)
  adapted = jax.tree.leaves(adapt(jax.tree.unflatten(treedef, out)))
  shapes = [(np.shape(y), x.shape) for y, x in zip(adapted, leaves) if np.shape(y) != x.shape]
  if len(adapted) != len(leaves) or shapes:
    raise ValueError(f"saved with shape {shapes[0][0] if shapes else '?'} where this run has "
                     f"{shapes[0][1] if shapes else 'another tree'}")
  return jax.tree.unflatten(treedef, [_place(y, x) for y, x in zip(adapted, leaves)])
