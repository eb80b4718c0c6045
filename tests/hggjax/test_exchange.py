"""The sparse exchange on 4 fake CPU devices: shard_map, pmap and a local reference."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import hggjax
from tests.conftest import NUM_DEVICES
from tests.hggjax import helpers

NAMES = sorted(hggjax.compressors)
SHAPES = {"scalar": (), "bias": (16,), "conv": (3, 3, 8, 16), "dense": (64, 32)}


def _per_device_grads(step: int, shapes=SHAPES) -> dict[str, np.ndarray]:
  """Gradients with a leading device axis: every device sees different values."""
  per_device = [helpers.gradients(100 * step + d, shapes=shapes) for d in range(NUM_DEVICES)]
  return {name: np.stack([g[name] for g in per_device]) for name in shapes}


def _mesh():
  return jax.make_mesh((NUM_DEVICES,), ("data",), devices=jax.devices()[:NUM_DEVICES])


def _shard_map_update(tx, mesh, state):
  specs = hggjax.state_specs(state, "data")

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("data"), specs), out_specs=(P(), specs))
  def update(grads, state):
    return tx.update(jax.tree.map(lambda g: g[0], grads), state)

  return update


def _local_reference(name, grads_steps, **kwargs):
  """Per device: the same compressor without an axis, playing device d.

  Returns, per step, the mean of the per-device decompressions (no collective),
  and per device the list of (acc, sent, residual) for every step.
  """
  tx = hggjax.get_compressor(name, density=0.05, **kwargs)
  update = jax.jit(tx.update)
  states = [tx.init(jax.tree.map(lambda g: g[0], grads_steps[0])) for _ in range(NUM_DEVICES)]
  means = []
  for grads in grads_steps:
    outs = []
    for d in range(NUM_DEVICES):
      out, states[d] = update(jax.tree.map(lambda g: g[d], grads), states[d], device_index=d)
      outs.append(out)
    means.append(jax.tree.map(lambda *o: sum(np.asarray(x, np.float32) for x in o) / NUM_DEVICES, *outs))
  return means, states


@pytest.mark.parametrize("name", NAMES)
def test_shard_map_equals_mean_of_local_decompressions_and_pmap(name):
  _check_against_local_reference(name, SHAPES)


# Large enough for the selectors' fast paths (radix.MIN_FAST_N and above).
LARGE = {"big": (3, 65_536), "bias": (10,)}


# The variants without error feedback select with another name's selector (topk2:
# topk's, gaussian2: gaussian's, randomk: randomkec's): they run with -m slow only, and
# every selector's fast path stays in the default suite.
_SAME_SELECTOR = {"topk2", "gaussian2", "randomk"}


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n in _SAME_SELECTOR else n
    for n in sorted(set(NAMES) - {"none"})])
def test_large_leaves_match_the_local_reference_under_shard_map(name):
  _check_against_local_reference(name, LARGE)


def _check_against_local_reference(name, shapes):
  mesh = _mesh()
  grads_steps = [_per_device_grads(s, shapes) for s in range(2)]
  tx = hggjax.get_compressor(name, density=0.05, axis_name="data")
  state = hggjax.shard_state(tx.init(jax.tree.map(lambda g: g[0], grads_steps[0])), mesh, "data")
  update = _shard_map_update(tx, mesh, state)
  pmapped = jax.pmap(tx.update, axis_name="data", devices=jax.devices()[:NUM_DEVICES])
  pstate = jax.tree.map(lambda x: jnp.stack([x[0]] * NUM_DEVICES)[:, None],
                        tx.init(jax.tree.map(lambda g: g[0], grads_steps[0])))
  means, _ = _local_reference(name, grads_steps)
  sharding = NamedSharding(mesh, P("data"))
  for grads, expected in zip(grads_steps, means):
    out, state = update(jax.device_put(grads, sharding), state)
    pout, pstate = pmapped(grads, pstate)
    for leaf in shapes:
      np.testing.assert_allclose(np.asarray(out[leaf]), expected[leaf], rtol=1e-6, atol=1e-7, err_msg=leaf)
      for d in range(NUM_DEVICES):  # pmap: every device holds the same mean
        np.testing.assert_allclose(np.asarray(pout[leaf][d]), np.asarray(out[leaf]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", sorted(hggjax.ERROR_FEEDBACK))
def test_error_feedback_identity_on_every_device(name):
  mesh = _mesh()
  grads_steps = [_per_device_grads(s) for s in range(2)]
  tx = hggjax.get_compressor(name, density=0.05, axis_name="data")
  state = hggjax.shard_state(tx.init(jax.tree.map(lambda g: g[0], grads_steps[0])), mesh, "data")
  update = _shard_map_update(tx, mesh, state)
  local = hggjax.get_compressor(name, density=0.05)
  local_update = jax.jit(local.update)
  names = sorted(SHAPES)
  for grads in grads_steps:
    _, new_state = update(jax.device_put(grads, NamedSharding(mesh, P("data"))), state)
    for d in range(NUM_DEVICES):
      old_d = jax.tree.map(lambda x: np.asarray(x)[d], state)  # this device's state, no device axis
      sent, _ = local_update(jax.tree.map(lambda g: g[d], grads), old_d, device_index=d)
      for i, leaf in enumerate(names):
        acc = grads[leaf][d] + np.asarray(old_d.residual[i])
        np.testing.assert_array_equal(
            acc, np.asarray(sent[leaf]) + np.asarray(new_state.residual[i])[d], err_msg=(leaf, d))
    state = new_state


@pytest.mark.parametrize("name,dtype,value_bytes", [
    ("topk", jnp.float32, 4), ("hggtopk", jnp.float32, 4), ("hggtopk", jnp.bfloat16, 2)])
def test_reported_bytes_are_what_the_gather_moves(name, dtype, value_bytes):
  mesh = _mesh()
  grads = jax.tree.map(lambda g: jnp.asarray(g, dtype), _per_device_grads(0))
  tx = hggjax.get_compressor(name, density=0.05, axis_name="data", **helpers.EXACT_WIRE)
  state = hggjax.shard_state(tx.init(jax.tree.map(lambda g: g[0], grads)), mesh, "data")
  _, state = _shard_map_update(tx, mesh, state)(jax.device_put(grads, NamedSharding(mesh, P("data"))), state)
  ks = [helpers.k_of(0.05, int(np.prod(s))) for s in SHAPES.values()]
  stats = hggjax.stats(state)
  np.testing.assert_array_equal(stats["k"], [sum(ks)] * NUM_DEVICES)
  # Each device sends C slots of (value, int32 index), the values packed into int32
  # words (a bfloat16 row of odd C pads 2 bytes); all P payloads arrive everywhere.
  row = [4 * (-(-k * value_bytes // 4) + k) for k in ks]
  np.testing.assert_array_equal(stats["sent_bytes"], [sum(row)] * NUM_DEVICES)
  np.testing.assert_array_equal(stats["received_bytes"], [(NUM_DEVICES - 1) * sum(row)] * NUM_DEVICES)
  dense = sum(int(np.prod(s)) for s in SHAPES.values()) * value_bytes
  np.testing.assert_array_equal(stats["dense_bytes"], [dense] * NUM_DEVICES)


def test_no_dense_collective_in_the_compiled_exchange():
  mesh = _mesh()
  grads = _per_device_grads(0)
  tx = hggjax.hggtopk(0.05, axis_name="data")
  state = hggjax.shard_state(tx.init(jax.tree.map(lambda g: g[0], grads)), mesh, "data")
  update = _shard_map_update(tx, mesh, state)
  hlo = update.lower(jax.device_put(grads, NamedSharding(mesh, P("data"))), state).as_text()
  assert "all_gather" in hlo or "all-gather" in hlo
  assert "all_reduce" not in hlo and "all-reduce" not in hlo and "psum" not in hlo


def test_update_with_an_unbound_axis_says_what_to_do():
  tx = hggjax.topk(0.1, axis_name="data")
  grads = {"w": jnp.ones(10)}
  with pytest.raises(ValueError, match="shard_map or jax.pmap"):
    tx.update(grads, tx.init(grads))


def test_shard_state_needs_an_axis_named_compressor():
  tx = hggjax.topk(0.1)
  with pytest.raises(ValueError, match="axis_name='data'"):
    hggjax.shard_state(tx.init({"w": jnp.ones(10)}), _mesh(), "data")


def test_train_step_as_in_readme_sends_no_dense_gradient():
  """The README's shard_map step: the only all-reduce left is the scalar loss."""
  mesh = _mesh()
  params = {"w": jnp.zeros((256, 10)), "b": jnp.zeros(10)}
  tx = hggjax.hggtopk(0.01, axis_name="data")
  state = hggjax.shard_state(tx.init(params), mesh, "data")
  specs = hggjax.state_specs(state, "data")

  def loss_fn(p, x, y):
    return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), specs, P("data"), P("data")),
                     out_specs=(P(), specs, P()))
  def step(params, state, x, y):
    local = jax.lax.pcast(params, "data", to="varying")
    loss, grads = jax.value_and_grad(loss_fn)(local, x, y)
    updates, state = tx.update(grads, state, params)
    return jax.tree.map(jnp.add, params, updates), state, jax.lax.pmean(loss, "data")

  batch = NamedSharding(mesh, P("data"))
  x = jax.device_put(jnp.ones((16, 256)), batch)
  y = jax.device_put(jnp.ones((16, 10)), batch)
  hlo = step.lower(params, state, x, y).compile().as_text()
  # XLA may combine all-reduces into one tuple: look at every operand shape.
  results = re.findall(r"= (.*?) all-reduce(?:-start)?\(", hlo)
  shapes = [s for r in results for s in re.findall(r"\w+\[[\d,]*\]", r)]
  assert shapes and all(s.endswith("[]") for s in shapes), shapes  # the loss, nothing else
  assert "all-gather" in hlo


def _payloads(p, m, c, n, seed, dtype=np.float32):
  """P devices' payloads: unique positions per device and row (overlapping across
  devices), the last slots unused (index n)."""
  rng = np.random.default_rng(seed)
  idx = np.stack([[rng.choice(n, c, replace=False) for _ in range(m)] for _ in range(p)])
  idx[:, :, -2:] = n
  vals = rng.standard_normal((p, m, c)).astype(dtype)
  vals[:, :, -2:] = 0
  return vals, idx.astype(np.int32)


def _numpy_mean(vals, idx, n):
  """Scatter every device's payload into zeros in device order, then scale by 1/P."""
  p, m, _ = vals.shape
  total = np.zeros((m, n + 1), np.float32)
  for d in range(p):
    for r in range(m):
      np.add.at(total[r], idx[d, r], vals[d, r].astype(np.float32))
  return total[:, :n] * np.float32(1.0 / p)


@pytest.mark.parametrize("p,m", [(1, 1), (2, 1), (3, 1), (4, 1), (8, 1), (4, 3), (3, 2)])
def test_densify_mean_is_bit_identical_to_scatter_then_scale(p, m):
  n, c = 5000, 700  # 700 of 5000 per device: many positions hit by several devices
  vals, idx = _payloads(p, m, c, n, seed=10 * p + m)
  got = jax.jit(hggjax.exchange.densify_mean, static_argnums=2)(vals, idx, n)
  assert got.shape == (m, n) and got.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(got), _numpy_mean(vals, idx, n))


def test_densify_mean_widens_bfloat16_values_exactly():
  vals, idx = _payloads(4, 1, 300, 1000, seed=1)
  vals = np.asarray(jnp.asarray(vals, jnp.bfloat16))
  got = hggjax.exchange.densify_mean(jnp.asarray(vals), jnp.asarray(idx), 1000)
  np.testing.assert_array_equal(np.asarray(got), _numpy_mean(vals, idx, 1000))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sparse_mean_under_shard_map_gathers_the_wire_dtype(dtype):
  mesh = _mesh()
  n, c = 3000, 200
  vals, idx = _payloads(NUM_DEVICES, 2, c, n, seed=5)
  vals = np.asarray(jnp.asarray(vals, dtype))

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P())
  def mean(v, i):
    mean, delivered = hggjax.exchange.sparse_mean(hggjax.payload.Payload(v[0], i[0]), n, "data")
    return mean

  sharding = NamedSharding(mesh, P("data"))
  args = jax.device_put((vals, idx), sharding)
  np.testing.assert_array_equal(np.asarray(mean(*args)), _numpy_mean(vals, idx, n))
  hlo = mean.lower(*args).compile().as_text()
  gathers = re.findall(r"= (\w+\[[\d,]*\])\{[^}]*\} all-gather", hlo)
  # One collective: values (2 bytes each for bfloat16, 4 for float32) and int32 indices
  # packed into int32 words, so XLA cannot widen bfloat16 before it crosses the wire.
  words = c * jnp.dtype(dtype).itemsize // 4 + c
  assert gathers == [f"s32[{NUM_DEVICES},2,{words}]"], gathers
