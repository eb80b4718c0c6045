"""Error feedback + flatten + select + exchange, as one optax transformation.

Every compressor in the registry is `sparsify` with a different selector; this
is the one place where residuals are formed and kept.
"""

from collections.abc import Sequence
import dataclasses
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from hggjax import exchange
from hggjax.payload import Payload
from hggjax.selectors import Selector

Scope = Literal["leaf", "global"]


class CompressionState(NamedTuple):
  """State of every hggjax compressor.

  With ``axis_name`` set, every field carries a leading device axis: length 1 as
  the update sees it (one device's slice), length P once `hggjax.shard_state`
  has placed it on a mesh (sharded ``P(axis_name)``) or once it is stacked for
  ``pmap``. G below is the number of selection groups: one per compressed leaf
  (``scope="leaf"``), or 1 (``scope="global"``).
  """
  count: jax.Array        # int32[]: updates applied so far
  rng_key: jax.Array      # uint32[2]: split every step; folded with the device index
  residual: Any           # error feedback: a tuple over the flattened gradient leaves,
                          # float32 like the leaf for compressed leaves, None for the
                          # rest; None for compressors without error feedback
  threshold: jax.Array    # float32[G]: smallest magnitude sent last step, per group
                          # (hggtopk's history)
  history_hit: jax.Array  # bool[G]: hggtopk accepted the previous threshold, per group
  selected: jax.Array     # int32[]: elements this device sent last step (padding excluded)
  passed: jax.Array       # int32[]: elements that met the threshold, before trimming to k
  k: jax.Array            # int32[]: the target, sum of k over groups
  sent_bytes: jax.Array   # float32[]: bytes this device put on the wire last step
                          # (values + int32 indices of every slot, plus dense leaves)
  dense_bytes: jax.Array  # float32[]: bytes of a dense exchange of the same gradients


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static layout of a gradient pytree: what happens to each flattened leaf."""
  sparse: tuple[int, ...]               # leaves that are selected from
  dense: tuple[int, ...]                # floating leaves sent whole (mean)
  groups: tuple[tuple[int, ...], ...]   # selection groups, leaf indices each
  ks: tuple[int, ...]                   # k per group

  @property
  def num_groups(self) -> int:
    return len(self.groups)


def _plan(leaves: Sequence[Any], density: float, scope: Scope, min_size: int) -> _Plan:
  floating = [i for i, x in enumerate(leaves) if jnp.issubdtype(x.dtype, jnp.floating)]
  sparse = tuple(i for i in floating if leaves[i].size >= max(min_size, 1))
  dense = tuple(i for i in floating if i not in sparse)
  if scope == "global":
    groups = (sparse,) if sparse else ()
  else:
    groups = tuple((i,) for i in sparse)
  sizes = [sum(leaves[i].size for i in g) for g in groups]
  ks = tuple(max(1, round(density * n)) for n in sizes)
  return _Plan(sparse, dense, groups, ks)


def _wire_dtype(leaves, group):
  return jnp.result_type(*[leaves[i].dtype for i in group])


def sparsify(
    selector: Selector | None,
    density: float,
    *,
    error_feedback: bool,
    axis_name: str | None = None,
    scope: Scope = "leaf",
    min_size: int = 0,
    key: jax.Array | int = 0,
) -> optax.GradientTransformationExtraArgs:
  """Compress gradients with `selector`, exchange them, and keep the residual.

  Arguments are validated by the public constructors (`hggjax.topk` etc.); this
  function trusts them. ``selector=None`` sends every floating leaf dense.

  Args:
    selector: chooses k positions of a flat float32 vector (`hggjax.selectors`).
    density: share of elements sent per group, k = max(1, round(density * n)).
    error_feedback: keep what was not sent and add it to the next gradient.
    axis_name: mapped axis to exchange over; None compresses and decompresses
      locally.
    scope: "leaf" selects within each leaf, "global" over all compressed leaves
      concatenated.
    min_size: leaves with fewer elements are sent dense (averaged, no residual).
    key: PRNG key or integer seed for randomised selectors.

  The update takes one optional keyword, ``device_index``: with ``axis_name=None``
  it makes the update behave as device i of a data-parallel group would (the
  same random draws), so P devices can be simulated without collectives.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is `CompressionState`.
  """
  if isinstance(key, int):
    key = jax.random.PRNGKey(key)
  if selector is None:
    min_size = 2**62  # every floating leaf goes dense

  def per_device(state: CompressionState) -> CompressionState:
    return jax.tree.map(lambda x: x[None], state) if axis_name else state

  def local(state: CompressionState) -> CompressionState:
    return jax.tree.map(lambda x: x[0], state) if axis_name else state

  def init_fn(params):
    leaves = jax.tree.leaves(params)
    plan = _plan(leaves, density, scope, min_size)
    residual = None
    if error_feedback:
      residual = tuple(
          jnp.zeros(x.shape, jnp.float32) if i in plan.sparse else None
          for i, x in enumerate(leaves))
    g = plan.num_groups
    return per_device(CompressionState(
        count=jnp.zeros((), jnp.int32),
        rng_key=jnp.asarray(key),
        residual=residual,
        threshold=jnp.zeros((g,), jnp.float32),
        history_hit=jnp.zeros((g,), bool),
        selected=jnp.zeros((), jnp.int32),
        passed=jnp.zeros((), jnp.int32),
        k=jnp.asarray(sum(plan.ks), jnp.int32),
        sent_bytes=jnp.zeros((), jnp.float32),
        dense_bytes=jnp.zeros((), jnp.float32),
    ))

  def update_fn(updates, state, params=None, *, device_index=None, **extra_args):
    """Compress `updates`; `device_index` lets one process play device i without an axis."""
    del params, extra_args
    state = local(state)
    leaves, treedef = jax.tree.flatten(updates)
    plan = _plan(leaves, density, scope, min_size)
    key, next_key = jax.random.split(state.rng_key)
    if axis_name is not None:
      if device_index is not None:
        raise ValueError(
            "device_index is for axis_name=None only: under an axis the device "
            "index is the axis index.")
      device_index = exchange.device_index(axis_name)
    if device_index is not None:
      # Random selections differ per device: fold the device into this step's key.
      key = jax.random.fold_in(key, device_index)

    out = list(leaves)  # non-floating leaves pass through untouched
    residual = list(state.residual) if error_feedback else None
    sent_bytes, dense_bytes = 0, 0
    for i in plan.dense:
      out[i] = exchange.dense_mean(leaves[i], axis_name)
      sent_bytes += leaves[i].size * leaves[i].dtype.itemsize
    for i in plan.sparse:
      dense_bytes += leaves[i].size * leaves[i].dtype.itemsize
    dense_bytes += sent_bytes

    thresholds, hits, selected, passed = [], [], [], []
    for g, (group, k) in enumerate(zip(plan.groups, plan.ks)):
      # Step 1: error feedback, acc = g + residual, flattened (and concatenated).
      acc = [leaves[i].astype(jnp.float32).ravel() for i in group]
      if error_feedback:
        acc = [a + state.residual[i].ravel() for a, i in zip(acc, group)]
      x = acc[0] if len(acc) == 1 else jnp.concatenate(acc)
      # Step 2: select k positions; read their values in the wire dtype.
      sel = selector(x, k, state.threshold[g], jax.random.fold_in(key, g))
      wire = _wire_dtype(leaves, group)
      values = x.at[sel.indices].get(mode="fill", fill_value=0).astype(wire)
      payload = Payload(values, sel.indices)
      sent_bytes += k * (wire.itemsize + 4)
      # Step 3: exchange, then the mean of every device's payload, per leaf.
      mean = exchange.sparse_mean(payload, x.shape[0], axis_name)
      # Step 4: what was not sent (including rounding to the wire dtype) stays.
      if error_feedback:
        rest = x.at[sel.indices].add(-values.astype(jnp.float32), mode="drop")
      offset = 0
      for i in group:
        n = leaves[i].size
        out[i] = mean[offset:offset + n].reshape(leaves[i].shape).astype(leaves[i].dtype)
        if error_feedback:
          residual[i] = rest[offset:offset + n].reshape(leaves[i].shape)
        offset += n
      thresholds.append(sel.threshold)
      hits.append(sel.history_hit)
      selected.append(jnp.sum(sel.indices < x.shape[0], dtype=jnp.int32))
      passed.append(sel.passed)

    def total(xs):
      return sum(xs) if xs else jnp.zeros((), jnp.int32)

    new_state = CompressionState(
        count=optax.safe_increment(state.count),
        rng_key=next_key,
        residual=tuple(residual) if error_feedback else None,
        threshold=jnp.stack(thresholds) if thresholds else state.threshold,
        history_hit=jnp.stack(hits) if hits else state.history_hit,
        selected=jnp.asarray(total(selected), jnp.int32),
        passed=jnp.asarray(total(passed), jnp.int32),
        k=state.k,
        sent_bytes=jnp.asarray(sent_bytes, jnp.float32),
        dense_bytes=jnp.asarray(dense_bytes, jnp.float32),
    )
    return jax.tree.unflatten(treedef, out), per_device(new_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
