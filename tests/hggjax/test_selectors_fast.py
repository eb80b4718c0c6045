"""Fast selection paths: same answers as the reference paths, and the quality bars.

Vectors are small (2**15) and `min_fast_n` is lowered so that the fast paths run;
speed is measured by `benchmarks/selection.py`, never here.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hggjax import hgg, radix, selectors
from tests.hggjax.helpers import draw, exact_topk_positions, k_of

DISTRIBUTIONS = ("normal", "laplace", "t3")
N = 1 << 15
KEY = jax.random.PRNGKey(0)


@functools.cache
def _kernel(name: str, k: int):
  make = {
      "hgg_fast": lambda: hgg.hgg_topk(min_fast_n=1024),
      "hgg_reference": lambda: hgg.hgg_topk(min_fast_n=1 << 62),
      "topk_fast": lambda: selectors.exact_topk(min_fast_n=1024),
      "gaussian": selectors.gaussian,
      "redsync": selectors.redsync,
      "dgcsampling": selectors.dgc_sampling,
  }[name]()
  return jax.jit(lambda x, prev: make(x, k, prev, KEY))


def _valid(sel, n=N):
  idx = np.asarray(sel.indices)
  valid = idx[idx < n]
  assert idx.dtype == np.int32 and len(set(valid.tolist())) == valid.size
  return valid


def _recall(valid, x, k):
  return np.isin(exact_topk_positions(x, k), valid).sum() / k


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("density", [0.01, 0.05])
def test_hggtopk_fast_path_quality(distribution, density):
  k = k_of(density, N)
  x = draw(distribution, N, seed=1)
  sel = _kernel("hgg_fast", k)(x, jnp.float32(0))
  valid = _valid(sel)
  assert 0.99 * k <= valid.size <= k
  assert _recall(valid, x, k) >= 0.995
  assert float(sel.threshold) == pytest.approx(np.abs(x[valid]).min())
  assert not bool(sel.history_hit)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_hggtopk_fast_path_matches_reference(distribution):
  k = k_of(0.01, N)
  x = draw(distribution, N, seed=2)
  fast, ref = _kernel("hgg_fast", k), _kernel("hgg_reference", k)
  # Cold start, an accepted history, a history that misses (window search), and
  # cuts passing k + tol_k (accepted) and k + tol_k + 1 (rejected): the fast path's
  # sample must leave those to the exact count.
  cold = ref(x, jnp.float32(0))
  tol_k = max(1, int(0.01 * k))
  ranked = np.sort(np.abs(np.asarray(x)))[::-1]
  edge_in, edge_out = jnp.float32(ranked[k + tol_k - 1]), jnp.float32(ranked[k + tol_k])
  assert bool(fast(x, edge_in).history_hit) and not bool(fast(x, edge_out).history_hit)
  for prev in (jnp.float32(0), cold.threshold, cold.threshold * 0.8, edge_in, edge_out):
    a, b = fast(x, prev), ref(x, prev)
    np.testing.assert_array_equal(np.sort(_valid(a)), np.sort(_valid(b)))
    assert int(a.passed) == int(b.passed)
    assert bool(a.history_hit) == bool(b.history_hit)
    np.testing.assert_allclose(float(a.threshold), float(b.threshold))
  assert bool(fast(x, cold.threshold).history_hit)
  assert not bool(fast(x, cold.threshold * 0.8).history_hit)


def test_hggtopk_history_on_a_drifting_sequence():
  k = k_of(0.01, N)
  f = _kernel("hgg_fast", k)
  rng = np.random.default_rng(3)
  x = draw("normal", N, seed=3)
  prev, hits = jnp.float32(0), []
  for t in range(8):
    sel = f(x, prev)
    valid = _valid(sel)
    assert 0.99 * k <= valid.size <= k
    if t:
      hits.append(bool(sel.history_hit))
    prev = sel.threshold
    # Slow drift: with k = 328 the tolerance is max(1, floor(0.01 k)) = 3 elements.
    x = x + 0.0005 * rng.standard_normal(N).astype(np.float32)
  assert np.mean(hits) >= 0.8


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_exact_topk_fast_path(distribution):
  k = k_of(0.01, N)
  x = draw(distribution, N, seed=4)
  sel = _kernel("topk_fast", k)(x, jnp.float32(0))
  valid = _valid(sel)
  np.testing.assert_array_equal(np.sort(valid), np.sort(exact_topk_positions(x, k)))
  assert float(sel.threshold) == np.abs(x[valid]).min()
  assert int(sel.passed) == k


@pytest.mark.parametrize("name", ["gaussian", "redsync", "dgcsampling"])
def test_threshold_methods_send_the_largest_that_pass(name, monkeypatch):
  monkeypatch.setattr(radix, "MIN_FAST_N", 1024)  # read at trace time: the packed path
  k = k_of(0.01, N)
  x = draw("normal", N, seed=5)
  sel = _kernel(name, k)(x, jnp.float32(0))
  valid = _valid(sel)
  a = np.abs(x)
  assert valid.size == min(k, int(sel.passed))
  assert float(sel.threshold) == a[valid].min()
  # Nothing left out that passed is larger than what was sent.
  rest = np.setdiff1d(np.flatnonzero(a >= float(sel.threshold)), valid)
  assert rest.size == 0 or a[rest].max() <= a[valid].min()
