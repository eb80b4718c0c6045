"""exchange="leader_mask" (ScaleCom's cyclic top-k): one device's positions for all."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import hggjax
from tests.conftest import NUM_DEVICES
from tests.hggjax import helpers, hlo_bytes, shared_positions

SHAPES, DENSITY = shared_positions.SHAPES, shared_positions.DENSITY


def _setup(dtype=jnp.float32, shapes=SHAPES):
  return shared_positions.sharded_update("leader_mask", dtype, shapes)


_grads = shared_positions.device_grads


def test_every_device_sends_its_values_at_the_leaders_positions_in_turn():
  mesh, state, update = _setup()
  for step in range(NUM_DEVICES + 1):
    grads = _grads(step)
    residual = [np.asarray(r) for r in state.residual]
    out, state = update(jax.device_put(grads, NamedSharding(mesh, P("data"))), state)
    leader = step % NUM_DEVICES
    for i, name in enumerate(sorted(SHAPES)):
      acc = grads[name].reshape(NUM_DEVICES, -1) + residual[i].reshape(NUM_DEVICES, -1)
      k = helpers.k_of(DENSITY, acc.shape[1])
      pos = np.sort(helpers.exact_topk_positions(acc[leader], k))
      sent = np.zeros_like(acc)
      sent[:, pos] = acc[:, pos]
      mean = np.zeros(acc.shape[1], np.float32)
      mean[pos] = (np.sum(sent[:, pos], axis=0) * np.float32(1 / NUM_DEVICES))
      new = np.asarray(state.residual[i]).reshape(NUM_DEVICES, -1)
      np.testing.assert_array_equal(acc, sent + new, err_msg=name)  # error feedback exact
      np.testing.assert_array_equal(new[:, pos], 0)
      # One replicated mean (out_specs P(): shard_map checks it is the same everywhere).
      np.testing.assert_allclose(np.asarray(out[name]).ravel(), mean, rtol=1e-6, atol=1e-7,
                                 err_msg=name)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_statistics_are_the_bytes_of_the_reductions_in_the_hlo(dtype):
  shapes = {"b": (300,), "w": (200, 500)}
  mesh, state, update = _setup(dtype, shapes)
  grads = jax.device_put(jax.tree.map(lambda g: jnp.asarray(g, dtype), _grads(0, shapes)),
                         NamedSharding(mesh, P("data")))
  _, new = update(grads, state)
  hlo = update.lower(grads, state).compile().as_text()
  reduces = [c for c in hlo_bytes.collectives(hlo) if c["kind"] == "all-reduce"]
  assert not [c for c in hlo_bytes.collectives(hlo) if c["kind"] != "all-reduce"]
  total = sum(c["bytes"] for c in reduces)
  k = 5000 + 15  # w: 5% of 1e5; b: 5% of 300
  assert total == 4 + k * (4 + 4)  # the count, positions, values (summed in float32)
  stats = hggjax.stats(new)
  assert set(np.asarray(stats["sent_bytes"]).tolist()) == {float(total)}
  np.testing.assert_allclose(np.asarray(stats["received_bytes"]),
                             2 * (NUM_DEVICES - 1) / NUM_DEVICES * total)


def test_a_device_that_skips_a_step_still_agrees_on_the_leader():
  mesh, state, update = _setup()
  grads = _grads(0)
  grads["w"][1, 0, 0] = np.nan
  out, state = update(jax.device_put(grads, NamedSharding(mesh, P("data"))), state)
  np.testing.assert_array_equal(np.asarray(hggjax.stats(state)["nonfinite"]), [0, 1, 0, 0])
  assert np.all(np.isfinite(np.asarray(out["w"])))
  # Counts are now 1, 0, 1, 1: the next leader is 1 on every device (the largest count).
  grads = _grads(1)
  residual = np.asarray(state.residual[1]).reshape(NUM_DEVICES, -1)
  out, state = update(jax.device_put(grads, NamedSharding(mesh, P("data"))), state)
  acc = grads["w"].reshape(NUM_DEVICES, -1) + residual
  k = helpers.k_of(DENSITY, acc.shape[1])
  pos = helpers.exact_topk_positions(acc[1], k)
  np.testing.assert_array_equal(np.flatnonzero(np.asarray(out["w"]).ravel()), np.sort(pos))
