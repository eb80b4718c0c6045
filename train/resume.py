"""What `--resume` continues: the run directory's config.json is the run.

A resumed run takes every field from config.json. A flag may restate a field; one that
contradicts it is refused, except for the fields below, which change how long the run
goes, what it logs, where its files are and how many devices share the work, not what it
computes up to the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from train.config import Config, check_types, field_names, flag, override
from train.errors import UsageError

# Changing the length (epochs, steps) also moves the LR drops, which sit at 50% and 75%
# of the total: the run continues on the new schedule from the checkpoint's step.
# (For language models, evaluation also sets the checkpoint steps, and eval_windows is how
# much of the validation split each evaluation reads.) The global batch stays, so another
# device or host count sees the same examples; the per-device optimizer state is folded or
# split for the new mesh by hggjax.reshard_state, which keeps what error feedback owes.
CHANGEABLE = ("epochs", "steps", "log_every", "eval_every", "eval_batch_size", "data_dir",
              "log_dir", "profile", "profile_reps", "keep_checkpoints", "on_nonfinite",
              "eval_windows", "devices", "hosts")


def saved_config(log_dir: str, cls: type = Config) -> Config:
  """The config (a `cls`) stored in `log_dir`/config.json; UsageError when there is none."""
  if not os.path.isdir(log_dir):
    raise UsageError(f"--resume: {log_dir} does not exist")
  path = os.path.join(log_dir, "config.json")
  if not os.path.isfile(path):
    raise UsageError(f"--resume: {log_dir} has no config.json: not a run directory of "
                     f"{cls.PROG}")
  try:
    with open(path) as f:
      values = json.load(f)
  except (OSError, ValueError) as err:
    raise UsageError(f"--resume: {path} is unreadable ({type(err).__name__}: {err})") from None
  if not isinstance(values, dict):
    raise UsageError(f"--resume: {path} is not a JSON object of config fields")
  unknown = sorted(set(values) - field_names(cls))
  if unknown:
    raise UsageError(f"--resume: {path} has unknown field(s) {', '.join(unknown)} (is it "
                     f"a run of another command than {cls.PROG}?)")
  try:
    return check_types(override(cls(), values))
  except UsageError as err:
    raise UsageError(f"--resume: {path}: {err}") from None


def _differences(saved: Config, values: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
  return {k: (getattr(saved, k), v) for k, v in values.items()
          if k != "log_dir" and getattr(saved, k) != v}


def from_flags(log_dir: str, given: dict[str, Any], cls: type = Config) -> Config:
  """The config (a `cls`) of the run in `log_dir` with the fields `given` on the command
  line; UsageError naming each flag that contradicts the run."""
  saved = saved_config(log_dir, cls)
  diff = _differences(saved, given)
  refused = [k for k in diff if k not in CHANGEABLE]
  if refused:
    flags = ", ".join(f"{flag(k)} {diff[k][1]}" for k in refused)
    saved_values = ", ".join(f"{k} {diff[k][0]!r}" for k in refused)
    verb = "contradicts" if len(refused) == 1 else "contradict"
    raise UsageError(f"--resume: {flags} {verb} the run in {log_dir} ({saved_values} in its "
                     "config.json); leave it out to continue that run, or use another "
                     "--log-dir for a new one")
  return dataclasses.replace(saved, log_dir=log_dir, **{k: given[k] for k in diff})


def changes(cfg: Config, log_dir: str) -> dict[str, tuple[Any, Any]]:
  """What `cfg` changes in the run saved in `log_dir` ({field: (saved, new)}); UsageError
  for a change that would make it another run."""
  diff = _differences(saved_config(log_dir, type(cfg)), dataclasses.asdict(cfg))
  refused = [f"{k} {new!r} (the run has {old!r})" for k, (old, new) in diff.items()
             if k not in CHANGEABLE]
  if refused:
    raise UsageError(f"resume: {'; '.join(refused)} contradicts the run in {log_dir}")
  return diff
