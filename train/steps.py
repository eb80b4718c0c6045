"""The train state and the jitted, data-parallel train and eval steps, for any task.

Parameters, BatchNorm statistics and the optimizer state are replicated; the
compressor's state (residuals, history, RNG key), and any state kept per device before it,
has a leading device axis sharded over "data" (`hggjax.shard_state`). Each step runs under
`jit(shard_map(...))`: per-device loss and gradients (the task's `loss`) -> the task's
optimizer chain (parts before the compressor on this device's gradient, hggjax's sparse
exchange and mean over "data", the rest on the mean).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import hggjax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from train.config import Config
from train.mesh import data_axes, process_rows, shard_batch
from train.task import Optimizer, Task


@dataclasses.dataclass
class TrainState:
  """What a step reads and writes; the fields after `opt_state` are static."""
  step: int
  params: Any          # nnx.State of nnx.Param, replicated
  batch_stats: Any     # nnx.State of nnx.BatchStat, replicated (pmean'd); empty for LMs
  opt_state: Any       # optax state; compressor part (and per-device parts) sharded P("data")
  graphdef: Any
  optimizer: Optimizer
  loss_fn: Callable    # Task.loss: (model, batch, step) -> (loss, metrics), one device's rows
  eval_fn: Callable    # Task.eval_sums: (model, batch) -> sums over one device's rows
  mesh: jax.sharding.Mesh

  @property
  def tx(self) -> optax.GradientTransformation:
    return self.optimizer.tx

  def arrays(self) -> dict[str, Any]:
    return {"params": self.params, "batch_stats": self.batch_stats, "opt_state": self.opt_state}


def init_state(task: Task, mesh, total_steps: int) -> TrainState:
  """The task's model, optimizer and their state, placed on `mesh` (compressor state per
  device)."""
  graphdef, params, batch_stats = nnx.split(task.create_model(), nnx.Param, nnx.BatchStat)
  axes = data_axes(mesh)  # "data", or ("hosts", "local") on a two-level mesh
  optimizer = task.make_optimizer(total_steps, axes)
  replicated = NamedSharding(mesh, P())
  params = jax.device_put(params, replicated)
  batch_stats = jax.device_put(batch_stats, replicated)
  opt_state = hggjax.shard_state(optimizer.tx.init(params), mesh, axes)
  return TrainState(0, params, batch_stats, opt_state, graphdef, optimizer, task.loss,
                    task.eval_sums, mesh)


def create_train_state(cfg: Config, image_shape, num_classes: int, mesh,
                       total_steps: int) -> TrainState:
  """The image-classification state for `cfg`, without loading its dataset."""
  from train.image_task import ImageTask  # pylint: disable=import-outside-toplevel
  return init_state(ImageTask(cfg, shapes=(image_shape, num_classes)), mesh, total_steps)


def local_grads(state: TrainState, params, batch_stats, batch: tuple, step):
  """(loss, metrics, new BatchNorm statistics, gradients) of this device's rows.

  Call it inside `shard_map` over "data"; BatchNorm statistics are pmean'd over "data"
  by the layers themselves.
  """
  graphdef, loss_fn = state.graphdef, state.loss_fn

  def objective(p):
    model = nnx.merge(graphdef, p, batch_stats, copy=True)
    model.train()
    loss, metrics = loss_fn(model, batch, step)
    return loss, (metrics, nnx.state(model, nnx.BatchStat))

  # Without the cast, grad of replicated params would be summed over devices by the
  # transpose of the implicit broadcast; the compressor must see per-device gradients.
  local_params = jax.lax.pcast(params, data_axes(state.mesh), to="varying")
  (loss, (metrics, new_stats)), grads = jax.value_and_grad(objective, has_aux=True)(local_params)
  return loss, metrics, new_stats, grads


def compressor_input(state: TrainState, params, batch_stats, opt_state, batch: tuple, step):
  """This device's gradients as the compressor receives them: after the parts of the
  chain before it, with their current state (inside `shard_map`)."""
  *_, grads = local_grads(state, params, batch_stats, batch, step)
  opt = state.optimizer
  updates, _ = opt.before.update(grads, opt.before_state(opt_state), params)
  return updates


def make_train_step(state: TrainState) -> Callable:
  """jit(shard_map(step)): (params, batch_stats, opt_state, step, batch) -> new + metrics.

  `step` is the int32 index of the step (the task's loss may draw randomness from it),
  `batch` the tuple of global arrays sharded over "data". params, batch_stats and
  opt_state are donated: the arrays passed in are deleted.
  """
  axes = data_axes(state.mesh)
  specs = hggjax.state_specs(state.opt_state, axes)
  tx = state.tx

  # The old params, BatchNorm statistics and optimizer state are dead after the step:
  # donating them lets XLA write the new ones in place instead of into fresh buffers
  # (on CPU every fresh buffer of a large model is page-faulted in again each step).
  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  @functools.partial(jax.shard_map, mesh=state.mesh,
                     in_specs=(P(), P(), specs, P(), P(axes)),
                     out_specs=(P(), P(), specs, P()))
  def train_step(params, batch_stats, opt_state, step, batch):
    loss, metrics, new_stats, grads = local_grads(state, params, batch_stats, batch, step)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    # 1 when any device's loss or gradient was NaN/Inf (the compressor then skipped the
    # step on that device). Reduced here so that the host reads one replicated flag, at
    # log steps and before checkpoints only: no extra sync per step.
    grads_bad = jnp.max(hggjax.stats(opt_state)["nonfinite"]) > 0
    bad = jnp.logical_or(jnp.logical_not(jnp.isfinite(loss)), grads_bad)
    metrics = {k: jax.lax.pmean(v, axes) for k, v in metrics.items()}
    metrics["nonfinite"] = jax.lax.pmax(bad.astype(jnp.int32), axes)
    # BatchNorm's running statistics are pmean'd over the devices: one non-finite batch
    # would leave NaN in them for good, so that step keeps the previous ones.
    new_stats = jax.tree.map(lambda new, old: jnp.where(metrics["nonfinite"] > 0, old, new),
                             new_stats, batch_stats)
    return params, new_stats, opt_state, metrics

  return train_step


def make_eval_step(state: TrainState) -> Callable:
  """The task's evaluation sums over a padded, sharded batch, summed over devices."""
  graphdef, eval_fn, axes = state.graphdef, state.eval_fn, data_axes(state.mesh)

  @jax.jit
  @functools.partial(jax.shard_map, mesh=state.mesh, in_specs=(P(), P(), P(axes)),
                     out_specs=P())
  def eval_step(params, batch_stats, batch):
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    model.eval()
    return jax.lax.psum(eval_fn(model, batch), axes)

  return eval_step


def train_step(state: TrainState, step_fn, *batch) -> tuple[TrainState, dict]:
  """One optimizer step; returns the new state and device-side metrics (no host sync)."""
  params, batch_stats, opt_state, metrics = step_fn(
      state.params, state.batch_stats, state.opt_state, np.int32(state.step), batch)
  return dataclasses.replace(state, step=state.step + 1, params=params,
                             batch_stats=batch_stats, opt_state=opt_state), metrics


def evaluate(state: TrainState, eval_fn, task: Task) -> dict:
  """The task's evaluation over all its batches; the only host sync is the final sum."""
  batch_size = task.cfg.eval_batch_size
  rows = process_rows(state.mesh, batch_size)  # each process feeds only its own rows
  total = None
  for batch in task.eval_batches():
    sums = eval_fn(state.params, state.batch_stats,
                   shard_batch(state.mesh, batch_size, *(x[rows] for x in batch)))
    total = sums if total is None else total + sums
  return task.eval_result(np.asarray(total))
