"""summary.md and summary.csv of a comparison: numbers read from the run directories only."""

from __future__ import annotations

import csv
import os
from typing import Any

from train.report.reader import finite

CSV_COLUMNS = (
    "run", "compressor", "density", "status", "steps", "total_steps", "final_test_accuracy",
    "best_test_accuracy", "final_test_loss", "final_train_loss", "step_s", "compute_s",
    "compressor_update_s", "exchange_and_update_s", "dense_allreduce_s", "sent_bytes", "dense_bytes",
    "bytes_ratio", "count_over_k", "threshold_rel_err_median", "threshold_rel_err_max",
    "train_wall_s", "first_step_s")

_MD_HEADER = ("| run | final test acc | best test acc | vs dense (points) | step ms | compute ms "
              "| compressor update ms | exchange + update ms | bytes/step/device | vs dense bytes "
              "| count/k | threshold rel. err. (median) | train s |")

_NOTES = """\
Columns (definitions in docs/training.md and docs/results.md):
- final / best test acc: the last / the highest `eval` line of metrics.jsonl (the whole test
  set); runs shorter than one epoch are evaluated only at the end, so both are the same.
- vs dense: final test accuracy minus that of the `none` run, in percentage points.
- step / compute / compressor update / exchange + update: timing.json, median of
  interleaved, separately jitted pieces after training; compressor update is the
  compressor's whole local update (selection, error feedback, momentum) without an
  exchange; exchange + update = step - compute - compressor update (derived: 0 when the
  measurement noise exceeds it).
- bytes/step/device: `sent_bytes` of the last train line (values + int32 indices, plus
  dense leaves); vs dense bytes: sent_bytes / dense_bytes.
- count/k: elements sent / target k (sums over devices), mean over the logged steps.
- threshold rel. err.: |t - t*| / t* on the largest leaf, t* the exact k-th largest
  |gradient + residual| (a separate probe), median over the logged steps; `none` has none.
- train s: training wall time (summary.json `train_wall_s`: excludes the time breakdown).
"""


def _pct(x) -> str:
  return f"{100 * x:.2f}%" if finite(x) else "—"


def _ms(x) -> str:
  return f"{1e3 * x:.1f}" if finite(x) else "—"


def _bytes(x) -> str:
  if not finite(x):
    return "—"
  return f"{x / 1024:.1f} KiB" if x < 1024 ** 2 else f"{x / 1024 ** 2:.2f} MiB"


def _num(x, fmt: str) -> str:
  return format(x, fmt) if finite(x) else "—"


def _md_row(row: dict[str, Any], dense_acc) -> str:
  if row["status"] != "ok":
    return f"| {row['run']} | {row['status']} |" + " |" * 11
  acc = row["final_test_accuracy"]
  delta = (f"{100 * (acc - dense_acc):+.2f}" if finite(acc) and finite(dense_acc)
           and row["compressor"] != "none" else "—")
  ratio = row["bytes_ratio"]
  cells = [row["run"], _pct(acc), _pct(row["best_test_accuracy"]), delta, _ms(row["step_s"]),
           _ms(row["compute_s"]), _ms(row["compressor_update_s"]), _ms(row["exchange_and_update_s"]),
           _bytes(row["sent_bytes"]), f"{ratio:.4f}x" if finite(ratio) else "—",
           _num(row["count_over_k"], ".3f"), _num(row["threshold_rel_err_median"], ".1e"),
           _num(row["train_wall_s"], ".1f")]
  return "| " + " | ".join(cells) + " |"


def markdown(rows: list[dict[str, Any]], command: str, machine: dict[str, Any]) -> str:
  dense = [r for r in rows if r["compressor"] == "none" and r["status"] == "ok"]
  dense_acc = dense[0]["final_test_accuracy"] if dense else None
  head = [
      "# Compressor comparison", "",
      f"Command: `{command}`", "",
      "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()), "",
      _MD_HEADER, "|" + "---|" * 13,
  ]
  return "\n".join(head + [_md_row(r, dense_acc) for r in rows]) + "\n\n" + _NOTES


def write(log_root: str, rows: list[dict[str, Any]], command: str,
          machine: dict[str, Any]) -> tuple[str, str]:
  """Writes summary.md and summary.csv under `log_root`; returns their paths."""
  md_path = os.path.join(log_root, "summary.md")
  csv_path = os.path.join(log_root, "summary.csv")
  with open(md_path, "w") as f:
    f.write(markdown(rows, command, machine))
  with open(csv_path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
      writer.writerow({k: "" if row.get(k) is None else row[k] for k in CSV_COLUMNS})
  return md_path, csv_path
