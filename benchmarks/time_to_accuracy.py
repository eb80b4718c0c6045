"""Time to accuracy over a slow network: the real harnesses on shaped links, dense against
compressed.

    sudo python -m benchmarks.time_to_accuracy            # image and text, P = 2, 4; 1 and 0.1 Gbit/s
    sudo python -m benchmarks.time_to_accuracy --tasks image --processes 4 --rates 100mbit
    python -m benchmarks.time_to_accuracy --dry-run       # 2 processes on loopback, a few steps

Each run is P processes of `python -m train.cifar` (the default: Fashion-MNIST, the small
CNN, 3 epochs) or `python -m train.lm` (the default tiny transformer, `--lm-steps` steps,
evaluated every `--lm-eval-every`), one per network namespace of `benchmarks.network`,
joined through `jax.distributed` (train.distributed's launcher), on links shaped with
`tc` to the rate (`unshaped`: the namespaces' links as they are). Process i is pinned to
core i mod cpus: one process per core, as on real hosts, where the cores allow it; with
more processes than cores two share one and the report says so (its compute time then
includes the waiting for the other).

Methods (`--methods`): `dense` (`--compressor none`: plain SGD, or AdamW after the
exchange for text), `hggtopk` (hggtopk at 1%, float32 values at int32 positions; for
text, Adam before the compressor, hggjax.adamw), `hggtopk-bf16` (the same with bfloat16
values and packed positions on the wire, docs/exchange.md) and `hggtopk-fp8` (the harness
default: float8 values with a scale per 256, packed positions).

From process 0's metrics.jsonl (every evaluation with its `wall_s`: seconds since the run
started, data loading and compiling included) it prints, per method: the time to the
target (images: the first evaluation at `--target-accuracy` test accuracy, default 0.90;
text: to dense's final validation loss x (1 + `--lm-margin`), default 3%, dense of the same
processes and rate), its ratio to dense, the final metric, the median step time, and the
compute share: `compute_s` of the run's own time breakdown (timing.json: forward and
backward on one batch, docs/training.md) against its step. It writes JSON (`--out`) and
the curves (metric against wall time, one panel per task and rate) as PNG (`--plot`).

Needs root (namespaces, tc) except with `--dry-run`; where namespaces cannot be made it
says why and exits 0 without measuring. Exit code 1 when a run fails, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from typing import NamedTuple

from benchmarks import network
from train import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOOPBACK = "loopback"  # the dry run's "rate": 127.0.0.1, no namespaces


class Task(NamedTuple):
  module: str         # the harness
  metric: str         # the eval key the curves show
  higher_is_better: bool
  label: str          # the curves' y axis


TASKS = {
    "image": Task("train.cifar", "test_accuracy", True, "test accuracy"),
    "lm": Task("train.lm", "valid_loss", False, "validation loss (nats/token)"),
}
METHODS = {
    "dense": ["--compressor", "none"],
    "hggtopk": ["--compressor", "hggtopk", "--density", "0.01", "--value-dtype", "none",
                "--index-coding", "int32"],
    "hggtopk-bf16": ["--compressor", "hggtopk", "--density", "0.01", "--value-dtype",
                     "bfloat16", "--index-coding", "packed"],
    "hggtopk-fp8": ["--compressor", "hggtopk", "--density", "0.01"],
}
DENSE = "dense"
# The dry run: the real harnesses, a few steps of tiny inputs (the test suite runs this).
DRY_FLAGS = {
    "image": ["--dataset", "synthetic", "--steps", "6", "--batch-size", "64", "--log-every",
              "2", "--min-size", "1000", "--no-profile", "--no-checkpoint"],
    "lm": ["--steps", "4", "--warmup-steps", "1", "--batch-size", "8", "--seq-len", "32",
           "--eval-batch-size", "8", "--eval-windows", "8", "--eval-every", "2",
           "--log-every", "2", "--max-corpus-bytes", "200000", "--no-profile",
           "--no-checkpoint"],
}


class BadArguments(Exception):
  """One line, exit 2."""


def _csv(text: str, allowed=None, what: str = "") -> list[str]:
  items = [t.strip() for t in text.split(",") if t.strip()]
  if not items:
    raise BadArguments(f"--{what}: give at least one")
  if allowed is not None:
    bad = [t for t in items if t not in allowed]
    if bad:
      raise BadArguments(f"--{what}: {', '.join(bad)} unknown; choose from "
                         f"{', '.join(allowed)}")
  return items


def task_flags(task: str, args) -> list[str]:
  """The flags every run of `task` gets besides its method's."""
  if args.dry_run:
    return list(DRY_FLAGS[task])
  # --profile: the time breakdown (after training: the curves do not include it) for the
  # compute share, which the harness would skip when it is long next to a short run.
  if task == "lm":
    return ["--steps", str(args.lm_steps), "--eval-every", str(args.lm_eval_every),
            "--profile"]
  return ["--profile"]


def time_to(evals: list[dict], metric: str, target: float, higher: bool) -> float | None:
  """The wall_s of the first evaluation that reaches `target` (>= when `higher`, else
  <=), or None when none does."""
  for e in evals:
    value = e.get(metric)
    if value is not None and (value >= target if higher else value <= target):
      return e["wall_s"]
  return None


def read_run(log_dir: str, metric: str) -> dict:
  """What one finished run's process 0 logged: its evaluations (step, wall_s, metric),
  median step time, bytes per step and the compute share of its time breakdown."""
  with open(os.path.join(log_dir, "metrics.jsonl")) as f:
    lines = [json.loads(t) for t in f if t.strip()]
  evals = [{"step": e["step"], "wall_s": e["wall_s"], metric: e.get(metric)}
           for e in lines if e.get("kind") == "eval"]
  train = [e for e in lines if e.get("kind") == "train"]
  rates = [e["steps_per_s"] for e in train if e.get("steps_per_s")]
  out = {"evals": evals, "final": evals[-1][metric] if evals else None,
         "step_ms": 1e3 / statistics.median(rates) if rates else None,
         "sent_bytes": train[-1].get("sent_bytes") if train else None,
         "dense_bytes": train[-1].get("dense_bytes") if train else None,
         "compute_ms": None, "profiled_step_ms": None}
  timing = os.path.join(log_dir, "timing.json")
  if os.path.isfile(timing):
    with open(timing) as f:
      t = json.load(f)
    out["compute_ms"] = 1e3 * t["compute_s"] if t.get("compute_s") else None
    out["profiled_step_ms"] = 1e3 * t["step_s"] if t.get("step_s") else None
  return out


def _launch(args, task: str, method: str, processes: int, log_dir: str, net) -> dict:
  cmd = ["-m", TASKS[task].module, *task_flags(task, args), *METHODS[method],
         "--seed", str(args.seed), "--log-dir", log_dir]
  cpus = os.cpu_count() or 1
  pin = shutil.which("taskset") is not None

  def head(i: int) -> list[str]:  # process i: its namespace, then core i mod cpus
    return [*(net.prefix(i) if net else []), *(["taskset", "-c", str(i % cpus)] if pin else [])]

  kw = {"coordinator": f"{net.address(0)}:{network.PORT}"} if net else {}
  t0 = time.perf_counter()
  results = distributed.launch_local(cmd, processes, timeout_s=args.timeout, cwd=REPO,
                                     env={"JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO},
                                     prefix=head, **kw)
  wall = time.perf_counter() - t0
  failed = [r for r in results if r.returncode != 0]
  if failed:
    r = failed[0]
    why = "killed at the time limit" if r.returncode is None else f"exit {r.returncode}"
    tail = (r.stderr.strip().splitlines() or r.stdout.strip().splitlines() or [""])[-1]
    raise RuntimeError(f"{task} {method}, {processes} processes: process {r.process_id} "
                       f"{why}: {tail}")
  return {"command": " ".join(["python", *cmd]), "process_wall_s": wall,
          **read_run(log_dir, TASKS[task].metric)}


def summarize(runs: list[dict], args) -> list[dict]:
  """Adds each run's target, time to it and ratio to dense (same task, processes, rate)."""
  for r in runs:
    task = TASKS[r["task"]]
    dense = next((d for d in runs if d["method"] == DENSE and
                  (d["task"], d["processes"], d["rate"]) == (r["task"], r["processes"],
                                                             r["rate"])), None)
    if r["task"] == "image":
      target = args.target_accuracy
    elif dense is not None and dense["final"] is not None:
      target = dense["final"] * (1 + args.lm_margin)
    else:
      target = None
    r["target"] = target
    r["time_to_target_s"] = None if target is None else time_to(
        r["evals"], task.metric, target, task.higher_is_better)
    dense_t = None if dense is None or target is None else time_to(
        dense["evals"], task.metric, target, task.higher_is_better)
    r["speedup_vs_dense"] = (dense_t / r["time_to_target_s"]
                             if dense_t and r["time_to_target_s"] else None)
  return runs


def print_table(runs: list[dict], cpus: int) -> None:
  print(f"{'task':<5} {'P':>2} {'rate':>9} {'method':<13} {'to target':>10} {'x dense':>8} "
        f"{'final':>7} {'step ms':>8} {'compute':>8} {'KiB/step':>9}  notes")
  for r in runs:
    t = r["time_to_target_s"]
    to = f"{t:.0f} s" if t is not None else "not reached"
    vs = f"{r['speedup_vs_dense']:.2f}" if r["speedup_vs_dense"] else ""
    final = f"{r['final']:.4f}" if r["final"] is not None else ""
    step = f"{r['step_ms']:.1f}" if r["step_ms"] else ""
    comp = f"{r['compute_ms']:.1f}" if r["compute_ms"] else ""
    kib = f"{r['sent_bytes'] / 1024:.1f}" if r["sent_bytes"] is not None else ""
    notes = f"target {r['target']:.4g}" if r["target"] is not None else "no target"
    if r["processes"] > cpus:
      notes += f"; {r['processes']} processes on {cpus} cores"
    print(f"{r['task']:<5} {r['processes']:>2} {r['rate']:>9} {r['method']:<13} {to:>10} "
          f"{vs:>8} {final:>7} {step:>8} {comp:>8} {kib:>9}  {notes}")


def plot(runs: list[dict], path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  panels = sorted({(r["task"], r["rate"]) for r in runs},
                  key=lambda p: (list(TASKS).index(p[0]), p[1]))
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
  colors = {m: f"C{i}" for i, m in enumerate(METHODS)}
  styles = {p: s for p, s in zip(sorted({r["processes"] for r in runs}), ("-", "--", ":", "-."))}
  for ax, (task, rate) in zip(axes[0], panels):
    for r in runs:
      if (r["task"], r["rate"]) != (task, rate) or not r["evals"]:
        continue
      xs = [e["wall_s"] for e in r["evals"]]
      ys = [e[TASKS[task].metric] for e in r["evals"]]
      ax.plot(xs, ys, styles[r["processes"]], marker="o", ms=3, color=colors[r["method"]],
              label=f"{r['method']}, {r['processes']} proc")
      if r["target"] is not None:
        ax.axhline(r["target"], color="grey", lw=0.5)
    ax.set_title(f"{task}, {rate}")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel(TASKS[task].label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _args(argv):
  p = argparse.ArgumentParser(prog="python -m benchmarks.time_to_accuracy",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--tasks", default="image,lm", help="image (train.cifar), lm (train.lm)")
  p.add_argument("--methods", default=",".join(METHODS), help=", ".join(METHODS))
  p.add_argument("--processes", default="2,4", help="process counts, e.g. 2,4")
  p.add_argument("--rates", default="1gbit,100mbit",
                 help=f"link rates in tc syntax, or {network.UNSHAPED}")
  p.add_argument("--lm-steps", type=int, default=600, help="steps of each text run")
  p.add_argument("--lm-eval-every", type=int, default=100, help="steps between its evals")
  p.add_argument("--target-accuracy", type=float, default=0.90)
  p.add_argument("--lm-margin", type=float, default=0.03,
                 help="text target: dense's final validation loss x (1 + this)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
  p.add_argument("--work-dir", default=None, help="the runs' directories (default: a "
                 "temporary one, removed at the end)")
  p.add_argument("--dry-run", action="store_true", help="2 processes on 127.0.0.1, "
                 "unshaped, a few steps of tiny inputs; no root needed")
  p.add_argument("--out", default="benchmarks/results/time_to_accuracy_cpu.json")
  p.add_argument("--plot", default="docs/img/time_to_accuracy.png")
  args = p.parse_args(argv)
  args.tasks = _csv(args.tasks, TASKS, "tasks")
  args.methods = _csv(args.methods, METHODS, "methods")
  try:
    args.processes = [int(n) for n in _csv(args.processes, None, "processes")]
  except ValueError:
    raise BadArguments(f"--processes: {args.processes!r}: give counts, e.g. 2,4") from None
  if any(n < 2 for n in args.processes):
    raise BadArguments("--processes: each count must be >= 2 (one process has no network)")
  args.rates = _csv(args.rates, None, "rates")
  for rate in args.rates:
    try:
      network.rate_bits_per_s(rate)
    except ValueError as err:
      raise BadArguments(f"--rates: {err}") from None
  if not 0 < args.target_accuracy <= 1:
    raise BadArguments("--target-accuracy must be in (0, 1]")
  if args.lm_steps < 1 or args.lm_eval_every < 1:
    raise BadArguments("--lm-steps and --lm-eval-every must be >= 1")
  if args.dry_run:
    args.processes, args.rates = [2], [LOOPBACK]
  return args


def _interrupt(signum, frame):
  del signum, frame
  raise KeyboardInterrupt


def run_all(args, work: str) -> list[dict]:
  runs = []
  for processes in args.processes:
    net = None if args.dry_run else network.Network(processes)
    try:
      if net is not None:
        net.up()
      for rate in args.rates:
        if net is not None:
          net.shape(rate)
        for task in args.tasks:
          for method in args.methods:
            log_dir = os.path.join(work, f"{task}-{processes}p-{rate}-{method}")
            print(f"{task} {method}: {processes} processes at {rate} ...", flush=True)
            r = _launch(args, task, method, processes, log_dir, net)
            runs.append({"task": task, "method": method, "processes": processes,
                         "rate": rate, **r})
            print(f"  {r['process_wall_s']:.0f} s, final {TASKS[task].metric} "
                  f"{r['final']}", flush=True)
    finally:
      if net is not None:
        left = net.down()
        if left:
          print(f"could not remove: {', '.join(left)}", file=sys.stderr)
  return runs


def main(argv=None) -> int:
  try:
    args = _args(argv)
  except BadArguments as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  if not args.dry_run:
    why = network.cannot_run()
    if why:
      print(f"benchmarks.time_to_accuracy skipped: {why}")
      return 0
  signal.signal(signal.SIGTERM, _interrupt)  # unwind through the namespaces' removal
  work = args.work_dir or tempfile.mkdtemp(prefix="hggjax-tta-")
  if args.work_dir and os.path.isdir(work) and os.listdir(work):
    print(f"error: --work-dir {work} is not empty: give a new one", file=sys.stderr)
    return 2
  cpus = os.cpu_count() or 1
  try:
    runs = summarize(run_all(args, work), args)
  except RuntimeError as err:
    print(f"error: {err}", file=sys.stderr)
    return 1
  finally:
    if not args.work_dir:
      shutil.rmtree(work, ignore_errors=True)
  print_table(runs, cpus)
  report = {"command": " ".join(["python", "-m", "benchmarks.time_to_accuracy",
                                 *(sys.argv[1:] if argv is None else argv)]),
            "machine": {"platform": platform.platform(), "cpus": cpus},
            "pinned": "process i on core i mod cpus" if shutil.which("taskset") else "no",
            "target_accuracy": args.target_accuracy, "lm_margin": args.lm_margin,
            "runs": runs}
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(report, f, indent=1)
  plot(runs, args.plot)
  print(f"wrote {args.out} and {args.plot}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
