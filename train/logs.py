"""A run's directory: argv.json, config.json, metrics.jsonl, TensorBoard events, timing.json,
summary.json.

Progress goes to the terminal as a redrawn bar when stdout is a TTY, and as plain lines
otherwise (CI logs, files, pipes). Every file the run writes goes through `RunLog`, which
turns a filesystem that refuses (full, read-only, gone) into a one-line UsageError.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, TextIO

from train.errors import UsageError


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


def _refused(path: str, err: OSError) -> UsageError:
  return UsageError(f"cannot write {path}: {err.strerror or err}")


def _discard(path: str) -> None:
  try:
    os.remove(path)
  except OSError:
    pass


def check_log_dir(path: str) -> None:
  """Raises UsageError unless `path` is, or can become, a writable directory. Creates
  nothing: a run that fails before it starts leaves no directory behind."""
  if not path.strip():
    raise UsageError("--log-dir must not be empty")
  if os.path.exists(path) and not os.path.isdir(path):
    raise UsageError(f"--log-dir {path} is a file, not a directory")
  probe = os.path.abspath(path)
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise UsageError(f"--log-dir {path}: {probe} is a file, not a directory")
  if not os.access(probe, os.W_OK | os.X_OK):
    raise UsageError(f"--log-dir {path}: {probe} is not writable"
                     + (" (read-only filesystem)" if _read_only(probe) else ""))


def _read_only(path: str) -> bool:
  try:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
  except OSError:
    return False


def holds_run(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "config.json"))


def _tb_writer(directory: str, purge_step: int | None):
  """A TensorBoard event writer next to metrics.jsonl, or None without tensorboardX."""
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  # purge_step: a resumed run hides the events the interrupted one logged after its
  # checkpoint, as metrics.jsonl drops those lines.
  return SummaryWriter(directory, purge_step=purge_step, flush_secs=30)


class RunLog:
  """Writes one run's files; `line()` prints progress, `record()` appends to metrics.jsonl
  and the TensorBoard events."""

  def __init__(self, directory: str, stream: TextIO | None = None):
    self.dir = directory
    try:
      os.makedirs(directory, exist_ok=True)
    except OSError as err:
      raise UsageError(f"cannot create the run directory {directory}: "
                       f"{err.strerror or err}") from None
    self.stream = stream if stream is not None else sys.stdout
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self._bar_open = False
    self._tb = None
    self._purge_step = None
    # wall_s of every record: this process's clock since the run log opened (before the
    # data, the model and the first compile: what a user waits for), plus the wall_s of
    # the line a resumed run continues from, so one run's clock runs on across segments.
    self._t0 = time.perf_counter()
    self._wall_offset = 0.0

  def _path(self, name: str) -> str:
    return os.path.join(self.dir, name)

  def write_json(self, name: str, obj: Any) -> None:
    """Replaces `name` whole: a reader never sees half a file."""
    path = self._path(name)
    try:
      with open(path + ".tmp", "w") as f:
        json.dump(_clean(obj), f, indent=2, sort_keys=True)
        f.write("\n")
      os.replace(path + ".tmp", path)
    except OSError as err:
      _discard(path + ".tmp")
      raise _refused(path, err) from None

  def write_run_info(self, argv: list[str], config) -> None:
    self.write_json("argv.json", list(argv))
    self.write_json("config.json", dataclasses.asdict(config))

  def record(self, entry: dict[str, Any]) -> None:
    """Appends `entry` with its `wall_s` (seconds of the run so far, see __init__)."""
    entry = {**entry, "wall_s": self.wall_s()}
    path = self._path("metrics.jsonl")
    try:
      with open(path, "a") as f:
        f.write(json.dumps(_clean(entry), sort_keys=True) + "\n")
    except OSError as err:
      raise _refused(path, err) from None
    self._scalars(entry)

  def _scalars(self, entry: dict[str, Any]) -> None:
    if self._tb is None:
      self._tb = _tb_writer(self.dir, self._purge_step) or False
    if not self._tb:
      return
    for key, value in entry.items():
      if key in ("step", "kind", "wall_s") or isinstance(value, bool):
        continue  # TensorBoard keeps each event's wall time itself
      if isinstance(value, (int, float)) and math.isfinite(value):
        self._tb.add_scalar(f"{entry['kind']}/{key}", value, entry["step"])

  def wall_s(self) -> float:
    """Seconds of the run so far: this segment's, after the kept lines' last `wall_s`."""
    return self._wall_offset + time.perf_counter() - self._t0

  def resume_at(self, step: int) -> None:
    """Keeps the metrics.jsonl lines up to `step` (the checkpoint a resumed run starts
    from): the steps an interrupted run logged after it are trained again and logged
    once. Lines cut off by the interruption are dropped too. The kept lines' last
    `wall_s` becomes the start of this segment's clock (the time lost to the
    interruption, and the steps trained again, are not counted twice)."""
    self._purge_step = step + 1
    path = self._path("metrics.jsonl")
    if not os.path.isfile(path):
      return
    kept = []
    with open(path) as f:
      for text in f:
        try:
          entry = json.loads(text)
        except ValueError:
          continue
        if isinstance(entry, dict) and isinstance(entry.get("step"), int) and \
            entry["step"] <= step:
          kept.append(text if text.endswith("\n") else text + "\n")
          if isinstance(entry.get("wall_s"), (int, float)):
            self._wall_offset = max(self._wall_offset, float(entry["wall_s"]))
    try:
      with open(path + ".tmp", "w") as f:
        f.writelines(kept)
      os.replace(path + ".tmp", path)
    except OSError as err:
      _discard(path + ".tmp")
      raise _refused(path, err) from None

  def close(self) -> None:
    if self._tb:
      self._tb.close()
    self._tb = None

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
  density = "" if cfg.compressor == "none" else f"-d{cfg.density:g}"  # none sends all
  return os.path.join("logs", f"{cfg.dataset}-{cfg.model}-{cfg.compressor}{density}"
                      f"-s{cfg.seed}-{stamp}")


def duration(seconds: float) -> str:
  """2h05m, 3m20s, 45s: how long, for a person."""
  s = max(0, int(round(seconds)))
  if s >= 3600:
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
  if s >= 60:
    return f"{s // 60}m{s % 60:02d}s"
  return f"{s}s"
