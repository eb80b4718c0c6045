"""Image classification for the shared loop: what `python -m train.cifar` trains.

The dataset (`train.data`), the model (`train.models`, BatchNorm statistics pmean'd over
"data"), SGD around the compressor (`train.optim`), cross-entropy and accuracy, the test
set as evaluation once per `eval_every` epochs, and a checkpoint every epoch.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
import optax

from train import data as data_lib
from train import models
from train import optim
from train.config import Config
from train.errors import UsageError
from train.mesh import config_axes
from train.task import Optimizer, Task


class ImageTask(Task):
  """Image classification on a `train.data.Dataset` (loaded from the config when None)."""

  def __init__(self, cfg: Config, data: data_lib.Dataset | None = None, *,
               shapes: tuple | None = None):
    """`shapes` = (image shape, classes) builds a task for the model and optimizer only,
    without loading the dataset."""
    self.cfg = cfg
    if shapes is None:
      data = data or data_lib.load_dataset(cfg.dataset, cfg.data_dir,
                                           synthetic_size=cfg.synthetic_size)
      shapes = (data.image_shape, data.num_classes)
    self.data = data
    self.image_shape, self.num_classes = tuple(shapes[0]), shapes[1]
    self.augment = cfg.augment if cfg.augment is not None else cfg.dataset.startswith("cifar")

  def steps_per_epoch(self) -> int:
    spe = data_lib.steps_per_epoch(self.data, self.cfg.batch_size)
    if spe < 1:
      raise UsageError(f"--batch-size {self.cfg.batch_size} exceeds the "
                       f"{len(self.data.train_labels)} training examples")
    return spe

  def create_model(self):
    return models.create_model(self.cfg.model, num_classes=self.num_classes,
                               image_shape=self.image_shape, axis_name=config_axes(self.cfg.hosts),
                               seed=self.cfg.seed)

  def make_optimizer(self, total_steps: int, axis_name: str | None) -> Optimizer:
    return optim.optimizer_parts(self.cfg, total_steps, axis_name)

  def lr_schedule(self, total_steps: int) -> optax.Schedule:
    return optim.lr_schedule(self.cfg, total_steps)

  def loss(self, model, batch: tuple, step) -> tuple[Any, dict[str, Any]]:
    del step  # no randomness inside the model
    images, labels = batch
    logits = model(images)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
    return loss, {"loss": loss, "accuracy": accuracy}

  def eval_sums(self, model, batch: tuple):
    images, labels, weights = batch
    logits = model(images)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return jnp.stack([jnp.sum(correct * weights), jnp.sum(loss * weights), jnp.sum(weights)])

  def train_batch(self, step: int, rows: slice) -> tuple[np.ndarray, ...]:
    return data_lib.train_batch(self.data, step, self.cfg.batch_size, self.cfg.seed,
                                self.augment, rows=rows)

  def eval_batches(self):
    return data_lib.eval_batches(self.data, self.cfg.eval_batch_size)

  def eval_result(self, sums: np.ndarray) -> dict[str, float]:
    correct, loss, count = sums
    return {"test_accuracy": float(correct / count), "test_loss": float(loss / count)}

  def pause_at(self, step: int, steps_per_epoch: int) -> tuple[bool, bool]:
    if step % steps_per_epoch:
      return False, False
    return True, (step // steps_per_epoch) % self.cfg.eval_every == 0

  def describe_train(self, entry: dict[str, Any]) -> str:
    return f"loss {entry['loss']:.4f} acc {100 * entry['accuracy']:.1f}%"

  def describe_eval(self, result: dict[str, Any]) -> str:
    return (f"test accuracy {100 * result['test_accuracy']:.2f}% loss "
            f"{result['test_loss']:.4f}")

  def describe_final(self, result: dict[str, Any], steps: int, train_s: float) -> str | None:
    if "test_accuracy" not in result:
      return None
    return (f"final test accuracy {100 * result['test_accuracy']:.2f}% after {steps} "
            f"steps; training wall time {train_s:.1f} s")
