"""The real training loop, 2 steps on 4 fake devices, for every compressor name: what it
logs and the run directory it writes."""

import io
import json
import math
import os

import hggjax
import pytest

from train import logs
from train.loop import train_and_evaluate

TRAIN_KEYS = {"kind", "step", "epoch", "loss", "accuracy", "lr", "samples_per_s", "selected",
              "k", "sent_bytes", "dense_bytes", "history_hits", "threshold_rel_err",
              "threshold_leaf", "wall_s"}


@pytest.mark.parametrize("name", sorted(hggjax.compressors))
def test_two_steps_every_compressor(name, tiny_config, tiny_dataset):
  cfg = tiny_config(compressor=name)
  out = io.StringIO()
  summary = train_and_evaluate(cfg, argv=["python", "-m", "train.cifar", "--x"],
                               dataset=tiny_dataset, stream=out)

  assert summary["step"] == 2 and summary["devices"] == 4
  assert 0.0 <= summary["test_accuracy"] <= 1.0
  assert math.isfinite(summary["test_loss"])
  records = logs.read_metrics(cfg.log_dir)
  train = [r for r in records if r["kind"] == "train"]
  evals = [r for r in records if r["kind"] == "eval"]
  assert len(train) == 1 and len(evals) == 1
  assert TRAIN_KEYS <= set(train[0]), TRAIN_KEYS - set(train[0])
  # The run's clock: from the run directory's opening, compiling included, never back.
  assert 0 < train[0]["wall_s"] <= evals[0]["wall_s"]
  assert math.isfinite(train[0]["loss"])
  if name == "none":
    assert train[0]["sent_bytes"] == train[0]["dense_bytes"]
    assert train[0]["threshold_rel_err"] is None
  else:
    assert train[0]["selected"] > 0
    assert train[0]["sent_bytes"] < train[0]["dense_bytes"]
  if name in ("topk", "topk2"):  # exact selection: the threshold is the exact k-th magnitude
    assert train[0]["threshold_rel_err"] == pytest.approx(0.0, abs=1e-6)
  assert "final test accuracy" in out.getvalue()

  files = set(os.listdir(cfg.log_dir))
  assert {"argv.json", "config.json", "metrics.jsonl", "summary.json"} <= files
  assert "timing.json" not in files  # profile=False; tests/train/test_profile.py has it
  with open(os.path.join(cfg.log_dir, "config.json")) as f:
    assert json.load(f)["compressor"] == name
  with open(os.path.join(cfg.log_dir, "argv.json")) as f:
    assert json.load(f)[-1] == "--x"


def test_training_reduces_loss(tiny_config, tiny_dataset):
  """More than wiring: a few epochs on learnable blobs beat chance clearly."""
  cfg = tiny_config(steps=None, epochs=3, lr=0.05, compressor="hggtopk", density=0.1,
                    log_every=4)
  summary = train_and_evaluate(cfg, dataset=tiny_dataset, stream=io.StringIO())
  assert summary["test_accuracy"] > 0.5


def test_cifar10_from_tfds_mock_data_trains(tiny_config, tmp_path):
  """The CIFAR path end to end (32x32x3, augmentation on) with TFDS mocked: no network."""
  tfds = pytest.importorskip("tensorflow_datasets")
  from train import data  # pylint: disable=import-outside-toplevel
  (tmp_path / "tfds" / "cifar10").mkdir(parents=True)  # a prepared TFDS directory
  cfg = tiny_config(dataset="cifar10", compressor="none", data_dir=str(tmp_path / "tfds"))
  with tfds.testing.mock_data(num_examples=32):
    ds = data.load_dataset(cfg.dataset, cfg.data_dir)
  assert ds.image_shape == (32, 32, 3)
  summary = train_and_evaluate(cfg, dataset=ds, stream=io.StringIO())
  assert summary["step"] == 2 and math.isfinite(summary["test_loss"])


@pytest.mark.slow
def test_main_job_shapes_hggtopk(tiny_config):
  """The main job's model at full size (28x28x1: fc1 has 200k weights, past hggtopk's
  small-leaf path) for 2 steps. The tiny tests above never reach that path."""
  from train import data  # pylint: disable=import-outside-toplevel
  ds = data.synthetic_dataset(64, (28, 28, 1))
  cfg = tiny_config(compressor="hggtopk", density=0.01, min_size=0)
  summary = train_and_evaluate(cfg, dataset=ds, stream=io.StringIO())
  assert summary["step"] == 2 and summary["selected"] > 0
  assert summary["sent_bytes"] < 0.05 * summary["dense_bytes"]
