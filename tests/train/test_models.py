"""Every model, both input shapes, traced abstractly (no real initialisation: it is slow)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from train import models

EXPECTED_PARAMS_CIFAR10 = {  # the usual counts of these CIFAR-style networks
    "resnet18": 11_173_962, "resnet50": 23_520_842, "vgg11": 9_228_362,
    "vgg16": 14_724_042, "mobilenetv2": 2_237_770, "cnn": 268_698,
}


@pytest.mark.parametrize("name", sorted(models.MODELS))
@pytest.mark.parametrize("shape", [(32, 32, 3), (28, 28, 1)])
def test_model_shapes(name, shape):
  def build_and_run(x):
    model = models.create_model(name, num_classes=10, image_shape=shape, axis_name=None, seed=0)
    return model(x), nnx.state(model, nnx.Param)

  logits, params = jax.eval_shape(build_and_run, jnp.zeros((2,) + shape))
  assert logits.shape == (2, 10)
  if shape == (32, 32, 3):
    assert sum(p.size for p in jax.tree.leaves(params)) == EXPECTED_PARAMS_CIFAR10[name]


def test_batchnorm_synchronised_over_data_axis():
  """Same global batch, 1 or 4 devices: identical BatchNorm statistics and outputs."""
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
  import functools  # pylint: disable=import-outside-toplevel
  model = models.create_model("cnn", num_classes=10, image_shape=(8, 8, 1), axis_name="data",
                              seed=0)
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  x = jax.random.normal(jax.random.key(0), (16, 8, 8, 1)) * jnp.arange(16)[:, None, None, None]

  def run(n):
    mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])

    @jax.jit
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P(), P("data")),
                       out_specs=(P("data"), P()))
    def fwd(p, s, xb):
      m = nnx.merge(graphdef, p, s, copy=True)
      m.train()
      return m(xb), nnx.state(m, nnx.BatchStat)

    rep = NamedSharding(mesh, P())
    return fwd(jax.device_put(params, rep), jax.device_put(stats, rep),
               jax.device_put(x, NamedSharding(mesh, P("data"))))

  (y1, s1), (y4, s4) = jax.device_get(run(1)), jax.device_get(run(4))
  np.testing.assert_allclose(y1, y4, atol=1e-4)
  for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s4)):
    np.testing.assert_allclose(a, b, atol=1e-5)
