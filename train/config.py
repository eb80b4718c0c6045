"""Run configuration: defaults, `get_config()` files, and their validation.

Resolution order: the embedded default (`Config()`), then a `--config` file's
`get_config()`, then flags given on the command line.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

from train.errors import UsageError


@dataclasses.dataclass
class Config:
  """Everything a run depends on. The default is the README's main job."""
  model: str = "cnn"
  dataset: str = "fashion_mnist"
  epochs: int = 3
  steps: int | None = None        # total optimizer steps; overrides epochs when set
  batch_size: int = 64            # global batch, split over the devices
  lr: float = 0.05
  momentum: float = 0.9
  weight_decay: float = 5e-4
  compressor: str = "hggtopk"
  density: float = 0.01
  min_size: int = 1000            # leaves with fewer elements go dense (hggjax option)
  momentum_correction: bool = True  # momentum inside the compressor (see make_optimizer)
  use_pipeline: bool = False
  data_dir: str | None = None
  log_dir: str | None = None      # the run's own directory; default logs/<name>-<time>
  devices: int | None = None      # None: all local accelerators, or 4 fake CPU devices
  seed: int = 0
  eval_every: int = 1             # epochs between test-set evaluations (and at the end)
  log_every: int = 50             # steps between metrics.jsonl lines
  eval_batch_size: int = 1000
  augment: bool | None = None     # None: the dataset's default (CIFAR yes, others no)
  checkpoint: bool = True
  profile: bool = True            # time-breakdown pass after training
  profile_reps: int = 20
  synthetic_size: int = 256       # train/test examples of the synthetic (test) dataset


FIELDS = {f.name for f in dataclasses.fields(Config)}
# The keys of train.models.MODELS, here so the CLI can reject a name without importing
# flax (a test keeps the two in step).
MODEL_NAMES = ("cnn", "mobilenetv2", "resnet18", "resnet50", "vgg11", "vgg16")


def load_config_file(path: str) -> Config:
  """Runs `get_config()` from a Python file; it may return a Config or a dict of fields."""
  if not os.path.isfile(path):
    raise UsageError(f"config file {path} does not exist")
  spec = importlib.util.spec_from_file_location("_run_config", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as err:  # noqa: BLE001 - report any error in the user's file in one line
    raise UsageError(f"config file {path} failed to load: {type(err).__name__}: {err}") from None
  if not hasattr(module, "get_config"):
    raise UsageError(f"config file {path} has no get_config()")
  cfg = module.get_config()
  if isinstance(cfg, Config):
    return cfg
  if isinstance(cfg, dict):
    return override(Config(), cfg)
  raise UsageError(f"{path}: get_config() must return train.config.Config or a dict")


def override(cfg: Config, values: dict[str, Any]) -> Config:
  unknown = set(values) - FIELDS
  if unknown:
    raise UsageError(f"unknown config field(s): {', '.join(sorted(unknown))}")
  return dataclasses.replace(cfg, **values)


def validate(cfg: Config, compressor_names, model_names, dataset_names) -> None:
  """Checks names and ranges the run would otherwise fail on deep inside JAX."""
  if cfg.model not in model_names:
    raise UsageError(f"unknown model {cfg.model!r}; choose from {', '.join(sorted(model_names))}")
  if cfg.dataset not in dataset_names:
    raise UsageError(
        f"unknown dataset {cfg.dataset!r}; choose from {', '.join(dataset_names)}")
  if cfg.compressor not in compressor_names:
    raise UsageError(f"unknown compressor {cfg.compressor!r}; choose from "
                     f"{', '.join(sorted(compressor_names))}")
  if not 0.0 < cfg.density <= 1.0:
    raise UsageError(f"--density must be in (0, 1], got {cfg.density}")
  for name in ("epochs", "batch_size", "eval_every", "log_every", "eval_batch_size"):
    if getattr(cfg, name) < 1:
      raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
  if cfg.steps is not None and cfg.steps < 1:
    raise UsageError(f"--steps must be >= 1, got {cfg.steps}")
  if cfg.devices is not None and cfg.devices < 1:
    raise UsageError(f"--devices must be >= 1, got {cfg.devices}")
  if cfg.min_size < 0:
    raise UsageError(f"--min-size must be >= 0, got {cfg.min_size}")
  if cfg.lr <= 0:
    raise UsageError(f"--lr must be > 0, got {cfg.lr}")


def check_divisible(cfg: Config, n_devices: int) -> None:
  if cfg.batch_size % n_devices:
    raise UsageError(f"--batch-size {cfg.batch_size} is not divisible by the device count "
                     f"{n_devices}")
  if cfg.eval_batch_size % n_devices:
    raise UsageError(f"eval_batch_size {cfg.eval_batch_size} is not divisible by the device "
                     f"count {n_devices}")
