"""What a task supplies to the shared training loop, and how the loop finds it.

One loop (`train/loop.py`), one data-parallel step (`train/steps.py`), the same
checkpoints, resume, non-finite stop, threshold probe and time breakdown serve every task;
a `Task` supplies only what differs between image classification (`train/image_task.py`,
`python -m train.cifar`) and language modelling (`train/lm/harness.py`, `python -m
train.lm`): the data, the model, the optimizer around the compressor, the per-device loss,
batches, evaluation, when to pause for evaluation and checkpoints, and what the log says.
`train/tasks.py` picks the task by the config's class; this module imports neither.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np
import optax


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """The optimizer as a chain whose first `compressor_index` parts act on each device's
  own gradient before the compressor (`parts[compressor_index]`); the rest act on the
  exchanged mean, identically on every device.

  The threshold probe and the time breakdown apply `before` with its state from the
  optimizer state (`before_state`) to see the gradients as the compressor receives them.
  """
  parts: tuple[optax.GradientTransformation, ...]
  compressor_index: int
  tx: optax.GradientTransformation = dataclasses.field(init=False)      # the whole chain
  before: optax.GradientTransformation = dataclasses.field(init=False)  # the parts before

  def __post_init__(self):
    object.__setattr__(self, "tx", optax.chain(*self.parts))
    i = self.compressor_index
    object.__setattr__(self, "before", optax.chain(*self.parts[:i]) if i else optax.identity())

  def before_state(self, opt_state: tuple):
    """The state of `before` inside the state of `tx` (a chain's state is the tuple of
    its parts' states)."""
    i = self.compressor_index
    return opt_state[:i] if i else optax.EmptyState()


class Task:
  """The task-specific side of a run. Subclasses set `cfg` and `data` and implement the
  methods below; the loop calls nothing else.

  Batches are tuples of numpy arrays whose first axis is the global batch (split over the
  "data" axis); the loss and evaluation functions see one device's rows of them.
  """
  cfg: Any
  data: Any

  # --- sizes ---
  def steps_per_epoch(self) -> int:
    """Full batches per pass over the training data; UsageError below 1."""
    raise NotImplementedError

  # --- model and optimizer (called with JAX running) ---
  def create_model(self):
    """The Flax NNX model, parameters initialised from the config's seed."""
    raise NotImplementedError

  def make_optimizer(self, total_steps: int, axis_name: str | None) -> Optimizer:
    raise NotImplementedError

  def lr_schedule(self, total_steps: int) -> optax.Schedule:
    """The learning rate per step, for the log."""
    raise NotImplementedError

  def loss(self, model, batch: tuple, step) -> tuple[Any, dict[str, Any]]:
    """(mean loss, {"loss", ...metrics}) of this device's rows; `model` is in training
    mode, `step` the int32 step index (e.g. for a dropout key). Called inside the
    step's `shard_map`; the step averages every metric over devices."""
    raise NotImplementedError

  def eval_sums(self, model, batch: tuple):
    """A float32 vector of sums over this device's rows of an evaluation batch (padding
    rows weighted out); the step sums it over devices and `eval_result` reads it."""
    raise NotImplementedError

  # --- data on the host ---
  def train_batch(self, step: int, rows: slice) -> tuple[np.ndarray, ...]:
    """`rows` of the global batch of `step`; depends only on (seed, step)."""
    raise NotImplementedError

  def eval_batches(self) -> Iterator[tuple[np.ndarray, ...]]:
    """Global evaluation batches of `eval_batch_size` rows, padding rows weighted 0."""
    raise NotImplementedError

  def eval_result(self, sums: np.ndarray) -> dict[str, float]:
    """The eval line's numbers from the summed `eval_sums` of every batch."""
    raise NotImplementedError

  def pause_at(self, step: int, steps_per_epoch: int) -> tuple[bool, bool]:
    """(pause: check non-finite steps and save a checkpoint, evaluate) after `step`
    steps; the end of the run always does both."""
    raise NotImplementedError

  # --- what the run directory and the log say ---
  def write_run_files(self, log) -> None:
    """Files a new run writes next to config.json (e.g. where its data came from)."""

  def check_resume(self, log_dir: str) -> None:
    """UsageError when the data differs from what the run in `log_dir` started with."""

  def train_extras(self, entry: dict[str, Any]) -> dict[str, Any]:
    """Keys a train line adds to the shared ones (`entry`)."""
    del entry
    return {}

  def summary_extras(self) -> dict[str, Any]:
    return {}

  def describe_batch(self) -> str:
    return f"batch {self.cfg.batch_size}"

  def describe_train(self, entry: dict[str, Any]) -> str:
    raise NotImplementedError

  def describe_eval(self, result: dict[str, Any]) -> str:
    raise NotImplementedError

  def describe_final(self, result: dict[str, Any], steps: int, train_s: float) -> str | None:
    raise NotImplementedError

