"""The sampled low cut brackets k."""

import jax.numpy as jnp
import numpy as np
import pytest

from hggjax.kernels import sampling
from tests.hggjax.helpers import draw, k_of

DISTRIBUTIONS = ("normal", "laplace", "t3")


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_low_cut_brackets_k(distribution):
  n = 1 << 18
  k = k_of(0.01, n)
  x = draw(distribution, n, seed=4)
  low, cap = sampling.low_cut(jnp.asarray(x), k)
  count = int(np.sum(np.abs(x) >= float(low)))
  assert k <= count <= cap < n // 2


def test_sample_rate_is_a_clipped_power_of_two():
  assert sampling.sample_rate(10, 64, 128) == 1
  assert sampling.sample_rate(64 * 5, 64, 128) == 4
  assert sampling.sample_rate(10**9, 64, 128) == 128
