"""The non-finite policy: a gradient holding NaN or Inf skips the step on that device.

For every compressor, with and without momentum (and pipelined HGG-TopK), in short
and long leaves (the latter on the packed fast paths): the bad step sends nothing,
changes no state but its statistics, and every later step sends exactly what it
would have sent had the bad step never happened.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import hggjax
from tests.conftest import NUM_DEVICES

SIZES = {"long": 70_000, "short": 1000}  # long: above the packed paths' MIN_FAST_N
CASES = [(name, 0.0, False) for name in sorted(hggjax.compressors)]
CASES += [(name, 0.9, False) for name in sorted(hggjax.compressors)]
CASES += [("hggtopk", 0.0, True), ("hggtopk", 0.9, True)]


def _grads(step: int, poison=None):
  rng = np.random.default_rng(step)
  g = {name: rng.standard_t(3, size).astype(np.float32) for name, size in SIZES.items()}
  if poison is not None:
    leaf, value = poison
    g[leaf][5] = value
  return g


def _build(name, momentum, pipeline, **extra):
  kwargs = {} if name == "none" else {"density": 0.01}
  if pipeline:
    kwargs["pipeline"] = True
  return hggjax.get_compressor(name, momentum=momentum, **kwargs, **extra)


def _state_arrays(state):
  """Everything in the state but the statistics, as numpy arrays."""
  return [np.asarray(x) for x in jax.tree.leaves(state._replace(stats=None))]


@pytest.mark.parametrize("name,momentum,pipeline", CASES)
def test_a_bad_step_is_skipped_and_later_steps_are_unchanged(name, momentum, pipeline):
  tx = _build(name, momentum, pipeline)
  update = jax.jit(tx.update)
  init = tx.init(_grads(0))
  clean = [_grads(t) for t in range(1, 4)]
  reference = []
  state = init
  for g in clean:
    out, state = update(g, state)
    reference.append((out, _state_arrays(state)))
  for leaf in SIZES:
    for value in (np.nan, np.inf, -np.inf):
      state = init
      out, state = update(clean[0], state)  # a first clean step, so that state is not fresh
      before = _state_arrays(state)
      bad_out, bad_state = update(_grads(99, poison=(leaf, value)), state)
      stats = hggjax.stats(bad_state)
      assert int(stats["nonfinite"]) == 1 and int(stats["selected"]) == 0, (leaf, value)
      for v in jax.tree.leaves(bad_out):
        assert not np.any(np.asarray(v)), (leaf, value)
      for a, b in zip(before, _state_arrays(bad_state)):
        np.testing.assert_array_equal(a, b, err_msg=f"{leaf} {value}")
      state = bad_state
      for t, g in enumerate(clean[1:], start=1):
        out, state = update(g, state)
        assert int(hggjax.stats(state)["nonfinite"]) == 0
        for key in SIZES:
          np.testing.assert_array_equal(
              np.asarray(out[key]), np.asarray(reference[t][0][key]), err_msg=f"{leaf} {value} {t}")
        for a, b in zip(reference[t][1], _state_arrays(state)):
          np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["none", "topk", "hggtopk", "randomkec", "dgcsampling"])
def test_every_replica_skips_the_bad_devices_contribution_alike(name):
  """Device 1's gradient holds NaN: its contribution is left out of the mean on every
  device, its own state stays, and the others step as they would have."""
  mesh = jax.make_mesh((NUM_DEVICES,), ("data",), devices=jax.devices()[:NUM_DEVICES])
  tx = _build(name, 0.9, False, axis_name="data", min_size=100)
  params = {key: np.zeros(size, np.float32) for key, size in SIZES.items()}
  state = hggjax.shard_state(tx.init(params), mesh, "data")
  specs = hggjax.state_specs(state, "data")

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("data"), specs),
                     out_specs=(P(), specs))
  def step(grads, state):
    return tx.update(jax.tree.map(lambda g: g[0], grads), state)

  local = _build(name, 0.9, False, min_size=100)
  local_update = jax.jit(functools.partial(local.update))
  local_states = [local.init(params) for _ in range(NUM_DEVICES)]
  sharding = NamedSharding(mesh, P("data"))
  for t in range(3):
    per_device = [_grads(10 * t + d, poison=("long", np.nan) if (t == 1 and d == 1) else None)
                  for d in range(NUM_DEVICES)]
    grads = {key: np.stack([g[key] for g in per_device]) for key in SIZES}
    out, state = step(jax.device_put(grads, sharding), state)
    expected = {key: 0.0 for key in SIZES}
    for d in range(NUM_DEVICES):
      sent, local_states[d] = local_update(per_device[d], local_states[d], device_index=d)
      for key in SIZES:
        expected[key] = expected[key] + np.asarray(sent[key])
    nonfinite = np.asarray(hggjax.stats(state)["nonfinite"])
    np.testing.assert_array_equal(nonfinite, [int(t == 1 and d == 1) for d in range(NUM_DEVICES)])
    for key in SIZES:
      np.testing.assert_allclose(np.asarray(out[key]), expected[key] / NUM_DEVICES,
                                 rtol=1e-6, atol=1e-7, err_msg=(key, t))
    for d in range(NUM_DEVICES):  # every device's state is what it would be alone
      mine = jax.tree.map(lambda x, d=d: np.asarray(x)[d], state)
      for a, b in zip(_state_arrays(local_states[d]), _state_arrays(mine)):
        np.testing.assert_array_equal(a, b)


def test_composes_with_optax_apply_if_finite():
  """apply_if_finite around the chain skips the optimizer's step too (it checks the
  gradients); the compressor state it keeps is the one from before the bad step."""
  tx = optax.apply_if_finite(optax.chain(hggjax.topk(0.1), optax.sgd(0.1, momentum=0.9)), 3)
  params = {"w": jnp.ones(100)}
  update = jax.jit(tx.update)
  _, state = update({"w": jnp.linspace(-1.0, 1.0, 100)}, tx.init(params), params)
  updates, bad = update({"w": jnp.full(100, jnp.nan)}, state, params)
  assert not np.any(np.asarray(updates["w"])) and int(bad.notfinite_count) == 1
  for a, b in zip(jax.tree.leaves(state.inner_state), jax.tree.leaves(bad.inner_state)):
    np.testing.assert_array_equal(a, b)
