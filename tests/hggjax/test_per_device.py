"""`per_device`: a transformation whose state stays with each device, under shard_map."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import hggjax
from tests.conftest import NUM_DEVICES
from tests.hggjax import helpers


def test_adam_per_device_then_topk_equals_each_device_alone():
  mesh = jax.make_mesh((NUM_DEVICES,), ("data",), devices=jax.devices()[:NUM_DEVICES])
  shapes = {"w": (30, 20), "b": (20,)}

  def chain(axis):
    return optax.chain(hggjax.per_device(optax.scale_by_adam(), axis_name=axis),
                       hggjax.topk(0.1, axis_name=axis), optax.scale(-0.1))

  tx, local = chain("data"), chain(None)
  params = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
  state = hggjax.shard_state(tx.init(params), mesh, "data")
  specs = hggjax.state_specs(state, "data")
  assert jax.tree.leaves(specs[0])[0] == P("data")  # Adam's moments per device

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("data"), specs),
                     out_specs=(P(), specs))
  def step(grads, state):
    return tx.update(jax.tree.map(lambda g: g[0], grads), state)

  locals_ = [local.init(params) for _ in range(NUM_DEVICES)]
  update = jax.jit(local.update)
  for t in range(3):
    per = [helpers.gradients(10 * t + d, shapes=shapes) for d in range(NUM_DEVICES)]
    grads = {k: np.stack([g[k] for g in per]) for k in shapes}
    out, state = step(jax.device_put(grads, NamedSharding(mesh, P("data"))), state)
    sent = []
    for d in range(NUM_DEVICES):
      u, locals_[d] = update(per[d], locals_[d])
      sent.append(u)
    for k in shapes:
      np.testing.assert_allclose(out[k], sum(np.asarray(u[k]) for u in sent) / NUM_DEVICES,
                                 rtol=1e-6, atol=1e-7)


def test_without_an_axis_it_is_the_inner_transformation():
  tx = hggjax.per_device(optax.scale_by_adam())
  g = {"w": jnp.arange(4.0)}
  u, _ = tx.update(g, tx.init(g))
  ref, _ = optax.scale_by_adam().update(g, optax.scale_by_adam().init(g))
  np.testing.assert_array_equal(u["w"], ref["w"])


def test_two_level_keeps_adam_per_device_and_the_residual_per_host():
  """On a (hosts, local) mesh the per-device state has one slot per device (each device
  sees its own gradient before the compressor's mean over "local"), the compressor's one
  per host; the update equals Adam per device, then topk of each host's mean."""
  hosts, local_n = 2, NUM_DEVICES // 2
  axes = ("hosts", "local")
  mesh = jax.make_mesh((hosts, local_n), axes, devices=jax.devices()[:NUM_DEVICES])
  shapes = {"w": (30, 20)}

  def chain(axis):
    return optax.chain(hggjax.per_device(optax.scale_by_adam(), axis_name=axis),
                       hggjax.topk(0.1, axis_name=axis), optax.scale(-0.1))

  tx = chain(axes)
  params = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
  state = hggjax.shard_state(tx.init(params), mesh, axes)
  specs = hggjax.state_specs(state, axes)
  assert jax.tree.leaves(specs[0])[0] == P(axes)
  assert jax.tree.leaves(specs[1])[0] == P("hosts")
  assert jax.tree.leaves(state[0])[0].shape[0] == NUM_DEVICES
  assert jax.tree.leaves(state[1])[0].shape[0] == hosts

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(axes), specs),
                     out_specs=(P(), specs))
  def step(grads, state):
    return tx.update(jax.tree.map(lambda g: g[0], grads), state)

  adams = [optax.scale_by_adam() for _ in range(NUM_DEVICES)]
  adam_states = [a.init(params) for a in adams]
  residual = [hggjax.topk(0.1).init(params) for _ in range(hosts)]
  topk_local = hggjax.topk(0.1)
  for t in range(3):
    per = [helpers.gradients(10 * t + d, shapes=shapes) for d in range(NUM_DEVICES)]
    grads = {k: np.stack([g[k] for g in per]) for k in shapes}
    out, state = step(jax.device_put(grads, NamedSharding(mesh, P(axes))), state)
    sent = []
    for h in range(hosts):
      steps = []
      for d in range(h * local_n, (h + 1) * local_n):
        u, adam_states[d] = adams[d].update(per[d], adam_states[d])
        steps.append(u)
      mean = jax.tree.map(lambda *u: sum(u) / local_n, *steps)
      u, residual[h] = topk_local.update(mean, residual[h])
      sent.append(u)
    for k in shapes:
      np.testing.assert_allclose(out[k], -0.1 * sum(np.asarray(u[k]) for u in sent) / hosts,
                                 rtol=1e-5, atol=1e-7)
