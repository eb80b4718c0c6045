"""`python -m train.compare`: run the harness over compressors x densities, then summarise.

    python -m train.compare                                   # all names at 0.01 and 0.05
    python -m train.compare --compressors none,topk,hggtopk --densities 0.01 --steps 500
    python -m train.compare --model resnet18 --dataset cifar10 --data-dir DIR --epochs 1
    python -m train.compare --task lm --densities 0.01        # language models (docs/lm.md)

Every run is one `python -m train.cifar` run (`--task lm`: one `python -m train.lm` run;
same flags, same code, in this process so the dataset is loaded once) into
`<log-dir>/<compressor>-d<density>/` (`none` runs once, as `<log-dir>/none/`: it has no
density). Flags other than --task, --compressors, --densities and --log-dir go to every
run unchanged (`python -m train.cifar --help` / `python -m train.lm --help` list them).
Image runs default to `--steps 200 --log-every 20 --no-checkpoint`, which keeps the whole
sweep short (pass --steps/--epochs/--log-every to change them, --checkpoint to keep
checkpoints); language-model runs keep train.lm's length and logging (a text run needs its
steps) and default to `--no-checkpoint` only.

A run whose summary.json says it reached its last step is skipped when the comparison is
re-run (after checking that it was run with the same settings); an unfinished run
directory is removed and run again. Then `<log-dir>/summary.md` and `summary.csv` are
written from the run directories alone (train/report/reader.py reads them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
import traceback
from typing import Any, NamedTuple, TextIO

from train import cli as train_cli
from train.report import reader, summary
from train.config import CPU_DEFAULT_DEVICES, Config
from train.errors import NonFiniteError, UsageError

DEFAULT_LOG_DIR = os.path.join("logs", "comparison")
PROGRAMS = {"image": train_cli.IMAGE, "lm": train_cli.LM}
DEFAULT_DENSITIES = (0.01, 0.05)
# Defaults added in front of the user's flags: about a minute per run on the 2-core CPU
# machine, so that the default sweep (21 runs) fits in about half an hour.
DEFAULT_RUN_FLAGS = {"steps": ["--steps", "200"], "log_every": ["--log-every", "20"]}
# train.cifar flags that compare sets per run, or that make no sense in a sweep.
_OWN_FLAGS = {"compressor": "--compressors", "density": "--densities", "log_dir": "--log-dir",
              "resume": "re-running the comparison", "use_pipeline": None,
              "coordinator": None, "num_processes": None, "process_id": None}


class Planned(NamedTuple):
  """One run of the comparison."""
  name: str            # directory name under the log dir
  argv: list[str]      # the `python -m train.cifar` (or train.lm) flags that reproduce it
  config: Config       # what those flags resolve to


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
  p = _Parser(prog="python -m train.compare", description=__doc__, allow_abbrev=False,
              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--task", choices=sorted(PROGRAMS), default="image", help="image: "
                 "python -m train.cifar runs; lm: python -m train.lm runs (default: "
                 "%(default)s)")
  p.add_argument("--compressors", default=None, help="comma-separated hggjax compressor "
                 "names (default: all of hggjax.compressors)")
  p.add_argument("--densities", default=",".join(map(str, DEFAULT_DENSITIES)),
                 help="comma-separated densities in (0, 1] (default: %(default)s)")
  p.add_argument("--log-dir", default=DEFAULT_LOG_DIR, help="where the run directories, "
                 "summary.md and summary.csv go (default: %(default)s)")
  p.add_argument("--checkpoint", action="store_true", help="keep the runs' orbax "
                 "checkpoints (default: --no-checkpoint)")
  return p


def _names(text: str, choices) -> list[str]:
  names = list(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
  unknown = [n for n in names if n not in choices]
  if unknown or not names:
    raise UsageError(f"--compressors: unknown or empty {', '.join(unknown) or repr(text)}; "
                     f"choose from {', '.join(sorted(choices))}")
  return names


def _densities(text: str) -> list[float]:
  try:
    values = list(dict.fromkeys(float(s) for s in text.split(",") if s.strip()))
  except ValueError:
    raise UsageError(f"--densities must be comma-separated numbers, got {text!r}") from None
  if not values or not all(0.0 < d <= 1.0 for d in values):
    raise UsageError(f"--densities must be in (0, 1], got {text!r}")
  return values


def plan(compressors: list[str], densities: list[float], train_args: list[str], log_root: str,
         *, checkpoint: bool = False, task: str = "image") -> list[Planned]:
  """The runs of a comparison, each resolved by its command's own parser (train.cifar,
  or train.lm with `task="lm"`) and checked as that command checks it."""
  program = PROGRAMS[task]
  given = vars(train_cli.build_parser(program).parse_args(train_args))
  for field, own in _OWN_FLAGS.items():
    if field in given:
      flag = "--" + field.replace("_", "-")
      raise UsageError(f"{flag} is not a train.compare flag" +
                       (f"; use {own}" if own else ""))
  base = []
  if task == "image" and "steps" not in given and "epochs" not in given:
    base += DEFAULT_RUN_FLAGS["steps"]
  if task == "image" and "log_every" not in given:
    base += DEFAULT_RUN_FLAGS["log_every"]
  if not checkpoint:
    base += ["--no-checkpoint"]
  base += train_args
  runs = []
  for c in compressors:
    for d in [1.0] if c == "none" else densities:
      name = "none" if c == "none" else f"{c}-d{d:g}"
      argv = base + ["--compressor", c, "--density", f"{d:g}",
                     "--log-dir", os.path.join(log_root, name)]
      cfg, _ = train_cli.resolve(train_cli.build_parser(program).parse_args(argv), program)
      train_cli.check(cfg)
      runs.append(Planned(name, argv, cfg))
  return runs


def _finished(path: str) -> bool:
  file = os.path.join(path, "summary.json")
  if not os.path.isfile(file):
    return False
  with open(file) as f:
    s = json.load(f)
  return s.get("step") is not None and s.get("step") == s.get("total_steps")


def _check_same_settings(run: Planned) -> None:
  """A finished run is reused only if its config.json matches what was asked for now."""
  with open(os.path.join(run.config.log_dir, "config.json")) as f:
    stored = json.load(f)
  wanted = json.loads(json.dumps(dataclasses.asdict(run.config)))
  diff = [f"{k}: {stored[k]!r} there, {wanted[k]!r} now" for k in stored
          if k in wanted and k != "log_dir" and stored[k] != wanted[k]]
  if diff:
    raise UsageError(f"{run.config.log_dir} was run with other settings ({'; '.join(diff)}); "
                     "use another --log-dir or remove that directory")


def _clear_unfinished(path: str) -> None:
  entries = os.listdir(path)
  if entries and "config.json" not in entries:
    raise UsageError(f"{path} exists but is not a run directory; move it away or use "
                     "another --log-dir")
  shutil.rmtree(path)


def _machine(loads: list[float]) -> dict[str, Any]:
  import jax  # pylint: disable=import-outside-toplevel
  dev = jax.devices()[0]
  return {"backend": f"{dev.platform} ({dev.device_kind})", "jax": jax.__version__,
          "host CPUs": os.cpu_count(), "machine": platform.machine(),
          "1-min load average at run boundaries (other jobs share the host)":
              f"min {min(loads):.1f}, median {statistics.median(loads):.1f}, "
              f"max {max(loads):.1f}"}


def run_comparison(runs: list[Planned], log_root: str, *, command: str, dataset=None,
                   stream: TextIO | None = None) -> list[dict[str, Any]]:
  """Runs what is not finished yet, writes summary.md/.csv, returns their rows."""
  stream = stream or sys.stdout
  loads = [os.getloadavg()[0]]
  todo = []
  for run in runs:
    if _finished(run.config.log_dir):
      _check_same_settings(run)
    else:
      todo.append(run)
  os.makedirs(log_root, exist_ok=True)
  failed: dict[str, str] = {}
  if todo:
    from train import tasks  # pylint: disable=import-outside-toplevel
    from train.loop import train_and_evaluate  # pylint: disable=import-outside-toplevel
    ds = dataset or tasks.for_config(todo[0].config).data
  for run in runs:
    if run not in todo:
      print(f"[compare] skip {run.name}: finished earlier in {run.config.log_dir}", file=stream)
      continue
    if os.path.exists(run.config.log_dir):
      print(f"[compare] {run.name}: removing the unfinished run in {run.config.log_dir}",
            file=stream)
      _clear_unfinished(run.config.log_dir)
    print(f"[compare] run {todo.index(run) + 1}/{len(todo)}: {run.name}", file=stream)
    t0 = time.perf_counter()
    try:
      train_and_evaluate(run.config, argv=[*run.config.PROG.split(), *run.argv],
                         dataset=ds, stream=stream)
    except Exception as err:  # noqa: BLE001 - one failed run must not lose the others
      failed[run.name] = f"failed: {type(err).__name__}: {err}".splitlines()[0]
      if not isinstance(err, (UsageError, NonFiniteError)):  # one line says it; a bug needs more
        traceback.print_exc(file=stream)
    loads.append(os.getloadavg()[0])
    print(f"[compare] {run.name}: {failed.get(run.name, 'done')} in "
          f"{time.perf_counter() - t0:.0f} s", file=stream)

  rows = []
  for run in runs:
    path = run.config.log_dir
    if run.name in failed or not os.path.isfile(os.path.join(path, "metrics.jsonl")):
      rows.append({"run": run.name, "compressor": run.config.compressor,
                   "density": run.config.density,
                   "status": failed.get(run.name, "failed: no metrics.jsonl")})
      continue
    loaded = reader.load_run(path)
    row = reader.metrics(loaded) if loaded.train else {}
    unusable = reader.unusable(loaded)
    if unusable:  # named in the summary, left out of its numbers
      row, status = {}, f"no usable metrics: {unusable}"
    elif row.get("finished"):
      status = "ok"
    else:
      status = f"failed: {row.get('stopped') or 'did not reach its last step'}"
    rows.append({"run": run.name, "compressor": run.config.compressor,
                 "density": run.config.density, **row, "status": status})
  machine = _machine(loads)
  task = "lm" if runs and reader.task_of(dataclasses.asdict(runs[0].config)) == "lm" else "image"
  md, csv = summary.write(log_root, rows, command, machine, task)
  print(f"[compare] wrote {md} and {csv}", file=stream)
  return rows


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    args, train_args = build_parser().parse_known_args(argv)
    import hggjax  # pylint: disable=import-outside-toplevel
    compressors = _names(args.compressors, hggjax.compressors) if args.compressors else \
        sorted(hggjax.compressors)
    runs = plan(compressors, _densities(args.densities), train_args, args.log_dir,
                checkpoint=args.checkpoint, task=args.task)
    import jax  # pylint: disable=import-outside-toplevel
    # Before the first backend use, as in train.cifar (only the CPU backend reads it).
    jax.config.update("jax_num_cpu_devices", runs[0].config.devices or CPU_DEFAULT_DEVICES)
    rows = run_comparison(runs, args.log_dir,
                          command=shlex.join(["python", "-m", "train.compare", *argv]))
  except UsageError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  return 0 if all(r["status"] == "ok" for r in rows) else 1

