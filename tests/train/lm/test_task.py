"""Loss, metrics, schedule and the optimizer chain; a small transformer learns under 1% top-k."""

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import hggjax

from train import optim
from train.lm import data, models, task
from train.lm.config import LMConfig


def test_uniform_logits_cost_log_vocab():
  class Uniform:
    def __call__(self, tokens, rngs=None):
      return jnp.zeros(tokens.shape + (256,))

  tokens = jnp.zeros((2, 9), jnp.int32)
  loss, metrics = task.next_token_loss(Uniform(), tokens)
  assert float(loss) == pytest.approx(math.log(256), rel=1e-6)
  assert set(metrics) == set(task.TRAIN_METRICS)
  sums = task.eval_sums(Uniform(), tokens, jnp.array([1.0, 0.0]))
  assert sums.tolist()[2] == 8  # the padding row does not count
  m = task.eval_metrics(sums, bytes_per_token=1.0)
  assert set(m) == set(task.EVAL_METRICS)
  assert m["valid_bits_per_byte"] == pytest.approx(8.0, rel=1e-6)
  assert m["valid_perplexity"] == pytest.approx(256, rel=1e-5)


def test_bits_per_byte_divides_by_bytes_per_token():
  m = task.loss_metrics(2 * math.log(2), bytes_per_token=4.0)
  assert m["bits_per_token"] == pytest.approx(2.0) and m["bits_per_byte"] == pytest.approx(0.5)


def test_schedule_warms_up_then_decays():
  cfg = LMConfig(lr=1e-3, warmup_steps=10, lr_final=0.1)
  lr = task.lr_schedule(cfg, 100)
  assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(5e-4)
  assert float(lr(10)) == pytest.approx(1e-3)
  assert float(lr(100)) == pytest.approx(1e-4)
  assert float(task.lr_schedule(cfg, 5)(4)) > 0  # warm-up longer than the run is cut


def test_weight_decay_skips_vectors():
  model = models.TransformerLM(256, 8, layers=1, width=8, heads=2, rngs=nnx.Rngs(0))
  mask = task.decay_mask(nnx.state(model, nnx.Param))
  decayed = {jax.tree_util.keystr(path, simple=True, separator="/").removesuffix("/value"): leaf
             for path, leaf in jax.tree.leaves_with_path(mask)}
  assert decayed["wte/embedding"] and decayed["blocks/0/fc/kernel"]
  assert not decayed["blocks/0/fc/bias"] and not decayed["ln_f/scale"]


def _recorder(seen):
  """A compressor stand-in that records the norm of what it receives."""
  def update(updates, state, params=None):
    del params
    seen.append(optax.tree.norm(updates))
    return updates, state
  return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


@pytest.mark.parametrize("adam, after, received", [
    ("after_exchange", False, 1.0),      # the clipped gradient
    ("after_exchange", True, 40.0),      # the raw gradient: clipping comes after
    # Adam's first step, +-1 per element, 16 of them, times the peak rate (no warm-up)
    ("before_compression", False, 4.0 * 2e-3),
])
def test_what_the_compressor_receives(adam, after, received):
  """Clipping before or after the compressor, Adam before it or after the exchange."""
  seen = []
  cfg = LMConfig(clip_norm=1.0, clip_after_exchange=after, adam=adam, lr=2e-3, warmup_steps=0)
  tx = task.lm_optimizer(cfg, _recorder(seen), total_steps=10)
  params = {"w": jnp.ones((4, 4))}
  grads = {"w": jnp.full((4, 4), 10.0)}  # norm 40
  tx.update(grads, tx.init(params), params)
  assert float(seen[0]) == pytest.approx(received, rel=1e-5)


def test_adam_before_compression_is_adamw_without_compression():
  """With a compressor that sends everything, the chain is AdamW applied per device: the
  learning rate before the compressor and the decay after it give optax.adamw's update."""
  cfg = LMConfig(adam="before_compression", lr=1e-2, warmup_steps=2, weight_decay=0.1,
                 clip_norm=0.0)
  tx = task.lm_optimizer(cfg, optax.identity(), total_steps=6)
  ref = optax.adamw(task.lr_schedule(cfg, 6), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay, mask=task.decay_mask)
  params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.ones(4)}
  state, ref_state = tx.init(params), ref.init(params)
  for t in range(5):
    grads = jax.tree.map(lambda p: jnp.sin(p * (t + 1)), params)
    updates, state = tx.update(grads, state, params)
    expected, ref_state = ref.update(grads, ref_state, params)
    chex.assert_trees_all_close(updates, expected, rtol=1e-6, atol=1e-9)
    params = optax.apply_updates(params, updates)


def test_default_compressor_has_no_momentum(compressor_calls):
  optim.make_compressor(LMConfig(), None)
  assert "momentum" not in compressor_calls[0][1]


@pytest.mark.parametrize("scope, groups", [("global", 1), ("leaf", 3)])
def test_the_default_selects_once_over_all_compressed_leaves(scope, groups):
  """The harness's chain (hggjax.adamw with the config's options) has one selection
  group by default; --scope leaf gives one per compressed leaf."""
  params = {"a": jnp.zeros((8, 8)), "b": jnp.zeros((4, 16)), "c": jnp.zeros(40), "d": jnp.zeros(3)}
  cfg = dataclasses.replace(LMConfig(min_size=10, warmup_steps=1), scope=scope)
  assert LMConfig().scope == "global"
  state = task.lm_optimizer(cfg, None, total_steps=10).init(params)
  assert np.shape(hggjax.stats(state)["threshold"]) == (groups,)


def test_small_transformer_learns_with_hggtopk_at_one_percent():
  """50 local steps (no exchange) on the standard library's text: the loss falls well
  below the uniform 8 bits per byte."""
  corpus = data.load_corpus("stdlib")
  cfg = LMConfig(compressor="hggtopk", density=0.01, min_size=1000, lr=3e-3, warmup_steps=5,
                 seq_len=32, batch_size=8)
  model = models.TransformerLM(256, cfg.seq_len, layers=2, width=64, heads=2,
                               rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  tx = task.lm_optimizer(cfg, optim.make_compressor(cfg, None), total_steps=50)

  @jax.jit
  def step(params, opt_state, tokens):
    def loss_fn(p):
      return task.next_token_loss(nnx.merge(graphdef, p), tokens)[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state, losses = tx.init(params), []
  for s in range(50):
    tokens = data.train_batch(corpus.train, s, cfg.batch_size, cfg.seq_len, cfg.seed)
    params, opt_state, loss = step(params, opt_state, tokens)
    losses.append(float(loss))
  first, last = np.mean(losses[:5]), np.mean(losses[-5:])
  assert first > 5.0 and last < first - 1.0, (first, last)
  sent = optax.tree.get(opt_state, "sent_bytes")
  dense = optax.tree.get(opt_state, "dense_bytes")
  assert float(sent) < 0.2 * float(dense)  # it really compressed


@pytest.mark.parametrize("mask", [False, True])
def test_mask_momentum_reaches_the_chain(mask):
  """--mask-momentum: after a step, each compressed leaf's first moment is 0 where the
  device sent (k of the 2048 elements here), and nowhere without it."""
  params = {"a": jnp.zeros((64, 32))}
  cfg = dataclasses.replace(LMConfig(min_size=10, warmup_steps=1, density=0.05),
                            mask_momentum=mask)
  tx = task.lm_optimizer(cfg, None, total_steps=10)
  state = tx.init(params)
  grads = {"a": jax.random.normal(jax.random.key(0), (64, 32))}
  for _ in range(2):  # the first step's learning rate is 0 (warm-up from 0)
    _, state = tx.update(grads, state, params)
  is_adam = lambda x: isinstance(x, hggjax.AdamState)  # noqa: E731
  adam = next(x for x in jax.tree.leaves(state, is_leaf=is_adam) if is_adam(x))
  zeros = int((np.asarray(adam.mu["a"]) == 0).sum())
  assert zeros == (round(0.05 * 2048) if mask else 0)


def _lm_residual(**changes):
  params = {"a": jnp.zeros((64, 32))}
  cfg = dataclasses.replace(LMConfig(min_size=10, warmup_steps=1, density=0.05), **changes)
  tx = task.lm_optimizer(cfg, None, total_steps=10)
  state = tx.init(params)
  for t in range(3):
    _, state = tx.update({"a": jax.random.normal(jax.random.key(t), (64, 32))}, state, params)
  return hggjax.compression_state(state).residual


def test_the_default_filters_the_residual_as_residual_lowpass_half():
  """LMConfig's residual_lowpass None is hggjax.adamw's default (0.5 here); 1 is plain
  error feedback, a different residual."""
  default = _lm_residual()
  chex.assert_trees_all_equal(default, _lm_residual(residual_lowpass=0.5))
  plain = _lm_residual(residual_lowpass=1.0)
  assert not np.array_equal(np.asarray(default[0]), np.asarray(plain[0]))
