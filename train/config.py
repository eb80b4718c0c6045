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

# The keys of train.models.MODELS, here so the CLI can reject a name without importing
# flax (a test keeps the two in step).
MODEL_NAMES = ("cnn", "mobilenetv2", "resnet18", "resnet50", "vgg11", "vgg16")
# Fake CPU devices when `devices` is None on a host without accelerators.
CPU_DEFAULT_DEVICES = 4


def _field(default: Any, doc: str) -> Any:
  """A Config field with its command-line help."""
  return dataclasses.field(default=default, metadata={"help": doc})


@dataclasses.dataclass
class Config:
  """Everything a run depends on. The default is the README's main job.

  Every field is a flag of `python -m train.cifar` (`batch_size` is `--batch-size`,
  booleans also take `--no-...`); its metadata["help"] is the flag's help, to which the
  CLI adds the default unless it is None (then the help says what None means).
  """
  model: str = _field("cnn", "model: one of " + ", ".join(MODEL_NAMES))
  dataset: str = _field("fashion_mnist", "fashion_mnist (offline, Debian package), cifar10, "
                        "cifar100 or synthetic (tests)")
  epochs: int = _field(3, "training epochs")
  steps: int | None = _field(None, "total optimizer steps, overriding --epochs; the LR "
                             "schedule scales to it (default: epochs x steps per epoch)")
  batch_size: int = _field(64, "global batch size, split over the devices (divisible by "
                           "their count)")
  lr: float = _field(0.05, "initial learning rate of SGD, x0.1 at 50% and 75% of the steps")
  momentum: float = _field(0.9, "SGD momentum; with --momentum-correction each device "
                           "keeps it inside the compressor")
  weight_decay: float = _field(5e-4, "weight decay added to the gradient")
  compressor: str = _field("hggtopk", "hggjax compressor")  # names: hggjax.compressors
  density: float = _field(0.01, "share of gradient elements sent per leaf, in (0, 1]")
  min_size: int = _field(1000, "parameter leaves with fewer elements are exchanged dense "
                         "(hggjax's min_size option; 0 compresses every leaf)")
  momentum_correction: bool = _field(
      True, "keep each device's momentum inside the compressor and compress it (DGC's "
      "momentum correction, hggjax's momentum option) instead of applying momentum to the "
      "exchanged mean")
  exchange: str = _field(
      "allgather", "how the compressed gradients travel: allgather (every device gathers "
      "every device's k slots) or sparse_allreduce (index regions reduced by their owner "
      "device, then gathered; fewer bytes for many devices; docs/exchange.md)")
  hosts: int | None = _field(
      None, "two-level mesh: split the devices into this many hosts, a 2-D mesh (hosts, "
      "devices / hosts) with axes (hosts, local); gradients are averaged dense over local, "
      "compressed and exchanged over hosts (default: a 1-D mesh over all devices)")
  use_pipeline: bool = _field(
      False, "hggtopk only: select each leaf in one pass from the previous step's "
      "threshold, with one exchange per leaf (docs/pipeline.md); other compressors exit "
      "with an error")
  data_dir: str | None = _field(
      None, "fashion_mnist: directory with the four IDX files (default "
      "/usr/share/datasets/fashion-mnist); cifar: a directory holding the standard archive "
      "(cifar-10-binary.tar.gz or -python.tar.gz) or a prepared tensorflow-datasets "
      "directory")
  log_dir: str | None = _field(
      None, "this run's directory for argv, config, metrics.jsonl, timing, checkpoints "
      "(default: logs/<dataset>-<model>-<compressor>-d<density>-s<seed>-<time>)")
  devices: int | None = _field(
      None, "devices on the data axis (default: all local accelerators; on a CPU-only host "
      f"{CPU_DEFAULT_DEVICES} fake CPU devices, and --devices N makes N of them)")
  seed: int = _field(0, "seed of the model init, data order and augmentation")
  eval_every: int = _field(1, "evaluate on the test set every N epochs, and always at the end")
  log_every: int = _field(50, "steps between metrics.jsonl lines and progress lines")
  eval_batch_size: int = _field(1000, "test-set batch size, divisible by the device count")
  augment: bool | None = _field(None, "random crop (pad 4) and horizontal flip (default: on "
                                "for CIFAR, off otherwise)")
  checkpoint: bool = _field(True, "orbax checkpoints every epoch and at the end")
  profile: bool = _field(True, "the time-breakdown pass after training (timing.json)")
  profile_reps: int = _field(20, "timed rounds of the time breakdown (their median is kept)")
  synthetic_size: int = _field(256, "train and test examples of the synthetic dataset")


FIELDS = {f.name for f in dataclasses.fields(Config)}


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
  if cfg.hosts is not None and cfg.hosts < 1:
    raise UsageError(f"--hosts must be >= 1, got {cfg.hosts}")
  if cfg.min_size < 0:
    raise UsageError(f"--min-size must be >= 0, got {cfg.min_size}")
  if cfg.lr <= 0:
    raise UsageError(f"--lr must be > 0, got {cfg.lr}")


def check_divisible(cfg: Config, n_devices: int) -> None:
  if cfg.hosts is not None and n_devices % cfg.hosts:
    raise UsageError(f"--hosts {cfg.hosts} does not divide the device count {n_devices}")
  if cfg.batch_size % n_devices:
    raise UsageError(f"--batch-size {cfg.batch_size} is not divisible by the device count "
                     f"{n_devices}")
  if cfg.eval_batch_size % n_devices:
    raise UsageError(f"eval_batch_size {cfg.eval_batch_size} is not divisible by the device "
                     f"count {n_devices}")
