"""Exact prefix sums (`kernels.scan.cumsum`) against NumPy."""

import jax
import numpy as np
import pytest

from hggjax.kernels import scan


@pytest.mark.parametrize("length", [1, 33, 1000, 70_000])
def test_cumsum_is_exact(length):
  rng = np.random.default_rng(length)
  for high in (33, 2**31 // length):
    v = rng.integers(0, high, size=length).astype(np.int32)
    got = jax.jit(scan.cumsum)(v)
    np.testing.assert_array_equal(got, np.cumsum(v.astype(np.int64)))
