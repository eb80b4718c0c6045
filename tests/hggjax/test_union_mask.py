"""exchange="union_mask": every device's values at every device's positions."""

import functools

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
  return shared_positions.sharded_update("union_mask", dtype, shapes)


_grads = shared_positions.device_grads


def _union(acc: np.ndarray, skip=()) -> np.ndarray:
  """Sorted distinct positions of every (not skipped) device's top-k of acc[P, n]."""
  k = helpers.k_of(DENSITY, acc.shape[1])
  return np.unique(np.concatenate([helpers.exact_topk_positions(acc[d], k)
                                   for d in range(len(acc)) if d not in skip]))


def test_every_device_sends_its_values_at_the_union_of_every_devices_positions():
  mesh, state, update = _setup()
  for step in range(3):
    grads = _grads(step)
    residual = [np.asarray(r) for r in state.residual]
    out, state = update(jax.device_put(grads, NamedSharding(mesh, P("data"))), state)
    for i, name in enumerate(sorted(SHAPES)):
      acc = grads[name].reshape(NUM_DEVICES, -1) + residual[i].reshape(NUM_DEVICES, -1)
      pos = _union(acc)
      k = helpers.k_of(DENSITY, acc.shape[1])
      assert k < len(pos) <= NUM_DEVICES * k  # the devices chose differently
      sent = np.zeros_like(acc)
      sent[:, pos] = acc[:, pos]
      mean = np.zeros(acc.shape[1], np.float32)
      mean[pos] = np.sum(sent[:, pos], axis=0) * np.float32(1 / NUM_DEVICES)
      new = np.asarray(state.residual[i]).reshape(NUM_DEVICES, -1)
      np.testing.assert_array_equal(acc, sent + new, err_msg=name)  # error feedback exact
      np.testing.assert_array_equal(new[:, pos], 0)  # a shared position: no one keeps it
      np.testing.assert_allclose(np.asarray(out[name]).ravel(), mean, rtol=1e-6, atol=1e-7,
                                 err_msg=name)
    # What each device sent: its values at the union, each position once.
    assert int(np.asarray(hggjax.stats(state)["selected"])[0]) == sum(
        len(_union(grads[n].reshape(NUM_DEVICES, -1) + residual[i].reshape(NUM_DEVICES, -1)))
        for i, n in enumerate(sorted(SHAPES)))


def test_statistics_are_the_bytes_of_the_gather_and_the_reduction_in_the_hlo():
  shapes = {"b": (300,), "w": (200, 500)}
  mesh, state, update = _setup(shapes=shapes)
  grads = jax.device_put(_grads(0, shapes), NamedSharding(mesh, P("data")))
  _, new = update(grads, state)
  hlo = update.lower(grads, state).compile().as_text()
  kinds = {c["kind"] for c in hlo_bytes.collectives(hlo)}
  assert kinds == {"all-gather", "all-reduce"}
  gathered_sent, gathered_received = hlo_bytes.sent_and_received(hlo, kinds=("all-gather",))
  reduced = sum(c["bytes"] for c in hlo_bytes.collectives(hlo) if c["kind"] == "all-reduce")
  k = 5000 + 15  # w: 5% of 1e5; b: 5% of 300
  assert gathered_sent == 4 * k  # the positions, int32
  assert reduced == NUM_DEVICES * k * 4  # every device's values at every position, float32
  stats = hggjax.stats(new)
  assert set(np.asarray(stats["sent_bytes"]).tolist()) == {float(gathered_sent + reduced)}
  np.testing.assert_allclose(
      np.asarray(stats["received_bytes"]),
      gathered_received + 2 * (NUM_DEVICES - 1) / NUM_DEVICES * reduced)


def test_a_device_that_skips_a_step_adds_no_positions_and_keeps_its_residual():
  mesh, state, update = _setup()
  grads = _grads(0)
  grads["w"][1, 0, 0] = np.nan
  out, state = update(jax.device_put(grads, NamedSharding(mesh, P("data"))), state)
  np.testing.assert_array_equal(np.asarray(hggjax.stats(state)["nonfinite"]), [0, 1, 0, 0])
  acc = grads["w"].reshape(NUM_DEVICES, -1)
  pos = _union(acc, skip=(1,))
  got = np.asarray(out["w"]).ravel()
  np.testing.assert_array_equal(np.flatnonzero(got), pos)
  ok = [0, 2, 3]
  np.testing.assert_allclose(got[pos], np.sum(acc[ok][:, pos], axis=0) / NUM_DEVICES,
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(state.residual[1])[1], 0)  # nothing changed


@pytest.mark.parametrize("options", [{"value_dtype": "bfloat16"}, {"index_coding": "packed"}])
def test_wire_formats_are_refused_with_a_message(options):
  with pytest.raises(ValueError, match="exchange='union_mask' sums float32 values"):
    hggjax.topk(DENSITY, axis_name="data", exchange="union_mask", **options)


def test_two_levels_exchange_the_union_over_hosts():
  """A 2 x 4 mesh, equal gradients on a host's devices: the union is over the 2 hosts,
  one residual per host."""
  hosts, local = 2, NUM_DEVICES
  mesh = jax.make_mesh((hosts, local), ("hosts", "local"), devices=jax.devices()[:hosts * local])
  axes = ("hosts", "local")
  tx = hggjax.topk(DENSITY, axis_name=axes, exchange="union_mask")
  state = hggjax.shard_state(tx.init({k: jnp.zeros(s) for k, s in SHAPES.items()}), mesh, axes)
  specs = hggjax.state_specs(state, axes)

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(axes), specs),
                     out_specs=(P(axes), specs))
  def update(grads, state):
    out, state = tx.update(jax.tree.map(lambda g: g[0], grads), state)
    return jax.tree.map(lambda x: x[None], out), state

  per_host = {k: np.stack([helpers.gradients(h, shapes=SHAPES)[k] for h in range(hosts)])
              for k in SHAPES}
  grads = {k: np.repeat(g, local, axis=0) for k, g in per_host.items()}
  out, state = update(jax.device_put(grads, NamedSharding(mesh, P(axes))), state)
  for i, name in enumerate(sorted(SHAPES)):
    acc = per_host[name].reshape(hosts, -1)
    pos = _union(acc)
    mean = np.zeros(acc.shape[1], np.float32)
    mean[pos] = np.sum(acc[:, pos], axis=0) * np.float32(1 / hosts)
    for d in range(hosts * local):
      np.testing.assert_allclose(np.asarray(out[name])[d].ravel(), mean, rtol=1e-6, atol=1e-7)
    rest = acc.copy()
    rest[:, pos] = 0
    np.testing.assert_array_equal(np.asarray(state.residual[i]).reshape(hosts, -1), rest)
