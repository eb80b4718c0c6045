"""`sparsify`: error feedback + select + exchange, as one optax transformation.

Every compressor in the registry but ``none`` is `sparsify` with a different
selector. The update runs, per bucket of equally sized selection groups:

  Step 1  accumulate: acc = (velocity or g) + residual  (`error_feedback.accumulate`)
  Step 2  select k positions per group                   (the selector)
  Step 3  exchange: read the values, code them (`wire`), exchange, mean (`exchange`)
  Step 4  keep the residual: residual' = acc - sent      (`error_feedback.keep`)
  Step 5  record statistics                              (`state.CompressionStats`)

"sent" is what of this device's payload reached the mean (the exchange's delivered
slots): the whole payload with ``exchange="allgather"`` and "leader_mask" (whose
positions are the leader device's selection, `exchange.leader_positions`); with "sparse_allreduce"
the slots that fit their region's bucket and that the region's owner kept. With a
two-level ``axis_name=(slow, fast)`` a Step 0 first takes the dense mean over the
fast axis, and everything after it runs over the slow axis only.
"""

from collections.abc import Sequence
import dataclasses
import numbers
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hggjax import error_feedback as ef
from hggjax import exchange as exchange_lib
from hggjax import regions
from hggjax import wire as wire_lib
from hggjax.wire import saturating_cast
from hggjax.kernels import topk as topk_kernels
from hggjax.kernels.bits import MIN_FAST_N
from hggjax.payload import Payload, Selection
from hggjax.selectors.base import Selector
from hggjax.state import (CompressionState, CompressionStats, empty_stats,
                          with_device_axis, without_device_axis)

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
  # Small groups of one size are selected by one loop body (lax.map): a model with
  # many small same-shaped leaves (biases, norms) compiles the selector once per
  # size, not per leaf. Groups on the packed fast paths are selected one by one:
  # stacking them would copy every one of them into a new buffer each step, and
  # the accumulated vector could no longer be written over the residual in place.
  buckets: dict[tuple, list[int]] = {}
  for g, (n, wire) in enumerate(zip(sizes, wires)):
    alone = separate_groups or n >= MIN_FAST_N
    buckets.setdefault((g,) if alone else (n, str(wire)), []).append(g)
  return _Plan(sparse, dense, groups, sizes, ks, wires,
               tuple(tuple(b) for b in buckets.values()))


def prng_key(key) -> jax.Array:
  """A PRNG key from a key or any integer seed (Python or NumPy)."""
  if isinstance(key, numbers.Integral) and not isinstance(key, bool):
    return jax.random.PRNGKey(int(key))
  return jnp.asarray(key)


def device_of(axis_name, device_index) -> jax.Array | None:
  """The index of this device: the axis index under an axis (the slow one of a
  two-level pair: the devices of one host act as one), else the caller's (or None)."""
  if axis_name is None:
    return device_index
  if device_index is not None:
    raise ValueError(
        "device_index is for axis_name=None only: under an axis the device "
        "index is the axis index.")
  slow, fast = exchange_lib.split_axes(axis_name)
  if fast is not None:
    exchange_lib.device_index(fast)  # unbound: the same error as for the slow axis
  return exchange_lib.device_index(slow)


def fast_mean(leaves, axis_name) -> list[Any]:
  """Step 0 of a two-level exchange: each floating leaf's dense mean over the fast axis
  (the devices of one host), in its own dtype; `leaves` as they are otherwise."""
  _, fast = exchange_lib.split_axes(axis_name)
  if fast is None:
    return list(leaves)
  return [exchange_lib.dense_mean(x, fast) if jnp.issubdtype(x.dtype, jnp.floating) else x
          for x in leaves]


def select_rows(selector: Selector, x: jax.Array, k: int, carry: Any, ids: jax.Array,
                keys: jax.Array, ok: jax.Array) -> tuple[Selection, Any]:
  """Step 2: `selector` over the rows of x[m, n] (groups `ids` of the carry).

  Returns the Selection (every field with a leading m) and the whole carry with
  those groups' entries replaced (kept as they were when not `ok`). With k = n
  (density 1) there is nothing to choose: every position is sent and the carry
  stays as it was.
  """
  rows = jax.tree.map(lambda v: v[ids], carry)
  m, n = x.shape
  if k >= n:
    a = jnp.abs(x)
    every = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (m, n))
    low = jnp.min(jnp.where(a > 0, a, jnp.inf), axis=1)
    sel = Selection(every, jnp.sum(a > 0, axis=1, dtype=jnp.int32),
                    jnp.where(jnp.isfinite(low), low, 0.0), jnp.zeros((m,), bool))
    return sel, carry
  if m == 1:
    sel, new = selector.select(x[0], k, jax.tree.map(lambda v: v[0], rows), keys[0])
    sel, new = jax.tree.map(lambda a: a[None], (sel, new))
  else:
    sel, new = jax.lax.map(lambda args: selector.select(args[0], k, args[1], args[2]),
                           (x, rows, keys))
  carry = jax.tree.map(lambda v, u, w: v.at[ids].set(jnp.where(ok, u, w)), carry, new, rows)
  return sel, carry


def make_payload(x: jax.Array, indices: jax.Array, ok: jax.Array, wire, groups,
                 leaves) -> Payload:
  """Step 3: what goes on the wire: the selected values of x[m, n] in the wire dtype.

  Zeros carry nothing: their slots go out unused (index n, value 0), like every
  slot of a skipped (not `ok`) step. A group mixing dtypes travels in the widest,
  each value first rounded to its own leaf's dtype.
  """
  n = x.shape[1]
  values = jnp.take_along_axis(x, indices, axis=1, mode="fill", fill_value=0)
  if len(groups) == 1:
    values = _round_to_leaf_dtypes(values, indices, groups[0], leaves)
  values = saturating_cast(values, wire)
  sent = ok & (values != 0)
  return Payload(jnp.where(sent, values, 0), jnp.where(sent, indices, n))


def _write_back(out, residual, mean, rest, kept, groups, leaves, axis_name) -> None:
  """Each leaf's slice of the mean rows into `out`, of the residual rows into `residual`."""
  for r, group in enumerate(groups):
    offset = 0
    for i in group:
      size, shape = leaves[i].size, leaves[i].shape
      out[i] = mean[r, offset:offset + size].reshape(shape).astype(leaves[i].dtype)
      if rest is not None:
        residual[i] = rest if kept is not None else _stored_shape(
            rest[r, offset:offset + size].reshape(shape), axis_name)
      offset += size


def _begin_stats(old: CompressionStats, plan: "_Plan", leaves, ok, p: int) -> CompressionStats:
  """Step 5's starting point: the per-step counts zero, the bytes of the dense leaves
  (their mean over `p` devices, `exchange.dense_traffic`)."""
  dense = sum(leaves[i].size * leaves[i].dtype.itemsize for i in plan.dense)
  every = sum(leaves[i].size * leaves[i].dtype.itemsize for i in plan.sparse + plan.dense)
  sent, received = exchange_lib.dense_traffic(p, dense)
  zero = jnp.zeros((), jnp.int32)
  return old._replace(
      selected=zero, passed=zero, k=jnp.asarray(sum(plan.ks), jnp.int32),
      sent_bytes=jnp.asarray(sent, jnp.float32), received_bytes=jnp.asarray(received, jnp.float32),
      dense_bytes=jnp.asarray(every, jnp.float32), nonfinite=(~ok).astype(jnp.int32))


def _record(stats: CompressionStats, ids, sel: Selection, delivered: Payload, ok, n,
            traffic: tuple[int, int]) -> CompressionStats:
  """Step 5: one bucket's counts added to `stats` (k-sized reads only); `traffic` is
  the bucket's (sent, received) bytes (`exchange.traffic`)."""
  return stats._replace(
      threshold=stats.threshold.at[ids].set(jnp.where(ok, sel.threshold, 0.0)),
      history_hit=stats.history_hit.at[ids].set(ok & sel.history_hit),
      selected=stats.selected + jnp.sum(delivered.indices < n, dtype=jnp.int32),
      passed=stats.passed + jnp.where(ok, jnp.sum(sel.passed, dtype=jnp.int32), 0),
      sent_bytes=stats.sent_bytes + traffic[0],
      received_bytes=stats.received_bytes + traffic[1])


def _check_layout(leaves, paths, plan: "_Plan", state: CompressionState) -> None:
  """Trace-time checks that the gradients fit `state` (one device's, as `init` built it);
  a mismatch names the leaf."""
  _check_leaves(leaves, paths)
  for field in ("residual", "velocity"):
    stored = getattr(state, field)
    if stored is None:
      continue
    if len(stored) != len(leaves):
      raise ValueError(
          f"the gradient pytree has {len(leaves)} leaves but tx.init saw {len(stored)}: "
          "pass updates with the structure of the params given to tx.init.")
    for i, (x, r) in enumerate(zip(leaves, stored)):
      shape = None if r is None else r.shape
      if shape is not None and shape != x.shape:
        raise ValueError(
            f"gradient leaf {paths[i]} has shape {x.shape} but tx.init saw {shape}: "
            "pass updates with the structure of the params given to tx.init.")
      floating = jnp.issubdtype(x.dtype, jnp.floating)
      expected = i in plan.sparse if field == "residual" else floating
      if (r is not None) != expected:
        raise ValueError(
            f"gradient leaf {paths[i]} ({x.dtype}, {x.shape}) does not match the leaf "
            "tx.init saw there: pass updates with the structure of the params given to tx.init.")
  groups = state.stats.threshold.shape[-1]
  if groups != plan.num_groups:
    raise ValueError(
        f"the gradients form {plan.num_groups} selection groups but tx.init saw {groups}: "
        "pass updates with the structure of the params given to tx.init.")


MAX_LEAF_SIZE = 2**31 - 1  # positions travel as int32


def _check_leaves(leaves, paths) -> None:
  for x, path in zip(leaves, paths):
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
      raise ValueError(
          f"leaf {path} is {x.dtype}: hggjax compresses real floating gradients; "
          "keep real and imaginary parts as two real leaves (e.g. a pair of float32 arrays).")
    if x.size > MAX_LEAF_SIZE:
      raise ValueError(
          f"leaf {path} has {x.size} elements; hggjax indexes positions with int32, so a "
          f"leaf may hold at most {MAX_LEAF_SIZE}: split it into smaller leaves.")


def _round_to_leaf_dtypes(values: jax.Array, indices: jax.Array, group, leaves) -> jax.Array:
  """A group mixing dtypes travels in the widest; each value is first rounded to its own
  leaf's dtype, so that the rounding stays in the residual as it does per leaf."""
  dtypes = [leaves[i].dtype for i in group]
  if len(set(dtypes)) == 1:
    return values
  ends = np.cumsum([leaves[i].size for i in group])
  leaf = jnp.searchsorted(jnp.asarray(ends, jnp.int32), indices, side="right")
  for dtype in sorted(set(dtypes) - {values.dtype}, key=str):
    mine = jnp.asarray([d == dtype for d in dtypes] + [False])[jnp.minimum(leaf, len(group))]
    values = jnp.where(mine, saturating_cast(values, dtype).astype(values.dtype), values)
  return values


def sparsify(
    selector: Selector,
    density: float,
    *,
    error_feedback: bool,
    axis_name: str | tuple[str, str] | None = None,
    exchange: str = "allgather",
    scope: Scope = "leaf",
    min_size: int = 0,
    key: jax.Array | int = 0,
    momentum: float = 0.0,
    residual_decay: float = 1.0,
    residual_lowpass: float = 1.0,
    wire_format: wire_lib.WireFormat = wire_lib.DEFAULT,
) -> optax.GradientTransformationExtraArgs:
  """Compress gradients with `selector`, exchange them, and keep the residual.

  Arguments are validated by the public constructors (`hggjax.topk` etc.); this
  function trusts them.

  Args:
    selector: chooses k positions of a flat float32 vector (`hggjax.selectors`).
    density: share of elements sent per group, k = max(1, round(density * n)).
    error_feedback: keep what was not sent and add it to the next gradient.
    axis_name: mapped axis to exchange over; None compresses and decompresses
      locally. A pair (slow, fast), e.g. ("hosts", "local"), takes the dense mean
      over the fast axis first and compresses and exchanges over the slow axis only;
      the devices of one slow-axis position then select alike and keep equal
      residuals (one per host, replicated on its devices).
    exchange: "allgather", "sparse_allreduce", "leader_mask" or "union_mask"
      (`hggjax.exchange`).
    scope: "leaf" selects within each leaf, "global" over all compressed leaves
      concatenated.
    min_size: leaves with fewer elements are sent dense (averaged, no residual).
    key: PRNG key or integer seed for randomised selectors.
    momentum: momentum correction (Lin et al. 2018, DGC): each device keeps its
      own velocity u = momentum * u + g and compresses u (plus the residual)
      instead of g; chain a plain ``optax.sgd(lr)`` after it. 0 disables it.
    residual_decay: acc = g + residual_decay * residual. 1 is plain error feedback;
      below 1 the residual is a momentum buffer that sent values leave (DeMo, Peng
      et al.: the compressor then carries the momentum itself).
    residual_lowpass: residual' = (1 - b) residual + b (acc - sent); 1 is plain error
      feedback (ScaleCom's low-pass filter, Chen et al. 2020).
    wire_format: how payload rows travel (`hggjax.wire`): the values' dtype and
      scales, the positions' code. What rounding loses stays in the residual.

  The update takes one optional keyword, ``device_index``: with ``axis_name=None``
  it makes the update behave as device i of a data-parallel group would (the
  same random draws), so P devices can be simulated without collectives.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is `CompressionState`.
  """

  def plan_of(leaves) -> _Plan:
    return _plan(leaves, density, scope, min_size, selector.separate_groups)

  def init_fn(params):
    leaves, paths = _flatten(params)
    _check_leaves(leaves, paths)
    plan = plan_of(leaves)
    g = plan.num_groups
    residual = velocity = None
    if error_feedback:
      residual = tuple(jnp.zeros(x.shape, jnp.float32) if i in plan.sparse else None
                       for i, x in enumerate(leaves))
    if momentum:
      velocity = tuple(jnp.zeros(x.shape, jnp.float32) if i in plan.sparse + plan.dense
                       else None for i, x in enumerate(leaves))
    return with_device_axis(CompressionState(
        count=jnp.zeros((), jnp.int32), rng_key=prng_key(key), residual=residual,
        velocity=velocity, carry=selector.init(g), stats=empty_stats(g, sum(plan.ks))),
        axis_name)

  def update_fn(updates, state, params=None, *, device_index=None, **extra_args):
    """Compress `updates`; `device_index` lets one process play device i without an axis."""
    del params, extra_args
    stored = state.residual  # as the caller holds it (device axis included): Step 4 writes over it
    state = without_device_axis(state, axis_name)
    (leaves, paths), treedef = _flatten(updates), jax.tree.structure(updates)
    plan = plan_of(leaves)
    _check_layout(leaves, paths, plan, state)
    key, next_key = jax.random.split(state.rng_key)
    device = device_of(axis_name, device_index)
    slow, _ = exchange_lib.split_axes(axis_name)
    p = exchange_lib.axis_size(slow)
    scheme = exchange if slow is not None else "allgather"  # nothing to exchange without
    if device is not None:  # random selections differ per device
      key = jax.random.fold_in(key, device)
    leader = exchange_lib.leader_count(state.count, slow) % p if scheme == "leader_mask" else None

    # Step 0: two-level: the dense mean over the fast axis. A gradient holding NaN or
    # Inf (with two levels: a host's mean) adds nothing this step and changes no state.
    leaves = fast_mean(leaves, axis_name)
    ok = ef.all_finite(leaves)
    grads, velocity = ef.momentum_step(
        leaves, state.velocity, plan.sparse + plan.dense, momentum, ok)
    out = list(leaves)  # non-floating leaves pass through untouched
    for i in plan.dense:
      out[i] = exchange_lib.dense_mean(
          saturating_cast(jnp.where(ok, grads[i], 0), leaves[i].dtype), slow)
    residual = list(stored) if error_feedback else None
    carry, stats = state.carry, _begin_stats(state.stats, plan, leaves, ok, p)
    if leader is not None and p > 1:  # the pmax that agrees on the leader: one int32
      sent, received = exchange_lib.dense_traffic(p, 4)
      stats = stats._replace(sent_bytes=stats.sent_bytes + sent,
                             received_bytes=stats.received_bytes + received)
    for bucket in plan.buckets:
      n, k, wire = plan.sizes[bucket[0]], plan.ks[bucket[0]], plan.wires[bucket[0]]
      groups = [plan.groups[g] for g in bucket]
      ids = jnp.asarray(bucket)
      # Step 1: acc = g + residual, one float32 row per group.
      in_place = (error_feedback and len(groups) == 1 and len(groups[0]) == 1
                  and stored[groups[0][0]].ndim > 0)
      x, kept = ef.accumulate(grads, groups, stored, state.residual, in_place, ok,
                                    residual_decay)
      # Step 2: k positions per row.
      keys = jnp.stack([jax.random.fold_in(key, g) for g in bucket])
      sel, carry = select_rows(selector, x, k, carry, ids, keys, ok)
      # Step 3: the payload, exchanged: the mean of every device's, and what of this
      # device's reached it.
      positions = sel.indices
      if scheme == "leader_mask":  # every device sends its values at the leader's positions
        positions = exchange_lib.leader_positions(sel.indices, leader, slow)
      elif scheme == "union_mask":  # ... at every device's positions (a skipped step adds none)
        positions = exchange_lib.union_positions(jnp.where(ok, sel.indices, n), slow, n)
      payload = make_payload(x, positions, ok, wire, groups, leaves)
      if scheme == "sparse_allreduce":  # its buckets are runs of the payload: sort first
        order = regions.region_order(payload.indices, n, p)
        payload = make_payload(x, order, ok, wire, groups, leaves)
      elif wire_format.packed and slow is not None:  # the position code needs them sorted
        order = topk_kernels.sort_distinct(payload.indices, n)
        payload = make_payload(x, order, ok, wire, groups, leaves)
      mean, sent = exchange_lib.sparse_mean(payload, n, slow, scheme, positions, wire_format)
      # Step 4: what was not sent (including rounding to the wire dtype) stays.
      rest = ef.keep(x, kept, sent.indices, sent.values, sel.threshold) if error_feedback else None
      if error_feedback and residual_lowpass != 1.0:
        rest = ef.low_pass(rest, kept, stored, state.residual, groups, residual_lowpass, ok)
      _write_back(out, residual, mean, rest, kept, groups, leaves, axis_name)
      # Step 5: statistics.
      traffic = exchange_lib.traffic(scheme, p, len(bucket), k, n,
                                     wire_format.dtype(wire).itemsize, wire_format)
      stats = _record(stats, ids, sel, sent, ok, n, traffic)

    stats = stats._replace(run_sent_bytes=state.stats.run_sent_bytes + stats.sent_bytes)
    new_state = with_device_axis(CompressionState(
        count=state.count + ok.astype(jnp.int32), rng_key=_keep_unless(ok, next_key, state.rng_key),
        residual=None, velocity=velocity, carry=carry, stats=stats), axis_name)
    # The residual is in the stored shapes already (device axis included).
    new_state = new_state._replace(residual=tuple(residual) if error_feedback else None)
    return jax.tree.unflatten(treedef, out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _stored_shape(x: jax.Array, axis_name: str | None) -> jax.Array:
  return x[None] if axis_name else x


def _keep_unless(ok: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
  """`new` when ok, else `old`; for raw (uint32) and typed PRNG keys alike."""
  if jax.dtypes.issubdtype(new.dtype, jax.dtypes.prng_key):
    data = jnp.where(ok, jax.random.key_data(new), jax.random.key_data(old))
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(new))
  return jnp.where(ok, new, old)


def _flatten(tree) -> tuple[list[Any], list[str]]:
  """(leaves, their paths as text) in ``jax.tree.leaves`` order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [x for _, x in flat], [jax.tree_util.keystr(p) or "(root)" for p, _ in flat]
