"""`reshard_state`: an optimizer state's per-device parts for another number of devices.

A compressor's state (`CompressionState`) and a `per_device` state (Adam's moments
before the compressor) keep one entry per device on a leading axis; a run resumed on
another number of devices or hosts needs that axis at the new length. Error feedback
owes the mean over devices of their residuals (each step sends the mean of what the
devices select from gradient + residual, and keeps the rest), so the one rule below
keeps that mean:

1. g = gcd(old length, new length). Old device i belongs to group i // (old / g) (the
   old devices in contiguous runs of old / g), new device j to group j // (new / g).
2. Fold: each group's value is its old devices' mean (float64 sum, one rounding back
   to the leaf's dtype) for the accumulators: residuals, velocities and every floating
   leaf of a `per_device` state (Adam's moments); the largest value for step counts
   (every signed integer leaf: `CompressionState.count`, Adam's count and refreshes,
   so the pmax that `exchange="leader_mask"` agrees its leader by is unchanged); the
   group's first device for the rest (PRNG keys, selector carries, statistics: a carry
   is one device's consistent hint, and a key is folded with the device index where it
   is used, so copies still draw apart).
3. Split: each new device takes its group's value, a bit-for-bit copy.

Invariant (float leaves): mean_j new[j] == mean_i old[i], in exact arithmetic. Growing
by a multiple (2 -> 4, 2 -> 8) or keeping the length, no value is rounded: every new
entry is a copy of an old one, so the equality is exact. Folding (4 -> 2, 8 -> 2),
rounding enters once per element, when a group's mean is stored back in float32: the
owed mean then moves by at most half a unit in the last place of each new value, and
not at all when the group mean is representable (equal values, as a shared second
moment's, come back unchanged).
"""

import math
from typing import Any

import jax
import numpy as np

from hggjax.per_device import PerDeviceState
from hggjax.state import CompressionState

_MEAN_FIELDS = ("residual", "velocity")  # CompressionState fields that hold owed updates


def _is_per_device(x) -> bool:
  return isinstance(x, (CompressionState, PerDeviceState))


def _lengths(devices) -> tuple[int, int]:
  """(a compressor state's leading length, a `per_device` state's) for `devices`."""
  if isinstance(devices, (tuple, list)):
    if len(devices) != 2 or not all(isinstance(n, int) and n >= 1 for n in devices):
      raise ValueError(f"devices={devices!r}: give the device count, or the (slow, fast) "
                       "sizes of a two-level mesh, e.g. (2, 4) for 2 hosts of 4 devices")
    slow, fast = devices
    return slow, slow * fast  # a compressor keeps one state per slow-axis position
  if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
    raise ValueError(f"devices={devices!r}: give the device count (an int >= 1), or the "
                     "(slow, fast) sizes of a two-level mesh")
  return devices, devices


def _fold_split(x, new: int, kind: str):
  """`x` (leading axis: old devices) with a leading axis of `new` devices (steps 1-3)."""
  is_key = jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)
  impl = jax.random.key_impl(x) if is_key else None
  a = np.asarray(jax.random.key_data(x) if is_key else x)
  old = a.shape[0]
  g = math.gcd(old, new)
  groups = a.reshape((g, old // g) + a.shape[1:])
  if kind == "mean" and np.issubdtype(a.dtype, np.floating):
    folded = groups.astype(np.float64).mean(axis=1).astype(a.dtype)
  elif kind != "first" and np.issubdtype(a.dtype, np.signedinteger):
    folded = groups.max(axis=1)
  else:
    folded = groups[:, 0]
  out = np.repeat(folded, new // g, axis=0)
  return jax.random.wrap_key_data(out, impl=impl) if is_key else out


def _reshard_sub(sub, new: int):
  # Zero-size leaves (per-group fields without groups) hold nothing: each keeps its own.
  leaves = [x for x in jax.tree.leaves(sub) if np.size(x) or not np.ndim(x)]
  found = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
  if len(found) > 1 or None in found:
    raise ValueError(f"a {type(sub).__name__} with leading axes of lengths "
                     f"{sorted(found, key=str)}: pass the state as saved from a mesh (after hggjax.shard_state), every "
                     "leaf with the same leading device axis")
  if isinstance(sub, PerDeviceState):
    return jax.tree.map(lambda x: _fold_split(x, new, "mean"), sub)
  fields = {}
  for name, value in sub._asdict().items():
    kind = "mean" if name in _MEAN_FIELDS else "max" if name == "count" else "first"
    fields[name] = jax.tree.map(lambda x, kind=kind: _fold_split(x, new, kind), value)
  return CompressionState(**fields)


def reshard_state(opt_state: Any, devices: int | tuple[int, int]) -> Any:
  """`opt_state` with every per-device state's leading axis resized for `devices`.

  The old length is read from the state itself; the module docstring states the rule
  (fold contiguous groups of old devices, split by copying) and its invariant: the mean
  over devices of each residual, velocity and per-device moment is unchanged (exactly
  when growing by a multiple; one float32 rounding per element when folding). Leaves
  outside compressor and `per_device` states (replicated ones) are returned as given.

  Args:
    opt_state: an optimizer state as `hggjax.shard_state` places it (or its host copy,
      e.g. restored from a checkpoint): each compressor and `per_device` state with a
      leading device axis.
    devices: the new mesh: the device count of a one-level ``axis_name``, or the
      ``(slow, fast)`` sizes of a two-level one (a compressor's state then has one entry
      per slow-axis position, a `per_device` state one per device).

  Returns:
    The same tree with NumPy arrays (typed PRNG keys stay keys) in the per-device states;
    place it with the shardings of a freshly sharded state (`hggjax.shard_state`).

  Example:
    >>> import jax, optax, hggjax
    >>> mesh = jax.make_mesh((1,), ("data",))
    >>> tx = optax.chain(hggjax.topk(0.5, axis_name="data"), optax.sgd(0.1))
    >>> state = hggjax.shard_state(tx.init({"w": jax.numpy.ones(8)}), mesh, "data")
    >>> hggjax.compression_state(hggjax.reshard_state(state, 4)).residual[0].shape
    (4, 8)
  """
  compressor_len, per_device_len = _lengths(devices)

  def sub(x):
    if isinstance(x, PerDeviceState):
      return _reshard_sub(x, per_device_len)
    if isinstance(x, CompressionState):
      return _reshard_sub(x, compressor_len)
    return x

  return jax.tree.map(sub, opt_state, is_leaf=_is_per_device)
