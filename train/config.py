"""Run configuration: defaults, `get_config()` files, and their validation.

Resolution order: the embedded default (`Config()`), then a `--config` file's
`get_config()`, then flags given on the command line.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
import typing
from typing import Any, ClassVar

from train.errors import UsageError

# The keys of train.models.MODELS, here so the CLI can reject a name without importing
# flax (a test keeps the two in step).
MODEL_NAMES = ("cnn", "mobilenetv2", "resnet18", "resnet50", "vgg11", "vgg16")
# Fake CPU devices when `devices` is None on a host without accelerators.
CPU_DEFAULT_DEVICES = 4
# Seeds feed numpy's generators (no negatives) and jax.random.key (at most 64 bits, and
# only 32 of them without jax_enable_x64): one range that both take unchanged.
MAX_SEED = 2**32 - 1
NONFINITE_POLICIES = ("stop", "skip")
SCOPES = ("leaf", "global")  # hggjax's scope option


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
  PROG: ClassVar[str] = "python -m train.cifar"  # the command that trains this config
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
      "every device's k slots), sparse_allreduce (index regions reduced by their owner "
      "device, then gathered; fewer bytes for many devices), leader_mask (ScaleCom: one "
      "device's positions in turn, every device's values there summed) or union_mask "
      "(every device's positions, every device's values there summed; docs/exchange.md)")
  value_dtype: str | None = _field(
      "auto", "dtype the compressed values travel in: auto (float8_e4m3fn with error "
      "feedback, else the gradient's dtype; float32 for the mask exchanges), none (the "
      "gradient's dtype), float32, bfloat16, float16, float8_e4m3fn or float8_e5m2; what "
      "rounding loses stays in the residual (docs/exchange.md)")
  scale_group: int | str | None = _field(
      "auto", "one float32 scale per this many values, sent along: auto (256 for float8 "
      "values, else none), none, or a number")
  index_coding: str = _field(
      "auto", "how the positions travel: auto (packed, int32 for the mask exchanges), "
      "packed (an Elias-Fano code of the sorted positions, about 2 + log2(1/density) bits "
      "each) or int32 (4 bytes each)")
  scope: str = _field(
      "leaf", "leaf: each compressed leaf sends density x its size; global: one selection "
      "over all compressed leaves together, density x their total, so a leaf whose "
      "updates are larger gets more of the budget (hggjax's scope option)")
  residual_decay: float = _field(
      1.0, "the error-feedback residual shrinks by this factor each step before the new "
      "gradient is added (1: plain error feedback; below 1: what waits long fades; "
      "hggjax's residual_decay option)")
  residual_lowpass: float = _field(
      1.0, "ScaleCom's low-pass filter: the residual kept is (1 - b) x the old one + b x "
      "what was not sent, for b this value (1: plain error feedback; hggjax's "
      "residual_lowpass option)")
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
  keep_checkpoints: int = _field(2, "checkpoints kept: the newest N that were saved whole")
  on_nonfinite: str = _field(
      "stop", "what a non-finite loss or gradient does: stop (exit code 3, the last good "
      "checkpoint kept) or skip (go on; the compressor already skipped that step on the "
      "device that saw it; metrics.jsonl counts them)")
  profile: bool | None = _field(
      None, "the time-breakdown pass after training (timing.json) (default: only when it is "
      "cheap: under a minute, or under a tenth of the training time)")
  profile_reps: int = _field(20, "timed rounds of the time breakdown (their median is kept)")
  synthetic_size: int = _field(256, "train and test examples of the synthetic dataset")


FIELDS = {f.name for f in dataclasses.fields(Config)}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def field_names(cls: type) -> set[str]:
  """The fields of a config class (Config or a subclass such as LMConfig)."""
  return {f.name for f in dataclasses.fields(cls)}


def flag(name: str) -> str:
  """The command-line flag of field `name`."""
  return "--" + name.replace("_", "-")


def load_config_file(path: str, cls: type = Config) -> Config:
  """Runs `get_config()` from a Python file; it may return a `cls` (Config or a subclass)
  or a dict of its fields."""
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
  try:
    cfg = module.get_config()
  except Exception as err:  # noqa: BLE001 - the user's code: its error, in one line
    raise UsageError(f"config file {path}: get_config() raised {type(err).__name__}: "
                     f"{str(err).splitlines()[0] if str(err) else ''}") from None
  if isinstance(cfg, dict):
    cfg = override(cls(), cfg)
  if type(cfg) is not cls:  # pylint: disable=unidiomatic-typecheck - a subclass is another task
    raise UsageError(f"{path}: get_config() must return {cls.__module__}.{cls.__name__} "
                     "or a dict")
  try:
    return check_types(cfg)
  except UsageError as err:
    raise UsageError(f"config file {path}: {err}") from None


def set_fields(cfg: Config) -> dict[str, Any]:
  """The fields of `cfg` that differ from the embedded default: what a config file sets
  (a file that returns a Config cannot say which fields it assigned)."""
  default = type(cfg)()
  return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
          if getattr(cfg, f.name) != getattr(default, f.name)}


def override(cfg: Config, values: dict[str, Any]) -> Config:
  unknown = set(values) - field_names(type(cfg))
  if unknown:
    raise UsageError(f"unknown config field(s): {', '.join(sorted(unknown))}")
  return dataclasses.replace(cfg, **values)


def _coerce(cls: type, name: str, value: Any) -> Any:
  """`value` as field `name`'s declared type; an int is a float where a float is wanted."""
  hint = _hints(cls)[name]
  allowed = typing.get_args(hint) or (hint,)
  if value is None and type(None) in allowed:
    return None
  for kind in allowed:
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
      return value
    if kind in (bool, str) and isinstance(value, kind):
      return value
  names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
  raise UsageError(f"field {name} must be {names}, got {type(value).__name__} {value!r}")


def check_types(cfg: Config) -> Config:
  """`cfg` with every field checked against its declared type (ints taken as floats)."""
  return dataclasses.replace(cfg, **{f.name: _coerce(type(cfg), f.name, getattr(cfg, f.name))
                                     for f in dataclasses.fields(cfg)})


def validate(cfg: Config, compressor_names, model_names, dataset_names) -> None:
  """Checks types, names and ranges the run would otherwise fail on deep inside JAX."""
  check_types(cfg)
  for name in ("lr", "momentum", "weight_decay", "density"):
    if not math.isfinite(getattr(cfg, name)):
      raise UsageError(f"{flag(name)} must be a finite number, got {getattr(cfg, name)}")
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
  for name in ("epochs", "batch_size", "eval_every", "log_every", "eval_batch_size",
               "synthetic_size"):
    if getattr(cfg, name) < 1:
      raise UsageError(f"{flag(name)} must be >= 1, got {getattr(cfg, name)}")
  if cfg.steps is not None and cfg.steps < 1:
    raise UsageError(f"--steps must be >= 1, got {cfg.steps}")
  if cfg.devices is not None and cfg.devices < 1:
    raise UsageError(f"--devices must be >= 1, got {cfg.devices}")
  if cfg.hosts is not None and cfg.hosts < 1:
    raise UsageError(f"--hosts must be >= 1, got {cfg.hosts}")
  if cfg.min_size < 0:
    raise UsageError(f"--min-size must be >= 0, got {cfg.min_size}")
  if cfg.scope not in SCOPES:
    raise UsageError(f"--scope must be one of {', '.join(SCOPES)}, got {cfg.scope!r}")
  for name in ("residual_decay", "residual_lowpass"):  # (None: the text harness's default)
    if getattr(cfg, name) is not None and not 0.0 < getattr(cfg, name) <= 1.0:
      raise UsageError(f"--{name.replace('_', '-')} must be in (0, 1], got {getattr(cfg, name)}")
  if cfg.lr <= 0:
    raise UsageError(f"--lr must be > 0, got {cfg.lr}")
  if not 0 <= cfg.seed <= MAX_SEED:
    raise UsageError(f"--seed must be in 0..{MAX_SEED}, got {cfg.seed}")
  if cfg.keep_checkpoints < 1:
    raise UsageError(f"--keep-checkpoints must be >= 1, got {cfg.keep_checkpoints}")
  if cfg.profile_reps < 1:
    raise UsageError(f"--profile-reps must be >= 1, got {cfg.profile_reps}")
  if cfg.on_nonfinite not in NONFINITE_POLICIES:
    raise UsageError(f"--on-nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, got "
                     f"{cfg.on_nonfinite!r}")
  if cfg.log_dir is not None and not cfg.log_dir.strip():
    raise UsageError("--log-dir must not be empty")


def check_divisible(cfg: Config, n_devices: int) -> None:
  if cfg.hosts is not None and n_devices % cfg.hosts:
    raise UsageError(f"--hosts {cfg.hosts} does not divide the device count {n_devices}")
  if cfg.batch_size % n_devices:
    raise UsageError(f"--batch-size {cfg.batch_size} is not divisible by the device count "
                     f"{n_devices}")
  if cfg.eval_batch_size % n_devices:
    raise UsageError(f"eval_batch_size {cfg.eval_batch_size} is not divisible by the device "
                     f"count {n_devices}")
