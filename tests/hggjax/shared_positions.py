"""Setup shared by the tests of the exchanges that sum values at shared positions
("leader_mask", "union_mask"): a topk update under shard_map, per-device gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import hggjax
from tests.conftest import NUM_DEVICES
from tests.hggjax import helpers

SHAPES = {"b": (10,), "w": (64, 32)}
DENSITY = 0.05


def sharded_update(exchange: str, dtype=jnp.float32, shapes=SHAPES):
  """(mesh, sharded state, jitted shard_map update) of topk at DENSITY over "data"."""
  mesh = jax.make_mesh((NUM_DEVICES,), ("data",), devices=jax.devices()[:NUM_DEVICES])
  tx = hggjax.topk(DENSITY, axis_name="data", exchange=exchange)
  params = {k: jnp.zeros(s, dtype) for k, s in shapes.items()}
  state = hggjax.shard_state(tx.init(params), mesh, "data")
  specs = hggjax.state_specs(state, "data")

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("data"), specs),
                     out_specs=(P(), specs))
  def update(grads, state):
    return tx.update(jax.tree.map(lambda g: g[0], grads), state)
  return mesh, state, update


def device_grads(step: int, shapes=SHAPES, dtype=np.float32) -> dict[str, np.ndarray]:
  """Each leaf as [NUM_DEVICES, *shape]: a different gradient per device and step."""
  per = [helpers.gradients(100 * step + d, shapes=shapes, dtype=dtype) for d in range(NUM_DEVICES)]
  return {k: np.stack([g[k] for g in per]) for k in shapes}
