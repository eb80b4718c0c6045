"""The language-modelling task: next-token loss, metrics, and the optimizer chain.

The optimizer is

    clip (each device's gradient) -> compressor (exchange over "data") -> AdamW

with the compressor built by the harness (`train.optim.make_compressor`) and passed in.

Clipping placement. By default each device clips its own gradient before the
compressor: error feedback stores what was not sent and adds it back later, so a
gradient spike that entered unclipped would sit in the residual and come out over the
following steps; clipped first, the residual stays bounded by what clipping allows.
`clip_after_exchange` clips the exchanged mean instead (as dense single-device training
would); under top-k that mean is sparse, its norm far below a dense gradient's, so the
same threshold bites less often.

Momentum correction is off. hggjax's `momentum=` is DGC's correction for momentum SGD:
each device keeps the SGD velocity and compresses it. AdamW keeps its first and second
moments after the exchange, on the averaged (sparse) update, identically on every
device; a velocity inside the compressor would be a second momentum on top of Adam's.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

# The per-step metrics the train step reports and the evaluation's keys (metrics.jsonl).
TRAIN_METRICS = ("loss", "accuracy")
EVAL_METRICS = ("valid_loss", "valid_perplexity", "valid_bits_per_token",
                "valid_bits_per_byte", "valid_accuracy")


def next_token_loss(model, tokens: jax.Array, *, rngs=None) -> tuple[jax.Array, dict]:
  """Mean cross-entropy (nats) of predicting tokens[:, 1:] from tokens[:, :-1].

  Args:
    model: a `train.lm.models` model (tokens -> logits).
    tokens: int32 (batch, seq_len + 1) windows.
    rngs: dropout randomness (`nnx.Rngs(dropout=key)`); None: no dropout.

  Returns:
    (loss, {"loss", "accuracy"}), accuracy being the share of next tokens predicted
    exactly (argmax).
  """
  logits = model(tokens[:, :-1], rngs=rngs)
  targets = tokens[:, 1:]
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
  accuracy = jnp.mean((jnp.argmax(logits, -1) == targets).astype(jnp.float32))
  return loss, {"loss": loss, "accuracy": accuracy}


def eval_sums(model, tokens: jax.Array, weights: jax.Array) -> jax.Array:
  """[summed loss, correct predictions, predicted tokens] over windows weighted by
  `weights` (0 on padding rows); psum them over devices and pass to `eval_metrics`."""
  logits = model(tokens[:, :-1])
  targets = tokens[:, 1:]
  w = weights[:, None] * jnp.ones(targets.shape, jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return jnp.stack([jnp.sum(loss * w), jnp.sum(correct * w), jnp.sum(w)])


def loss_metrics(loss: float, bytes_per_token: float, prefix: str = "") -> dict[str, float]:
  """Loss in nats per token as perplexity, bits per token and bits per byte.

  Bits per byte compare runs with different tokenizers: a token carries
  `bytes_per_token` bytes of text on average (1 for bytes; measured on the corpus
  for BPE).
  """
  bits = loss / math.log(2)
  return {f"{prefix}loss": loss, f"{prefix}perplexity": math.exp(min(loss, 700.0)),
          f"{prefix}bits_per_token": bits, f"{prefix}bits_per_byte": bits / bytes_per_token}


def eval_metrics(sums, bytes_per_token: float) -> dict[str, float]:
  """The `EVAL_METRICS` from the summed `eval_sums` of the whole validation set."""
  loss, correct, count = (float(x) for x in sums)
  return {**loss_metrics(loss / count, bytes_per_token, "valid_"),
          "valid_accuracy": correct / count}


def lr_schedule(cfg, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to `cfg.lr`, then cosine decay to `cfg.lr_final * cfg.lr`."""
  warmup = min(cfg.warmup_steps, max(0, total_steps - 1))
  return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(total_steps, 1),
                                            end_value=cfg.lr * cfg.lr_final)


def decay_mask(params: Any) -> Any:
  """Weight decay on matrices and embeddings only: decaying biases and LayerNorm
  scales towards 0 only hurts (GPT-2 and most transformer recipes leave them out)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def lm_optimizer(cfg, compressor: optax.GradientTransformation,
                 total_steps: int) -> optax.GradientTransformation:
  """clip -> compressor -> AdamW(warm-up + cosine), or compressor -> clip -> AdamW with
  `cfg.clip_after_exchange`; `compressor` comes from `train.optim.make_compressor`
  (it must be built with momentum correction off)."""
  adamw = optax.adamw(lr_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                      weight_decay=cfg.weight_decay, mask=decay_mask)
  clip = optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity()
  if cfg.clip_after_exchange:
    return optax.chain(compressor, clip, adamw)
  return optax.chain(clip, compressor, adamw)
