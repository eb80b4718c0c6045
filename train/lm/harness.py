"""Language modelling for the shared loop: what `python -m train.lm` trains.

The corpus (`train.lm.data`, tokenized by `train.lm.tokenizer`), the model
(`train.lm.models`, parameters only), the optimizer around the compressor
(`train.lm.task.lm_optimizer_parts`), the next-token loss with dropout drawn from (seed,
step, device), validation every `eval_every` steps (and a checkpoint with it), and the
numbers of a text run: tokens per second, bits per byte, the unigram baseline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from train.errors import UsageError
from train.lm import data as lm_data
from train.lm import task as lm_task
from train.lm.config import LMConfig, adam_placement, warmup_steps
from train.lm.models import create_lm_model
from train.lm.tokenizer import load_tokenizer
from train.mesh import config_axes
from train.task import Optimizer, Task

CORPUS_FILE = "corpus.json"  # in the run directory: where the text came from


def load(cfg: LMConfig) -> lm_data.TextCorpus:
  """The corpus `cfg` names, tokenized as it says."""
  return lm_data.load_corpus(cfg.dataset, cfg.data_dir, tokenizer=load_tokenizer(cfg.bpe_dir),
                             max_bytes=cfg.max_corpus_bytes)


def _digest(tokens: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(tokens).tobytes()).hexdigest()


class LMTask(Task):
  """Next-token prediction on a `train.lm.data.TextCorpus` (loaded from the config when
  None)."""

  def __init__(self, cfg: LMConfig, data: lm_data.TextCorpus | None = None):
    self.cfg = cfg
    self.data = data if data is not None else load(cfg)
    self._windows = None
    self._baseline = None

  @property
  def train_bytes_per_token(self) -> float:
    return self.data.train_bytes / max(1, len(self.data.train))

  def baseline(self) -> dict[str, float]:
    """The unigram baseline of this corpus (`train.lm.data.unigram_baseline`)."""
    if self._baseline is None:
      corpus = self.data
      self._baseline = lm_data.unigram_baseline(corpus.train, corpus.valid, corpus.vocab_size,
                                                corpus.bytes_per_token)
    return self._baseline

  def steps_per_epoch(self) -> int:
    cfg = self.cfg
    spe = lm_data.steps_per_epoch(len(self.data.train), cfg.batch_size, cfg.seq_len)
    if spe < 1:
      raise UsageError(f"the train split of {cfg.dataset} ({len(self.data.train)} tokens) is "
                       f"shorter than one batch of {cfg.batch_size} windows of "
                       f"{cfg.seq_len + 1} tokens")
    return spe

  def create_model(self):
    cfg = self.cfg
    dtype = jnp.bfloat16 if cfg.compute_dtype == "bfloat16" else None
    return create_lm_model(cfg.model, vocab_size=self.data.vocab_size, seed=cfg.seed,
                           dropout=cfg.dropout, dtype=dtype)

  def _scheduled(self, total_steps: int) -> LMConfig:
    """The config with the warm-up of a run of `total_steps` resolved to a number (the
    default scales with the run), as `train.lm.task` reads it."""
    return dataclasses.replace(self.cfg, warmup_steps=warmup_steps(self.cfg, total_steps))

  def make_optimizer(self, total_steps: int, axis_name: str | None) -> Optimizer:
    return lm_task.lm_optimizer_parts(self._scheduled(total_steps), None, total_steps,
                                      axis_name)

  def lr_schedule(self, total_steps: int) -> optax.Schedule:
    return lm_task.lr_schedule(self._scheduled(total_steps), total_steps)

  def loss(self, model, batch: tuple, step) -> tuple[Any, dict[str, Any]]:
    (tokens,) = batch
    rngs = None
    if self.cfg.dropout > 0:
      # A different mask on every step and device, the same on a rerun or a resume.
      key = jax.random.fold_in(jax.random.key(self.cfg.seed), step)
      rngs = nnx.Rngs(dropout=jax.random.fold_in(key, jax.lax.axis_index(config_axes(self.cfg.hosts))))
    return lm_task.next_token_loss(model, tokens, rngs=rngs)

  def eval_sums(self, model, batch: tuple):
    tokens, weights = batch
    return lm_task.eval_sums(model, tokens, weights)

  def train_batch(self, step: int, rows: slice) -> tuple[np.ndarray, ...]:
    cfg = self.cfg
    return (lm_data.train_batch(self.data.train, step, cfg.batch_size, cfg.seq_len, cfg.seed,
                                rows=rows),)

  def eval_batches(self):
    if self._windows is None:
      self._windows = lm_data.eval_windows(self.data.valid, self.cfg.seq_len,
                                           self.cfg.eval_windows)
    return lm_data.eval_batches(self._windows, self.cfg.eval_batch_size)

  def eval_result(self, sums: np.ndarray) -> dict[str, float]:
    return lm_task.eval_metrics(sums, self.data.bytes_per_token)

  def pause_at(self, step: int, steps_per_epoch: int) -> tuple[bool, bool]:
    del steps_per_epoch  # an epoch of text is far longer than a run on the CPU
    due = step % self.cfg.eval_every == 0
    return due, due

  def write_run_files(self, log) -> None:
    corpus = self.data
    log.write_json(CORPUS_FILE, {
        "dataset": corpus.name, "tokenizer": corpus.tokenizer,
        "vocab_size": corpus.vocab_size, "train_tokens": len(corpus.train),
        "valid_tokens": len(corpus.valid), "train_bytes": corpus.train_bytes,
        "valid_bytes": corpus.valid_bytes, "bytes_per_token": corpus.bytes_per_token,
        "train_tokens_sha256": _digest(corpus.train),
        "valid_tokens_sha256": _digest(corpus.valid),
        "unigram_baseline": self.baseline(), "manifest": corpus.manifest})

  def check_resume(self, log_dir: str) -> None:
    path = os.path.join(log_dir, CORPUS_FILE)
    if not os.path.isfile(path):
      return
    with open(path) as f:
      saved = json.load(f)
    for split, tokens in (("train", self.data.train), ("valid", self.data.valid)):
      if saved.get(f"{split}_tokens_sha256") not in (None, _digest(tokens)):
        raise UsageError(f"--resume: the {split} text of {self.cfg.dataset} differs from the "
                         f"text the run in {log_dir} started with ({CORPUS_FILE}); resume "
                         "with the same --data-dir and Python")

  def train_extras(self, entry: dict[str, Any]) -> dict[str, Any]:
    rate = entry.get("samples_per_s")
    return {"tokens_per_s": rate * self.cfg.seq_len if rate else None,
            "bits_per_byte": entry["loss"] / math.log(2) / self.train_bytes_per_token}

  def summary_extras(self) -> dict[str, Any]:
    return {"unigram_valid_bits_per_byte": self.baseline()["valid_cross_entropy_bits_per_byte"],
            "tokens_per_step": self.cfg.batch_size * self.cfg.seq_len,
            "adam": adam_placement(self.cfg)}

  def describe_batch(self) -> str:
    return (f"batch {self.cfg.batch_size} x {self.cfg.seq_len} tokens, Adam "
            f"{adam_placement(self.cfg).replace('_', ' ')}")

  def describe_train(self, entry: dict[str, Any]) -> str:
    return (f"loss {entry['loss']:.4f} ({entry['bits_per_byte']:.3f} bits/byte) acc "
            f"{100 * entry['accuracy']:.1f}%")

  def describe_eval(self, result: dict[str, Any]) -> str:
    return (f"validation loss {result['valid_loss']:.4f}, "
            f"{result['valid_bits_per_byte']:.3f} bits/byte, perplexity "
            f"{result['valid_perplexity']:.3f}, accuracy {100 * result['valid_accuracy']:.1f}%")

  def describe_final(self, result: dict[str, Any], steps: int, train_s: float) -> str | None:
    if "valid_loss" not in result:
      return None
    unigram = self.baseline()["valid_cross_entropy_bits_per_byte"]
    return (f"final validation loss {result['valid_loss']:.4f} "
            f"({result['valid_bits_per_byte']:.3f} bits/byte; unigram baseline "
            f"{unigram:.3f}) after {steps} steps; training wall time {train_s:.1f} s")
