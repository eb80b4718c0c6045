"""Placing optimizer state for a data-parallel step under ``jax.shard_map``.

Residuals (and the per-step statistics) differ per device, so a compressor's
state carries a leading device axis sharded ``P(axis_name)``; everything else
in the optimizer state (momentum, step counts) is replicated, ``P()``. With a
two-level ``axis_name=(slow, fast)`` the devices along the fast axis compute the
same state (they compress the same mean), so it is sharded over the slow axis
only, ``P(slow)``, and replicated over the fast one; shard_map's type check then
knows the update's result is replicated too.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hggjax import exchange
from hggjax.compressed_adam import AdamState
from hggjax import state as state_lib
from hggjax import validate
from hggjax.per_device import PerDeviceState
from hggjax.state import CompressionState


def _is_compression(x) -> bool:
  """State kept per device: a compressor's, or that of a `per_device` transformation."""
  return isinstance(x, (CompressionState, PerDeviceState))


def _state_axis(sub, axis_name) -> str | tuple[str, str]:
  """The mesh axes a per-device state's leading axis is sharded over: for a compressor,
  the slow one of a pair (it compresses the fast axis's mean); for `per_device`, every
  axis (it sees each device's own updates, before that mean)."""
  axis_name = validate.axis_name(axis_name)
  slow, _ = exchange.split_axes(axis_name)
  if slow is None:
    raise ValueError("axis_name is None: a compressor state without a device axis is "
                     "replicated; pass the axis the compressor was built with.")
  return axis_name if isinstance(sub, PerDeviceState) else slow


def state_specs(opt_state: Any, axis_name: str | tuple[str, str]) -> Any:
  """PartitionSpecs for `opt_state`: P(axis_name) inside per-device states (compressors,
  `per_device`), P() elsewhere.

  Use them as the ``in_specs``/``out_specs`` entry of the optimizer state. For a
  two-level ``(slow, fast)`` pair a compressor's state is P(slow) and a `per_device`
  state P((slow, fast)).
  """
  def spec(sub):
    if _is_compression(sub):
      axis = _state_axis(sub, axis_name)
      return jax.tree.map(lambda _: P(axis), sub)
    return P()

  return jax.tree.map(spec, opt_state, is_leaf=_is_compression)


def shard_state(opt_state: Any, mesh: Mesh, axis_name: str | tuple[str, str]) -> Any:
  """`opt_state` from ``tx.init`` placed on `mesh`, ready for ``jax.shard_map``.

  Compressor and `per_device` states (built with ``axis_name=axis_name``) are
  repeated once per device along their leading axis and sharded over `axis_name`;
  every other leaf is replicated. For a two-level ``(slow, fast)`` pair a compressor's
  state is repeated once per slow-axis position, sharded over the slow axis and
  replicated over the fast one; a `per_device` state once per device.

  Example:
    >>> import jax, optax, hggjax
    >>> mesh = jax.make_mesh((1,), ("data",))
    >>> tx = optax.chain(hggjax.topk(0.1, axis_name="data"), optax.sgd(0.1))
    >>> state = hggjax.shard_state(tx.init({"w": jax.numpy.ones(8)}), mesh, "data")
  """
  replicated = NamedSharding(mesh, P())

  def build(x, sharding, shape):
    # Each process fills only its own devices from its host copy: no device
    # ever holds P copies, and the same call works across processes.
    x = np.asarray(x)
    return jax.make_array_from_callback(shape, sharding, lambda index: x[index])

  def place(sub):
    if not _is_compression(sub):
      return jax.tree.map(lambda x: build(x, replicated, np.shape(x)), sub)
    leaves = jax.tree.leaves(sub)
    if any(np.ndim(x) < 1 or np.shape(x)[0] != 1 for x in leaves):
      raise ValueError(
          "this compressor state has no device axis: build the compressor with "
          f"axis_name={axis_name!r} before calling tx.init.")
    axis = _state_axis(sub, axis_name)
    devices = int(np.prod([mesh.shape[a] for a in (axis if isinstance(axis, tuple) else (axis,))]))
    per_device = NamedSharding(mesh, P(axis))
    # Every device starts from the same state: slot d of the device axis is x[0].
    return jax.tree.map(
        lambda x: build(np.broadcast_to(x, (devices,) + x.shape[1:]), per_device,
                        (devices,) + x.shape[1:]), sub)

  return jax.tree.map(place, opt_state, is_leaf=_is_compression)


def compression_state(opt_state: Any) -> CompressionState:
  """The first `CompressionState` inside `opt_state` (e.g. an optax.chain's state)."""
  return state_lib.find(opt_state)


def stats(opt_state: Any) -> dict[str, jax.Array]:
  """What the last step did, read from the compressor's state, for logging.

  Keys: ``selected`` (elements sent), ``passed`` (met the threshold before the
  trim), ``k`` (target), ``threshold`` (float32[G], smallest magnitude sent per
  group), ``history_hits`` (groups where hggtopk selected from what the previous
  step left), ``groups``, ``sent_bytes`` and ``received_bytes`` (this device's own
  data put on the wire, other devices' data arriving; `hggjax.exchange.traffic`)
  and ``dense_bytes`` (a dense exchange's payload); ``run_sent_bytes``: sent_bytes
  summed over every step so far (a float32 sum, about 7 significant digits); ``refresh_bytes``: the bytes
  this device has sent so far, over the whole run, refreshing `hggjax.adamw`'s shared
  second moment (0 without one; add ``refresh_bytes / steps`` to ``sent_bytes`` for
  the run's mean per step). With a device axis each value has a leading axis of
  length P: reduce it yourself (e.g. sum ``sent_bytes`` for the whole wire).
  """
  s = state_lib.find(opt_state).stats
  return {
      "selected": s.selected,
      "passed": s.passed,
      "k": s.k,
      "threshold": s.threshold,
      "history_hits": jnp.sum(s.history_hit, axis=-1),
      "groups": jnp.full(s.k.shape, s.threshold.shape[-1]),
      "sent_bytes": s.sent_bytes,
      "received_bytes": s.received_bytes,
      "dense_bytes": s.dense_bytes,
      "run_sent_bytes": s.run_sent_bytes,
      "nonfinite": s.nonfinite,
      "refresh_bytes": _refresh_bytes(opt_state, s.sent_bytes),
  }


def _refresh_bytes(opt_state: Any, like: jax.Array) -> jax.Array:
  """float32, `like`'s shape: refreshes so far x the bytes of one dense second moment."""
  is_adam = lambda x: isinstance(x, AdamState)  # noqa: E731
  total = jnp.zeros(jnp.shape(like), jnp.float32)
  for st in (x for x in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(x)):
    if st.shared_nu is None:
      continue
    per_refresh = sum(int(np.prod(np.shape(v)[1 if np.ndim(st.count) else 0:])) * 4
                      for v in jax.tree.leaves(st.shared_nu))
    refreshes = st.refreshes.astype(jnp.float32)
    if refreshes.shape != total.shape:  # two levels: moments per device, stats per host
      refreshes = jnp.broadcast_to(jnp.max(refreshes), total.shape)  # refreshed together
    total = total + refreshes * float(per_refresh)
  return total
