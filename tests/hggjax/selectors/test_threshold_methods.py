"""Exact top-k and the threshold methods (Gaussian-k, RedSync, DGC) on their packed
paths: what they send against NumPy."""

import functools

import jax
import numpy as np
import pytest

from hggjax import selectors
from tests.hggjax.helpers import draw, exact_topk_positions, k_of

N = 1 << 15
KEY = jax.random.PRNGKey(0)
DISTRIBUTIONS = ("normal", "laplace", "t3")
# min_fast_n lowered so that the packed paths run on these short vectors.
SELECTORS = {
    "topk": lambda: selectors.exact_topk(min_fast_n=1024),
    "gaussian": lambda: selectors.gaussian(min_fast_n=1024),
    "redsync": lambda: selectors.redsync(min_fast_n=1024),
    "redsynctrim": lambda: selectors.redsync_trim(min_fast_n=1024),
    "dgcsampling": lambda: selectors.dgc_sampling(min_fast_n=1024),
}


@functools.cache
def _kernel(name: str, k: int):
  selector = SELECTORS[name]()
  return jax.jit(lambda x: selector.select(x, k, selector.init(1), KEY)[0])


def _valid(sel, n=N):
  idx = np.asarray(sel.indices)
  valid = idx[idx < n]
  assert idx.dtype == np.int32 and len(set(valid.tolist())) == valid.size
  return valid


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_exact_topk_fast_path(distribution):
  k = k_of(0.01, N)
  x = draw(distribution, N, seed=4)
  sel = _kernel("topk", k)(x)
  valid = _valid(sel)
  np.testing.assert_array_equal(np.sort(valid), np.sort(exact_topk_positions(x, k)))
  assert float(sel.threshold) == np.abs(x[valid]).min()
  assert int(sel.passed) == k


@pytest.mark.parametrize("name", ["gaussian", "redsync", "dgcsampling"])
def test_threshold_methods_send_the_largest_that_pass(name):
  k = k_of(0.01, N)
  x = draw("normal", N, seed=5)
  sel = _kernel(name, k)(x)
  valid = _valid(sel)
  a = np.abs(x)
  assert valid.size == min(k, int(sel.passed))
  assert float(sel.threshold) == a[valid].min()
  # Nothing left out that passed is larger than what was sent.
  rest = np.setdiff1d(np.flatnonzero(a >= float(sel.threshold)), valid)
  assert rest.size == 0 or a[rest].max() <= a[valid].min()


@pytest.mark.parametrize("name", sorted(SELECTORS))
def test_selectors_without_memory_carry_nothing(name):
  selector = SELECTORS[name]()
  assert selector.init(3) == ()
  assert not selector.separate_groups
