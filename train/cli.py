"""Command line for `python -m train.cifar` and `python -m train.lm`: flags -> config ->
train_and_evaluate.

Both commands are one `Program` each: a config class (every field a flag), a description
and a validation; everything else is shared. JAX's CPU device count must be set before any
backend starts, so this module parses and validates everything it can (flags, config file,
the run directory) before touching a device. Every user error ends in one line on stderr
and exit code 2; a run stopped by a non-finite loss or gradient ends in one line and exit
code 3.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from typing import Callable, NamedTuple

import hggjax

from train import distributed
from train import logs
from train import resume as resume_lib
from train.config import (CPU_DEFAULT_DEVICES, MODEL_NAMES, Config, load_config_file,
                          override, set_fields, validate)
from train.errors import NonFiniteError, UsageError
from train.lm.config import LMConfig, validate_lm
from train.mesh import config_axes

EXIT_USAGE = 2
EXIT_NONFINITE = 3


class _Parser(argparse.ArgumentParser):
  """argparse, but errors are one line (no usage block) with exit code 2."""

  def error(self, message):
    raise UsageError(message)


def _show(value) -> str:
  if isinstance(value, bool):
    return "on" if value else "off"
  return str(value)


def _validate_image(cfg: Config) -> None:
  from train import data  # pylint: disable=import-outside-toplevel
  validate(cfg, hggjax.compressors, MODEL_NAMES, data.DATASETS)


def _validate_lm(cfg: LMConfig) -> None:
  # The batch must divide over the devices: checked here when --devices says how many,
  # else once JAX has counted them.
  validate_lm(cfg, hggjax.compressors, cfg.devices)


class Program(NamedTuple):
  """One training command: its config class (every field a flag; `PROG` its name),
  what --help says, and the checks of names and ranges (no JAX backend started)."""
  config_cls: type
  description: str
  validate: Callable[[Config], None]
  example_config: str  # named in --config's help


IMAGE = Program(
    Config, "Data-parallel training with hggjax gradient compression. Defaults give the "
    "README's main job: Fashion-MNIST, small CNN, 4 CPU devices, hggtopk at density 0.01. "
    "Precedence: built-in defaults < --config file < flags.", _validate_image,
    "configs/fashion_mnist_cnn.py")
LM = Program(
    LMConfig, "Data-parallel language-model training with hggjax gradient compression "
    "(docs/lm.md). Defaults give the CPU job: the tiny transformer on the Python standard "
    "library's source as bytes, 4 CPU devices, hggtopk at density 0.01. Precedence: "
    "built-in defaults < --config file < flags.", _validate_lm, "configs/lm_tiny.py")


def program_for(cfg: Config) -> Program:
  return LM if isinstance(cfg, LMConfig) else IMAGE


def _add_config_flags(p: argparse.ArgumentParser, cls: type) -> None:
  """One flag per field of `cls`: `--batch-size N` sets batch_size; booleans take `--x`
  and `--no-x`. The help is the field's metadata plus its default."""
  hints = typing.get_type_hints(cls)
  for field in dataclasses.fields(cls):
    text = field.metadata["help"]
    if field.name == "compressor":
      text += ": one of " + ", ".join(sorted(hggjax.compressors))
    if field.default is not None:
      text += f" (default: {_show(field.default)})"
    kind = [t for t in typing.get_args(hints[field.name]) if t is not type(None)]
    kind = kind[0] if kind else hints[field.name]
    flag = "--" + field.name.replace("_", "-")
    help_text = text.replace("%", "%%")
    if kind is bool:
      p.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
    elif field.name in _WIRE_FLAGS:
      p.add_argument(flag, type=_WIRE_FLAGS[field.name], help=help_text)
    elif kind is int and type(None) in typing.get_args(hints[field.name]):
      p.add_argument(flag, type=_int_or_none, help=help_text)
    else:
      p.add_argument(flag, type=kind, help=help_text)


def _int_or_none(text: str) -> int | None:
  """An optional int flag: a number, or "none" for the default (--resume --hosts none goes
  back to the 1-D mesh)."""
  return None if text.strip().lower() == "none" else int(text)


_int_or_none.__name__ = "int"  # argparse names the type in its error: "invalid int value"


def _text_or_none(text: str) -> str | None:
  """--value-dtype: a dtype name, auto, or "none" (the gradient's dtype)."""
  return None if text.strip().lower() == "none" else text


def _group(text: str) -> int | str | None:
  """--scale-group: a number, auto, or "none" (no scales)."""
  text = text.strip().lower()
  return None if text == "none" else text if text == "auto" else int(text)


_text_or_none.__name__ = "dtype"
_group.__name__ = "int"
_WIRE_FLAGS = {"value_dtype": _text_or_none, "scale_group": _group}


def build_parser(program: Program = IMAGE) -> argparse.ArgumentParser:
  cls = program.config_cls
  p = _Parser(prog=cls.PROG, description=program.description,
              argument_default=argparse.SUPPRESS)
  p.add_argument("--config", help=f"Python file whose get_config() returns a "
                 f"{cls.__module__}.{cls.__name__} or a dict of its fields, e.g. "
                 f"{program.example_config} (default: none)")
  _add_config_flags(p, cls)
  p.add_argument("--resume", action="store_true", help="continue the run in --log-dir from "
                 "its newest good checkpoint, with the settings in its config.json; a flag "
                 "that contradicts them is refused, except for the length, logging, "
                 "checkpoint-keeping, --devices and --hosts flags (docs/training.md)")
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


def resolve_given(args: argparse.Namespace,
                  program: Program = IMAGE) -> tuple[Config, bool, dict]:
  """(config, --resume, the fields the user gave: flags, and what a --config file sets)."""
  cls = program.config_cls
  values = vars(args).copy()
  resume = values.pop("resume", False)
  cfg = load_config_file(values.pop("config"), cls) if "config" in values else cls()
  given = {**set_fields(cfg), **values}
  return override(cfg, values), resume, given


def resolve(args: argparse.Namespace, program: Program = IMAGE) -> tuple[Config, bool]:
  cfg, resume, _ = resolve_given(args, program)
  return cfg, resume


def check_flags(cfg: Config, flags: dict) -> None:
  """Rejects flags that would be silently ignored. (A config file's density stays: the
  file may describe a compressed run that --compressor none turns into its baseline.)"""
  if cfg.compressor == "none" and flags.get("density", 1.0) != 1.0:
    raise UsageError(f"--density {flags['density']:g} has no effect with --compressor none "
                     "(it sends every element); leave it out")


def check(cfg: Config) -> None:
  """Rejects what the run would otherwise fail on deep inside JAX: names, ranges, and
  the compressor's own arguments, checked by building the compressor once (this starts
  no JAX backend)."""
  from train import optim  # pylint: disable=import-outside-toplevel
  program_for(cfg).validate(cfg)
  try:
    optim.make_compressor(cfg, config_axes(cfg.hosts))
  except (TypeError, ValueError) as err:
    raise UsageError(f"--compressor {cfg.compressor}: {err}") from None


def _run(argv: list[str], program: Program) -> None:
  args = build_parser(program).parse_args(argv)
  spec = distributed.spec_from(*(vars(args).pop(name, None)
                                 for name in ("coordinator", "num_processes", "process_id")))
  cfg, resume, given = resolve_given(args, program)
  if resume:
    if cfg.log_dir is None:
      raise UsageError("--resume needs --log-dir with the run to continue")
    # the run's own config.json
    cfg = resume_lib.from_flags(cfg.log_dir, given, program.config_cls)
  check(cfg)
  check_flags(cfg, {k: v for k, v in vars(args).items() if k not in ("resume", "config")})
  logs.check_log_dir(cfg.log_dir if cfg.log_dir is not None else "logs")
  if not resume and cfg.log_dir is not None and logs.holds_run(cfg.log_dir):
    raise UsageError(f"--log-dir {cfg.log_dir} already holds a run: add --resume to "
                     "continue it, or use another --log-dir")

  patient_cpu_collectives()
  import jax  # pylint: disable=import-outside-toplevel
  if spec is not None:
    _run_processes(cfg, spec, argv, resume)
    return
  try:
    # Must precede the first backend use; it only affects the CPU backend, so on a GPU
    # host the default stays "all local GPUs".
    jax.config.update("jax_num_cpu_devices", cfg.devices or CPU_DEFAULT_DEVICES)
  except RuntimeError:
    # JAX already runs in this process (a caller such as a test): its devices stay, and
    # train_and_evaluate checks that there are enough.
    pass

  from train.loop import train_and_evaluate  # pylint: disable=import-outside-toplevel
  train_and_evaluate(cfg, argv=[*cfg.PROG.split(), *argv], resume=resume)


def patient_cpu_collectives(seconds: int = 600) -> None:
  """Let XLA:CPU's collectives wait `seconds` for every device's thread (default 40 s).

  Fake CPU devices are threads sharing a few cores: on a loaded machine one of them can
  reach a collective long after the others, and the default timeout then ends the run
  as if it had deadlocked. Only the CPU backend reads the flag; it must be set before
  JAX starts its backend, and a value the user put in XLA_FLAGS is kept.
  """
  flag = "--xla_cpu_collective_call_terminate_timeout_seconds"
  flags = os.environ.get("XLA_FLAGS", "")
  if flag not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {flag}={seconds}".strip()


def _run_processes(cfg: Config, spec: distributed.ProcessSpec, argv: list[str],
                   resume: bool) -> None:
  """One process of a multi-process run: join, then train on the global mesh."""
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
    train_and_evaluate(cfg, argv=[*cfg.PROG.split(), *argv], stream=stream,
                       resume=resume, checkpoint_dir=os.path.join(base, "checkpoints"))
  except (UsageError, NonFiniteError):
    raise  # the same on every process: each exits 2 (or 3) and the run ends cleanly
  except Exception as err:  # noqa: BLE001 - any failure ends this process at once
    distributed.exit_on_failure(spec, err)


def main(argv: list[str] | None = None, program: Program = IMAGE) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    _run(argv, program)
  except UsageError as err:
    print(f"error: {err}", file=sys.stderr)
    return EXIT_USAGE
  except NonFiniteError as err:
    print(f"error: {err}", file=sys.stderr)
    return EXIT_NONFINITE
  return 0
