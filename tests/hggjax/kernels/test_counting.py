"""The accelerators' branch-free exact top-k (`kernels.counting`), run here on the CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hggjax.kernels import bits, counting


def _draw(name, n, rng):
  if name == "normal":
    x = rng.standard_normal(n)
  elif name == "t2":
    x = rng.standard_t(2, n)
  elif name == "ties":
    x = np.concatenate([np.full(50, 2.0), np.full(n - 50, -1.0)])
  elif name == "few":
    x = rng.choice([-3.0, 1.0, 2.0, 0.5], n)
  elif name == "wide":
    x = np.where(rng.random(n) < 0.001, rng.normal(0, 1e-2, n), rng.normal(0, 1e-6, n))
  elif name == "sparse":
    x = np.where(rng.random(n) < 0.002, rng.standard_normal(n), 0.0)
  elif name == "tiny":
    x = rng.standard_normal(n) * 1e-30
  else:  # huge
    x = rng.standard_normal(n) * 1e37
  return x.astype(np.float32)


@pytest.mark.parametrize("dist", ["normal", "t2", "ties", "few", "wide", "sparse", "tiny", "huge"])
def test_exact_top_k_with_and_without_a_hint(dist):
  n = 40_000
  x = _draw(dist, n, np.random.default_rng(1))
  a = np.abs(x)
  select = jax.jit(counting.top_k, static_argnums=1)
  for k in (1, 400, 4000):
    kth = np.sort(a)[-k]
    for hint in (0.0, kth, min(float(kth) * 40.0, 3e38), float(kth) / 40.0):
      idx, candidates, guided = select(x, k, jnp.float32(hint))
      idx = np.asarray(idx)
      assert len(set(idx.tolist())) == k and idx.max() < n
      assert a[idx].min() >= kth, (dist, k, hint)
      assert int(candidates) >= k
      if hint == kth and np.count_nonzero(a) >= k:
        assert bool(guided)


def test_count_edges_and_bracket_invariant():
  keys = bits.magnitude_keys(jnp.asarray(_draw("t2", 5000, np.random.default_rng(2))))
  edges = jnp.asarray([1, 1 << 23, 127 << 23, 130 << 23, 0x7F800000], jnp.int32)
  np.testing.assert_array_equal(counting.count_edges(keys, edges),
                                [(np.asarray(keys) >= e).sum() for e in np.asarray(edges)])
  for k in (1, 77, 4999):
    lo, hi, _ = counting.kth_bracket(keys, k, jnp.float32(0), passes=2)
    assert (np.asarray(keys) >= int(lo)).sum() >= k > (np.asarray(keys) >= int(hi)).sum()
