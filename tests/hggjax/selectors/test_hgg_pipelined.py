"""Pipelined HGG-TopK (hggtopk(pipeline=True)): its paths, error feedback, the exchange, the state."""

import functools
import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import hggjax
from hggjax import selectors
from hggjax.kernels import sampling
from hggjax.selectors.hgg_pipelined import PipelineCarry
from tests.conftest import NUM_DEVICES
from tests.hggjax import helpers

N = 1 << 17   # above kernels.bits.MIN_FAST_N: the packed fast path
K = helpers.k_of(0.01, N)
TOL = int(0.01 * K)


@functools.cache
def _select():
  """The pipelined selector at (N, K), jitted once for the whole module."""
  piped = selectors.hgg_topk_pipelined()
  return jax.jit(lambda x, carry: piped.select(x, K, carry, None))


def _carry(center=0.0, slope=0.0, path=-1):
  return PipelineCarry(jnp.float32(center), jnp.float32(slope), jnp.int32(path))


def _power_law(seed: int, s: float = 3.0) -> np.ndarray:
  """|x| = (N / i)^(1/s) for i = 1..N, shuffled, random signs: count(|x| >= t) = floor(N t^-s)."""
  rng = np.random.default_rng(seed)
  a = (N / np.arange(1, N + 1)) ** (1.0 / s)
  return (rng.permutation(a) * rng.choice([-1.0, 1.0], N)).astype(np.float32)


def _check(x: np.ndarray, sel, carry) -> int:
  """The guarantees of each path; returns the path."""
  path = int(carry.path)
  idx = np.asarray(sel.indices)
  sent = idx[idx < N]
  a = np.abs(x)
  assert len(set(sent.tolist())) == sent.size  # no duplicates
  assert bool(sel.history_hit) == (path <= 1)
  if path == 0:
    # Everything >= the cut, and nothing else: k - tol to k elements, no trim.
    cut = float(sel.threshold)
    np.testing.assert_array_equal(np.sort(sent), np.flatnonzero(a >= cut))
    assert K - TOL <= sent.size <= K and int(sel.passed) == sent.size
  elif path in (1, 2):
    # A trim, or the second pass: exactly the k largest.
    assert sent.size == K
    assert a[sent].min() >= np.sort(a)[-K]
    assert float(sel.threshold) == a[sent].min()
  else:
    # The second pass's sample missed: flagged, at most k sent.
    assert path == 3 and 0 < sent.size <= K
  return path


def test_each_path_keeps_its_guarantee():
  select = _select()
  x = _power_law(0)
  kth = np.sort(np.abs(x))[-K]
  # 100 equal magnitudes around rank k: every threshold passes either fewer than
  # k - 50 or more than k + 49 elements, so no edge lands in [k - tol, k].
  tied = x.copy()
  order = np.argsort(-np.abs(x), kind="stable")
  tied[order[K - 50:K + 50]] = kth
  # The largest 2k values only in blocks the second pass's sample never reads:
  # its low cut lands in the bulk, more than its capacity pass, path 3.
  rate = sampling.low_cut_rate(K)
  groups = np.arange(N // (16 * rate), dtype=np.uint64)
  phase = ((groups * 2654435761) % 2**32 >> 16) % rate
  sampled = np.zeros(N, bool)
  for g, b in zip(groups, phase):
    start = int(g * rate + b) * 16
    sampled[start:start + 16] = True
  hidden = np.random.default_rng(2).uniform(0, 1, N).astype(np.float32)
  hidden[np.flatnonzero(~sampled)[:2 * K]] += 100.0
  cases = {
      "cold start": (x, _carry(), 2),
      "cold start, the sample misses": (hidden, _carry(), 3),
      "carried cut and slope exact": (x, _carry(kth, 3.0), 0),
      "ties straddle the k-th: trim": (tied, _carry(kth, 3.0), 1),
      # A cut 1000x too high with the steepest slope: no edge comes near k.
      "cut 1000x off": (x, _carry(kth * 1000.0, 64.0), 2),
  }
  for name, (x, carry, path) in cases.items():
    sel, new = select(jnp.asarray(x), carry)
    assert _check(x, sel, new) == path, name
    assert float(new.center) > 0 and 0.25 <= float(new.slope) <= 64.0, name


def test_the_pass_measures_the_slope_and_the_next_cut():
  select = _select()
  x = _power_law(1, s=3.0)
  kth = np.sort(np.abs(x))[-K]
  _, carry = select(jnp.asarray(x), _carry(kth * 1.01, 4.0))
  # Geometric mean of the carried 4 and the measured 3.
  assert abs(float(carry.slope) - np.sqrt(4.0 * 3.0)) < 0.1
  assert abs(float(carry.center) / kth - 1) < 2e-3


def _ef_sequence(steps: int, scale_noise: float, seed: int = 0):
  """acc_t = g_t + residual (exact top-k residual), g_t = c_t * |t3 scale| * N(0, 1)."""
  rng = np.random.default_rng(seed)
  scale = np.abs(rng.standard_t(3, N)).astype(np.float32)
  residual = np.zeros(N, np.float32)
  for _ in range(steps):
    acc = np.float32(np.exp(scale_noise * rng.standard_normal())) * scale * rng.standard_normal(N).astype(np.float32) + residual
    yield acc
    residual = acc.copy()
    residual[helpers.exact_topk_positions(acc, K)] = 0


def test_error_feedback_sequence_mostly_takes_one_pass():
  """Gradients whose scale jumps ~10% per step (like the default training run's)."""
  select = _select()
  carry, paths = _carry(), []
  for x in _ef_sequence(12, 0.1):
    sel, carry = select(jnp.asarray(x), carry)
    paths.append(_check(x, sel, carry))
    idx = np.asarray(sel.indices)
    recall = np.intersect1d(idx[idx < N], helpers.exact_topk_positions(x, K)).size / K
    assert recall >= 0.99
  assert paths[0] == 2  # cold start
  assert np.mean(np.array(paths[1:]) <= 1) >= 0.9, paths


def test_hggtopk_alone_takes_pipeline_and_validates_it():
  assert "pipeline" in inspect.signature(hggjax.hggtopk).parameters
  for name in sorted(set(hggjax.compressors) - {"hggtopk"}):
    assert "pipeline" not in inspect.signature(hggjax.compressors[name]).parameters, name
    with pytest.raises(TypeError, match="offered by hggtopk only"):
      hggjax.get_compressor(name, density=0.1, pipeline=True)
  with pytest.raises(ValueError, match="pipeline must be True or False"):
    hggjax.hggtopk(0.1, pipeline=1)
  assert isinstance(hggjax.hggtopk(0.1).init({"w": jnp.ones(3)}).carry, selectors.History)
  assert isinstance(hggjax.hggtopk(0.1, pipeline=True).init({"w": jnp.ones(3)}).carry,
                    PipelineCarry)


SHAPES = {"bias": (10,), "w": (24, 16), "v": (16, 24)}  # small: the all-XLA path


def test_transform_error_feedback_is_exact_and_state_records_paths():
  grads0 = helpers.gradients(0, shapes=SHAPES)
  tx = hggjax.hggtopk(0.05, pipeline=True)
  state = tx.init(grads0)
  np.testing.assert_array_equal(state.carry.path, [-1] * 3)
  update = jax.jit(tx.update)
  for step in range(4):
    grads = jax.tree.map(lambda g, s=step: g * np.float32(1 + 0.1 * s), helpers.gradients(step, shapes=SHAPES))
    sent, new_state = update(grads, state)
    helpers.assert_error_feedback_exact(grads, state.residual, sent, new_state.residual)
    state = new_state
    path = np.asarray(state.carry.path)
    assert set(path.tolist()) <= {0, 1, 2}
    np.testing.assert_array_equal(state.stats.history_hit, path <= 1)
    if step == 0:
      np.testing.assert_array_equal(path, [2, 2, 2])
  assert update._cache_size() == 1  # no retrace over steps
  assert 0.98 * int(state.stats.k) <= int(state.stats.selected) <= int(state.stats.k)
  # What users log: found by name inside an optax chain's state.
  chained = (optax.EmptyState(), state)
  np.testing.assert_array_equal(optax.tree.get(chained, "path"), state.carry.path)


def _mesh():
  return jax.make_mesh((NUM_DEVICES,), ("data",), devices=jax.devices()[:NUM_DEVICES])


def test_shard_map_equals_mean_of_local_decompressions_one_gather_per_leaf():
  mesh = _mesh()
  steps = [{name: np.stack([helpers.gradients(100 * s + d, shapes=SHAPES)[name]
                            for d in range(NUM_DEVICES)]) for name in SHAPES} for s in range(3)]
  tx = hggjax.hggtopk(0.05, pipeline=True, axis_name="data")
  state = hggjax.shard_state(tx.init(jax.tree.map(lambda g: g[0], steps[0])), mesh, "data")
  specs = hggjax.state_specs(state, "data")

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("data"), specs), out_specs=(P(), specs))
  def update(grads, state):
    return tx.update(jax.tree.map(lambda g: g[0], grads), state)

  local_tx = hggjax.hggtopk(0.05, pipeline=True)
  local_update = jax.jit(local_tx.update)
  local = [local_tx.init(jax.tree.map(lambda g: g[0], steps[0])) for _ in range(NUM_DEVICES)]
  sharding = NamedSharding(mesh, P("data"))
  # Separate collectives per leaf: the pipelined update gathers as often per leaf
  # as the bucketed one does per size (w and v share a size: 2 buckets, 3 leaves).
  plain = hggjax.hggtopk(0.05, axis_name="data")
  plain_state = hggjax.shard_state(plain.init(jax.tree.map(lambda g: g[0], steps[0])), mesh, "data")
  plain_specs = hggjax.state_specs(plain_state, "data")
  gathers = []
  for t, st, sp in ((tx, state, specs), (plain, plain_state, plain_specs)):
    fn = jax.shard_map(lambda g, s, t=t: t.update(jax.tree.map(lambda x: x[0], g), s), mesh=mesh,
                       in_specs=(P("data"), sp), out_specs=(P(), sp))
    hlo = jax.jit(fn).lower(jax.device_put(steps[0], sharding), st).as_text()
    gathers.append(len(re.findall(r"all_gather|all-gather\(", hlo)))
  assert gathers[0] * 2 == gathers[1] * 3 and gathers[0] > 0, gathers
  for grads in steps:
    out, new_state = update(jax.device_put(grads, sharding), state)
    outs = []
    for d in range(NUM_DEVICES):
      mine = jax.tree.map(lambda g, d=d: g[d], grads)
      sent, local[d] = local_update(mine, local[d])
      outs.append(sent)
      for i, leaf in enumerate(sorted(SHAPES)):  # error feedback on every device
        acc = mine[leaf] + np.asarray(state.residual[i])[d]
        np.testing.assert_array_equal(acc, np.asarray(sent[leaf]) + np.asarray(new_state.residual[i])[d])
      np.testing.assert_array_equal(np.asarray(new_state.carry.path)[d], local[d].carry.path)
    for leaf in SHAPES:
      expected = sum(np.asarray(o[leaf], np.float32) for o in outs) / NUM_DEVICES
      np.testing.assert_allclose(np.asarray(out[leaf]), expected, rtol=1e-6, atol=1e-7, err_msg=leaf)
    state = new_state


def test_short_vectors_select_from_candidates_without_packing():
  """Below kernels.bits.MIN_FAST_N the candidates come from ``jnp.nonzero``; same guarantees."""
  n, k = 20_000, 200
  tol = int(0.01 * k)
  rng = np.random.default_rng(5)
  x = ((n / np.arange(1, n + 1)) ** (1 / 3.0) * rng.choice([-1.0, 1.0], n))[rng.permutation(n)]
  x = x.astype(np.float32)
  a = np.abs(x)
  kth = np.sort(a)[-k]
  piped = selectors.hgg_topk_pipelined()
  select = jax.jit(lambda x, carry: piped.select(x, k, carry, None))
  for center in (kth, kth * 1.05, kth * 0.95):
    sel, carry = select(jnp.asarray(x), _carry(center, 3.0))
    idx = np.asarray(sel.indices)
    sent = idx[idx < n]
    assert int(carry.path) == 0, center
    np.testing.assert_array_equal(np.sort(sent), np.flatnonzero(a >= float(sel.threshold)))
    assert k - tol <= sent.size <= k and int(sel.passed) == sent.size
