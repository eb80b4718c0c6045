"""Command line for `python -m train.cifar`: flags -> Config -> train_and_evaluate.

JAX's CPU device count must be set before any backend starts, so this module parses and
validates everything it can before touching a device. Every user error ends in one line
on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

import inspect

from train.config import MODEL_NAMES, Config, load_config_file, override, validate
from train.errors import UsageError

_DEFAULT = Config()
_CPU_DEFAULT_DEVICES = 4


class _Parser(argparse.ArgumentParser):
  """argparse, but errors are one line (no usage block) with exit code 2."""

  def error(self, message):
    raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
  p = _Parser(
      prog="python -m train.cifar",
      description="Data-parallel training with hggjax gradient compression. Defaults give "
      "the README's main job: Fashion-MNIST, small CNN, 4 CPU devices, hggtopk at density "
      "0.01. Precedence: built-in defaults < --config file < flags.",
      argument_default=argparse.SUPPRESS)
  d = _DEFAULT
  p.add_argument("--config", help="Python file whose get_config() returns a train.config.Config "
                 "or a dict of its fields, e.g. configs/fashion_mnist_cnn.py (default: none)")
  p.add_argument("--model", help=f"cnn, resnet18, resnet50, vgg11, vgg16 or mobilenetv2 "
                 f"(default: {d.model})")
  p.add_argument("--dataset", help=f"fashion_mnist (offline, Debian package), cifar10, "
                 f"cifar100 or synthetic (tests) (default: {d.dataset})")
  p.add_argument("--epochs", type=int, help=f"training epochs (default: {d.epochs})")
  p.add_argument("--steps", type=int, help="total optimizer steps, overriding --epochs; the "
                 "LR schedule scales to it (default: epochs x steps per epoch)")
  p.add_argument("--batch-size", type=int, dest="batch_size", help="global batch size, "
                 f"divisible by the device count (default: {d.batch_size})")
  p.add_argument("--lr", type=float, help="initial learning rate of SGD (momentum 0.9, weight "
                 f"decay 5e-4), x0.1 at 50%% and 75%% of the steps (default: {d.lr})")
  p.add_argument("--compressor", help="hggjax compressor name: none, topk, topk2, gaussian, "
                 "gaussian2, randomk, randomkec, dgcsampling, redsync, redsynctrim, hggtopk "
                 f"(default: {d.compressor})")
  p.add_argument("--density", type=float, help="share of gradient elements sent per leaf, in "
                 f"(0, 1] (default: {d.density})")
  p.add_argument("--min-size", type=int, dest="min_size", help="parameter leaves with fewer "
                 "elements are exchanged dense (hggjax's min_size option; default: "
                 f"{d.min_size}, every leaf compressed)")
  p.add_argument("--use-pipeline", action="store_true", dest="use_pipeline",
                 help="pipelined hggtopk; exits with an error while hggjax does not offer it")
  p.add_argument("--data-dir", dest="data_dir", help="fashion_mnist: directory with the four "
                 "IDX files (default /usr/share/datasets/fashion-mnist); cifar: a directory "
                 "holding the standard archive (cifar-10-binary.tar.gz or -python.tar.gz) or a "
                 "prepared tensorflow-datasets directory")
  p.add_argument("--log-dir", dest="log_dir", help="this run's directory for argv, config, "
                 "metrics.jsonl, timing, checkpoints (default: logs/<dataset>-<model>-"
                 "<compressor>-d<density>-s<seed>-<time>)")
  p.add_argument("--devices", type=int, help="devices on the data axis (default: all local "
                 f"accelerators; on a CPU-only host {_CPU_DEFAULT_DEVICES} fake CPU devices, and "
                 "--devices N makes N of them)")
  p.add_argument("--seed", type=int, help=f"seed of the model init, data order and "
                 f"augmentation (default: {d.seed})")
  p.add_argument("--eval-every", type=int, dest="eval_every", help="evaluate on the test set "
                 f"every N epochs, and always at the end (default: {d.eval_every})")
  p.add_argument("--log-every", type=int, dest="log_every", help="steps between "
                 f"metrics.jsonl lines and progress lines (default: {d.log_every})")
  p.add_argument("--augment", action=argparse.BooleanOptionalAction, help="random crop "
                 "(pad 4) and horizontal flip (default: on for CIFAR, off otherwise)")
  p.add_argument("--no-checkpoint", action="store_false", dest="checkpoint",
                 help="skip the orbax checkpoints (every epoch and at the end)")
  p.add_argument("--no-profile", action="store_false", dest="profile",
                 help="skip the time-breakdown pass after training")
  p.add_argument("--resume", action="store_true", help="continue the run in --log-dir from "
                 "its latest checkpoint; pass the same flags as the original run")
  return p


def resolve(args: argparse.Namespace) -> tuple[Config, bool]:
  values = vars(args).copy()
  resume = values.pop("resume", False)
  cfg = load_config_file(values.pop("config")) if "config" in values else Config()
  return override(cfg, values), resume


def pipeline_supported(compressor: str) -> bool:
  """Whether hggjax's constructor for `compressor` takes `pipeline=`."""
  import hggjax  # pylint: disable=import-outside-toplevel
  fn = hggjax.compressors.get(compressor)
  return fn is not None and "pipeline" in inspect.signature(fn).parameters


def _run(argv: list[str]) -> None:
  cfg, resume = resolve(build_parser().parse_args(argv))
  if resume and cfg.log_dir is None:
    raise UsageError("--resume needs --log-dir with the run to continue")

  import hggjax  # pylint: disable=import-outside-toplevel
  from train import data  # pylint: disable=import-outside-toplevel
  validate(cfg, hggjax.compressors, MODEL_NAMES, data.DATASETS)
  if cfg.use_pipeline and not pipeline_supported(cfg.compressor):
    if not pipeline_supported("hggtopk"):
      raise UsageError("--use-pipeline is not implemented yet")
    raise UsageError("only hggtopk supports --use-pipeline")

  import jax  # pylint: disable=import-outside-toplevel
  # Must precede the first backend use; it only affects the CPU backend, so on a GPU host
  # the default stays "all local GPUs".
  jax.config.update("jax_num_cpu_devices", cfg.devices or _CPU_DEFAULT_DEVICES)

  from train.loop import train_and_evaluate  # pylint: disable=import-outside-toplevel
  train_and_evaluate(cfg, argv=["python", "-m", "train.cifar", *argv], resume=resume)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    _run(argv)
  except UsageError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  return 0
