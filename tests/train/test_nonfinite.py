"""Non-finite training: refused hyper-parameters, a clean stop (exit code 3) that keeps the
last good checkpoint, `--on-nonfinite skip`, and reports that leave such runs out."""

import json
import os
import shutil

import numpy as np
import pytest

from train import cli, data
from train.report import plot, reader


@pytest.mark.parametrize("flag, value", [("--lr", "nan"), ("--lr", "inf"),
                                         ("--momentum", "nan"), ("--weight-decay", "inf")])
def test_nonfinite_hyperparameters_are_refused(flag, value, tmp_path, capsys):
  assert cli.main([flag, value, "--log-dir", str(tmp_path / "run")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f"{flag} must be a finite number" in err[0], err
  assert not os.path.exists(tmp_path / "run")


def _poison(monkeypatch, steps):
  """Training batches of NaN images at these step indices (0-based)."""
  real = data.train_batch

  def batch(ds, step, *args, **kwargs):
    images, labels = real(ds, step, *args, **kwargs)
    return (np.full_like(images, np.nan) if step in steps else images), labels

  monkeypatch.setattr(data, "train_batch", batch)


def _lines(log_dir):
  with open(os.path.join(log_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_a_nonfinite_loss_stops_the_run(tiny_cli, monkeypatch, tmp_path, capsys):
  _poison(monkeypatch, range(5, 12))  # from the 6th step on
  log_dir = str(tmp_path / "logs" / "run")
  # 4 steps per epoch: a good checkpoint at step 4, none after the non-finite step 6.
  assert cli.main([*tiny_cli, "--steps", "12", "--log-every", "4", "--no-profile",
                   "--log-dir", log_dir]) == 3
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  assert err[0].startswith("error: non-finite loss or gradient at step 6 (and 2 later): "
                           "stopped at step 8; the last good checkpoint is step 4"), err
  assert os.listdir(os.path.join(log_dir, "checkpoints")) == ["4"]
  with open(os.path.join(log_dir, "summary.json")) as f:
    assert "non-finite" in json.load(f)["stopped"]
  train = [e for e in _lines(log_dir) if e["kind"] == "train"]
  assert [(e["step"], e["nonfinite_steps"]) for e in train] == [(4, 0), (8, 3)]
  assert train[1]["loss"] is None  # NaN is written as null

  # Reports read such a run without crashing; a run with no finite loss at all is left
  # out and named.
  hopeless = str(tmp_path / "logs" / "hopeless")
  os.makedirs(hopeless)
  shutil.copy(os.path.join(log_dir, "config.json"), hopeless)
  with open(os.path.join(hopeless, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({**train[1], "step": 1}) + "\n")
  assert reader.metrics(reader.load_run(log_dir))["stopped"].startswith("non-finite")
  assert plot.main(["--log-dir", str(tmp_path / "logs"), "--out", str(tmp_path / "png")]) == 0
  err = capsys.readouterr().err
  assert "run hopeless left out: no train line with a finite loss" in err
  assert "run run left out" not in err
  assert os.path.isfile(tmp_path / "png" / "curves_step.png")


def test_skip_trains_on_and_counts(tiny_cli, monkeypatch, tmp_path):
  _poison(monkeypatch, {5})
  log_dir = str(tmp_path / "run")
  assert cli.main([*tiny_cli, "--steps", "8", "--log-every", "4", "--no-profile",
                   "--on-nonfinite", "skip", "--log-dir", log_dir]) == 0
  train = [e for e in _lines(log_dir) if e["kind"] == "train"]
  assert [(e["step"], e["nonfinite_steps"]) for e in train] == [(4, 0), (8, 1)]
  assert train[1]["loss"] is not None  # step 8 itself was finite
  assert sorted(os.listdir(os.path.join(log_dir, "checkpoints"))) == ["4", "8"]
  # BatchNorm's running statistics skipped the NaN batch too: evaluation stays finite.
  with open(os.path.join(log_dir, "summary.json")) as f:
    assert np.isfinite(json.load(f)["test_loss"])
