"""Error feedback + flatten + select + exchange, as one optax transformation.

Every compressor in the registry is `sparsify` with a different selector; this
is the one place where residuals are formed and kept.
"""

from collections.abc import Sequence
import dataclasses
import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from hggjax import exchange
from hggjax.payload import Payload, Selection
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
  pipeline: Any = None    # None, except for hggtopk(pipeline=True): its carried
                          # histogram, an `hgg.PipelineCarry` of float32[G] center
                          # (last k-th largest |acc|), float32[G] slope (d ln count /
                          # d ln threshold there) and int32[G] path (0 one pass, 1 one
                          # pass + trim, 2 second pass, -1 no step yet)
  velocity: Any = None    # momentum correction (``momentum > 0``): a tuple over the
                          # flattened gradient leaves, float32 like the leaf for
                          # floating leaves, None for the rest; None without momentum


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static layout of a gradient pytree: what happens to each flattened leaf."""
  sparse: tuple[int, ...]               # leaves that are selected from
  dense: tuple[int, ...]                # floating leaves sent whole (mean)
  groups: tuple[tuple[int, ...], ...]   # selection groups, leaf indices each
  sizes: tuple[int, ...]                # elements per group
  ks: tuple[int, ...]                   # k per group
  wires: tuple[Any, ...]                # dtype the values of each group travel in
  buckets: tuple[tuple[int, ...], ...]  # groups of equal size and wire dtype

  @property
  def num_groups(self) -> int:
    return len(self.groups)


def _plan(leaves: Sequence[Any], density: float, scope: Scope, min_size: int,
          per_group: bool = False) -> _Plan:
  floating = [i for i, x in enumerate(leaves) if jnp.issubdtype(x.dtype, jnp.floating)]
  sparse = tuple(i for i in floating if leaves[i].size >= max(min_size, 1))
  dense = tuple(i for i in floating if i not in sparse)
  if scope == "global":
    groups = (sparse,) if sparse else ()
  else:
    groups = tuple((i,) for i in sparse)
  sizes = tuple(sum(leaves[i].size for i in g) for g in groups)
  ks = tuple(max(1, round(density * n)) for n in sizes)
  wires = tuple(jnp.result_type(*[leaves[i].dtype for i in g]) for g in groups)
  # Groups of one size are selected by one loop body (lax.map): a model with
  # many same-shaped layers compiles the selector once per size, not per leaf.
  # `per_group` (the pipeline) gives every group its own selection and its own
  # all_gather instead, so that XLA may start a leaf's exchange as soon as its
  # gradient exists, while the rest of the backward pass still runs.
  buckets: dict[tuple[int, str], list[int]] = {}
  for g, (n, wire) in enumerate(zip(sizes, wires)):
    buckets.setdefault((g,) if per_group else (n, str(wire)), []).append(g)
  return _Plan(sparse, dense, groups, sizes, ks, wires,
               tuple(tuple(b) for b in buckets.values()))


def _unravel(flat: jax.Array, shape: tuple[int, ...]) -> tuple[jax.Array, ...]:
  """Index arrays into `shape` for flat positions; a position >= the size stays out
  of range (in the first dimension), so ``mode="drop"`` still drops padding slots."""
  strides = [math.prod(shape[j + 1:]) for j in range(len(shape))]
  return tuple(flat // s if j == 0 else (flat // s) % d
               for j, (s, d) in enumerate(zip(strides, shape)))


def _select_rows(selector: Selector, x, k, prev_thresholds, keys) -> Selection:
  """`selector` over the rows of x[m, n]; every Selection field gains a leading m."""
  if x.shape[0] == 1:
    return jax.tree.map(lambda a: a[None], selector(x[0], k, prev_thresholds[0], keys[0]))
  return jax.lax.map(lambda args: selector(args[0], k, args[1], args[2]),
                     (x, prev_thresholds, keys))


def sparsify(
    selector: Selector | None,
    density: float,
    *,
    error_feedback: bool,
    axis_name: str | None = None,
    scope: Scope = "leaf",
    min_size: int = 0,
    key: jax.Array | int = 0,
    pipeline: Any = None,
    momentum: float = 0.0,
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
    momentum: momentum correction (Lin et al. 2018, DGC): each device keeps its
      own velocity u = momentum * u + g and compresses u (plus the residual)
      instead of g; chain a plain ``optax.sgd(lr)`` after it. 0 disables it.
    pipeline: an `hgg.PipelinedSelector` (replaces `selector`): selection from
      state carried between steps (``CompressionState.pipeline``), and one
      selection and one all_gather per group.

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
    plan = _plan(leaves, density, scope, min_size, pipeline is not None)
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
        pipeline=None if pipeline is None else pipeline.init(g),
        velocity=tuple(
            jnp.zeros(x.shape, jnp.float32) if i in plan.sparse + plan.dense else None
            for i, x in enumerate(leaves)) if momentum else None,
    ))

  def update_fn(updates, state, params=None, *, device_index=None, **extra_args):
    """Compress `updates`; `device_index` lets one process play device i without an axis."""
    del params, extra_args
    held = state.residual  # as stored: with an axis, [1, *shape] per leaf (see step 4)
    state = local(state)
    leaves, treedef = jax.tree.flatten(updates)
    plan = _plan(leaves, density, scope, min_size, pipeline is not None)
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
    residual = list(held) if error_feedback else None  # kept in the stored shapes
    # Momentum correction: what is compressed is each device's own velocity.
    grads, velocity = list(leaves), None
    if momentum:
      velocity = list(state.velocity)
      for i in plan.sparse + plan.dense:
        velocity[i] = momentum * velocity[i] + leaves[i].astype(jnp.float32)
        grads[i] = velocity[i]
    sent_bytes, dense_bytes = 0, 0
    for i in plan.dense:
      out[i] = exchange.dense_mean(grads[i].astype(leaves[i].dtype), axis_name)
      sent_bytes += leaves[i].size * leaves[i].dtype.itemsize
    for i in plan.sparse:
      dense_bytes += leaves[i].size * leaves[i].dtype.itemsize
    dense_bytes += sent_bytes

    threshold, history_hit, carry = state.threshold, state.history_hit, state.pipeline
    selected = passed = jnp.zeros((), jnp.int32)
    for bucket in plan.buckets:
      n, k, wire = plan.sizes[bucket[0]], plan.ks[bucket[0]], plan.wires[bucket[0]]
      # Step 1: error feedback, acc = g + residual: one flat float32 row per group.
      rows, kept = [], None
      leaf = plan.groups[bucket[0]][0]
      if (error_feedback and len(bucket) == 1 and len(plan.groups[bucket[0]]) == 1
          and held[leaf].ndim):
        # One leaf alone: acc in the stored residual's own shape (see step 4).
        kept = grads[leaf].astype(jnp.float32).reshape(held[leaf].shape) + held[leaf]
        rows.append(kept.ravel())
      else:
        for g in bucket:
          acc = [grads[i].astype(jnp.float32).ravel() for i in plan.groups[g]]
          if error_feedback:
            acc = [a + state.residual[i].ravel() for a, i in zip(acc, plan.groups[g])]
          rows.append(acc[0] if len(acc) == 1 else jnp.concatenate(acc))
      x = jnp.stack(rows)  # [m, n]
      # Step 2: select k positions per row; read their values in the wire dtype.
      ids = jnp.asarray(bucket)
      keys = jnp.stack([jax.random.fold_in(key, g) for g in bucket])
      if pipeline is None:
        sel = _select_rows(selector, x, k, threshold[ids], keys)
      else:  # one group per bucket
        sel, carry_g = pipeline.select(x[0], k, jax.tree.map(lambda v: v[bucket[0]], carry))
        sel = jax.tree.map(lambda v: v[None], sel)
        carry = jax.tree.map(lambda v, u: v.at[bucket[0]].set(u), carry, carry_g)
      values = jnp.take_along_axis(x, sel.indices, axis=1, mode="fill", fill_value=0)
      values = values.astype(wire)
      sent_bytes += len(bucket) * k * (wire.itemsize + 4)
      # Step 3: exchange, then the mean of every device's payload.
      mean = exchange.sparse_mean(Payload(values, sel.indices), n, axis_name)
      # Step 4: what was not sent (including rounding to the wire dtype) stays.
      if kept is not None:
        # Scattered in the stored residual's shape, the new residual is written into
        # the old one's buffer when the caller donates the state; through a reshape or
        # the added device axis XLA copied all n elements once more.
        sent = values[0].astype(jnp.float32)
        # Every read of acc must come before this scatter overwrites it in place, or XLA
        # copies acc first. Reads that feed the indices or values do; the selector's
        # threshold (it reads the sent magnitudes again) is tied in here. It changes
        # nothing unless the threshold is NaN, i.e. acc holds NaN already.
        sent = jnp.where(jnp.isnan(sel.threshold[0]), jnp.nan, sent)
        residual[leaf] = kept.at[_unravel(sel.indices[0], kept.shape)].add(-sent, mode="drop")
      elif error_feedback:
        if len(bucket) == 1:
          # On the 1-D row itself, the value the selector read: scattering into the
          # [1, n] view instead made XLA compute g + residual twice (one more pass).
          rest = rows[0].at[sel.indices[0]].add(-values[0].astype(jnp.float32), mode="drop")[None]
        else:
          row = jnp.arange(len(bucket))[:, None]
          rest = x.at[row, sel.indices].add(-values.astype(jnp.float32), mode="drop")
      for r, g in enumerate(bucket):
        offset = 0
        for i in plan.groups[g]:
          size, shape = leaves[i].size, leaves[i].shape
          out[i] = mean[r, offset:offset + size].reshape(shape).astype(leaves[i].dtype)
          if error_feedback and kept is None:
            residual[i] = rest[r, offset:offset + size].reshape(shape)
            residual[i] = residual[i][None] if axis_name else residual[i]
          offset += size
      threshold = threshold.at[ids].set(sel.threshold)
      history_hit = history_hit.at[ids].set(sel.history_hit)
      selected += jnp.sum(sel.indices < n, dtype=jnp.int32)
      passed += jnp.sum(sel.passed, dtype=jnp.int32)

    new_state = per_device(CompressionState(
        count=optax.safe_increment(state.count),
        rng_key=next_key,
        residual=None,  # already in the stored shapes, set below
        threshold=threshold,
        history_hit=history_hit,
        selected=selected,
        passed=passed,
        k=state.k,
        sent_bytes=jnp.asarray(sent_bytes, jnp.float32),
        dense_bytes=jnp.asarray(dense_bytes, jnp.float32),
        pipeline=carry,
        velocity=tuple(velocity) if momentum else None,
    ))
    new_state = new_state._replace(residual=tuple(residual) if error_feedback else None)
    return jax.tree.unflatten(treedef, out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
