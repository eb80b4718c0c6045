"""The language-modelling task: next-token loss, metrics, and the optimizer chain.

The optimizer has the compressor (the one the config names, with
`train.optim.compressor_options`) in one of two places relative to Adam (`cfg.adam`,
resolved by `train.lm.config.adam_placement`):

    before_compression:  hggjax.adamw: clip -> Adam's moments, per device -> learning
                         rate -> [DCT] -> compressor -> [inverse DCT] -> weight decay
    after_exchange:      clip -> compressor -> AdamW (moments on the exchanged mean)

Adam before the compressor. Each device keeps Adam's first and second moments of its own
(clipped) gradient and the compressor sends Adam's step: every coordinate's step is
bounded, error feedback stores the steps not yet sent, and a coordinate sent after many
steps moves by what dense Adam would have moved it over those steps. The learning rate
scales each step before the compressor, so the residual holds parameter changes, each at
the rate of the step that made it: applied after the exchange instead, a step computed
during warm-up would be sent, and scaled, at a later step's rate. This is DGC's
momentum correction carried over to Adam (the moments live where the velocity would).
After the exchange, Adam normalises the sparse mean instead: a coordinate sent once
after many steps of accumulation moves by a few learning-rate units however large the
residual it carries, so top-k at low density trails dense AdamW (docs/lm.md has both
measured).

Clipping placement. Each device clips its own gradient before the compressor by default:
error feedback stores what was not sent and adds it back later, so a gradient spike that
entered unclipped would sit in the residual and come out over the following steps;
clipped first, the residual stays bounded by what clipping allows. `clip_after_exchange`
(with Adam after the exchange only) clips the exchanged mean instead, as dense
single-device training would; under top-k that mean is sparse, its norm far below a dense
gradient's, so the same threshold bites less often.

hggjax's momentum correction (`momentum=`, DGC's SGD velocity inside the compressor) is
off: Adam's first moment is the momentum, and it lives where `cfg.adam` puts it.
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


def lm_optimizer_parts(cfg, compressor: optax.GradientTransformation | None, total_steps: int,
                       axis_name: str | None = None):
  """The optimizer `cfg` describes, as a `train.task.Optimizer`: which parts act on each
  device's gradient and which on the exchanged mean (module docstring). With Adam before
  a compressor it is `hggjax.adamw_parts` with the config's mechanisms; `axis_name` is
  the compressor's, and Adam's moments are kept per device along it. `compressor`: None
  builds the one `cfg` names (the harness), or a stand-in to use instead (tests)."""
  import hggjax  # pylint: disable=import-outside-toplevel
  from train import optim  # pylint: disable=import-outside-toplevel
  from train.lm.config import adam_placement, warmup_densities  # pylint: disable=import-outside-toplevel
  from train.task import Optimizer  # pylint: disable=import-outside-toplevel
  schedule = lr_schedule(cfg, total_steps)
  options = optim.compressor_options(cfg, axis_name)
  clip = optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity()
  if adam_placement(cfg) == "before_compression" and cfg.compressor != "none":
    by_name = compressor is None
    parts = hggjax.adamw_parts(
        schedule, compressor=cfg.compressor if by_name else compressor, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
        weight_decay=cfg.weight_decay, mask=decay_mask, clip_norm=cfg.clip_norm or None,
        method=cfg.method, second_moment=cfg.second_moment, refresh_every=cfg.refresh_every,
        freeze_after=cfg.freeze_after, basis=None if cfg.basis == "none" else cfg.basis,
        chunk=cfg.dct_chunk, axis_name=axis_name, mask_momentum=cfg.mask_momentum,
        residual_lowpass=cfg.residual_lowpass if by_name else None,
        **({"density_warmup": warmup_densities(cfg), "warmup_every": cfg.density_warmup_every}
           if cfg.density_warmup else {}),
        **({k: v for k, v in options.items() if k not in ("axis_name", "residual_lowpass")}
           if by_name else {}))
    return Optimizer(parts.before + (parts.compressor,) + parts.after, len(parts.before))
  if compressor is None:
    compressor = hggjax.get_compressor(cfg.compressor, **options)
  if adam_placement(cfg) == "before_compression":
    # Dense, but Adam per device: what keeping the moments per device costs on its own.
    adam = hggjax.adam_moments(cfg.b1, cfg.b2, cfg.eps, axis_name=axis_name)
    return Optimizer((clip, adam, optax.scale_by_learning_rate(schedule), compressor,
                      hggjax.scheduled_weight_decay(schedule, cfg.weight_decay, decay_mask)), 3)
  adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                      weight_decay=cfg.weight_decay, mask=decay_mask)
  if cfg.clip_after_exchange:
    return Optimizer((compressor, clip, adamw), 0)
  return Optimizer((clip, compressor, adamw), 1)


def lm_optimizer(cfg, compressor: optax.GradientTransformation | None, total_steps: int,
                 axis_name: str | None = None) -> optax.GradientTransformation:
  """The chain of `lm_optimizer_parts` as one optax transformation."""
  return lm_optimizer_parts(cfg, compressor, total_steps, axis_name).tx
