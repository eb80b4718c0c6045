"""Command line for `python -m train.cifar`: flags -> Config -> train_and_evaluate.

JAX's CPU device count must be set before any backend starts, so this module parses and
validates everything it can before touching a device. Every user error ends in one line
on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

import inspect

from train import distributed
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
                 f"{d.min_size}; 0 compresses every leaf)")
  p.add_argument("--momentum-correction", action=argparse.BooleanOptionalAction,
                 dest="momentum_correction", help="keep each device's momentum inside the "
                 "compressor and compress it (DGC's momentum correction, hggjax's momentum "
                 "option) instead of applying momentum to the exchanged mean (default: "
                 f"{'on' if d.momentum_correction else 'off'})")
  p.add_argument("--use-pipeline", action="store_true", dest="use_pipeline",
                 help="hggtopk only: select each leaf in one pass from the previous step's "
                 "threshold, with one exchange per leaf (docs/pipeline.md); other compressors "
                 "exit with an error")
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
  # Multi-process (jax.distributed); docs/multihost.md. Not Config fields: where a process
  # sits is not part of what the run computes.
  p.add_argument("--coordinator", help="multi-process: HOST:PORT of process 0 (default: "
                 f"${distributed.ENV_COORDINATOR})")
  p.add_argument("--num-processes", type=int, dest="num_processes", help="multi-process: "
                 f"processes in the run (default: ${distributed.ENV_NUM_PROCESSES}, else 1); "
                 "--devices is then the total over all processes")
  p.add_argument("--process-id", type=int, dest="process_id", help="multi-process: this "
                 f"process, 0..N-1 (default: ${distributed.ENV_PROCESS_ID})")
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
  args = build_parser().parse_args(argv)
  spec = distributed.spec_from(*(vars(args).pop(name, None)
                                 for name in ("coordinator", "num_processes", "process_id")))
  cfg, resume = resolve(args)
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
  if spec is not None:
    _run_processes(cfg, spec, argv, resume)
    return
  # Must precede the first backend use; it only affects the CPU backend, so on a GPU host
  # the default stays "all local GPUs".
  jax.config.update("jax_num_cpu_devices", cfg.devices or _CPU_DEFAULT_DEVICES)

  from train.loop import train_and_evaluate  # pylint: disable=import-outside-toplevel
  train_and_evaluate(cfg, argv=["python", "-m", "train.cifar", *argv], resume=resume)


def _run_processes(cfg: Config, spec: distributed.ProcessSpec, argv: list[str],
                   resume: bool) -> None:
  """One process of a multi-process run: join, then train on the global mesh."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  per_process = None  # CPU: one device per process unless --devices says more
  if cfg.devices is not None:
    if cfg.devices % spec.num_processes:
      raise UsageError(f"--devices {cfg.devices} (the total) must be a multiple of "
                       f"--num-processes {spec.num_processes}")
    per_process = cfg.devices // spec.num_processes
  distributed.initialize(spec, cpu_devices=per_process)
  try:
    from train import logs  # pylint: disable=import-outside-toplevel
    from train.loop import train_and_evaluate  # pylint: disable=import-outside-toplevel
    # Process 0 owns the run directory; process i writes its own files to process-i/.
    base = distributed.broadcast_text(cfg.log_dir or logs.default_run_dir(cfg))
    log_dir = base if spec.process_id == 0 else os.path.join(base, f"process-{spec.process_id}")
    cfg = dataclasses.replace(cfg, devices=cfg.devices or jax.device_count(), log_dir=log_dir)
    stream = None
    if spec.process_id:
      os.makedirs(log_dir, exist_ok=True)
      stream = open(os.path.join(log_dir, "progress.log"), "a")  # pylint: disable=consider-using-with
    # One checkpoint directory for all: orbax writes each process's shards into it (on
    # several hosts it must be a shared filesystem).
    train_and_evaluate(cfg, argv=["python", "-m", "train.cifar", *argv], stream=stream,
                       resume=resume, checkpoint_dir=os.path.join(base, "checkpoints"))
  except UsageError:
    raise  # the same on every process: each exits 2 and the run ends cleanly
  except Exception as err:  # noqa: BLE001 - any failure ends this process at once
    distributed.exit_on_failure(spec, err)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    _run(argv)
  except UsageError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  return 0
