"""The train state's placement and the jitted train step."""

import hggjax
import jax
import numpy as np

from train import data, steps
from train.mesh import make_mesh, shard_batch


def test_params_replicated_and_compressor_state_per_device(tiny_config, tiny_dataset):
  state = steps.create_train_state(tiny_config(), tiny_dataset.image_shape, 10, make_mesh(4), 2)
  residual = hggjax.compression_state(state.opt_state).residual
  leaf = jax.tree.leaves(residual)[0]
  assert leaf.shape[0] == 4 and len(leaf.sharding.device_set) == 4
  p = jax.tree.leaves(state.params)[0]
  assert p.sharding.is_fully_replicated
  assert np.all(np.asarray(leaf) == 0)


def test_train_step_donates_the_old_state(tiny_config, tiny_dataset):
  """The step writes the new params and optimizer state over the old buffers."""
  mesh = make_mesh(4)
  state = steps.create_train_state(tiny_config(), tiny_dataset.image_shape, 10, mesh, 2)
  # The big ones; inputs the step never reads (last step's statistics) are pruned by
  # XLA and stay alive.
  residual = hggjax.compression_state(state.opt_state).residual
  old = jax.tree.leaves((state.params, state.batch_stats, residual))
  batch = shard_batch(mesh, 16, *data.train_batch(tiny_dataset, 0, 16, 0, False))
  new_state, _ = steps.train_step(state, steps.make_train_step(state), *batch)
  assert old and all(x.is_deleted() for x in old)
  residual = jax.tree.leaves(hggjax.compression_state(new_state.opt_state).residual)
  assert any(np.any(np.asarray(r) != 0) for r in residual)
