"""`reshard_state`: per-device state folded or split for another device count, the mean
owed by error feedback (and every per-device accumulator's mean) kept."""

from fractions import Fraction

import jax
import numpy as np
import optax
import pytest

import hggjax

PARAMS = {"w": np.zeros((12, 10), np.float32), "b": np.zeros((10,), np.float32)}


def _state(length: int, seed: int = 0, values=None):
  """The states of hggtopk with momentum correction and of hggjax.adamw (a shared second
  moment), per-device leaves differing per device: floats from `values` (default normal
  draws), counts and keys random."""
  tx = optax.chain(
      hggjax.hggtopk(0.1, axis_name="data", momentum=0.9, min_size=0),
      hggjax.adamw(0.1, compressor="hggtopk", density=0.1, axis_name="data",
                   second_moment="shared", min_size=0))
  rng = np.random.default_rng(seed)
  draw = values or (lambda shape: rng.standard_normal(shape).astype(np.float32))

  def per_device(sub):
    def fill(x):
      shape = (length,) + np.shape(x)[1:]
      if np.issubdtype(x.dtype, np.floating):
        return draw(shape)
      return rng.integers(0, 1000, shape).astype(x.dtype)
    return jax.tree.map(fill, sub)

  state = tx.init(PARAMS)
  kinds = (hggjax.CompressionState, hggjax.PerDeviceState)
  return jax.tree.map(lambda s: per_device(s) if isinstance(s, kinds) else s, state,
                      is_leaf=lambda s: isinstance(s, kinds))


def _parts(state):
  comp = hggjax.compression_state(state)
  adam = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, hggjax.AdamState))
          if isinstance(s, hggjax.AdamState)][0]
  return comp, adam


def _accumulators(state):
  """Every leaf whose device mean is owed: residuals, velocities, Adam's moments."""
  comp, adam = _parts(state)
  return [x for x in jax.tree.leaves((comp.residual, comp.velocity, adam.mu, adam.nu,
                                      adam.shared_nu))]


def _exact_mean(x):
  """The mean over the leading axis in exact rational arithmetic, per element."""
  flat = np.asarray(x, np.float32).reshape(x.shape[0], -1)
  return [sum(map(Fraction, col.tolist())) / flat.shape[0] for col in flat.T]


def _ulp(x):
  return np.spacing(np.abs(np.asarray(x, np.float32))).astype(np.float64)


@pytest.mark.parametrize("old,new", [(2, 4), (2, 8), (4, 4), (3, 6)])
def test_growing_copies_bits_and_keeps_the_owed_mean_exactly(old, new):
  before = _state(old)
  after = hggjax.reshard_state(before, new)
  r = new // old
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    if np.ndim(a) and np.shape(a)[0] == old and np.shape(b)[0] == new:
      np.testing.assert_array_equal(np.asarray(b), np.repeat(np.asarray(a), r, axis=0))
  for a, b in zip(_accumulators(before), _accumulators(after)):
    assert _exact_mean(b) == _exact_mean(a)


@pytest.mark.parametrize("old,new", [(4, 2), (8, 2), (4, 1), (4, 6)])
def test_folding_rounds_once_and_the_owed_mean_moves_by_under_half_an_ulp(old, new):
  before, after = _state(old), None
  after = hggjax.reshard_state(before, new)
  g = np.gcd(old, new)
  for a, b in zip(_accumulators(before), _accumulators(after)):
    a, b = np.asarray(a), np.asarray(b)
    # Step 2: the group's float64 mean, stored as float32; step 3: copied.
    means = a.reshape((g, old // g) + a.shape[1:]).astype(np.float64).mean(1)
    np.testing.assert_array_equal(b, np.repeat(means.astype(np.float32), new // g, axis=0))
    # The owed mean moves by at most half an ulp of the new values, averaged over them.
    bound = (_ulp(b).reshape(new, -1).sum(0) / 2 / new).tolist()
    moved = [abs(x - y) for x, y in zip(_exact_mean(b), _exact_mean(a))]
    assert all(m <= Fraction(t) for m, t in zip(moved, bound))


def test_folding_is_exact_when_the_group_means_are_representable():
  rng = np.random.default_rng(1)
  quarters = lambda shape: (rng.integers(-400, 400, shape) / 4).astype(np.float32)  # noqa: E731
  before = _state(4, values=quarters)
  after = hggjax.reshard_state(before, 2)
  for a, b in zip(_accumulators(before), _accumulators(after)):
    assert _exact_mean(b) == _exact_mean(a)
  # A shared second moment is the same on every device: it comes back bit for bit.
  same = _state(4, values=lambda shape: np.broadcast_to(
      rng.standard_normal(shape[1:]).astype(np.float32), shape).copy())
  adam_before, adam_after = _parts(same)[1], _parts(hggjax.reshard_state(same, 2))[1]
  for a, b in zip(jax.tree.leaves(adam_before.shared_nu), jax.tree.leaves(adam_after.shared_nu)):
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a)[:2])


def test_counts_take_the_largest_and_keys_and_carries_the_first_of_each_group():
  before = _state(4)
  comp, adam = _parts(before)
  comp2, adam2 = _parts(hggjax.reshard_state(before, 2))
  for old, new in ((comp.count, comp2.count), (adam.count, adam2.count),
                   (adam.refreshes, adam2.refreshes)):
    np.testing.assert_array_equal(new, np.asarray(old).reshape(2, 2).max(1))
  for old, new in zip(jax.tree.leaves((comp.rng_key, comp.carry, comp.stats)),
                      jax.tree.leaves((comp2.rng_key, comp2.carry, comp2.stats))):
    np.testing.assert_array_equal(new, np.asarray(old)[::2])


def test_two_levels_fold_the_compressor_per_host_and_keep_each_devices_moments():
  before = _state(8)
  after = hggjax.reshard_state(before, (2, 4))  # 8 devices -> 2 hosts of 4
  comp, adam = _parts(before)
  comp2, adam2 = _parts(after)
  for a, b in zip(jax.tree.leaves(comp.residual), jax.tree.leaves(comp2.residual)):
    assert b.shape[0] == 2
    np.testing.assert_array_equal(
        b, np.asarray(a).reshape((2, 4) + a.shape[1:]).astype(np.float64).mean(1)
        .astype(np.float32))
  for a, b in zip(jax.tree.leaves(adam), jax.tree.leaves(adam2)):
    np.testing.assert_array_equal(b, a)  # Adam's moments stay one per device
  back = _parts(hggjax.reshard_state(after, 8))[0]  # and back: each host's copied to its 4
  for a, b in zip(jax.tree.leaves(comp2.residual), jax.tree.leaves(back.residual)):
    np.testing.assert_array_equal(b, np.repeat(a, 4, axis=0))


def test_a_sharded_state_reshards_and_replicated_leaves_stay():
  mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
  tx = optax.chain(hggjax.topk(0.5, axis_name="data"), optax.sgd(0.1, momentum=0.9))
  state = hggjax.shard_state(tx.init(PARAMS), mesh, "data")
  after = hggjax.reshard_state(state, 2)
  assert hggjax.compression_state(after).residual[0].shape == (2, 10)
  # SGD's momentum: replicated, the same arrays
  assert all(a is b for a, b in zip(jax.tree.leaves(after[1]), jax.tree.leaves(state[1])))


@pytest.mark.parametrize("devices,match", [(0, "an int >= 1"), ((2,), r"\(slow, fast\)"),
                                           ("4", "the device count"), ((2, 0), "two-level")])
def test_bad_device_counts_say_what_to_pass(devices, match):
  with pytest.raises(ValueError, match=match):
    hggjax.reshard_state(_state(2), devices)


def test_a_state_without_one_device_axis_is_refused():
  tx = hggjax.topk(0.5, axis_name="data")
  state = tx.init(PARAMS)._replace(count=np.zeros((), np.int32))  # no device axis
  with pytest.raises(ValueError, match="same leading device axis"):
    hggjax.reshard_state(state, 2)
