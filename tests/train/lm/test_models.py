"""The LM presets: shapes, causality, parameter counts (abstractly), one GPT-2 step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from train.lm import models, presets

# GPT-2's published sizes with tied embeddings (Radford et al. 2019; nanoGPT's counts).
EXPECTED_PARAMS = {"gpt2-small": 124_439_808, "gpt2-medium": 354_823_168,
                   "tiny": 3_290_624, "lstm": 19_775_200}


def test_names_match_presets():
  assert models.LM_MODEL_NAMES == tuple(sorted(presets.PRESETS))


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_parameter_counts(name):
  assert models.count_params(name) == EXPECTED_PARAMS[name]


def test_vocab_and_context_override_the_preset():
  # bytes instead of BPE: only the embedding shrinks
  small = models.count_params("gpt2-small", vocab_size=256)
  assert EXPECTED_PARAMS["gpt2-small"] - small == (50257 - 256) * 768
  assert models.count_params("tiny", context=64) == EXPECTED_PARAMS["tiny"] - (256 - 64) * 256


@pytest.mark.parametrize("name", ["gpt2-small", "lstm"])
def test_logits_shape_abstractly(name):
  def run(tokens):
    return models.create_lm_model(name, vocab_size=512, context=64)(tokens)
  out = jax.eval_shape(run, jax.ShapeDtypeStruct((2, 16), jnp.int32))
  assert out.shape == (2, 16, 512) and out.dtype == jnp.float32


def _small_transformer(**kw):
  return models.TransformerLM(256, 32, layers=2, width=32, heads=2, rngs=nnx.Rngs(0), **kw)


@pytest.mark.parametrize("make", [
    _small_transformer,
    lambda: models.LSTMLM(256, 2, 16, rngs=nnx.Rngs(0)),
    lambda: models.LSTMLM(256, 1, 16, tied=True, rngs=nnx.Rngs(0)),
], ids=["transformer", "lstm", "lstm-tied"])
def test_causal(make):
  """A position's logits depend on that token and earlier ones only."""
  model = make()
  tokens = jax.random.randint(jax.random.key(1), (2, 20), 0, 256)
  changed = tokens.at[:, 12:].set((tokens[:, 12:] + 1) % 256)
  a, b = np.asarray(model(tokens)), np.asarray(model(changed))
  assert a.shape == (2, 20, 256)
  np.testing.assert_array_equal(a[:, :12], b[:, :12])
  assert np.abs(a[:, 12:] - b[:, 12:]).max() > 0


def test_output_is_tied_to_the_embedding():
  model = _small_transformer()
  params = nnx.state(model, nnx.Param)
  assert "lm_head" not in params and "head" not in params  # no separate output matrix
  assert models.LSTMLM(256, 1, 16, rngs=nnx.Rngs(0)).head is not None  # the classic is untied


def test_sequence_above_context_is_rejected():
  with pytest.raises(ValueError, match="context"):
    _small_transformer()(jnp.zeros((1, 33), jnp.int32))


def test_dropout_only_with_rngs():
  model = _small_transformer(dropout=0.5)
  tokens = jnp.zeros((1, 8), jnp.int32)
  np.testing.assert_array_equal(model(tokens), model(tokens))
  assert not np.allclose(model(tokens), model(tokens, rngs=nnx.Rngs(dropout=0)))


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = _small_transformer(dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert model(jnp.zeros((1, 8), jnp.int32)).dtype == jnp.float32


@pytest.mark.slow
def test_gpt2_small_takes_an_optimizer_step_on_cpu():
  """124 M parameters, batch 1 x 16 tokens: AdamW step, finite loss that goes down."""
  import optax  # pylint: disable=import-outside-toplevel
  from train.lm import task  # pylint: disable=import-outside-toplevel
  model = models.create_lm_model("gpt2-small", seed=0)
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4))
  tokens = jax.random.randint(jax.random.key(0), (1, 17), 0, 50257)

  @jax.jit
  def step(params, opt_state):
    def loss_fn(p):
      return task.next_token_loss(nnx.merge(graphdef, p), tokens)[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  params, opt_state, loss0 = step(params, tx.init(params))
  _, _, loss1 = step(params, opt_state)
  assert np.isfinite(loss0) and float(loss1) < float(loss0)
  assert abs(float(loss0) - np.log(50257)) < 1.0  # N(0, 0.02) init: near uniform
