"""The optimizer a config describes: one way to build its compressor, and the chain."""

import dataclasses

import hggjax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train import optim
from train.config import Config
from train.mesh import AXIS


@pytest.mark.parametrize("overrides, options", [
    ({}, {"momentum": 0.9}),
    ({"momentum_correction": False}, {}),
    ({"use_pipeline": True}, {"momentum": 0.9, "pipeline": True}),
    ({"compressor": "none", "momentum": 0.5}, {"momentum": 0.5}),
    ({"exchange": "sparse_allreduce"}, {"momentum": 0.9, "exchange": "sparse_allreduce"}),
    ({"scope": "global", "residual_decay": 0.99},
     {"momentum": 0.9, "scope": "global", "residual_decay": 0.99}),
    ({"residual_lowpass": 0.5}, {"momentum": 0.9, "residual_lowpass": 0.5}),
    ({"value_dtype": None, "scale_group": None, "index_coding": "int32"},
     {"momentum": 0.9, "value_dtype": None, "scale_group": None, "index_coding": "int32"}),
])
def test_make_compressor_passes_the_config(compressor_calls, overrides, options):
  cfg = dataclasses.replace(Config(density=0.05, min_size=7), **overrides)
  optim.make_compressor(cfg, "data")
  assert compressor_calls == [
      (cfg.compressor, {"density": 0.05, "axis_name": "data", "min_size": 7,
                        "exchange": "allgather", "scope": "leaf", "value_dtype": "auto",
                        "scale_group": "auto", "index_coding": "auto", **options})]


def test_make_optimizer_builds_its_compressor_with_make_compressor(compressor_calls):
  cfg = Config(compressor="topk", use_pipeline=False)
  optim.make_optimizer(cfg, 10)
  optim.make_compressor(cfg, AXIS)
  assert len(compressor_calls) == 2 and compressor_calls[0] == compressor_calls[1]


@pytest.mark.parametrize("overrides, error, message", [
    ({"compressor": "topk", "use_pipeline": True}, TypeError, "pipeline= is offered by hggtopk"),
    ({"momentum": 1.0}, ValueError, "momentum must be a number in"),
    ({"exchange": "ring"}, ValueError, "exchange must be one of"),
])
def test_make_compressor_rejects_what_hggjax_rejects(overrides, error, message):
  with pytest.raises(error, match=message):
    optim.make_compressor(dataclasses.replace(Config(), **overrides), "data")


@pytest.mark.parametrize("correction", [True, False])
def test_at_density_one_both_orders_are_sgd_with_momentum_and_weight_decay(correction):
  """Everything is sent, so where momentum acts cannot matter: both chains are dense SGD."""
  cfg = Config(compressor="topk", density=1.0, min_size=0, momentum_correction=correction,
               lr=0.1, weight_decay=0.01, value_dtype=None, index_coding="int32")
  tx = optim.make_optimizer(cfg, total_steps=100, axis_name=None)
  dense = optax.chain(optax.add_decayed_weights(0.01), optax.sgd(0.1, momentum=0.9))
  params = {"w": jnp.arange(6.0).reshape(2, 3)}
  state, dense_state = tx.init(params), dense.init(params)
  compression = hggjax.compression_state(state)
  assert (compression.velocity is not None) == correction
  update, dense_update = jax.jit(tx.update), jax.jit(dense.update)
  for step in range(3):
    grads = jax.tree.map(lambda p, s=step: jnp.sin(p + s), params)
    updates, state = update(grads, state, params)
    expected, dense_state = dense_update(grads, dense_state, params)
    np.testing.assert_allclose(updates["w"], expected["w"], rtol=1e-6)
    params = optax.apply_updates(params, updates)


def test_before_compressor_is_weight_decay_only_with_momentum_correction():
  params = {"w": jnp.ones(3)}
  grads = {"w": jnp.full(3, 2.0)}
  for correction, expected in ((True, 2.5), (False, 2.0)):
    before = optim.before_compressor(Config(weight_decay=0.5, momentum_correction=correction))
    updates, _ = before.update(grads, before.init(params), params)
    np.testing.assert_array_equal(updates["w"], np.full(3, expected))
