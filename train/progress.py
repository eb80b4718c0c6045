"""How fast a run trains and how long it has left, from wall time read at log steps.

The loop syncs with the device only at log steps (and around evaluation and checkpoints),
so every number here comes from those moments: no extra host sync per step.
"""

from __future__ import annotations

import time
from typing import Any

from train.logs import duration


class Clock:
  """Rates since the previous log line (evaluation and checkpoint pauses excluded) and the
  time left at the whole run's pace so far (pauses included: they recur)."""

  def __init__(self, batch_size: int, end: int):
    self.batch, self.end = batch_size, end
    self.t_first = self.step_first = self.t_mark = None
    self.steps_since, self.paused = 0, 0.0
    self.active_s, self.active_steps = 0.0, 0

  def started(self, step: int) -> None:
    """After the first step of this session: it compiled, so rates start after it."""
    self.t_first = self.t_mark = time.perf_counter()
    self.step_first = step

  def stepped(self) -> None:
    if self.t_mark is not None:
      self.steps_since += 1

  def pause(self, seconds: float) -> None:
    self.paused += seconds

  def lap(self, step: int) -> dict[str, Any]:
    """At a log step, after the device sync: steps_per_s, samples_per_s, eta_s."""
    now = time.perf_counter()
    rate = None
    if self.t_mark is not None and self.steps_since:
      interval = now - self.t_mark - self.paused
      if interval > 0:
        rate = self.steps_since / interval
        self.active_s += interval
        self.active_steps += self.steps_since
      self.t_mark, self.steps_since, self.paused = now, 0, 0.0
    eta = None
    if self.t_first is not None and step > self.step_first:
      eta = (self.end - step) * (now - self.t_first) / (step - self.step_first)
    return {"steps_per_s": rate, "samples_per_s": rate * self.batch if rate else None,
            "eta_s": eta}

  def per_step_s(self) -> float | None:
    """Mean training time per step so far (pauses and the compiling step excluded)."""
    return self.active_s / self.active_steps if self.active_steps else None


def describe(lap: dict[str, Any]) -> str:
  """`12.3 steps/s (787 samples/s), 3m20s left`, or less while it is unknown; tokens
  instead of samples when `lap` has `tokens_per_s` (text)."""
  parts = []
  if lap["steps_per_s"]:
    if lap.get("tokens_per_s"):
      parts.append(f"{lap['steps_per_s']:.3g} steps/s ({lap['tokens_per_s']:.0f} tokens/s)")
    else:
      parts.append(f"{lap['steps_per_s']:.3g} steps/s ({lap['samples_per_s']:.0f} samples/s)")
  if lap["eta_s"] is not None:
    parts.append(f"{duration(lap['eta_s'])} left")
  return ", ".join(parts)
