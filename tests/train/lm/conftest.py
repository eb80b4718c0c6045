"""Fixtures for the language-model harness tests: a small generated corpus, a 2-layer
transformer named "nano" known only to these tests, and a config that runs in seconds.

tests/conftest.py gives 8 fake CPU devices; these tests use a mesh of the first 4.
"""

import dataclasses

import pytest

from train.lm import config as config_module
from train.lm import data
from train.lm import harness
from train.lm import presets
from train.lm.config import LMConfig

DEVICES = 4
# 2 layers of width 32: compiles in seconds where the tiny preset takes tens of seconds.
NANO = presets.LMSpec("transformer", layers=2, width=32, heads=2, context=64, vocab_size=256)

# `python -m train.lm` flags of a nano run on 4 devices, 4 steps (with `lm_cli`).
LM_FLAGS = ["--model", "nano", "--steps", "4", "--warmup-steps", "1", "--batch-size", "8",
            "--seq-len", "32", "--eval-batch-size", "8", "--eval-windows", "16",
            "--eval-every", "2", "--log-every", "2", "--devices", "4", "--min-size", "4000",
            "--density", "0.1", "--no-profile"]


@pytest.fixture
def nano_model(monkeypatch):
  """The "nano" preset, for this test only (not one of the shipped models)."""
  monkeypatch.setitem(presets.PRESETS, "nano", NANO)
  monkeypatch.setattr(config_module, "LM_MODEL_NAMES", (*presets.LM_MODEL_NAMES, "nano"))


@pytest.fixture(scope="session")
def tiny_corpus():
  """About 130 KB of generated Python-like lines as bytes, split 95/5: regular enough that
  a few steps lower the loss."""
  lines = [f"def f{i}(x):\n  return x * {i % 7} + {i % 13}\n".encode() for i in range(4200)]
  return data.corpus_from_documents("stdlib", lines[:4000], lines[4000:],
                                    manifest={"generated": "tests/train/lm/conftest.py"})


@pytest.fixture
def lm_config(tmp_path, nano_model):
  """4 steps of 8 windows of 32 tokens on 4 devices; evaluation and a log line every 2."""
  del nano_model

  def make(**overrides):
    cfg = LMConfig(model="nano", steps=4, warmup_steps=1, batch_size=8, seq_len=32,
                   eval_batch_size=8, eval_windows=16, eval_every=2, log_every=2,
                   devices=DEVICES, min_size=4000, density=0.1, compressor="hggtopk",
                   profile=False, checkpoint=False, log_dir=str(tmp_path / "run"))
    return dataclasses.replace(cfg, **overrides)
  return make


@pytest.fixture
def lm_cli(monkeypatch, tiny_corpus, nano_model):
  """`python -m train.lm` in this process reads `tiny_corpus` for --dataset stdlib;
  returns LM_FLAGS."""
  del nano_model
  real = harness.load
  monkeypatch.setattr(harness, "load", lambda cfg: tiny_corpus if cfg.dataset == "stdlib"
                      and cfg.data_dir is None else real(cfg))
  return list(LM_FLAGS)
