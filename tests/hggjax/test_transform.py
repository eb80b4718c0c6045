"""One battery over every registered compressor, plus exact references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hggjax
from hggjax import wire
from tests.hggjax import helpers

NAMES = sorted(hggjax.compressors)
EF = sorted(hggjax.ERROR_FEEDBACK)
NO_EF = sorted(set(NAMES) - set(EF) - {"none"})
DENSITY = 0.05


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_shapes_dtypes_finite_and_compiled_once(name, dtype):
  tx = hggjax.get_compressor(name, density=DENSITY)
  params = jax.tree.map(lambda g: jnp.zeros(g.shape, dtype), helpers.gradients(0))
  state = tx.init(params)
  update = jax.jit(tx.update)
  for step in range(3):
    grads = jax.tree.map(lambda g: jnp.asarray(g, dtype), helpers.gradients(step))
    out, state = update(grads, state)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, grads)
    chex.assert_tree_all_finite(out)
  assert update._cache_size() == 1  # no retrace over steps
  assert int(state.count) == 3


@pytest.mark.parametrize("name", ["topk", "topk2"])
def test_topk_equals_numpy_reference(name):
  grads = helpers.gradients(1)
  tx = hggjax.get_compressor(name, density=DENSITY, **helpers.EXACT_WIRE)
  out, state = jax.jit(tx.update)(grads, tx.init(grads))
  for leaf, g in grads.items():
    expected = np.zeros(g.size, np.float32)
    pos = helpers.exact_topk_positions(g, helpers.k_of(DENSITY, g.size))
    expected[pos] = g.ravel()[pos]
    np.testing.assert_array_equal(np.asarray(out[leaf]).ravel(), expected, err_msg=leaf)
  assert int(state.stats.selected) == int(state.stats.k)


def test_topk_second_step_adds_residual_exactly():
  g1, g2 = helpers.gradients(1), helpers.gradients(2)
  tx = hggjax.topk(DENSITY, **helpers.EXACT_WIRE)
  _, state = tx.update(g1, tx.init(g1))
  out, _ = tx.update(g2, state)
  leaves, _ = jax.tree.flatten(g1)
  for i, name in enumerate(sorted(g1)):  # dict leaves flatten in key order
    acc = g2[name].ravel() + np.asarray(state.residual[i]).ravel()
    expected = np.zeros_like(acc)
    pos = helpers.exact_topk_positions(acc, helpers.k_of(DENSITY, acc.size))
    expected[pos] = acc[pos]
    np.testing.assert_array_equal(np.asarray(out[name]).ravel(), expected)


@pytest.mark.parametrize("name", EF)
@pytest.mark.parametrize("scope", ["leaf", "global"])
def test_error_feedback_identity_is_exact(name, scope):
  """acc == sent + new residual, bit for bit, over several steps."""
  tx = hggjax.get_compressor(name, density=DENSITY, scope=scope)
  grads0 = helpers.gradients(0)
  state = tx.init(grads0)
  update = jax.jit(tx.update)
  for step in range(3):
    grads = helpers.gradients(step)
    sent, new_state = update(grads, state)
    helpers.assert_error_feedback_exact(grads, state.residual, sent, new_state.residual)
    state = new_state
  assert 0 < int(state.stats.selected) <= int(state.stats.k)


@pytest.mark.parametrize("name", NO_EF + ["none"])
def test_variants_without_error_feedback_keep_no_residual(name):
  grads = helpers.gradients(0)
  tx = hggjax.get_compressor(name, density=DENSITY)
  state = tx.init(grads)
  assert state.residual is None
  assert optax.tree.get(state, "residual") is None


@pytest.mark.parametrize("name", sorted(set(NAMES) - {"none"}))
def test_sends_k_per_leaf_even_below_one_over_density(name):
  grads = {"bias": jnp.arange(1.0, 6.0), "scalar": jnp.float32(-2.0)}
  tx = hggjax.get_compressor(name, density=0.01)
  out, state = jax.jit(tx.update)(grads, tx.init(grads))
  assert int(state.stats.k) == 2  # one element per leaf
  assert int(state.stats.selected) >= 1
  assert float(out["scalar"]) == -2.0  # the only element of a scalar is always sent
  if name.startswith(("topk", "hgg", "redsync", "gaussian", "dgc")):
    np.testing.assert_array_equal(out["bias"], [0, 0, 0, 0, 5.0])


def test_none_is_identity_locally():
  grads = helpers.gradients(0)
  tx = hggjax.none()
  out, state = jax.jit(tx.update)(grads, tx.init(grads))
  chex.assert_trees_all_equal(out, grads)
  assert float(state.stats.sent_bytes) == float(state.stats.dense_bytes) == sum(g.nbytes for g in grads.values())


def test_bytes_and_counts_in_state():
  grads = helpers.gradients(0)
  tx = hggjax.topk(DENSITY, **helpers.EXACT_WIRE)
  _, state = tx.update(grads, tx.init(grads))
  ks = [helpers.k_of(DENSITY, g.size) for g in grads.values()]
  assert int(state.stats.k) == sum(ks)
  assert float(state.stats.sent_bytes) == sum(ks) * 8  # float32 value + int32 index per slot
  assert float(state.stats.dense_bytes) == sum(g.nbytes for g in grads.values())
  stats = hggjax.stats(optax.chain(tx).init(grads))
  assert set(stats) >= {"selected", "k", "sent_bytes", "dense_bytes", "threshold", "history_hits"}
  # The default wire: one float8 byte a value, a float32 scale per 256, packed positions.
  _, state = hggjax.topk(DENSITY).update(grads, tx.init(grads))
  fmt = wire.WireFormat("float8_e4m3fn", 256, "packed")
  assert float(state.stats.sent_bytes) == sum(
      4 * wire.row_words(k, g.size, 1, fmt) for k, g in zip(ks, grads.values()))


def test_bfloat16_values_travel_in_bfloat16():
  grads = jax.tree.map(lambda g: jnp.asarray(g, jnp.bfloat16), helpers.gradients(0))
  tx = hggjax.hggtopk(DENSITY, **helpers.EXACT_WIRE)
  _, state = tx.update(grads, tx.init(grads))
  # 2-byte values packed into int32 words (an odd count pads 2 bytes), int32 indices.
  ks = [helpers.k_of(DENSITY, g.size) for g in grads.values()]
  assert float(state.stats.sent_bytes) == sum(4 * (-(-k // 2) + k) for k in ks)
  assert float(state.stats.received_bytes) == 0  # no axis: nothing arrives
  assert all(r.dtype == jnp.float32 for r in state.residual)


def test_integer_leaves_pass_through_untouched():
  grads = {"w": jnp.ones(100), "steps": jnp.arange(3, dtype=jnp.int32)}
  tx = hggjax.hggtopk(0.1)
  out, state = tx.update(grads, tx.init(grads))
  np.testing.assert_array_equal(out["steps"], grads["steps"])
  assert int(state.stats.k) == 10
  assert state.residual[0] is None  # "steps" flattens first


def test_min_size_sends_small_leaves_dense():
  grads = helpers.gradients(0)
  tx = hggjax.topk(DENSITY, min_size=100)
  out, state = tx.update(grads, tx.init(grads))
  for name in ("scalar", "vector", "matrix", "rank3"):
    np.testing.assert_array_equal(out[name], grads[name])
  assert int(state.stats.k) == helpers.k_of(DENSITY, 7 * 7 * 3 * 64)


def test_global_scope_selects_over_all_leaves():
  grads = {"small": np.full(10, 100.0, np.float32), "big": np.ones(990, np.float32)}
  tx = hggjax.topk2(0.01, scope="global")
  out, state = tx.update(grads, tx.init(grads))
  assert int(state.stats.k) == 10 and state.stats.threshold.shape == (1,)
  np.testing.assert_array_equal(out["small"], grads["small"])  # all 10 largest live here
  assert not np.any(out["big"])


def test_chains_with_optax_and_jit():
  params = jax.tree.map(jnp.zeros_like, helpers.gradients(0))
  tx = optax.chain(hggjax.hggtopk(density=0.05), optax.sgd(0.1, momentum=0.9))
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: tx.update(g, s, p))
  for i in range(2):
    updates, state = step(params, state, helpers.gradients(i))
    params = optax.apply_updates(params, updates)
  chex.assert_tree_all_finite(params)
  assert int(optax.tree.get(state, "count")) == 2


@pytest.mark.parametrize("name", ["randomk", "randomkec"])
def test_random_selection_changes_per_step_and_per_device(name):
  g = {"w": jnp.ones(1000)}
  tx = hggjax.get_compressor(name, density=0.01)
  state = tx.init(g)
  update = jax.jit(tx.update)
  a, s1 = update(g, state, device_index=0)
  b, _ = update(g, s1, device_index=0)
  c, _ = update(g, state, device_index=1)
  assert not np.array_equal(a["w"] != 0, b["w"] != 0)
  assert not np.array_equal(a["w"] != 0, c["w"] != 0)


def test_randomk_is_uniform_and_has_no_duplicates():
  n, k = 1000, 50
  tx = hggjax.randomk(k / n)
  g = {"w": jnp.ones(n)}
  state = tx.init(g)
  update = jax.jit(tx.update)
  hits = np.zeros(n)
  for _ in range(400):
    out, state = update(g, state)
    chosen = np.asarray(out["w"]) != 0
    assert chosen.sum() == k  # k distinct positions
    hits += chosen
  # Each position is chosen with probability k/n = 0.05: 20 of 400 expected.
  assert hits.min() > 3 and hits.max() < 45
  assert abs(hits.mean() - 20) < 1e-9
