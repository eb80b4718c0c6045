"""DGC's sparsity warm-up (`hggjax.density_warmup`): each phase is its density's compressor."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hggjax
from tests.hggjax import helpers


def _build(d):
  return hggjax.topk(d, **helpers.EXACT_WIRE)


def test_each_phase_is_its_densitys_compressor_from_the_same_state():
  """Steps 0-1 at 0.5, 2-3 at 0.1, then 0.02: outputs and states bit for bit those of the
  compressor of that density, and the statistics count that density's k and bytes."""
  tx = hggjax.density_warmup(_build, 0.02, (0.5, 0.1), every=2)
  grads0 = helpers.gradients(0)
  state = tx.init(grads0)
  total = 0.0
  for step, d in enumerate([0.5, 0.5, 0.1, 0.1, 0.02, 0.02]):
    grads = helpers.gradients(step)
    got, new = jax.jit(tx.update)(grads, state)
    want, ref = jax.jit(_build(d).update)(grads, state)
    chex.assert_trees_all_equal((got, new), (want, ref))
    k = sum(max(1, round(d * g.size)) for g in jax.tree.leaves(grads))
    stats = hggjax.stats(new)
    assert int(stats["k"]) == k
    total += float(stats["sent_bytes"])  # each phase's own bytes, summed over the run
    assert float(stats["run_sent_bytes"]) == total
    state = new
  assert total > 6 * float(stats["sent_bytes"])  # the warm-up sent more than the last phase


def test_a_skipped_step_does_not_advance_the_phase():
  tx = hggjax.density_warmup(_build, 0.02, (0.5,), every=1)
  grads = helpers.gradients(0)
  state = tx.init(grads)
  nan = jax.tree.map(lambda g: jnp.full_like(g, jnp.nan), grads)
  _, state = jax.jit(tx.update)(nan, state)
  _, state = jax.jit(tx.update)(grads, state)  # still phase 0: density 0.5
  k = sum(max(1, round(0.5 * g.size)) for g in jax.tree.leaves(grads))
  assert int(hggjax.stats(state)["k"]) == k


def test_adamw_with_a_warmup_under_shard_map_is_each_devices_own_chain():
  """hggjax.adamw(density_warmup=...) on 4 devices: the mean of each device's chain."""
  from tests.hggjax import test_compressed_adam as adam_tests  # pylint: disable=import-outside-toplevel
  kwargs = dict(compressor="topk", density=0.05, density_warmup=(0.5,), warmup_every=1,
                eps=0.5, **helpers.EXACT_WIRE)  # eps: no ties among Adam's first steps
  outs, _ = adam_tests._run_sharded(hggjax.adamw(adam_tests.LR, axis_name="data", **kwargs), 3)
  alone = hggjax.adamw(adam_tests.LR, **kwargs)
  params = adam_tests._params()
  states = [alone.init(params) for _ in range(adam_tests.NUM_DEVICES)]
  for t in range(3):
    sent = []
    for d, g in enumerate(adam_tests._device_grads(t)):
      s, states[d] = alone.update(g, states[d], params)
      sent.append(s)
    for k in adam_tests.SHAPES:
      np.testing.assert_allclose(outs[t][k], np.mean([np.asarray(s[k]) for s in sent], axis=0),
                                 rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("warmup, every, match", [
    ((), 1, "at least one"), ((0.0,), 1, "density"), ((1.5,), 1, "density"),
    ((0.5,), 0, "every"),
])
def test_bad_warmups_are_refused(warmup, every, match):
  with pytest.raises(ValueError, match=match):
    hggjax.density_warmup(_build, 0.01, warmup, every)


def test_adamw_needs_a_named_compressor_for_a_warmup():
  with pytest.raises(ValueError, match="density_warmup"):
    hggjax.adamw(1e-3, compressor=hggjax.topk(0.01), density_warmup=(0.5,))
  with pytest.raises(ValueError, match="density_warmup"):
    hggjax.adamw(1e-3, compressor="none", density_warmup=(0.5,))
