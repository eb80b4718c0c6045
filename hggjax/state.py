"""The state every hggjax compressor keeps, and its per-step statistics.

With ``axis_name`` set, every field carries a leading device axis: length 1 as
the update sees it (one device's slice), length P once `hggjax.shard_state` has
placed it on a mesh (sharded ``P(axis_name)``) or once it is stacked for
``pmap``. With a two-level ``axis_name=(slow, fast)`` the axis has one entry per
slow-axis position (per host), sharded ``P(slow)`` and replicated over the fast
axis: the devices of one host keep one residual. G below is the number of selection
groups: one per compressed leaf (``scope="leaf"``), or 1 (``scope="global"``); 0 for
``none``.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class CompressionStats(NamedTuple):
  """What the last step did, per device (read them with `hggjax.stats`)."""
  selected: jax.Array     # int32[]: elements this device sent (padding excluded)
  passed: jax.Array       # int32[]: elements that met the threshold, before trimming to k
  k: jax.Array            # int32[]: the target, sum of k over groups
  threshold: jax.Array    # float32[G]: smallest magnitude sent, per group
  history_hit: jax.Array  # bool[G]: HGG-TopK selected from what the previous step left
                          # (its threshold accepted; pipelined: one pass, paths 0-1)
  sent_bytes: jax.Array   # float32[]: bytes of this device's own data put on the wire,
                          # each byte once (`exchange.traffic`: every slot's value and
                          # position as `hggjax.wire` codes them; plus dense leaves,
                          # once each)
  received_bytes: jax.Array  # float32[]: bytes of other devices' data arriving here
                          # (`exchange.traffic`; dense leaves as a ring all-reduce's
                          # 2 (P - 1) / P of their size); 0 without an axis. Two
                          # levels: the slow axis only (the fast dense mean is not
                          # counted)
  dense_bytes: jax.Array  # float32[]: bytes of a dense exchange of the same gradients
  run_sent_bytes: jax.Array  # float32[]: sent_bytes summed over every step so far (the
                          # run's mean per step, divided by the steps, also when the
                          # traffic changes, e.g. under `hggjax.density_warmup`)
  nonfinite: jax.Array    # int32[]: 1 when this device's gradient held NaN or Inf and
                          # the step was skipped (nothing sent, no other state changed)


class CompressionState(NamedTuple):
  """State of every hggjax compressor; found in a chain's state by `hggjax.stats`."""
  count: jax.Array     # int32[]: steps this device contributed to (skipped steps excluded)
  rng_key: jax.Array   # uint32[2]: split every step; folded with the device and group
  residual: Any        # error feedback: a tuple over the flattened gradient leaves,
                       # float32[*leaf.shape] for compressed leaves, None for the rest;
                       # None for compressors without error feedback
  velocity: Any        # momentum correction (``momentum > 0``): a tuple over the
                       # flattened gradient leaves, float32[*leaf.shape] for floating
                       # leaves, None for the rest; None without momentum
  carry: Any           # what the selector keeps between steps, [G] arrays
                       # (`selectors.History` for hggtopk, `selectors.PipelineCarry`
                       # with pipeline=True, () for selectors without memory)
  stats: CompressionStats


def empty_stats(num_groups: int, k: int) -> CompressionStats:
  """The statistics before any step: nothing sent yet (every field its own buffer, so
  that a donated state never donates one buffer twice)."""
  return CompressionStats(
      selected=jnp.zeros((), jnp.int32), passed=jnp.zeros((), jnp.int32),
      k=jnp.asarray(k, jnp.int32), threshold=jnp.zeros((num_groups,), jnp.float32),
      history_hit=jnp.zeros((num_groups,), bool), sent_bytes=jnp.zeros((), jnp.float32),
      received_bytes=jnp.zeros((), jnp.float32), dense_bytes=jnp.zeros((), jnp.float32),
      run_sent_bytes=jnp.zeros((), jnp.float32), nonfinite=jnp.zeros((), jnp.int32))


def with_device_axis(state: CompressionState, axis_name: str | None) -> CompressionState:
  """`state` with the leading device axis of length 1 that the update's caller sees."""
  return jax.tree.map(lambda x: x[None], state) if axis_name else state


def without_device_axis(state: CompressionState, axis_name: str | None) -> CompressionState:
  return jax.tree.map(lambda x: x[0], state) if axis_name else state


def find(opt_state: Any) -> CompressionState:
  """The first `CompressionState` inside `opt_state` (e.g. an optax.chain's state)."""
  is_state = lambda x: isinstance(x, CompressionState)  # noqa: E731
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(x)]
  if not found:
    raise ValueError("no hggjax compressor state found in this optimizer state.")
  return found[0]
