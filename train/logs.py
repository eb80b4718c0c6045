"""A run's directory: argv.json, config.json, metrics.jsonl, timing.json, summary.json.

Progress goes to the terminal as a redrawn bar when stdout is a TTY, and as plain lines
otherwise (CI logs, files, pipes).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, TextIO


def _clean(value):
  """JSON-safe: numpy scalars to Python, NaN/inf to null."""
  if isinstance(value, dict):
    return {k: _clean(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_clean(v) for v in value]
  if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


class RunLog:
  """Writes one run's files; `line()` prints progress, `record()` appends to metrics.jsonl."""

  def __init__(self, directory: str, stream: TextIO | None = None):
    self.dir = directory
    os.makedirs(directory, exist_ok=True)
    self.stream = stream if stream is not None else sys.stdout
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self._bar_open = False

  def write_json(self, name: str, obj: Any) -> None:
    with open(os.path.join(self.dir, name), "w") as f:
      json.dump(_clean(obj), f, indent=2, sort_keys=True)
      f.write("\n")

  def write_run_info(self, argv: list[str], config) -> None:
    self.write_json("argv.json", list(argv))
    self.write_json("config.json", dataclasses.asdict(config))

  def record(self, entry: dict[str, Any]) -> None:
    with open(os.path.join(self.dir, "metrics.jsonl"), "a") as f:
      f.write(json.dumps(_clean(entry), sort_keys=True) + "\n")

  def line(self, text: str) -> None:
    if self._bar_open:
      self.stream.write("\n")
      self._bar_open = False
    self.stream.write(text + "\n")
    self.stream.flush()

  def progress(self, step: int, total: int, text: str) -> None:
    """A redrawn bar on a terminal; elsewhere nothing (the caller logs plain lines)."""
    if not self.tty:
      return
    width = 24
    filled = int(width * step / max(1, total))
    self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {step}/{total} {text}\033[K")
    self.stream.flush()
    self._bar_open = True


def read_metrics(directory: str) -> list[dict[str, Any]]:
  with open(os.path.join(directory, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def default_run_dir(cfg) -> str:
  stamp = time.strftime("%Y%m%d-%H%M%S")
  return os.path.join("logs", f"{cfg.dataset}-{cfg.model}-{cfg.compressor}-d{cfg.density:g}"
                      f"-s{cfg.seed}-{stamp}")
