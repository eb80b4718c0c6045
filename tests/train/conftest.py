"""Fixtures for the harness tests: a tiny synthetic dataset and a config that runs fast.

tests/conftest.py gives 8 fake CPU devices; these tests use a mesh of the first 4.
"""

import dataclasses

import hggjax
import pytest

from train.config import Config

DEVICES = 4


@pytest.fixture(scope="session")
def tiny_dataset():
  from train import data  # pylint: disable=import-outside-toplevel
  return data.synthetic_dataset(64, (8, 8, 1))


@pytest.fixture
def tiny_config(tmp_path):
  """2 steps of 16 examples on 4 devices; no profiling pass, no checkpoints.

  min_size=1000 sends the small leaves dense and compresses 3 of the CNN's 10 leaves:
  hggjax compiles selection code per compressed leaf, and compilation dominates here.
  """
  def make(**overrides):
    cfg = Config(model="cnn", dataset="synthetic", steps=2, batch_size=16, eval_batch_size=16,
                 compressor="hggtopk", density=0.1, min_size=1000, devices=DEVICES, log_every=2,
                 profile=False, checkpoint=False, log_dir=str(tmp_path / "run"))
    return dataclasses.replace(cfg, **overrides)
  return make


@pytest.fixture
def compressor_calls(monkeypatch):
  """Every hggjax.get_compressor call from here on, as (name, options)."""
  calls = []
  real = hggjax.get_compressor

  def record(name, **options):
    calls.append((name, options))
    return real(name, **options)

  monkeypatch.setattr(hggjax, "get_compressor", record)
  return calls


# `python -m train.cifar` flags of a tiny run on 4 devices (with `tiny_cli`).
TINY_FLAGS = ["--dataset", "synthetic", "--batch-size", "16", "--eval-batch-size", "16",
              "--devices", "4", "--min-size", "1000", "--density", "0.1"]


def use_tiny_dataset(monkeypatch, dataset) -> None:
  """`--dataset synthetic` loads `dataset` (8x8 images) instead of the 28x28 default."""
  from train import data  # pylint: disable=import-outside-toplevel
  real = data.load_dataset

  def load(name, *args, **kwargs):
    return dataset if name == "synthetic" else real(name, *args, **kwargs)

  monkeypatch.setattr(data, "load_dataset", load)


@pytest.fixture
def tiny_cli(monkeypatch, tiny_dataset):
  """train.cli.main in this process on the tiny dataset; returns TINY_FLAGS."""
  use_tiny_dataset(monkeypatch, tiny_dataset)
  return list(TINY_FLAGS)
