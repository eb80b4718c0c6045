"""Packed masks: the bit layout, and counts against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hggjax.kernels import bits


@pytest.mark.parametrize("length", [1, 255, 256, 257, 1024, 5000, 70_001])
def test_pack_layout_and_element_of(length):
  """Bit b of word [g, l] is element 256 g + 8 b + l; blocks padded with zeros to a multiple of 4."""
  mask = np.random.default_rng(length).random(length) < 0.3
  words = np.asarray(jax.jit(bits.pack)(mask))
  assert words.shape == (-(-length // 1024) * 4, bits.LANES)
  flat = words.reshape(-1)
  w, b = np.nonzero((flat[:, None] >> np.arange(32, dtype=np.uint32)) & 1)
  got = np.asarray(bits.element_of(jnp.asarray(w), jnp.asarray(b)))
  np.testing.assert_array_equal(np.sort(got), np.flatnonzero(mask))


@pytest.mark.parametrize("min_fast_n", [0, 1 << 40])
def test_count_at_least_counts_nonzero_entries_at_or_above(min_fast_n):
  rng = np.random.default_rng(6)
  a = np.abs(rng.standard_normal(10_000)).astype(np.float32)
  a[::5] = 0.0
  for threshold in (0.0, 0.5, 1.5):
    count = jax.jit(lambda v, t: bits.count_at_least(v, t, min_fast_n))(a, jnp.float32(threshold))
    assert int(count) == np.count_nonzero((a >= threshold) & (a > 0))


def test_count_many_counts_every_edge_in_one_call():
  rng = np.random.default_rng(7)
  a = np.abs(rng.standard_normal(5_001)).astype(np.float32)
  edges = np.linspace(0.1, 3.0, 8).astype(np.float32)
  got = np.asarray(jax.jit(bits.count_many)(a, edges))
  np.testing.assert_array_equal(got, [(a >= e).sum() for e in edges])
