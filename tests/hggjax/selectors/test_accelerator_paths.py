"""The selectors' accelerator branches (chosen by ``lax.platform_dependent`` off the
CPU), run here on the CPU against their CPU branches and exact references."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hggjax.kernels import bits, topk
from hggjax.selectors import base, hgg
from hggjax.selectors.hgg_pipelined import PipelineCarry, hgg_topk_pipelined
from tests.hggjax.helpers import draw, exact_topk_positions

# The module (the package re-exports its constructor under the same name).
redsync = importlib.import_module("hggjax.selectors.redsync")


def test_hggtopk_sends_the_exact_top_k_guided_by_its_history():
  x = draw("t3", 50_000, seed=3)
  k = 500
  kth = np.sort(np.abs(x))[-k]
  for prev, guided in ((0.0, False), (kth * 1.01, True)):
    sel = jax.jit(hgg.on_accelerator, static_argnums=1)(x, k, jnp.float32(prev))
    np.testing.assert_array_equal(np.sort(np.asarray(sel.indices)),
                                  np.sort(exact_topk_positions(x, k)))
    assert bool(sel.history_hit) == guided
    assert float(sel.threshold) == kth


def test_largest_above_matches_the_cpu_branch():
  a = np.abs(draw("normal", 70_000, seed=4))
  for threshold, capacity, at_least in ((2.0, 4000, None), (2.5, 2000, None), (0.5, 2000, 1000)):
    got = jax.jit(topk._largest_above_gpu, static_argnums=(2, 3, 4))(  # pylint: disable=protected-access
        a, jnp.float32(threshold), 1000, capacity, at_least)
    ref = jax.jit(topk._largest_above_cpu, static_argnums=(2, 3, 4, 5))(  # pylint: disable=protected-access
        a, jnp.float32(threshold), 1000, capacity, 1024, at_least)
    np.testing.assert_array_equal(np.sort(np.asarray(got[0])), np.sort(np.asarray(ref[0])))
    assert int(got[1]) == int(ref[1]) and float(got[2]) == float(ref[2])


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_count_and_adjust_tree_replays_the_rounds_bit_for_bit(steps):
  rng = np.random.default_rng(steps)
  for dist in ("normal", "t3"):
    a = jnp.abs(jnp.asarray(draw(dist, 30_000, seed=steps)))
    for t0 in (0.01, 1.0, 2.5, 40.0):
      rule = (300, steps, 2 / 3, 4 / 3, 0.5, 1.5)
      t, f = base._adjust_tree(a, jnp.float32(t0), jnp.float32(99.0), rule)  # pylint: disable=protected-access
      r, g = base._adjust_rounds(a, jnp.float32(t0), jnp.float32(99.0), rule, 1 << 40)  # pylint: disable=protected-access
      assert float(t) == float(r) and float(f) == float(g), (dist, t0)
  del rng


@pytest.mark.parametrize("steps", [1, 5, 6, 7, 12])
def test_redsync_grid_finds_the_bisections_cut(steps):
  a = jnp.abs(jnp.asarray(draw("t3", 30_000, seed=steps)))
  top, mean = jnp.max(a), jnp.mean(a)
  for k in (1, 30, 300, 20_000):
    assert float(redsync._grid(a, k, mean, top, steps)) == float(  # pylint: disable=protected-access
        redsync._bisect(a, k, mean, top, steps, 1 << 40))  # pylint: disable=protected-access


def test_counts_of_many_edges_equal_one_count_each():
  a = jnp.abs(jnp.asarray(draw("laplace", 10_000, seed=5))).at[::7].set(0.0)
  edges = jnp.asarray([0.0, 0.1, 1.0, 3.0, 100.0])
  np.testing.assert_array_equal(
      bits.count_edges_at_least(a, edges),
      [int(bits.count_at_least(a, e, 1 << 40)) for e in edges])


def test_pipelined_selector_keeps_its_carry_shape_on_accelerators():
  x = jnp.asarray(draw("normal", 70_000, seed=6))
  k = 700
  kth = float(np.sort(np.abs(np.asarray(x)))[-k])
  sel = hgg.on_accelerator(x, k, jnp.float32(kth))
  assert bool(sel.history_hit)
  # The CPU branch of the same selector still returns the documented carry.
  selector = hgg_topk_pipelined()
  _, carry = selector.select(x, k, PipelineCarry(jnp.float32(kth), jnp.float32(3.0),
                                                 jnp.int32(0)), None)
  assert carry.center.dtype == jnp.float32 and carry.path.dtype == jnp.int32
