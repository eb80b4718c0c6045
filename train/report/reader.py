"""Reading finished run directories and the numbers compare and plot report.

Reads only the documented files of a run directory (docs/training.md, docs/lm.md):
`config.json`, `metrics.jsonl` (`kind` = `train` / `eval` lines), `timing.json` and
`summary.json`, of `python -m train.cifar` runs (image classification: test-set eval
lines) and `python -m train.lm` runs (language models: validation eval lines). A key the
schema promises but a line lacks is an error naming the file and line, never a silent
gap in a chart. Imports neither JAX nor matplotlib.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from typing import Any, Callable, NamedTuple

from train.errors import UsageError

# Keys of docs/training.md's metrics.jsonl schema that compare and plot read.
TRAIN_KEYS = ("step", "loss", "accuracy", "samples_per_s", "selected", "k", "sent_bytes",
              "dense_bytes", "threshold_rel_err")
EVAL_KEYS = ("step", "test_accuracy", "test_loss")
# docs/lm.md's keys of a language model's train and eval lines.
LM_TRAIN_KEYS = TRAIN_KEYS + ("tokens_per_s", "bits_per_byte")
LM_EVAL_KEYS = ("step", "valid_loss", "valid_bits_per_byte", "valid_perplexity",
                "valid_accuracy")
TASKS = ("image", "lm")


def task_of(config: dict[str, Any]) -> str:
  """"lm" for a `python -m train.lm` run (its config has `seq_len`), else "image"."""
  return "lm" if "seq_len" in config else "image"


class Run(NamedTuple):
  """One run directory, parsed."""
  name: str                    # the directory's base name
  path: str
  task: str                    # "image" or "lm" (`task_of`)
  config: dict[str, Any]       # config.json: the resolved train.config.Config
  train: list[dict[str, Any]]  # metrics.jsonl `kind: "train"` lines, in file order
  evals: list[dict[str, Any]]  # metrics.jsonl `kind: "eval"` lines, in file order
  timing: dict[str, Any] | None   # timing.json; None when the run skipped profiling
  summary: dict[str, Any] | None  # summary.json; None while the run has not finished


def _read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as err:
    raise UsageError(f"{path} is not valid JSON ({err})") from None


def _read_metrics(path: str, task: str) -> tuple[list[dict], list[dict]]:
  schema = {"image": {"train": TRAIN_KEYS, "eval": EVAL_KEYS},
            "lm": {"train": LM_TRAIN_KEYS, "eval": LM_EVAL_KEYS}}[task]
  doc = "docs/lm.md" if task == "lm" else "docs/training.md"
  train, evals = [], []
  with open(path) as f:
    for number, text in enumerate(f, 1):
      if not text.strip():
        continue
      try:
        entry = json.loads(text)
      except json.JSONDecodeError as err:
        raise UsageError(f"{path} line {number} is not JSON ({err})") from None
      kind = entry.get("kind")
      keys = schema.get(kind)
      if keys is None:
        raise UsageError(f"{path} line {number}: kind {kind!r} is neither 'train' nor 'eval' "
                         f"(see {doc} for the metrics.jsonl schema)")
      missing = [k for k in keys if k not in entry]
      if missing:
        raise UsageError(f"{path} line {number}: {kind} line lacks {', '.join(missing)} "
                         f"(see {doc} for the metrics.jsonl schema)")
      (train if kind == "train" else evals).append(entry)
  return train, evals


def load_run(path: str) -> Run:
  """Parses one run directory; it must hold config.json and metrics.jsonl."""
  for name in ("config.json", "metrics.jsonl"):
    if not os.path.isfile(os.path.join(path, name)):
      raise UsageError(f"{path} has no {name}: not a run directory of python -m "
                       "train.cifar or python -m train.lm")
  config = _read_json(os.path.join(path, "config.json"))
  task = task_of(config)
  train, evals = _read_metrics(os.path.join(path, "metrics.jsonl"), task)
  optional = {}
  for name in ("timing.json", "summary.json"):
    file = os.path.join(path, name)
    optional[name] = _read_json(file) if os.path.isfile(file) else None
  return Run(os.path.basename(os.path.normpath(path)), path, task, config, train, evals,
             optional["timing.json"], optional["summary.json"])


def find_runs(log_dir: str) -> list[str]:
  """The run directories under `log_dir` (or `log_dir` itself if it is one), sorted."""
  if not os.path.isdir(log_dir):
    raise UsageError(f"log dir {log_dir} does not exist; run python -m train.compare "
                     "(or python -m train.cifar --log-dir DIR) first, or pass --log-dir")
  if os.path.isfile(os.path.join(log_dir, "metrics.jsonl")):
    return [log_dir]
  runs = sorted(os.path.join(log_dir, d) for d in os.listdir(log_dir)
                if os.path.isfile(os.path.join(log_dir, d, "metrics.jsonl")))
  if not runs:
    raise UsageError(f"log dir {log_dir} holds no runs (no metrics.jsonl in it or in its "
                     "subdirectories); run python -m train.compare --log-dir "
                     f"{log_dir} first")
  return runs


def unusable(run: Run) -> str | None:
  """Why `run` has nothing to chart (None when it has): no train line yet, or none with a
  finite loss (a run stopped by a non-finite loss or gradient before its first line)."""
  if not run.train:
    return "no train line yet"
  if not any(finite(e["loss"]) and finite(e["accuracy"]) for e in run.train):
    stopped = (run.summary or {}).get("stopped")
    return "no train line with a finite loss" + (f" ({stopped})" if stopped else "")
  return None


def load_runs(log_dir: str, on_skip: Callable[[str, str], None] | None = None) -> list[Run]:
  """Every run under `log_dir` with usable metrics; `on_skip(name, why)` hears of the rest."""
  runs = []
  for run in (load_run(p) for p in find_runs(log_dir)):
    why = unusable(run)
    if why is None:
      runs.append(run)
    elif on_skip is not None and run.train:
      on_skip(run.name, why)
  if not runs:
    raise UsageError(f"log dir {log_dir}: no run has logged a train line with a finite loss")
  return runs


def label(run: Run) -> str:
  """`compressor@density`, or `none (dense)` for the baseline (it has no density)."""
  c = run.config["compressor"]
  return "none (dense)" if c == "none" else f"{c}@{run.config['density']:g}"


def train_wall_s(run: Run) -> list[float]:
  """Training wall time at each train line, rebuilt from `samples_per_s`.

  Each line's rate covers the examples since the previous line (the first line: since
  the first, compiling step, which it excludes), so time = examples / rate summed over
  lines. Evaluation, checkpoint and compilation time are excluded, as in the rate.
  """
  batch = run.config["batch_size"]
  out, t = [], 0.0
  prev = 1  # runs start at step 0; the first line's interval starts after step 1
  for entry in run.train:
    rate = entry["samples_per_s"]
    if rate:
      t += (entry["step"] - prev) * batch / rate
    out.append(t)
    prev = entry["step"]
  return out


def _median(values: list[float]) -> float | None:
  return statistics.median(values) if values else None


def _lm_metrics(run: Run) -> dict[str, Any]:
  losses = [e["valid_loss"] for e in run.evals if finite(e["valid_loss"])]
  last = run.evals[-1] if run.evals else {}
  rates = [e["tokens_per_s"] for e in run.train if finite(e["tokens_per_s"])]
  return {
      "final_valid_loss": last.get("valid_loss"),
      "best_valid_loss": min(losses) if losses else None,
      "final_valid_bits_per_byte": last.get("valid_bits_per_byte"),
      "final_valid_perplexity": last.get("valid_perplexity"),
      "final_valid_accuracy": last.get("valid_accuracy"),
      "tokens_per_s": _median(rates),
      "unigram_bits_per_byte": (run.summary or {}).get("unigram_valid_bits_per_byte"),
  }


def _image_metrics(run: Run) -> dict[str, Any]:
  test_acc = [e["test_accuracy"] for e in run.evals if e["test_accuracy"] is not None]
  return {
      "final_test_accuracy": run.evals[-1]["test_accuracy"] if run.evals else None,
      "best_test_accuracy": max(test_acc) if test_acc else None,
      "final_test_loss": run.evals[-1]["test_loss"] if run.evals else None,
  }


def metrics(run: Run) -> dict[str, Any]:
  """The comparison numbers of one run (None where the run did not produce them): the
  shared ones and its task's (test accuracy for images, validation loss and bits per byte
  for text)."""
  cfg, last = run.config, run.train[-1]
  ratios = [e["selected"] / e["k"] for e in run.train if e["k"]]
  errs = [e["threshold_rel_err"] for e in run.train if e["threshold_rel_err"] is not None]
  timing = run.timing or {}
  total = run.summary.get("total_steps") if run.summary else None
  out = {
      "run": run.name, "compressor": cfg["compressor"],
      "density": None if cfg["compressor"] == "none" else cfg["density"],
      "steps": last["step"], "total_steps": total,
      "finished": bool(run.summary) and run.summary.get("step") == total,
      "stopped": run.summary.get("stopped") if run.summary else None,
      **(_lm_metrics(run) if run.task == "lm" else _image_metrics(run)),
      "final_train_loss": last["loss"],
  }
  for key in ("step_s", "compute_s", "compressor_update_s", "exchange_and_update_s",
              "dense_allreduce_s"):
    out[key] = timing.get(key)
  dense = last["dense_bytes"]
  # Per step over the run: a shared second moment's dense refreshes (cumulative in
  # refresh_bytes) spread over the steps taken.
  if "run_sent_bytes" in last:  # every step's own bytes (e.g. a density warm-up's)
    sent = (last["run_sent_bytes"] + last.get("refresh_bytes", 0.0)) / max(1, last["step"])
  else:
    sent = last["sent_bytes"] + last.get("refresh_bytes", 0.0) / max(1, last["step"])
  out.update({
      "sent_bytes": sent, "dense_bytes": dense,
      "bytes_ratio": sent / dense if dense else None,
      # selected and k are sums over devices; the mean ratio over the logged steps
      "count_over_k": statistics.fmean(ratios) if ratios else None,
      "threshold_rel_err_median": _median(errs),
      "threshold_rel_err_max": max(errs) if errs else None,
      "train_wall_s": run.summary.get("train_wall_s") if run.summary else None,
      "first_step_s": run.summary.get("first_step_s") if run.summary else None,
  })
  return out


def finite(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x)
