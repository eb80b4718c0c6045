"""Language models in Flax NNX: a GPT-2-style transformer and an LSTM.

Both map int32 tokens (batch, time) to float32 logits (batch, time, vocab) and hold only
`nnx.Param` variables, so `nnx.split(model, nnx.Param)` gives the whole state. Dropout is
off unless a rate is given; it then needs `rngs` at call time (no RNG state lives in
the model, so a step stays a pure function of params, batch and key).

Layers are separate modules, not one scanned stack: the compressors select per
parameter leaf, and a stacked (layers, ...) leaf would share one top-k over all layers.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from train.lm.presets import LM_MODEL_NAMES, LMSpec, lm_spec

__all__ = ["LM_MODEL_NAMES", "LSTMLM", "TransformerLM", "count_params", "create_lm_model"]

# GPT-2's initialisation: N(0, 0.02) (positions: 0.01), zero biases, residual output
# projections scaled down by sqrt(2 * layers) so the residual stream's variance does not
# grow with depth.
_STD = 0.02


def _normal(std: float):
  return nnx.initializers.normal(stddev=std)


def _dropout(x, rate: float, rngs: nnx.Rngs | None):
  if rate == 0.0 or rngs is None:
    return x
  keep = jax.random.bernoulli(rngs.dropout(), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class CausalSelfAttention(nnx.Module):
  """Multi-head self-attention over earlier positions only, one fused QKV projection."""

  def __init__(self, width: int, heads: int, layers: int, *, dtype, rngs: nnx.Rngs):
    if width % heads:
      raise ValueError(f"width {width} is not divisible by {heads} heads")
    self.heads = heads
    self.qkv = nnx.Linear(width, 3 * width, kernel_init=_normal(_STD), dtype=dtype, rngs=rngs)
    self.proj = nnx.Linear(width, width, kernel_init=_normal(_STD / math.sqrt(2 * layers)),
                           dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, c = x.shape
    qkv = self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads)
    # (batch, time, heads, head_dim) each; XLA's implementation on CPU, cuDNN where it fits
    y = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], is_causal=True)
    return self.proj(y.reshape(b, t, c))


class Block(nnx.Module):
  """Pre-LayerNorm block: x + attn(ln(x)), then x + mlp(ln(x)) with a 4x GELU MLP."""

  def __init__(self, width: int, heads: int, layers: int, dropout: float, *, dtype,
               rngs: nnx.Rngs):
    self.dropout = dropout
    self.ln1 = nnx.LayerNorm(width, epsilon=1e-5, dtype=dtype, rngs=rngs)
    self.attn = CausalSelfAttention(width, heads, layers, dtype=dtype, rngs=rngs)
    self.ln2 = nnx.LayerNorm(width, epsilon=1e-5, dtype=dtype, rngs=rngs)
    self.fc = nnx.Linear(width, 4 * width, kernel_init=_normal(_STD), dtype=dtype, rngs=rngs)
    self.out = nnx.Linear(4 * width, width, kernel_init=_normal(_STD / math.sqrt(2 * layers)),
                          dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
    x = x + _dropout(self.attn(self.ln1(x)), self.dropout, rngs)
    h = nnx.gelu(self.fc(self.ln2(x)), approximate=True)  # GPT-2's tanh approximation
    return x + _dropout(self.out(h), self.dropout, rngs)


class TransformerLM(nnx.Module):
  """Decoder-only transformer as GPT-2: learned positions, pre-LN blocks, final LayerNorm,
  output logits from the token embedding (tied)."""

  def __init__(self, vocab_size: int, context: int, layers: int, width: int, heads: int, *,
               dropout: float = 0.0, dtype=None, rngs: nnx.Rngs):
    self.context, self.dropout = context, dropout
    self.wte = nnx.Embed(vocab_size, width, embedding_init=_normal(_STD), dtype=dtype, rngs=rngs)
    self.wpe = nnx.Embed(context, width, embedding_init=_normal(0.01), dtype=dtype, rngs=rngs)
    self.blocks = nnx.List([Block(width, heads, layers, dropout, dtype=dtype, rngs=rngs)
                            for _ in range(layers)])
    self.ln_f = nnx.LayerNorm(width, epsilon=1e-5, dtype=dtype, rngs=rngs)

  def __call__(self, tokens: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    t = tokens.shape[1]
    if t > self.context:
      raise ValueError(f"sequence length {t} exceeds the model's context {self.context}")
    x = self.wte(tokens) + self.wpe(jnp.arange(t))[None]
    x = _dropout(x, self.dropout, rngs)
    for block in self.blocks:
      x = block(x, rngs)
    return self.wte.attend(self.ln_f(x)).astype(jnp.float32)


def _uniform(scale: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -scale, scale)
  return init


class LSTMLayer(nnx.Module):
  """One LSTM layer over the whole sequence: the input projection for every step at
  once (one large matmul), then a scan over time for the recurrent part."""

  def __init__(self, cin: int, units: int, init, *, rngs: nnx.Rngs):
    self.w_x = nnx.Param(init(rngs.params(), (cin, 4 * units)))
    self.w_h = nnx.Param(init(rngs.params(), (units, 4 * units)))
    self.b = nnx.Param(init(rngs.params(), (4 * units,)))

  def __call__(self, x: jax.Array) -> jax.Array:
    units = self.w_h.shape[0]
    gx = jnp.swapaxes(x @ self.w_x[...] + self.b[...], 0, 1)  # (time, batch, 4 units)
    w_h = self.w_h[...]

    def step(carry, g):
      h, c = carry
      i, f, u, o = jnp.split(g + h @ w_h, 4, axis=-1)
      c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(u)
      h = jax.nn.sigmoid(o) * jnp.tanh(c)
      return (h, c), h

    # zeros_like keeps gx's type inside shard_map (varying over the data axis), which the
    # scan's carry must match; a plain jnp.zeros would be replicated.
    zeros = jnp.zeros_like(gx[0, :, :units])
    _, hs = jax.lax.scan(step, (zeros, zeros), gx)
    return jnp.swapaxes(hs, 0, 1)


class LSTMLM(nnx.Module):
  """Embedding, stacked LSTM layers, output projection (Zaremba et al. 2014).

  Every window starts from a zero state: batches are independent windows, not one
  stream carried across steps. Weights start uniform in +-0.05 as in the medium model.
  With `tied` the output reuses the embedding (Press & Wolf 2017; needs embedding
  width = units, as here).
  """

  def __init__(self, vocab_size: int, layers: int, units: int, *, tied: bool = False,
               dropout: float = 0.0, rngs: nnx.Rngs):
    init = _uniform(0.05)
    self.dropout = dropout
    self.embed = nnx.Embed(vocab_size, units, embedding_init=init, rngs=rngs)
    self.layers = nnx.List([LSTMLayer(units, units, init, rngs=rngs) for _ in range(layers)])
    self.head = None if tied else nnx.Linear(units, vocab_size, kernel_init=init,
                                             bias_init=init, rngs=rngs)

  def __call__(self, tokens: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    x = _dropout(self.embed(tokens), self.dropout, rngs)
    for layer in self.layers:
      x = _dropout(layer(x), self.dropout, rngs)
    logits = self.embed.attend(x) if self.head is None else self.head(x)
    return logits.astype(jnp.float32)


def _build(spec: LMSpec, vocab_size: int, context: int | None, dropout: float, dtype,
           rngs: nnx.Rngs) -> nnx.Module:
  if spec.kind == "lstm":
    return LSTMLM(vocab_size, spec.layers, spec.width, tied=spec.tied, dropout=dropout,
                  rngs=rngs)
  return TransformerLM(vocab_size, context or spec.context, spec.layers, spec.width,
                       spec.heads, dropout=dropout, dtype=dtype, rngs=rngs)


def create_lm_model(name: str, *, vocab_size: int | None = None, context: int | None = None,
                    seed: int = 0, dropout: float = 0.0, dtype=None) -> nnx.Module:
  """Builds the preset `name` (`LM_MODEL_NAMES`).

  Args:
    name: a key of `train.lm.presets.PRESETS`.
    vocab_size: the tokenizer's vocabulary (256 for bytes, 50257 for GPT-2's BPE);
      default: the preset's.
    context: the transformer's longest sequence (size of the position table); default:
      the preset's. The LSTM takes any length and ignores it.
    seed: parameter initialisation.
    dropout: rate on embeddings and residual branches (LSTM: between layers); 0 is off.
    dtype: compute dtype (e.g. jnp.bfloat16 on GPUs); parameters stay float32.
  """
  spec = lm_spec(name)
  return _build(spec, vocab_size or spec.vocab_size, context, dropout, dtype, nnx.Rngs(seed))


def count_params(name: str, *, vocab_size: int | None = None,
                 context: int | None = None) -> int:
  """Parameters of a preset, from shapes only (nothing is allocated)."""
  params = nnx.eval_shape(lambda: nnx.state(
      create_lm_model(name, vocab_size=vocab_size, context=context), nnx.Param))
  return sum(p.size for p in jax.tree.leaves(params))
