"""Compaction, radix select and the exact top-k: every answer against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hggjax.kernels import bits, topk
from tests.hggjax.helpers import draw, exact_topk_positions, k_of

DISTRIBUTIONS = ("normal", "laplace", "t3")


@pytest.mark.parametrize("share", [0.0, 0.02, 0.5, 1.0])
def test_compact_returns_every_set_position(share):
  length, capacity = 5000, 5000  # not a multiple of 32
  mask = np.random.default_rng(1).random(length) < share
  pos, count = jax.jit(lambda m: topk.compact(bits.pack(m), length, capacity))(mask)
  pos = np.asarray(pos)
  assert int(count) == mask.sum()
  np.testing.assert_array_equal(np.sort(pos[: mask.sum()]), np.flatnonzero(mask))
  assert np.all(pos[mask.sum():] == length)


def test_compact_over_capacity_keeps_capacity_distinct_set_positions():
  length, capacity = 4096, 100
  mask = np.random.default_rng(2).random(length) < 0.3
  pos, count = jax.jit(lambda m: topk.compact(bits.pack(m), length, capacity))(mask)
  pos = np.asarray(pos)
  assert int(count) == mask.sum()
  assert len(set(pos.tolist())) == capacity and mask[pos].all()


def test_compact_linear_returns_set_positions_sorted():
  length, capacity = 5000, 400
  mask = np.random.default_rng(4).random(length) < 0.05
  lanes = np.pad(mask, (0, 5024 - length)).reshape(-1, 32).astype(np.uint32)
  words = (lanes << np.arange(32, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)  # bit j of word w: 32 w + j
  pos, count = jax.jit(lambda w: topk.compact(w, length, capacity, linear=True))(words)
  pos = np.asarray(pos)
  assert int(count) == mask.sum()
  np.testing.assert_array_equal(pos[: mask.sum()], np.flatnonzero(mask))  # in order
  assert np.all(pos[mask.sum():] == length)


def _shuffled_rows(rng, n, c, m, unused):
  rows = []
  for _ in range(m):
    real = min(n, c - unused)
    row = np.concatenate([rng.choice(n, real, replace=False), np.full(c - real, n)])
    rng.shuffle(row)
    rows.append(row.astype(np.int32))
  return np.stack(rows)


@pytest.mark.parametrize("n, c, m, unused", [
    (300_007, 5000, 3, 17),    # bitmap path, n not a multiple of 32
    (100_000, 4096, 1, 0),     # bitmap path, every slot used
    (40, 4096, 1, 4096 - 40),  # bitmap path, more slots than positions
    (1_000_000, 5000, 2, 5),   # sparse: a sort
    (50_000, 300, 2, 3),       # few slots: a sort
])
def test_sort_distinct_equals_numpy_sort(n, c, m, unused):
  rows = _shuffled_rows(np.random.default_rng(5), n, c, m, unused)
  got = jax.jit(topk.sort_distinct, static_argnums=1)(jnp.asarray(rows), n)
  np.testing.assert_array_equal(np.asarray(got), np.sort(rows, axis=1))


def test_sort_distinct_sorts_rows_with_a_repeated_position():
  n, c = 200_000, 5000
  rows = _shuffled_rows(np.random.default_rng(6), n, c, 2, 10)
  assert n <= 64 * c  # the bitmap path
  rows[1, :3] = rows[1, 3]  # the bitmap would carry: the fallback sorts
  got = jax.jit(topk.sort_distinct, static_argnums=1)(jnp.asarray(rows), n)
  np.testing.assert_array_equal(np.asarray(got), np.sort(rows, axis=1))


def test_kth_largest_and_take_largest_with_ties():
  rng = np.random.default_rng(3)
  keys = rng.integers(0, 50, size=20_000).astype(np.int32)  # many ties
  keys[::7] = -1  # empty slots
  positions = np.arange(keys.size, dtype=np.int32) + 10
  k = 3000
  valid = np.sort(keys[keys >= 0])[::-1]
  assert int(jax.jit(lambda c: topk.kth_largest(c, k))(keys)) == valid[k - 1]
  for floor in (0, valid[k - 1] + 1):
    out = np.asarray(jax.jit(
        lambda c, p, f: topk.take_largest(c, p, k, f, -5))(keys, positions, jnp.int32(floor)))
    sent = out[out != -5]
    assert len(set(sent.tolist())) == sent.size
    chosen = keys[sent - 10]
    expected = np.sort(valid[valid >= floor][:k])
    np.testing.assert_array_equal(np.sort(chosen), expected)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_top_k_fast_path_is_exact(distribution):
  n, k = 1 << 16, 655
  x = draw(distribution, n, seed=5)
  idx = np.asarray(jax.jit(lambda v: topk.top_k(v, k, min_fast_n=1024))(x))
  assert len(set(idx.tolist())) == k
  np.testing.assert_array_equal(np.sort(idx), np.sort(exact_topk_positions(x, k)))


def test_top_k_falls_back_when_the_sample_misses():
  # Every magnitude ties: far more than capacity pass the low cut -> lax.top_k.
  n, k = 1 << 16, 655
  x = np.where(np.arange(n) % 2 == 0, 1.0, -1.0).astype(np.float32)
  idx = np.asarray(jax.jit(lambda v: topk.top_k(v, k, min_fast_n=1024))(x))
  assert len(set(idx.tolist())) == k and idx.max() < n


@pytest.mark.parametrize("min_fast_n", [0, 1 << 40])
def test_largest_above_keeps_the_largest_that_pass(min_fast_n):
  rng = np.random.default_rng(6)
  a = np.abs(rng.standard_normal(10_000)).astype(np.float32)
  a[::5] = 0.0
  threshold, k = 1.5, 300
  passing = np.flatnonzero(a >= threshold)
  idx, passed, cut = jax.jit(
      lambda v, t: topk.largest_above(v, t, k, 4 * k, min_fast_n))(a, jnp.float32(threshold))
  idx = np.asarray(idx)
  assert int(passed) == passing.size
  np.testing.assert_array_equal(np.sort(idx), np.sort(passing[np.argsort(-a[passing])[:k]]))
  assert float(cut) == a[idx].min()


@pytest.mark.parametrize("kind", ["normal", "ties", "mostly_zero", "all_zero"])
@pytest.mark.parametrize("n,k", [(1000, 10), (70_000, 700), (5000, 5000)])
def test_lean_top_k_is_exact(kind, n, k):
  rng = np.random.default_rng(n + k)
  x = rng.standard_normal(n).astype(np.float32)
  if kind == "ties":
    x = np.round(x * 2) / 2  # few distinct magnitudes: the k-th is tied many times
  elif kind == "mostly_zero":
    x[rng.random(n) < 0.995] = 0.0
  elif kind == "all_zero":
    x[:] = 0.0
  idx = np.asarray(jax.jit(topk.lean_top_k, static_argnums=1)(jnp.asarray(x), k))
  assert idx.shape == (k,) and len(set(idx.tolist())) == k and idx.max() < n
  np.testing.assert_array_equal(np.sort(np.abs(x[idx])), np.sort(np.abs(x))[n - k:])


def test_lean_top_k_holds_no_vector_sized_temporary():
  n, k = 1 << 22, 1 << 12
  compiled = jax.jit(topk.lean_top_k, static_argnums=1).lower(
      jax.ShapeDtypeStruct((n,), jnp.float32), k).compile()
  # Packed masks (n / 8 bytes each) and k-sized buffers only; one float32[n] is 4n.
  assert compiled.memory_analysis().temp_size_in_bytes < n
