"""The shared fast paths: packed-mask counting and compaction, radix select, exact top-k."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hggjax import compaction, radix
from tests.hggjax.helpers import draw, exact_topk_positions, k_of

DISTRIBUTIONS = ("normal", "laplace", "t3")


@pytest.mark.parametrize("length", [1, 33, 1000, 70_000])
def test_cumsum_is_exact(length):
  rng = np.random.default_rng(length)
  for high in (33, 2**31 // length):
    v = rng.integers(0, high, size=length).astype(np.int32)
    got = jax.jit(radix.cumsum)(v)
    np.testing.assert_array_equal(got, np.cumsum(v.astype(np.int64)))


@pytest.mark.parametrize("length", [1, 255, 256, 257, 1024, 5000, 70_001])
def test_pack_layout_and_element_of(length):
  """Bit b of word [g, l] is element 256 g + 8 b + l; blocks padded with zeros to a multiple of 4."""
  mask = np.random.default_rng(length).random(length) < 0.3
  words = np.asarray(jax.jit(radix.pack)(mask))
  assert words.shape == (-(-length // 1024) * 4, radix.LANES)
  flat = words.reshape(-1)
  w, b = np.nonzero((flat[:, None] >> np.arange(32, dtype=np.uint32)) & 1)
  got = np.asarray(radix.element_of(jnp.asarray(w), jnp.asarray(b)))
  np.testing.assert_array_equal(np.sort(got), np.flatnonzero(mask))


@pytest.mark.parametrize("share", [0.0, 0.02, 0.5, 1.0])
def test_compact_returns_every_set_position(share):
  length, capacity = 5000, 5000  # not a multiple of 32
  mask = np.random.default_rng(1).random(length) < share
  pos, count = jax.jit(lambda m: radix.compact(radix.pack(m), length, capacity))(mask)
  pos = np.asarray(pos)
  assert int(count) == mask.sum()
  np.testing.assert_array_equal(np.sort(pos[: mask.sum()]), np.flatnonzero(mask))
  assert np.all(pos[mask.sum():] == length)


def test_compact_over_capacity_keeps_capacity_distinct_set_positions():
  length, capacity = 4096, 100
  mask = np.random.default_rng(2).random(length) < 0.3
  pos, count = jax.jit(lambda m: radix.compact(radix.pack(m), length, capacity))(mask)
  pos = np.asarray(pos)
  assert int(count) == mask.sum()
  assert len(set(pos.tolist())) == capacity and mask[pos].all()


def test_kth_largest_and_take_largest_with_ties():
  rng = np.random.default_rng(3)
  keys = rng.integers(0, 50, size=20_000).astype(np.int32)  # many ties
  keys[::7] = -1  # empty slots
  positions = np.arange(keys.size, dtype=np.int32) + 10
  k = 3000
  valid = np.sort(keys[keys >= 0])[::-1]
  assert int(jax.jit(lambda c: radix.kth_largest(c, k))(keys)) == valid[k - 1]
  for floor in (0, valid[k - 1] + 1):
    out = np.asarray(jax.jit(
        lambda c, p, f: radix.take_largest(c, p, k, f, -5))(keys, positions, jnp.int32(floor)))
    sent = out[out != -5]
    assert len(set(sent.tolist())) == sent.size
    chosen = keys[sent - 10]
    expected = np.sort(valid[valid >= floor][:k])
    np.testing.assert_array_equal(np.sort(chosen), expected)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_low_cut_brackets_k(distribution):
  n = 1 << 18
  k = k_of(0.01, n)
  x = draw(distribution, n, seed=4)
  low, cap = radix.low_cut(jnp.asarray(x), k)
  count = int(np.sum(np.abs(x) >= float(low)))
  assert k <= count <= cap < n // 2


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_top_k_fast_path_is_exact(distribution):
  n, k = 1 << 16, 655
  x = draw(distribution, n, seed=5)
  idx = np.asarray(jax.jit(lambda v: radix.top_k(v, k, min_fast_n=1024))(x))
  assert len(set(idx.tolist())) == k
  np.testing.assert_array_equal(np.sort(idx), np.sort(exact_topk_positions(x, k)))


def test_top_k_falls_back_when_the_sample_misses():
  # Every magnitude ties: far more than capacity pass the low cut -> lax.top_k.
  n, k = 1 << 16, 655
  x = np.where(np.arange(n) % 2 == 0, 1.0, -1.0).astype(np.float32)
  idx = np.asarray(jax.jit(lambda v: radix.top_k(v, k, min_fast_n=1024))(x))
  assert len(set(idx.tolist())) == k and idx.max() < n


@pytest.mark.parametrize("min_fast_n", [0, 1 << 40])
def test_largest_above_and_count(min_fast_n):
  rng = np.random.default_rng(6)
  a = np.abs(rng.standard_normal(10_000)).astype(np.float32)
  a[::5] = 0.0
  threshold, k = 1.5, 300
  passing = np.flatnonzero(a >= threshold)
  idx, passed, cut = jax.jit(
      lambda v, t: compaction.largest_above(v, t, k, 4 * k, min_fast_n))(a, jnp.float32(threshold))
  idx = np.asarray(idx)
  assert int(passed) == passing.size
  np.testing.assert_array_equal(np.sort(idx), np.sort(passing[np.argsort(-a[passing])[:k]]))
  assert float(cut) == a[idx].min()
  count = jax.jit(lambda v: compaction.count_at_least(v, jnp.float32(0.0), min_fast_n))(a)
  assert int(count) == np.count_nonzero(a)
