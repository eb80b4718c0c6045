"""`sparsify`: error feedback + select + exchange, as one optax transformation.

Every compressor in the registry but ``none`` is `sparsify` with a different
selector. The update runs, per bucket of equally sized selection groups:

  Step 1  accumulate: acc = (velocity or g) + residual  (`error_feedback.accumulate`)
  Step 2  select k positions per group                   (the selector)
  Step 3  exchange: read the values in the wire dtype, all_gather, mean (`exchange`)
  Step 4  keep the residual: residual' = acc - sent      (`error_feedback.keep`)
  Step 5  record statistics                              (`state.CompressionStats`)
"""

from collections.abc import Sequence
import dataclasses
import numbers
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from hggjax import error_feedback as ef
from hggjax import exchange
from hggjax.payload import Payload, Selection
from hggjax.selectors.base import Selector
from hggjax.state import (CompressionState, CompressionStats, with_device_axis,
                          without_device_axis)

Scope = Literal["leaf", "global"]


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static layout of a gradient pytree: what happens to each flattened leaf."""
  sparse: tuple[int, ...]               # leaves that are selected from
  dense: tuple[int, ...]                # floating leaves sent whole (mean)
  groups: tuple[tuple[int, ...], ...]   # selection groups, leaf indices each
  sizes: tuple[int, ...]                # elements per group
  ks: tuple[int, ...]                   # k per group
  wires: tuple[Any, ...]                # dtype the values of each group travel in
  buckets: tuple[tuple[int, ...], ...]  # groups selected together (equal size and wire dtype)

  @property
  def num_groups(self) -> int:
    return len(self.groups)


def _plan(leaves: Sequence[Any], density: float, scope: Scope, min_size: int,
          separate_groups: bool) -> _Plan:
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
  buckets: dict[tuple[int, str], list[int]] = {}
  for g, (n, wire) in enumerate(zip(sizes, wires)):
    buckets.setdefault((g,) if separate_groups else (n, str(wire)), []).append(g)
  return _Plan(sparse, dense, groups, sizes, ks, wires,
               tuple(tuple(b) for b in buckets.values()))


def prng_key(key) -> jax.Array:
  """A PRNG key from a key or any integer seed (Python or NumPy)."""
  if isinstance(key, numbers.Integral) and not isinstance(key, bool):
    return jax.random.PRNGKey(int(key))
  return jnp.asarray(key)


def device_of(axis_name: str | None, device_index) -> jax.Array | None:
  """The index of this device: the axis index under an axis, else the caller's (or None)."""
  if axis_name is None:
    return device_index
  if device_index is not None:
    raise ValueError(
        "device_index is for axis_name=None only: under an axis the device "
        "index is the axis index.")
  return exchange.device_index(axis_name)


def _select(selector: Selector, x: jax.Array, k: int, carry: Any, ids: jax.Array,
            keys: jax.Array) -> tuple[Selection, Any]:
  """Step 2: `selector` over the rows of x[m, n]; Selection fields and carry gain a leading m."""
  rows = jax.tree.map(lambda v: v[ids], carry)
  if x.shape[0] == 1:
    sel, new = selector.select(x[0], k, jax.tree.map(lambda v: v[0], rows), keys[0])
    return jax.tree.map(lambda a: a[None], (sel, new))
  return jax.lax.map(lambda args: selector.select(args[0], k, args[1], args[2]),
                     (x, rows, keys))


def sparsify(
    selector: Selector,
    density: float,
    *,
    error_feedback: bool,
    axis_name: str | None = None,
    scope: Scope = "leaf",
    min_size: int = 0,
    key: jax.Array | int = 0,
    momentum: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
  """Compress gradients with `selector`, exchange them, and keep the residual.

  Arguments are validated by the public constructors (`hggjax.topk` etc.); this
  function trusts them.

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

  The update takes one optional keyword, ``device_index``: with ``axis_name=None``
  it makes the update behave as device i of a data-parallel group would (the
  same random draws), so P devices can be simulated without collectives.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is `CompressionState`.
  """

  def plan_of(leaves) -> _Plan:
    return _plan(leaves, density, scope, min_size, selector.separate_groups)

  def init_fn(params):
    leaves = jax.tree.leaves(params)
    plan = plan_of(leaves)
    g = plan.num_groups
    residual = velocity = None
    if error_feedback:
      residual = tuple(jnp.zeros(x.shape, jnp.float32) if i in plan.sparse else None
                       for i, x in enumerate(leaves))
    if momentum:
      velocity = tuple(jnp.zeros(x.shape, jnp.float32) if i in plan.sparse + plan.dense
                       else None for i, x in enumerate(leaves))
    stats = CompressionStats(
        selected=jnp.zeros((), jnp.int32),
        passed=jnp.zeros((), jnp.int32),
        k=jnp.asarray(sum(plan.ks), jnp.int32),
        threshold=jnp.zeros((g,), jnp.float32),
        history_hit=jnp.zeros((g,), bool),
        sent_bytes=jnp.zeros((), jnp.float32),
        dense_bytes=jnp.zeros((), jnp.float32))
    return with_device_axis(CompressionState(
        count=jnp.zeros((), jnp.int32), rng_key=prng_key(key), residual=residual,
        velocity=velocity, carry=selector.init(g), stats=stats), axis_name)

  def update_fn(updates, state, params=None, *, device_index=None, **extra_args):
    """Compress `updates`; `device_index` lets one process play device i without an axis."""
    del params, extra_args
    stored = state.residual  # as the caller holds it (device axis included): Step 4 writes over it
    state = without_device_axis(state, axis_name)
    leaves, treedef = jax.tree.flatten(updates)
    plan = plan_of(leaves)
    key, next_key = jax.random.split(state.rng_key)
    device = device_of(axis_name, device_index)
    if device is not None:  # random selections differ per device
      key = jax.random.fold_in(key, device)

    grads, velocity = ef.momentum_step(leaves, state.velocity, plan.sparse + plan.dense, momentum)
    out = list(leaves)  # non-floating leaves pass through untouched
    for i in plan.dense:
      out[i] = exchange.dense_mean(grads[i].astype(leaves[i].dtype), axis_name)
    residual = list(stored) if error_feedback else None
    carry, threshold, history_hit = state.carry, state.stats.threshold, state.stats.history_hit
    selected = passed = jnp.zeros((), jnp.int32)
    sent_bytes = sum(leaves[i].size * leaves[i].dtype.itemsize for i in plan.dense)
    for bucket in plan.buckets:
      n, k, wire = plan.sizes[bucket[0]], plan.ks[bucket[0]], plan.wires[bucket[0]]
      groups = [plan.groups[g] for g in bucket]
      # Step 1: acc = g + residual, one float32 row per group.
      in_place = (error_feedback and len(groups) == 1 and len(groups[0]) == 1
                  and stored[groups[0][0]].ndim > 0)
      x, kept = ef.accumulate(grads, groups, stored, state.residual, in_place)
      # Step 2: select k positions per row.
      ids = jnp.asarray(bucket)
      keys = jnp.stack([jax.random.fold_in(key, g) for g in bucket])
      sel, carry_rows = _select(selector, x, k, carry, ids, keys)
      carry = jax.tree.map(lambda v, u: v.at[ids].set(u), carry, carry_rows)
      # Step 3: exchange the values in the wire dtype; the mean of every device's payload.
      values = jnp.take_along_axis(x, sel.indices, axis=1, mode="fill", fill_value=0)
      values = values.astype(wire)
      mean = exchange.sparse_mean(Payload(values, sel.indices), n, axis_name)
      # Step 4: what was not sent (including rounding to the wire dtype) stays.
      rest = ef.keep(x, kept, sel.indices, values, sel.threshold) if error_feedback else None
      for r, group in enumerate(groups):
        offset = 0
        for i in group:
          size, shape = leaves[i].size, leaves[i].shape
          out[i] = mean[r, offset:offset + size].reshape(shape).astype(leaves[i].dtype)
          if error_feedback:
            residual[i] = rest if kept is not None else _stored_shape(
                rest[r, offset:offset + size].reshape(shape), axis_name)
          offset += size
      # Step 5: statistics.
      threshold = threshold.at[ids].set(sel.threshold)
      history_hit = history_hit.at[ids].set(sel.history_hit)
      selected += jnp.sum(sel.indices < n, dtype=jnp.int32)
      passed += jnp.sum(sel.passed, dtype=jnp.int32)
      sent_bytes += len(bucket) * k * (wire.itemsize + 4)

    dense_bytes = sum(leaves[i].size * leaves[i].dtype.itemsize for i in plan.sparse + plan.dense)
    stats = CompressionStats(
        selected=selected, passed=passed, k=state.stats.k, threshold=threshold,
        history_hit=history_hit, sent_bytes=jnp.asarray(sent_bytes, jnp.float32),
        dense_bytes=jnp.asarray(dense_bytes, jnp.float32))
    new_state = with_device_axis(CompressionState(
        count=optax.safe_increment(state.count), rng_key=next_key, residual=None,
        velocity=velocity, carry=carry, stats=stats), axis_name)
    # The residual is in the stored shapes already (device axis included).
    new_state = new_state._replace(residual=tuple(residual) if error_feedback else None)
    return jax.tree.unflatten(treedef, out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _stored_shape(x: jax.Array, axis_name: str | None) -> jax.Array:
  return x[None] if axis_name else x
