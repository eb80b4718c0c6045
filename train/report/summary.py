"""summary.md and summary.csv of a comparison: numbers read from the run directories only.

Image runs report test accuracy, language-model runs validation loss and bits per byte;
the shared columns (time breakdown, bytes, selection quality) are the same for both.
"""

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

LM_CSV_COLUMNS = (
    "run", "compressor", "density", "status", "steps", "total_steps", "final_valid_loss",
    "best_valid_loss", "final_valid_bits_per_byte", "final_valid_perplexity",
    "final_valid_accuracy", "unigram_bits_per_byte", "final_train_loss", "tokens_per_s",
    "step_s", "compute_s", "compressor_update_s", "exchange_and_update_s",
    "dense_allreduce_s", "sent_bytes", "dense_bytes", "bytes_ratio", "count_over_k",
    "threshold_rel_err_median", "threshold_rel_err_max", "train_wall_s", "first_step_s")

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


_LM_MD_HEADER = ("| run | final valid loss | vs dense | bits/byte | perplexity | tokens/s | "
                 "step ms | compute ms | compressor update ms | exchange + update ms | "
                 "bytes/step/device | vs dense bytes | count/k | threshold rel. err. (median) "
                 "| train s |")

_LM_NOTES = """\
Columns (definitions in docs/lm.md and docs/training.md):
- final valid loss: the last `eval` line of metrics.jsonl (mean next-token cross-entropy in
  nats over the validation windows); vs dense: its relative difference to the `none` run's.
- bits/byte, perplexity: the same evaluation as bits per byte of text and exp(loss).
- tokens/s: median of the train lines' `tokens_per_s` (training only; evaluation,
  checkpoints and the compiling step excluded).
- step / compute / compressor update / exchange + update: timing.json (when the run
  profiled; `--profile` forces it), as for image runs.
- bytes/step/device: `sent_bytes` of the last train line (values + int32 indices, plus
  dense leaves); vs dense bytes: sent_bytes / dense_bytes.
- count/k: elements sent / target k (sums over devices), mean over the logged steps.
- threshold rel. err.: |t - t*| / t* on the largest leaf, t* the exact k-th largest
  |input + residual| (a separate probe), median over the logged steps; `none` has none.
- train s: training wall time (summary.json `train_wall_s`).
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


def _lm_md_row(row: dict[str, Any], dense_loss) -> str:
  if row["status"] != "ok":
    return f"| {row['run']} | {row['status']} |" + " |" * 13
  loss = row["final_valid_loss"]
  delta = (f"{100 * (loss - dense_loss) / dense_loss:+.1f}%" if finite(loss)
           and finite(dense_loss) and row["compressor"] != "none" else "—")
  ratio = row["bytes_ratio"]
  cells = [row["run"], _num(loss, ".4f"), delta, _num(row["final_valid_bits_per_byte"], ".3f"),
           _num(row["final_valid_perplexity"], ".3f"), _num(row["tokens_per_s"], ".0f"),
           _ms(row["step_s"]), _ms(row["compute_s"]), _ms(row["compressor_update_s"]),
           _ms(row["exchange_and_update_s"]), _bytes(row["sent_bytes"]),
           f"{ratio:.4f}x" if finite(ratio) else "—", _num(row["count_over_k"], ".3f"),
           _num(row["threshold_rel_err_median"], ".1e"), _num(row["train_wall_s"], ".1f")]
  return "| " + " | ".join(cells) + " |"


def markdown(rows: list[dict[str, Any]], command: str, machine: dict[str, Any],
             task: str = "image") -> str:
  dense = [r for r in rows if r["compressor"] == "none" and r["status"] == "ok"]
  head = [
      "# Compressor comparison", "",
      f"Command: `{command}`", "",
      "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()), "",
  ]
  if task == "lm":
    dense_loss = dense[0]["final_valid_loss"] if dense else None
    unigram = [r["unigram_bits_per_byte"] for r in rows if finite(r.get("unigram_bits_per_byte"))]
    if unigram:
      head += [f"Unigram baseline (no context) on the validation split: {unigram[0]:.3f} "
               "bits per byte.", ""]
    head += [_LM_MD_HEADER, "|" + "---|" * 15]
    return "\n".join(head + [_lm_md_row(r, dense_loss) for r in rows]) + "\n\n" + _LM_NOTES
  dense_acc = dense[0]["final_test_accuracy"] if dense else None
  head += [_MD_HEADER, "|" + "---|" * 13]
  return "\n".join(head + [_md_row(r, dense_acc) for r in rows]) + "\n\n" + _NOTES


def write(log_root: str, rows: list[dict[str, Any]], command: str,
          machine: dict[str, Any], task: str = "image") -> tuple[str, str]:
  """Writes summary.md and summary.csv under `log_root` with `task`'s columns ("image"
  or "lm"); returns their paths."""
  columns = LM_CSV_COLUMNS if task == "lm" else CSV_COLUMNS
  md_path = os.path.join(log_root, "summary.md")
  csv_path = os.path.join(log_root, "summary.csv")
  with open(md_path, "w") as f:
    f.write(markdown(rows, command, machine, task))
  with open(csv_path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
      writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
  return md_path, csv_path
