"""`python -m train.plot`: charts of a comparison's runs and of the selection benchmark.

    python -m train.plot --log-dir logs/comparison                 # PNGs in logs/comparison/plots
    python -m train.plot --log-dir logs/comparison --out docs/img
    python -m train.plot --selection benchmarks/results/selection_cpu.json --out docs/img

From the run directories (read by train/report/reader.py: config.json, metrics.jsonl,
timing.json, summary.json as documented in docs/training.md and docs/lm.md) it writes
  curves_step.png          training-batch accuracy and loss vs step, test points marked
                           (language models: loss and bits per byte, validation marked)
  curves_time.png          the same vs training wall time
  time_breakdown.png       compute / compressor update / exchange + update per run (timing.json)
  bytes_per_step.png       bytes each device sends per step, log scale, dense marked
  selection_quality.png    count/k and the threshold's relative error per run
  accuracy_vs_density.png  final test accuracy vs density, dense as a line (language
                           models: bits_per_byte_vs_density.png, validation bits per byte)
One log directory holds runs of one task (image classification or language models).
and from each `--selection FILE.json` of `python -m benchmarks.selection`, `<FILE>.png`:
time vs n on log-log axes per density, with the one-pass floor when the file has it.
A compressor keeps its colour in every figure (train/report/style.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from matplotlib.lines import Line2D

from train.report import plot_selection, reader, style
from train.report.reader import finite
from train.errors import UsageError


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    raise UsageError(message)


class _Series:
  """One run with what every figure needs to draw it."""

  def __init__(self, run: reader.Run, colors: dict[str, str], densities: list[float]):
    self.run = run
    self.label = reader.label(run)
    self.compressor = run.config["compressor"]
    self.color = colors[self.compressor]
    dense = self.compressor == "none"
    d = run.config["density"]
    self.linestyle = "-" if dense else style.LINESTYLES[densities.index(d) % 4]
    self.m = reader.metrics(run)


def task_of(runs: list[reader.Run]) -> str:
  """The task all `runs` share; UsageError when they mix image and text runs."""
  tasks = sorted({r.task for r in runs})
  if len(tasks) > 1:
    raise UsageError("the log dir mixes image-classification and language-model runs ("
                     + ", ".join(f"{r.name}: {r.task}" for r in runs[:4])
                     + "); plot each in its own directory")
  return tasks[0]


def setup(runs: list[reader.Run]) -> tuple[list[_Series], str]:
  task = task_of(runs)
  colors = style.colors_for(r.config["compressor"] for r in runs)
  densities = sorted({r.config["density"] for r in runs if r.config["compressor"] != "none"})
  series = sorted((_Series(r, colors, densities) for r in runs),
                  key=lambda s: (s.compressor != "none", s.compressor, s.run.config["density"]))
  cfg = [r.config for r in runs]
  def values(key):
    return "/".join(str(v) for v in sorted({str(c.get(key)) for c in cfg}))
  steps = "/".join(str(v) for v in sorted({r.train[-1]["step"] for r in runs}))
  # config.json has devices = null when the run took the default; summary.json has the count.
  devices = "/".join(sorted({str((r.summary or {}).get("devices") or r.config.get("devices"))
                             for r in runs}))
  tokens = f" x {values('seq_len')} tokens" if task == "lm" else ""
  subtitle = (f"{values('dataset')}, {values('model')}, {steps} steps, batch "
              f"{values('batch_size')}{tokens}, {devices} devices")
  return series, subtitle


def _legend(fig, series: list[_Series], extra: list | None = None) -> None:
  """Compressor colours, density line styles, and `extra` handles, right of the axes."""
  handles, seen = [], set()
  for s in series:
    if s.compressor not in seen:
      seen.add(s.compressor)
      handles.append(Line2D([], [], color=s.color, lw=2, label=s.compressor))
  dens = sorted({(s.run.config["density"], s.linestyle) for s in series if s.compressor != "none"})
  handles += [Line2D([], [], color="0.3", ls=ls, label=f"density {d:g}") for d, ls in dens]
  fig.legend(handles=handles + (extra or []), loc="outside right upper", fontsize=8)


# Per task: the two panels of curves_*.png as (train key, eval key, scale, y label, title).
_PANELS = {
    "image": (("accuracy", "test_accuracy", 100, "accuracy (%)", "Accuracy"),
              ("loss", "test_loss", 1, "cross-entropy loss (nats)", "Loss")),
    "lm": (("loss", "valid_loss", 1, "next-token cross-entropy (nats)", "Loss"),
           ("bits_per_byte", "valid_bits_per_byte", 1, "bits per byte", "Bits per byte")),
}
_EVAL_NAME = {"image": "test set", "lm": "validation"}


def curves(series, subtitle, out_dir, x_of, xlabel, name) -> str:
  task = series[0].run.task
  fig = style.figure(11, 4.5)
  axes = fig.subplots(1, 2)
  for s in series:
    xs = x_of(s)
    for ax, (key, eval_key, scale, _, _) in zip(axes, _PANELS[task]):
      line = [(x, scale * e[key]) for e, x in zip(s.run.train, xs) if finite(e[key])]
      if line:  # a non-finite value (null in metrics.jsonl) leaves out its point
        ax.plot(*zip(*line), color=s.color, ls=s.linestyle, lw=1.2)
      # Eval lines are placed at the x of the train line of the same step.
      at = {e["step"]: x for e, x in zip(s.run.train, xs)}
      pts = [(at[e["step"]], scale * e[eval_key]) for e in s.run.evals
             if e["step"] in at and e[eval_key] is not None]
      if pts:
        ax.plot(*zip(*pts), ls="none", marker="o", ms=5, mfc=s.color, mec="k", mew=0.5)
  extra = [Line2D([], [], color="0.5", ls="none", marker="o", mec="k",
                  label=f"{_EVAL_NAME[task]} (eval)")]
  unigram = _unigram(series)
  if unigram is not None:  # what a model without context reaches: learning starts below
    axes[1].axhline(unigram, color="0.4", ls=":", lw=1)
    extra.append(Line2D([], [], color="0.4", ls=":", label=f"unigram baseline ({unigram:.2f})"))
  for ax, (_, _, _, ylabel, title) in zip(axes, _PANELS[task]):
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
  what = "accuracy and loss" if task == "image" else "loss and bits per byte"
  fig.suptitle(f"Training-batch {what} (lines), {_EVAL_NAME[task]} (dots): {subtitle}",
               fontsize=10)
  _legend(fig, series, extra)
  return style.save(fig, out_dir, name)


def _unigram(series) -> float | None:
  """The validation unigram baseline in bits per byte (text runs of one corpus)."""
  values = {s.m.get("unigram_bits_per_byte") for s in series}
  values = [v for v in values if finite(v)]
  return values[0] if len(values) == 1 else None


def time_breakdown(series, subtitle, out_dir) -> str | None:
  timed = [s for s in series if finite(s.m["step_s"])]
  if not timed:
    print("train.plot: no run has timing.json (runs measure it with --profile, and by "
          "default only when it is cheap); time_breakdown.png not written", file=sys.stderr)
    return None
  fig = style.figure(9, 1.9 + 0.3 * len(timed))
  ax = fig.subplots()
  pieces = (("compute_s", "compute (forward + backward)", "0.75", None),
            ("compressor_update_s", "compressor update (local, no exchange)", "0.35", None),
            ("exchange_and_update_s", "exchange + update (derived)", "white", "///"))
  y = list(range(len(timed)))[::-1]
  left = [0.0] * len(timed)
  for key, text, color, hatch in pieces:
    width = [1e3 * max(0.0, s.m[key]) if finite(s.m[key]) else 0.0 for s in timed]
    ax.barh(y, width, left=left, color=color, hatch=hatch, edgecolor="0.2", lw=0.5, label=text)
    left = [a + b for a, b in zip(left, width)]
  ax.plot([1e3 * s.m["step_s"] for s in timed], y, ls="none", marker="|", ms=14, mew=2,
          color="k", label="measured step")
  ax.set_yticks(y, [s.label for s in timed], fontsize=8)
  for tick, s in zip(ax.get_yticklabels(), timed):
    tick.set_color(s.color if s.compressor != "none" else "k")
  ax.set(xlabel="time per step (ms, median of the timing pass)",
         title=f"Time per step by piece: {subtitle}")
  ax.title.set_fontsize(10)
  ax.grid(axis="x", alpha=0.3)
  fig.legend(loc="outside lower center", ncols=2, fontsize=8)
  return style.save(fig, out_dir, "time_breakdown.png")


def _bytes(series, subtitle, out_dir) -> str:
  fig = style.figure(9, 1.6 + 0.3 * len(series))
  ax = fig.subplots()
  y = list(range(len(series)))[::-1]
  kib = [s.m["sent_bytes"] / 1024 for s in series]
  ax.barh(y, kib, color=[s.color for s in series], edgecolor="0.2", lw=0.5)
  dense = {s.m["dense_bytes"] for s in series}
  for d in dense:
    ax.axvline(d / 1024, color="k", ls="--", lw=1, label=f"dense: {d / 1024:.1f} KiB")
  for yy, s, v in zip(y, series, kib):
    ratio = s.m["bytes_ratio"]
    ax.text(v, yy, f" {v:.1f} KiB ({ratio:.3f}x)" if finite(ratio) else f" {v:.1f} KiB",
            va="center", fontsize=7)
  ax.set_xscale("log")
  ax.set_xlim(min(kib) / 2, max(kib) * 8)
  ax.set_yticks(y, [s.label for s in series], fontsize=8)
  ax.set(xlabel="bytes sent per step per device (KiB, log scale)",
         title=f"Communication per step: {subtitle}")
  ax.title.set_fontsize(10)
  fig.legend(loc="outside lower center", fontsize=8)
  return style.save(fig, out_dir, "bytes_per_step.png")


def _quality(series, subtitle, out_dir) -> str:
  sel = [s for s in series if s.compressor != "none"]
  fig = style.figure(11, 1.9 + 0.3 * max(1, len(sel)))
  ax_c, ax_e = fig.subplots(1, 2, sharey=True)
  y = list(range(len(sel)))[::-1]
  colors = [s.color for s in sel]
  # Dots, not bars from 0: the interesting differences are a few percent around 1.
  counted = [(yy, s.m["count_over_k"], s.color) for yy, s in zip(y, sel)
             if finite(s.m["count_over_k"])]
  ax_c.axvline(1.0, color="k", ls="--", lw=1, label="k (the target)")
  for yy, c, color in counted:
    ax_c.plot([c], [yy], ls="none", marker="o", ms=7, color=color, mec="k", mew=0.5)
    ax_c.text(c, yy + 0.25, f"{c:.3f}", ha="center", fontsize=7)
  ax_c.set_ylim(-0.7, len(sel) - 0.3)
  ax_c.set(xlabel="elements sent / k (mean over logged steps)", title="Count / k")
  # Relative errors span decades; an exact 0 cannot sit on a log axis, so it is drawn at
  # the floor and written out.
  floor = 1e-10
  errs = [s.m["threshold_rel_err_median"] for s in sel]
  shown = [max(floor, e) if finite(e) else floor for e in errs]
  ax_e.barh(y, shown, color=colors, edgecolor="0.2", lw=0.5)
  worst = [s.m["threshold_rel_err_max"] for s in sel]
  ax_e.plot([max(floor, w) for w in worst if finite(w)],
            [yy for yy, w in zip(y, worst) if finite(w)], ls="none", marker="|", ms=10,
            color="k", label="max over the logged steps")
  for yy, e, w in zip(y, errs, worst):
    right = max(floor, e, w if finite(w) else floor) if finite(e) else floor
    ax_e.text(right * 1.5, yy, f"{e:.1e}" if finite(e) else "not logged", va="center",
              fontsize=7)
  ax_e.set_xscale("log")
  ax_e.set_xlim(floor / 2, 1e3)
  ax_e.set(xlabel="|t - t*| / t* (bar: median over logged steps; log scale)",
           title="Threshold vs exact k-th magnitude (largest leaf)")
  fig.legend(handles=[*ax_c.get_legend_handles_labels()[0],
                      *ax_e.get_legend_handles_labels()[0]],
             loc="outside lower center", ncols=2, fontsize=8)
  ax_c.set_yticks(y, [s.label for s in sel], fontsize=8)
  for ax in (ax_c, ax_e):
    ax.title.set_fontsize(10)
    ax.grid(axis="x", alpha=0.3)
  fig.suptitle(f"Selection quality during training: {subtitle}", fontsize=10)
  return style.save(fig, out_dir, "selection_quality.png")


# Per task: the final number charted against density, (metrics key, scale, y label, file).
_FINAL = {"image": ("final_test_accuracy", 100, "final test accuracy (%)",
                    "accuracy_vs_density.png"),
          "lm": ("final_valid_bits_per_byte", 1, "final validation bits per byte (lower is "
                 "better)", "bits_per_byte_vs_density.png")}


def _final_vs_density(series, subtitle, out_dir) -> str:
  key, scale, ylabel, name = _FINAL[series[0].run.task]
  fig = style.figure(8, 4.5)
  ax = fig.subplots()
  by_name: dict[str, list[_Series]] = {}
  for s in series:
    if finite(s.m[key]):
      by_name.setdefault(s.compressor, []).append(s)
  extra = []
  for name_, group in by_name.items():
    if name_ == "none":
      for s in group:
        ax.axhline(scale * s.m[key], color=s.color, ls="--", lw=1)
      extra.append(Line2D([], [], color="k", ls="--", label="none (dense)"))
      continue
    group = sorted(group, key=lambda s: s.run.config["density"])
    ax.plot([s.run.config["density"] for s in group],
            [scale * s.m[key] for s in group], color=group[0].color,
            marker="o", lw=1.5, label=name_)
  ax.set_xscale("log")
  title = "Accuracy" if series[0].run.task == "image" else "Bits per byte"
  ax.set(xlabel="density (share of elements sent per leaf, log scale)",
         ylabel=ylabel, title=f"{title} vs density: {subtitle}")
  ax.title.set_fontsize(10)
  ax.grid(alpha=0.3)
  handles = [Line2D([], [], color=g[0].color, marker="o", label=n)
             for n, g in by_name.items() if n != "none"]
  fig.legend(handles=handles + extra, loc="outside right upper", fontsize=8)
  return style.save(fig, out_dir, name)


def _skipped(name: str, why: str) -> None:
  print(f"train.plot: run {name} left out: {why}", file=sys.stderr)


def plot_runs(log_dir: str, out_dir: str) -> list[str]:
  """Writes the run charts of `log_dir` into `out_dir`; returns the paths written. Runs
  without usable metrics are left out and named on stderr."""
  series, subtitle = setup(reader.load_runs(log_dir, on_skip=_skipped))
  paths = [
      curves(series, subtitle, out_dir, lambda s: [e["step"] for e in s.run.train],
              "optimizer step", "curves_step.png"),
      curves(series, subtitle, out_dir, lambda s: reader.train_wall_s(s.run),
              "training wall time (s; compilation and evaluation excluded)",
              "curves_time.png"),
      time_breakdown(series, subtitle, out_dir),
      _bytes(series, subtitle, out_dir),
      _quality(series, subtitle, out_dir),
      _final_vs_density(series, subtitle, out_dir),
  ]
  return [p for p in paths if p]


def build_parser() -> argparse.ArgumentParser:
  p = _Parser(prog="python -m train.plot", description=__doc__, allow_abbrev=False,
              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--log-dir", help="a directory of run directories (python -m train.compare "
                 "--log-dir) or one run directory (default: logs/comparison, unless only "
                 "--selection is given)")
  p.add_argument("--out", help="where the PNGs go (default: <log-dir>/plots)")
  p.add_argument("--selection", action="append", default=[], metavar="FILE.json",
                 help="a JSON written by python -m benchmarks.selection (repeatable)")
  return p


def _log_dir(args: Any) -> str | None:
  if args.log_dir is None and not args.selection:
    return os.path.join("logs", "comparison")
  return args.log_dir


def out_dir(args: Any) -> str:
  log_dir = _log_dir(args)
  if args.out is None and log_dir is None:
    raise UsageError("--selection without --log-dir needs --out DIR for the PNGs")
  return args.out or os.path.join(log_dir, "plots")


def run(args: Any) -> list[str]:
  log_dir, out = _log_dir(args), out_dir(args)
  paths = plot_runs(log_dir, out) if log_dir else []
  for file in args.selection:
    paths.append(plot_selection.plot(file, out))
  return paths


def main(argv: list[str] | None = None) -> int:
  try:
    paths = run(build_parser().parse_args(sys.argv[1:] if argv is None else argv))
  except UsageError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  for p in paths:
    print(f"wrote {p} ({os.path.getsize(p) // 1024} KiB)")
  return 0

