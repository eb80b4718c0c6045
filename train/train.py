"""Data-parallel training with a hggjax compressor: state, steps, and the loop.

One 1-D mesh over the devices, axis "data". Parameters, BatchNorm statistics and the
optimizer state are replicated; the compressor's state (residuals, history, RNG key) has
a leading device axis sharded over "data" (`hggjax.shard_state`). Each step runs under
`jit(shard_map(...))`: per-device gradients -> hggjax transform (sparse exchange and
mean over "data") -> SGD; momentum and weight decay as `make_optimizer` says.
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
from train.config import Config

AXIS = "data"


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


def make_mesh(n_devices: int) -> jax.sharding.Mesh:
  devices = jax.devices()
  if n_devices > len(devices):
    raise ValueError(f"{n_devices} devices requested, {len(devices)} available")
  return jax.make_mesh((n_devices,), (AXIS,), devices=devices[:n_devices])


def process_rows(mesh: jax.sharding.Mesh, batch_size: int) -> slice:
  """The rows of a global batch sharded over "data" that live on this process's devices.

  One process: every row. Several (jax.distributed): a contiguous block, this process's
  share, which it alone reads and feeds (`shard_batch`).
  """
  index = NamedSharding(mesh, P(AXIS)).addressable_devices_indices_map((batch_size,))
  blocks = sorted({s[0].indices(batch_size)[:2] for s in index.values()})
  if any(a[1] != b[0] for a, b in zip(blocks, blocks[1:])):
    raise ValueError(f"this process's devices hold non-contiguous rows {blocks} of the batch: "
                     "build the mesh with jax.make_mesh so each process's devices are adjacent")
  return slice(blocks[0][0], blocks[-1][1])


def shard_batch(mesh: jax.sharding.Mesh, batch_size: int, *local: np.ndarray) -> tuple:
  """Global arrays sharded P("data") from this process's rows (`process_rows`) only."""
  sharding = NamedSharding(mesh, P(AXIS))
  return tuple(jax.make_array_from_process_local_data(sharding, x, (batch_size,) + x.shape[1:])
               for x in local)


def host_value(x: jax.Array) -> np.ndarray:
  """A (possibly multi-process, sharded) array on this host; collective when not local."""
  if getattr(x, "is_fully_addressable", True) or x.is_fully_replicated:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def lr_schedule(cfg: Config, total_steps: int) -> optax.Schedule:
  """The seed's schedule: lr, x0.1 at 50% and x0.1 again at 75% of training."""
  return optax.piecewise_constant_schedule(
      cfg.lr, {int(0.5 * total_steps): 0.1, int(0.75 * total_steps): 0.1})


def make_optimizer(cfg: Config, total_steps: int,
                   axis_name: str | None = AXIS) -> optax.GradientTransformation:
  """Compressor, weight decay and SGD; where momentum acts depends on the config.

  With `momentum_correction` (the default) each device keeps its own velocity of
  gradient + weight decay inside the compressor (DGC's momentum correction, hggjax's
  `momentum` option) and plain SGD applies the exchanged mean; without it the
  compressor sends the gradient and SGD applies momentum to the exchanged mean.
  """
  extra = {"pipeline": True} if cfg.use_pipeline else {}  # cli.pipeline_supported() checked
  lr = lr_schedule(cfg, total_steps)
  if cfg.momentum_correction:
    compressor = hggjax.get_compressor(cfg.compressor, density=cfg.density, axis_name=axis_name,
                                       min_size=cfg.min_size, momentum=cfg.momentum, **extra)
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay), compressor, optax.sgd(lr))
  compressor = hggjax.get_compressor(cfg.compressor, density=cfg.density, axis_name=axis_name,
                                     min_size=cfg.min_size, **extra)
  return optax.chain(compressor, optax.add_decayed_weights(cfg.weight_decay),
                     optax.sgd(lr, momentum=cfg.momentum))


def create_train_state(cfg: Config, image_shape, num_classes: int, mesh,
                       total_steps: int) -> TrainState:
  """Model, optimizer and their state, placed on `mesh` (compressor state per device)."""
  model = models.create_model(cfg.model, num_classes=num_classes, image_shape=image_shape,
                              axis_name=AXIS, seed=cfg.seed)
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  tx = make_optimizer(cfg, total_steps)
  replicated = NamedSharding(mesh, P())
  params = jax.device_put(params, replicated)
  batch_stats = jax.device_put(batch_stats, replicated)
  opt_state = hggjax.shard_state(tx.init(params), mesh, AXIS)
  return TrainState(0, params, batch_stats, opt_state, graphdef, tx, mesh)


def _forward(graphdef, params, batch_stats, images, train: bool):
  model = nnx.merge(graphdef, params, batch_stats, copy=True)
  if train:
    model.train()
  else:
    model.eval()
  logits = model(images)
  return logits, nnx.state(model, nnx.BatchStat)


def _local_grads(graphdef, params, batch_stats, images, labels):
  """Per-device loss gradient. BatchNorm statistics are pmean'd over "data" inside."""
  def loss_fn(p):
    logits, new_stats = _forward(graphdef, p, batch_stats, images, train=True)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (logits, new_stats)

  # Without the cast, grad of replicated params would be summed over devices by the
  # transpose of the implicit broadcast; the compressor must see per-device gradients.
  local_params = jax.lax.pcast(params, AXIS, to="varying")
  (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(local_params)
  return loss, logits, new_stats, grads


def make_train_step(state: TrainState) -> Callable:
  """jit(shard_map(step)): (params, batch_stats, opt_state, images, labels) -> new + metrics.

  params, batch_stats and opt_state are donated: the arrays passed in are deleted.
  """
  specs = hggjax.state_specs(state.opt_state, AXIS)
  graphdef, tx = state.graphdef, state.tx

  # The old params, BatchNorm statistics and optimizer state are dead after the step:
  # donating them lets XLA write the new ones in place instead of into fresh buffers
  # (on CPU every fresh buffer of a large model is page-faulted in again each step).
  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  @functools.partial(jax.shard_map, mesh=state.mesh,
                     in_specs=(P(), P(), specs, P(AXIS), P(AXIS)),
                     out_specs=(P(), P(), specs, P()))
  def train_step(params, batch_stats, opt_state, images, labels):
    loss, logits, new_stats, grads = _local_grads(graphdef, params, batch_stats, images, labels)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
    metrics = {"loss": jax.lax.pmean(loss, AXIS), "accuracy": jax.lax.pmean(accuracy, AXIS)}
    return params, new_stats, opt_state, metrics

  return train_step


def make_eval_step(state: TrainState) -> Callable:
  """Sums of correct predictions, loss and weights over a padded, sharded test batch."""
  graphdef = state.graphdef

  @jax.jit
  @functools.partial(jax.shard_map, mesh=state.mesh,
                     in_specs=(P(), P(), P(AXIS), P(AXIS), P(AXIS)), out_specs=P())
  def eval_step(params, batch_stats, images, labels, weights):
    logits, _ = _forward(graphdef, params, batch_stats, images, train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    sums = jnp.stack([jnp.sum(correct * weights), jnp.sum(loss * weights), jnp.sum(weights)])
    return jax.lax.psum(sums, AXIS)

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


def largest_leaf(params, min_size: int = 0) -> tuple[int, int, str]:
  """The leaf the threshold probe samples: the largest parameter leaf.

  Returns its index among all leaves, its selection group (its index among the compressed
  leaves, those with at least `min_size` elements; scope="leaf") and its path.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  sizes = [leaf.size for _, leaf in flat]
  i = int(np.argmax(sizes))
  group = sum(1 for s in sizes[:i] if s >= max(min_size, 1))
  return i, group, jax.tree_util.keystr(flat[i][0])


def make_threshold_probe(state: TrainState, leaf_index: int, cfg: Config) -> Callable:
  """Per-device exact top-k threshold |acc|_(k) of one leaf: what the compressor selects from.

  acc = grad + residual, or with momentum correction momentum * velocity + (grad +
  weight decay * param) + residual. Run on the same inputs as the following train step,
  its result is the reference for that step's compressor threshold
  (`hggjax.stats(...)['threshold']`).
  """
  density = cfg.density
  specs = hggjax.state_specs(state.opt_state, AXIS)
  graphdef = state.graphdef

  @jax.jit
  @functools.partial(jax.shard_map, mesh=state.mesh,
                     in_specs=(P(), P(), specs, P(AXIS), P(AXIS)), out_specs=P())
  def probe(params, batch_stats, opt_state, images, labels):
    *_, grads = _local_grads(graphdef, params, batch_stats, images, labels)
    acc = jax.tree.leaves(grads)[leaf_index].reshape(-1).astype(jnp.float32)
    compression = hggjax.compression_state(opt_state)
    if compression.velocity is not None:  # see make_optimizer: decay, then the velocity
      param = jax.tree.leaves(params)[leaf_index].reshape(-1).astype(jnp.float32)
      velocity = compression.velocity[leaf_index].reshape(-1)
      acc = cfg.momentum * velocity + (acc + cfg.weight_decay * param)
    residual = compression.residual  # tuple over flattened leaves
    if residual is not None and residual[leaf_index] is not None:
      acc = acc + residual[leaf_index].reshape(-1)
    k = max(1, round(density * acc.size))
    # float32[P], replicated: readable on every process of a multi-process run.
    return jax.lax.all_gather(jnp.min(jax.lax.top_k(jnp.abs(acc), k)[0]), AXIS, to="invarying")

  return probe


def compressor_stats(opt_state, group: int) -> dict[str, Any]:
  """Host-side summary of `hggjax.stats`: totals over devices and the probed leaf's threshold."""
  s = {name: host_value(v) for name, v in hggjax.stats(opt_state).items()}
  out: dict[str, Any] = {}
  if "selected" in s:
    out["selected"] = int(np.sum(s["selected"]))
  if "k" in s:
    out["k"] = int(np.sum(s["k"]))
  if "sent_bytes" in s and "dense_bytes" in s:
    out["sent_bytes"] = float(np.mean(s["sent_bytes"]))
    out["dense_bytes"] = float(np.mean(s["dense_bytes"]))
  if "history_hits" in s:
    out["history_hits"] = int(np.sum(s["history_hits"]))
  thr = s.get("threshold")  # float32[P, G]: one group per compressed leaf (scope="leaf")
  if thr is not None and np.ndim(thr) == 2 and group < np.shape(thr)[1]:
    out["_threshold"] = np.asarray(thr, np.float64)[:, group]
  return out
