"""The train state and the jitted, data-parallel train and eval steps.

Parameters, BatchNorm statistics and the optimizer state are replicated; the
compressor's state (residuals, history, RNG key) has a leading device axis sharded over
"data" (`hggjax.shard_state`). Each step runs under `jit(shard_map(...))`: per-device
gradients -> the optimizer of `train.optim` (hggjax's sparse exchange and mean over
"data", weight decay, SGD).
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

from train import data as data_lib
from train import models
from train import optim
from train.config import Config
from train.mesh import AXIS, data_axes, process_rows, shard_batch


@dataclasses.dataclass
class TrainState:
  """What a step reads and writes; `graphdef` and `tx` are static."""
  step: int
  params: Any          # nnx.State of nnx.Param, replicated
  batch_stats: Any     # nnx.State of nnx.BatchStat, replicated (pmean'd batch statistics)
  opt_state: Any       # optax state; compressor part sharded P("data")
  graphdef: Any
  tx: optax.GradientTransformation
  mesh: jax.sharding.Mesh

  def arrays(self) -> dict[str, Any]:
    return {"params": self.params, "batch_stats": self.batch_stats, "opt_state": self.opt_state}


def create_train_state(cfg: Config, image_shape, num_classes: int, mesh,
                       total_steps: int) -> TrainState:
  """Model, optimizer and their state, placed on `mesh` (compressor state per device)."""
  axes = data_axes(mesh)  # "data", or ("hosts", "local") on a two-level mesh
  model = models.create_model(cfg.model, num_classes=num_classes, image_shape=image_shape,
                              axis_name=axes, seed=cfg.seed)
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  tx = optim.make_optimizer(cfg, total_steps, axes)
  replicated = NamedSharding(mesh, P())
  params = jax.device_put(params, replicated)
  batch_stats = jax.device_put(batch_stats, replicated)
  opt_state = hggjax.shard_state(tx.init(params), mesh, axes)
  return TrainState(0, params, batch_stats, opt_state, graphdef, tx, mesh)


def _forward(graphdef, params, batch_stats, images, train: bool):
  model = nnx.merge(graphdef, params, batch_stats, copy=True)
  if train:
    model.train()
  else:
    model.eval()
  logits = model(images)
  return logits, nnx.state(model, nnx.BatchStat)


def local_grads(graphdef, params, batch_stats, images, labels, axis=AXIS):
  """(loss, logits, new BatchNorm statistics, gradients) of this device's rows.

  Call it inside `shard_map` over `axis` (`data_axes` of the mesh); the statistics are
  pmean'd over it.
  """
  def loss_fn(p):
    logits, new_stats = _forward(graphdef, p, batch_stats, images, train=True)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (logits, new_stats)

  # Without the cast, grad of replicated params would be summed over devices by the
  # transpose of the implicit broadcast; the compressor must see per-device gradients.
  local_params = jax.lax.pcast(params, axis, to="varying")
  (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(local_params)
  return loss, logits, new_stats, grads


def make_train_step(state: TrainState) -> Callable:
  """jit(shard_map(step)): (params, batch_stats, opt_state, images, labels) -> new + metrics.

  params, batch_stats and opt_state are donated: the arrays passed in are deleted.
  """
  axes = data_axes(state.mesh)
  specs = hggjax.state_specs(state.opt_state, axes)
  graphdef, tx = state.graphdef, state.tx

  # The old params, BatchNorm statistics and optimizer state are dead after the step:
  # donating them lets XLA write the new ones in place instead of into fresh buffers
  # (on CPU every fresh buffer of a large model is page-faulted in again each step).
  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  @functools.partial(jax.shard_map, mesh=state.mesh,
                     in_specs=(P(), P(), specs, P(axes), P(axes)),
                     out_specs=(P(), P(), specs, P()))
  def train_step(params, batch_stats, opt_state, images, labels):
    loss, logits, new_stats, grads = local_grads(graphdef, params, batch_stats, images, labels,
                                                 axes)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
    metrics = {"loss": jax.lax.pmean(loss, axes), "accuracy": jax.lax.pmean(accuracy, axes)}
    return params, new_stats, opt_state, metrics

  return train_step


def make_eval_step(state: TrainState) -> Callable:
  """Sums of correct predictions, loss and weights over a padded, sharded test batch."""
  graphdef, axes = state.graphdef, data_axes(state.mesh)

  @jax.jit
  @functools.partial(jax.shard_map, mesh=state.mesh,
                     in_specs=(P(), P(), P(axes), P(axes), P(axes)), out_specs=P())
  def eval_step(params, batch_stats, images, labels, weights):
    logits, _ = _forward(graphdef, params, batch_stats, images, train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    sums = jnp.stack([jnp.sum(correct * weights), jnp.sum(loss * weights), jnp.sum(weights)])
    return jax.lax.psum(sums, axes)

  return eval_step


def train_step(state: TrainState, step_fn, images, labels) -> tuple[TrainState, dict]:
  """One optimizer step; returns the new state and device-side metrics (no host sync)."""
  params, batch_stats, opt_state, metrics = step_fn(
      state.params, state.batch_stats, state.opt_state, images, labels)
  return dataclasses.replace(state, step=state.step + 1, params=params,
                             batch_stats=batch_stats, opt_state=opt_state), metrics


def eval_step(state: TrainState, eval_fn, ds: data_lib.Dataset, batch_size: int) -> dict:
  """Test-set accuracy and loss; the only host sync is the final sum."""
  rows = process_rows(state.mesh, batch_size)  # each process feeds only its own rows
  total = jnp.zeros(3)
  for images, labels, weights in data_lib.eval_batches(ds, batch_size):
    batch = shard_batch(state.mesh, batch_size, images[rows], labels[rows], weights[rows])
    total = total + eval_fn(state.params, state.batch_stats, *batch)
  correct, loss, count = np.asarray(total)
  return {"test_accuracy": float(correct / count), "test_loss": float(loss / count)}
