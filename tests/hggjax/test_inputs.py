"""Inputs real gradients produce, and inputs users get wrong: ties, wide and extreme
ranges, density 1, mixed dtypes, changed structures, complex and huge leaves."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hggjax
from hggjax.kernels import sampling
from tests.hggjax import helpers

NAMES = sorted(hggjax.compressors)
COMPRESSED = [n for n in NAMES if n != "none"]
# Exact: the k largest |acc| (ties broken arbitrarily). HGG-TopK: the largest, at
# least max(1, k - tol_k) and at most k of them (tol_k = max(1, floor(0.01 k))).
EXACT = ["topk", "topk2", "redsynctrim"]
HGG = [("hggtopk", {}), ("hggtopk", {"pipeline": True})]


@functools.cache
def _compiled(name, kwargs):
  """One compressor and its jitted update per name and arguments, reused across
  inputs of the same shape (compiling dominates these tests)."""
  tx = hggjax.get_compressor(name, **({} if name == "none" else dict(kwargs)))
  return tx, jax.jit(tx.update)


def _update_state(name, x, steps, **kwargs):
  tx, update = _compiled(name, tuple(sorted(kwargs.items())))
  g = {"w": jnp.asarray(x)}
  state = tx.init(g)
  for _ in range(steps):
    acc = np.asarray(hggjax.accumulated(g, state)["w"])
    u, state = update(g, state)
    yield np.asarray(u["w"], np.float32), state, acc


def _update(name, x, steps=1, **kwargs):
  """(updates, stats, acc) per step of `name` on the same gradient {"w": x}; acc is
  the vector the compressor selected from (`hggjax.accumulated`). Values travel as they
  are (`helpers.EXACT_WIRE`) unless kwargs say otherwise."""
  kwargs = {"density": 0.01, **helpers.EXACT_WIRE, **kwargs}
  return [(sent, {k: np.asarray(v) for k, v in hggjax.stats(state).items()}, acc)
          for sent, state, acc in _update_state(name, x, steps, **kwargs)]


def _check_largest(sent: np.ndarray, acc: np.ndarray, k: int, low: int):
  """`sent` (the update) holds between `low` and k entries, all among the largest |acc|."""
  idx = np.flatnonzero(sent)
  a = np.abs(acc)
  assert low <= idx.size <= k, (idx.size, low, k)
  np.testing.assert_array_equal(sent[idx], acc[idx])  # sent as they are (float32, one device)
  kth = np.sort(a)[-idx.size] if idx.size else np.inf
  assert a[idx].min() >= kth, "a larger magnitude was left out"


def _tol(k):
  return max(1, int(0.01 * k))


TIES = {
    "5 of 1000 larger": (np.concatenate([np.full(5, 2.0), np.full(995, 1.0)]), 0.01),
    "500 of 1e5 larger": (np.concatenate([np.full(500, 2.0), np.full(99_500, 1.0)]), 0.01),
    "all equal": (np.ones(70_000), 0.01),
    "four values": (np.tile(np.array([1.0, -2.0, 3.0, -4.0]), 20_000), 0.05),
}


@pytest.mark.parametrize("case", sorted(TIES))
def test_exact_methods_send_k_on_ties(case):
  x, density = TIES[case]
  x = x.astype(np.float32)
  k = helpers.k_of(density, x.size)
  for name in EXACT:
    for sent, stats, acc in _update(name, x, steps=2, density=density):
      _check_largest(sent, acc, k, k)
      assert int(stats["selected"]) == k
  for name, kwargs in HGG:
    for sent, _, acc in _update(name, x, steps=3, density=density, **kwargs):
      _check_largest(sent, acc, k, max(1, k - _tol(k)))


def _wide(n, seed=0):
  """0.1% of entries ~N(0, 1e-2), the rest ~N(0, 1e-6)."""
  rng = np.random.default_rng(seed)
  big = rng.random(n) < 0.001
  return np.where(big, rng.normal(0, 1e-2, n), rng.normal(0, 1e-6, n)).astype(np.float32)


@pytest.mark.parametrize("n", [1000, 100_000])
def test_wide_dynamic_range(n):
  x = _wide(n)
  k = helpers.k_of(0.01, n)
  for name in EXACT:
    for sent, _, acc in _update(name, x, steps=2):
      _check_largest(sent, acc, k, k)
  for name, kwargs in HGG:
    for sent, _, acc in _update(name, x, steps=3, **kwargs):
      _check_largest(sent, acc, k, max(1, k - _tol(k)))


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e20, 1e35, 3e38])
def test_extreme_magnitudes(scale):
  """Normal data times `scale`: exact methods exact, HGG-TopK within tolerance, every
  threshold method sends something, nothing overflows into NaN or Inf."""
  rng = np.random.default_rng(1)
  for n in (2000, 70_000):
    base = rng.standard_normal(n).astype(np.float32)
    x = (base * np.float32(scale / 4)).astype(np.float32)  # |x| stays below 3.4e38
    assert np.all(np.isfinite(x)) and np.count_nonzero(x) == n
    k = helpers.k_of(0.01, n)
    for name in COMPRESSED:
      for sent, stats, acc in _update(name, x, steps=2):
        assert np.all(np.isfinite(sent)), (name, n)
        assert int(stats["selected"]) >= 1 and int(stats["nonfinite"]) == 0, (name, n)
        if name in EXACT:
          _check_largest(sent, acc, k, k)
    for name, kwargs in HGG:
      for sent, _, acc in _update(name, x, steps=3, **kwargs):
        _check_largest(sent, acc, k, max(1, k - _tol(k)))


@pytest.mark.parametrize("scale", [1e-30, 1e20, 3e38])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_the_default_wire_stays_finite_and_exact_at_extreme_magnitudes(scale, dtype):
  """float8 values with power-of-two scales: nothing becomes NaN or Inf, even where rounding
  goes past the gradient dtype's largest value, and acc == sent + residual' bit for bit."""
  top = float(np.finfo(dtype).max)
  base = np.random.default_rng(5).standard_normal(4000).astype(np.float32)
  x = np.clip(base * np.float32(min(scale, top) / 4), -top, top).astype(dtype)
  x[:3] = [top, -top, top * 0.999]  # rounds up past the largest in float8
  for sent, state, acc in _update_state("topk", x, 3, density=0.01):
    assert np.all(np.isfinite(sent)) and np.count_nonzero(sent) >= 1
    np.testing.assert_array_equal(acc, sent + np.asarray(state.residual[0]))


@pytest.mark.parametrize("name", ["topk", "gaussian", "redsync", "redsynctrim", "dgcsampling"])
def test_a_power_of_two_rescaling_changes_no_selection(name):
  """Thresholds from means, deviations and counts scale exactly with 2^j."""
  x = helpers.draw("t3", 70_000, seed=2)
  (ref, _, _), = _update(name, x, key=3)
  for j in (-100, -60, 60, 100):
    (got, _, _), = _update(name, x * np.float32(2.0**j), key=3)
    np.testing.assert_array_equal(np.flatnonzero(got), np.flatnonzero(ref), err_msg=str(j))


@pytest.mark.parametrize("x", [np.arange(1.0, 101.0), np.ones(1000), np.repeat([1.0, 3.0], 500)],
                         ids=["arange", "ones", "two values"])
@pytest.mark.parametrize("name", ["gaussian", "gaussian2", "redsync", "dgcsampling"])
def test_threshold_methods_never_send_nothing(name, x):
  x = x.astype(np.float32)
  for _, stats, _ in _update(name, x, steps=4):
    assert 1 <= int(stats["selected"]) <= int(stats["k"])


def test_redsynctrim_sends_the_largest_on_heavy_tails():
  for n, density in ((100_000, 0.01), (2_000_000, 0.001)):
    x = np.random.default_rng(3).standard_t(2, n).astype(np.float32)
    (sent, _, acc), = _update("redsynctrim", x, density=density)
    _check_largest(sent, acc, helpers.k_of(density, n), helpers.k_of(density, n))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("name", NAMES)
def test_density_one_is_sgd(name, momentum):
  """Nothing left unsent: chain(compressor(1.0, momentum=m), sgd) == sgd(momentum=m)."""
  params = jax.tree.map(jnp.zeros_like, helpers.gradients(0))
  kwargs = {} if name == "none" else {"density": 1.0}
  if name != "none":
    kwargs.update(helpers.EXACT_WIRE)  # rounding to float8 would differ from sgd
  compressed = optax.chain(hggjax.get_compressor(name, momentum=momentum, **kwargs),
                           optax.sgd(0.1))
  plain = optax.sgd(0.1, momentum=momentum or None)
  s1, s2 = compressed.init(params), plain.init(params)
  for step in range(3):
    grads = helpers.gradients(step)
    u1, s1 = jax.jit(compressed.update)(grads, s1)
    u2, s2 = jax.jit(plain.update)(grads, s2)
    for key in grads:
      np.testing.assert_allclose(u1[key], u2[key], rtol=1e-6, atol=1e-7, err_msg=key)


def test_global_scope_keeps_each_dtypes_rounding_in_the_residual():
  """A bfloat16 and a float32 leaf selected together: acc == sent + residual' per leaf."""
  rng = np.random.default_rng(4)
  params = {"a": jnp.zeros(3000, jnp.bfloat16), "b": jnp.zeros(2000, jnp.float32)}
  tx = hggjax.topk(0.1, scope="global")
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(3):
    grads = {"a": jnp.asarray(rng.standard_normal(3000), jnp.bfloat16),
             "b": jnp.asarray(rng.standard_normal(2000), jnp.float32)}
    sent, new = update(grads, state)
    assert sent["a"].dtype == jnp.bfloat16
    helpers.assert_error_feedback_exact(
        {k: np.asarray(v, np.float32) for k, v in grads.items()}, state.residual,
        {k: np.asarray(v, np.float32) for k, v in sent.items()}, new.residual)
    state = new


def test_topk_counts_only_what_it_sends():
  x = np.zeros(1000, np.float32)
  x[[3, 500, 900]] = [1.0, -2.0, 3.0]
  (sent, stats, _), = _update("topk", x)  # k = 10, three nonzero
  assert int(stats["selected"]) == 3 and np.count_nonzero(sent) == 3


@pytest.mark.parametrize("name", COMPRESSED)
def test_a_changed_pytree_says_which_leaf(name):
  tx = hggjax.get_compressor(name, density=0.1)
  state = tx.init({"w": jnp.zeros((10, 10)), "b": jnp.zeros(10)})
  reshaped = {"w": jnp.zeros((5, 10)), "b": jnp.zeros(10)}
  if state.residual is not None:  # per-leaf state: the leaf that changed is named
    with pytest.raises(ValueError, match=r"gradient leaf \['w'\] has shape \(5, 10\) but tx.init saw"):
      tx.update(reshaped, state)
  else:  # nothing kept per leaf: any shape works, and k follows it
    _, new = tx.update(reshaped, state)
    assert int(new.stats.k) == 5 + 1
  with pytest.raises(ValueError, match="leaves but tx.init saw|selection groups but tx.init saw"):
    tx.update({"w": jnp.zeros((10, 10))}, state)


def test_a_changed_pytree_with_momentum_says_which_leaf():
  tx = hggjax.randomk(0.1, momentum=0.9)
  state = tx.init({"w": jnp.zeros((10, 10)), "b": jnp.zeros(10)})
  with pytest.raises(ValueError, match=r"gradient leaf \['b'\] has shape \(3,\)"):
    tx.update({"w": jnp.zeros((10, 10)), "b": jnp.zeros(3)}, state)


def test_complex_leaves_are_refused_with_a_reason():
  tx = hggjax.topk(0.1)
  with pytest.raises(ValueError, match=r"leaf \['z'\] is complex64: .*real"):
    tx.init({"z": jnp.zeros(8, jnp.complex64)})
  state = tx.init({"z": jnp.zeros(8)})
  with pytest.raises(ValueError, match=r"leaf \['z'\] is complex64"):
    tx.update({"z": jnp.zeros(8, jnp.complex64)}, state)


def test_leaves_beyond_int32_positions_are_refused_with_the_limit():
  tx = hggjax.hggtopk(0.01)
  huge = jax.ShapeDtypeStruct((2**31,), jnp.float32)
  with pytest.raises(ValueError, match="at most 2147483647"):
    jax.eval_shape(tx.init, {"w": huge})


def test_strided_sample_stays_in_range_past_two_to_the_thirty():
  n = 2**31 - 1
  idx = np.asarray(jax.jit(lambda key: sampling.strided_sample(key, n, 4096))(jax.random.PRNGKey(0)))
  assert idx.min() >= 0 and idx.max() < n and np.unique(idx).size == idx.size
