"""Random-k: k uniformly drawn positions, a baseline."""

import jax.numpy as jnp

from hggjax.kernels.sampling import strided_sample
from hggjax.payload import Selection
from hggjax.selectors.base import Selector, no_history, stateless


def random_k() -> Selector:
  """k positions drawn uniformly (each with probability k/n, no duplicates).

  References:
    Stich, Cordonnier & Jaggi, `Sparsified SGD with Memory
    <https://arxiv.org/abs/1809.07599>`_, 2018
  """

  def select(x, k, key):
    idx = strided_sample(key, x.shape[0], k)
    return Selection(idx, jnp.int32(k), jnp.float32(0), no_history())

  return stateless(select)
