"""The threshold probe and the compressor statistics the training log reports."""

import hggjax
import jax.numpy as jnp
import numpy as np
import pytest

from train import data, diagnostics, steps
from train.mesh import AXIS, make_mesh, shard_batch


def test_largest_leaf_and_its_selection_group():
  params = {"a": jnp.zeros(3), "b": jnp.zeros((10, 10)), "c": jnp.zeros(50)}
  assert diagnostics.largest_leaf(params, min_size=5) == (1, 0, "['b']")  # a goes dense
  assert diagnostics.largest_leaf(params, min_size=0) == (1, 1, "['b']")
  assert diagnostics.largest_leaf(params, 5, "global") == (1, 0, diagnostics.GLOBAL_GROUP)


def test_compressor_stats_sums_over_devices():
  tx = hggjax.topk(0.5, axis_name=AXIS)
  stats = diagnostics.compressor_stats(tx.init({"w": jnp.zeros(8), "v": jnp.zeros(4)}), 1)
  assert {"selected", "k", "sent_bytes", "dense_bytes", "history_hits"} <= set(stats)
  assert stats["_threshold"].shape == (1,)  # one device of the state's device axis


@pytest.mark.parametrize("scope", ["leaf", "global"])
def test_probe_gives_the_exact_threshold_without_momentum_correction(tiny_config, tiny_dataset,
                                                                     scope):
  """Exact top-k after a first step (non-zero residual), with the order where momentum
  follows the exchange; the training loop's tests check the default order. With
  scope="global" the reference is the k-th largest over all compressed leaves."""
  # Globally several leaves share one group, so its threshold is not the largest leaf's.
  cfg = tiny_config(compressor="topk", momentum_correction=False,
                    min_size=5000 if scope == "leaf" else 1000, scope=scope)
  mesh = make_mesh(4)
  state = steps.create_train_state(cfg, tiny_dataset.image_shape, 10, mesh, 2)
  leaf, group, _ = diagnostics.largest_leaf(state.params, cfg.min_size, cfg.scope)
  probe = diagnostics.make_threshold_probe(state, leaf, cfg)
  step_fn = steps.make_train_step(state)
  for step in range(2):
    batch = shard_batch(mesh, 16, *data.train_batch(tiny_dataset, step, 16, 0, False))
    exact = np.asarray(probe(state.params, state.batch_stats, state.opt_state, np.int32(step),
                             batch))
    state, _ = steps.train_step(state, step_fn, *batch)
  threshold = diagnostics.compressor_stats(state.opt_state, group)["_threshold"]
  assert np.all(exact > 0)
  np.testing.assert_allclose(threshold, exact, rtol=1e-6)
