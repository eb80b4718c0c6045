"""Error feedback and momentum correction (`hggjax.error_feedback`): exact references."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import hggjax
from tests.conftest import NUM_DEVICES
from tests.hggjax import helpers

M = 0.9


def test_at_density_one_it_is_sgd_with_momentum():
  """Nothing left unsent: chain(topk(1.0, momentum=m), sgd) == sgd(momentum=m)."""
  params = jax.tree.map(jnp.zeros_like, helpers.gradients(0))
  corrected = optax.chain(hggjax.topk(1.0, momentum=M, **helpers.EXACT_WIRE), optax.sgd(0.1))
  plain = optax.sgd(0.1, momentum=M)
  s1, s2 = corrected.init(params), plain.init(params)
  for step in range(4):
    grads = helpers.gradients(step)
    u1, s1 = jax.jit(corrected.update)(grads, s1)
    u2, s2 = jax.jit(plain.update)(grads, s2)
    chex.assert_trees_all_close(u1, u2, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["topk", "hggtopk", "randomkec"])
def test_velocity_and_error_feedback_identity_are_exact(name):
  """u' = m u + g (up to XLA's fused multiply-add), and u' + residual == sent + residual',
  bit for bit."""
  grads0 = helpers.gradients(0)
  tx = hggjax.get_compressor(name, density=0.05, momentum=M)
  state = tx.init(grads0)
  update = jax.jit(tx.update)
  names = sorted(grads0)  # dict leaves flatten in key order
  for step in range(3):
    grads = helpers.gradients(step)
    sent, new = update(grads, state)
    for i, leaf in enumerate(names):
      u = np.asarray(new.velocity[i])
      np.testing.assert_allclose(
          u, M * np.asarray(state.velocity[i]) + np.asarray(grads[leaf]), rtol=1e-6, atol=1e-6)
      np.testing.assert_array_equal(
          u + np.asarray(state.residual[i]),
          np.asarray(sent[leaf]) + np.asarray(new.residual[i]), err_msg=leaf)
    state = new


def test_without_momentum_there_is_no_velocity():
  tx = hggjax.hggtopk(0.05)
  assert tx.init(helpers.gradients(0)).velocity is None


def test_dense_leaves_and_bfloat16_keep_their_dtype():
  grads = {"w": jnp.ones((300,), jnp.bfloat16), "b": jnp.ones((3,), jnp.bfloat16)}
  tx = hggjax.topk(0.1, momentum=M, min_size=10)  # "b" goes dense
  state = tx.init(grads)
  for _ in range(2):
    out, state = jax.jit(tx.update)(grads, state)
  chex.assert_trees_all_equal_shapes_and_dtypes(out, grads)
  # The velocity stays float32; what travels is rounded to the leaf's bfloat16.
  np.testing.assert_array_equal(out["b"], jnp.full(3, 1 + M, jnp.bfloat16))
  assert state.velocity[0].dtype == jnp.float32


@pytest.mark.parametrize("name", ["none", "hggtopk"])
def test_sharded_equals_mean_of_local_devices(name):
  """Each device keeps its own velocity; the exchange averages what they send."""
  mesh = jax.make_mesh((NUM_DEVICES,), ("data",), devices=jax.devices()[:NUM_DEVICES])
  shapes = {"bias": (16,), "dense": (64, 32)}
  steps = [{k: np.stack([helpers.gradients(10 * s + d, shapes=shapes)[k]
                         for d in range(NUM_DEVICES)]) for k in shapes} for s in range(3)]
  first = jax.tree.map(lambda g: g[0], steps[0])
  tx = hggjax.get_compressor(name, density=0.05, momentum=M, axis_name="data")
  state = hggjax.shard_state(tx.init(first), mesh, "data")
  specs = hggjax.state_specs(state, "data")

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("data"), specs),
                     out_specs=(P(), specs))
  def update(grads, state):
    return tx.update(jax.tree.map(lambda g: g[0], grads), state)

  local = hggjax.get_compressor(name, density=0.05, momentum=M)
  local_states = [local.init(first) for _ in range(NUM_DEVICES)]
  for grads in steps:
    out, state = update(jax.device_put(grads, NamedSharding(mesh, P("data"))), state)
    outs = []
    for d in range(NUM_DEVICES):
      o, local_states[d] = jax.jit(local.update)(
          jax.tree.map(lambda g: g[d], grads), local_states[d], device_index=d)
      outs.append(o)
    for leaf in shapes:
      expected = sum(np.asarray(o[leaf]) for o in outs) / NUM_DEVICES
      np.testing.assert_allclose(np.asarray(out[leaf]), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad", [1.0, -0.1, True, "0.9"])
def test_momentum_outside_zero_one_says_what_to_do(bad):
  with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\)"):
    hggjax.topk(0.01, momentum=bad)


@pytest.mark.parametrize("name,momentum,scope", [
    ("topk", 0.0, "leaf"), ("hggtopk", M, "leaf"), ("gaussian", M, "global"),
    ("topk2", M, "leaf"), ("none", M, "leaf")])
def test_accumulated_is_what_the_selector_reads(name, momentum, scope):
  """hggjax.accumulated == sent + residual' bit for bit (error feedback), and equals the
  update at density 1 for the methods without it."""
  grads0 = helpers.gradients(0)
  kwargs = {} if name == "none" else {"density": 0.05, "scope": scope}
  tx = hggjax.get_compressor(name, momentum=momentum, min_size=10, **kwargs)
  state = tx.init(grads0)
  update = jax.jit(tx.update)
  accumulated = jax.jit(functools.partial(hggjax.accumulated, momentum=momentum))
  for step in range(3):
    grads = helpers.gradients(step)
    acc = accumulated(grads, (optax.EmptyState(), state))  # found inside a chain's state
    sent, state = update(grads, state)
    for i, leaf in enumerate(sorted(grads)):
      residual = state.residual[i] if state.residual is not None else None
      if residual is not None:
        np.testing.assert_array_equal(
            np.asarray(acc[leaf]), np.asarray(sent[leaf]) + np.asarray(residual), err_msg=leaf)
      elif name == "none":
        np.testing.assert_array_equal(np.asarray(acc[leaf]), np.asarray(sent[leaf]), err_msg=leaf)


@pytest.mark.parametrize("scope", ["leaf", "global"])
@pytest.mark.parametrize("name", ["topk", "hggtopk"])
def test_low_pass_residual_is_the_filtered_plain_residual(name, scope):
  """ScaleCom's filter: from the same state, residual' = (1 - b) residual + b x the plain
  compressor's residual' (acc - sent), and the same values are sent; a skipped
  (non-finite) step keeps the residual bit for bit."""
  b = 0.3
  kwargs = dict(density=0.05, scope=scope, **helpers.EXACT_WIRE)
  filtered = hggjax.get_compressor(name, residual_lowpass=b, **kwargs)
  plain = hggjax.get_compressor(name, **kwargs)
  grads0 = helpers.gradients(0)
  state = filtered.init(grads0)
  for step in range(3):
    grads = helpers.gradients(step)
    sent, new = jax.jit(filtered.update)(grads, state)
    want_sent, ref = jax.jit(plain.update)(grads, state)
    chex.assert_trees_all_equal(sent, want_sent)
    for old, got, unfiltered in zip(state.residual, new.residual, ref.residual):
      np.testing.assert_allclose(
          np.asarray(got), (1 - b) * np.asarray(old) + b * np.asarray(unfiltered),
          rtol=1e-6, atol=1e-7)
    state = new
  nan = jax.tree.map(lambda g: jnp.full_like(g, jnp.nan), grads0)
  _, skipped = jax.jit(filtered.update)(nan, state)
  chex.assert_trees_all_equal(skipped.residual, state.residual)


def test_low_pass_needs_error_feedback_and_a_share_in_0_1():
  with pytest.raises(ValueError, match="residual_lowpass"):
    hggjax.topk2(0.1, residual_lowpass=0.5)
  with pytest.raises(ValueError, match="residual_lowpass"):
    hggjax.topk(0.1, residual_lowpass=0.0)
  with pytest.raises(ValueError, match="mask_momentum"):
    hggjax.adamw(1e-3, mask_momentum=True, residual_lowpass=0.5)
