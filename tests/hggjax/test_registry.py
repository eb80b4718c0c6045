"""The registry's names, lookup and argument validation."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hggjax

ELEVEN = ["dgcsampling", "gaussian", "gaussian2", "hggtopk", "none", "randomk",
          "randomkec", "redsync", "redsynctrim", "topk", "topk2"]


def test_registry_holds_exactly_the_eleven_names():
  assert sorted(hggjax.compressors) == ELEVEN
  for name in ELEVEN:
    assert getattr(hggjax, name) is hggjax.compressors[name]
  assert hggjax.ERROR_FEEDBACK == {"topk", "gaussian", "randomkec", "dgcsampling", "redsync",
                                   "redsynctrim", "hggtopk"}


@pytest.mark.parametrize("variant,base,error_feedback", [
    ("topk2", "topk", False), ("gaussian2", "gaussian", False), ("randomkec", "randomk", True)])
def test_traditional_names_are_the_base_constructor_with_error_feedback_set(
    variant, base, error_feedback):
  fn = hggjax.compressors[variant]
  assert fn.func is hggjax.compressors[base] and fn.keywords == {"error_feedback": error_feedback}
  g = {"w": jnp.arange(1.0, 9.0)}
  state = fn(0.25).init(g)
  assert (state.residual is not None) == error_feedback
  assert (hggjax.compressors[base](0.25, error_feedback=error_feedback).init(g).residual
          is not None) == error_feedback


def test_error_feedback_must_be_a_bool():
  with pytest.raises(ValueError, match="error_feedback must be True or False"):
    hggjax.topk(0.1, error_feedback=1)


def test_building_a_compressor_starts_no_backend():
  # The harness builds (and so validates) the compressor before it sets JAX's device
  # count, which must precede the first backend.
  code = ("import jax, hggjax; from jax._src import xla_bridge as xb; "
          "[hggjax.get_compressor(n, density=0.1, key=3) for n in hggjax.compressors]; "
          "print(xb.backends_are_initialized())")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"


def test_unknown_name_lists_the_valid_ones():
  with pytest.raises(ValueError, match="unknown compressor 'gtopk'; valid names: dgcsampling, gaussian"):
    hggjax.get_compressor("gtopk", density=0.1)


@pytest.mark.parametrize("density", [0, 0.0, -0.1, 1.5, float("nan"), "0.1", None, True])
@pytest.mark.parametrize("name", [n for n in ELEVEN if n != "none"])
def test_density_outside_unit_interval_is_rejected(name, density):
  with pytest.raises(ValueError, match=r"density must be a Python float in \(0, 1\]"):
    hggjax.get_compressor(name, density=density)


def test_none_accepts_and_checks_density():
  hggjax.none(density=0.05)
  with pytest.raises(ValueError, match="density"):
    hggjax.none(density=2.0)


@pytest.mark.parametrize("kwargs,match", [
    ({"num_bins": 1}, r"num_bins must be an integer in \[2, 1048576\]"),
    ({"num_bins": 2.5}, r"num_bins must be an integer in \[2, 1048576\]"),
    ({"num_bins": 1 << 21}, r"num_bins must be an integer in \[2, 1048576\]"),
    ({"gamma": 0.0}, r"gamma must be a finite number > 0"),
    ({"gamma": -1.0}, r"gamma must be a finite number > 0"),
    ({"gamma": float("inf")}, r"gamma must be a finite number > 0"),
    ({"gamma": float("nan")}, r"gamma must be a finite number > 0"),
    ({"tolerance": 0.0}, r"tolerance must be a float in \(0, 1\]"),
    ({"tolerance": 1.5}, r"tolerance must be a float in \(0, 1\]"),
    ({"beta": 0.0}, r"beta must be a float in \(0, 1\]"),
    ({"beta": 1.01}, r"beta must be a float in \(0, 1\]"),
])
def test_hggtopk_knobs_are_validated(kwargs, match):
  with pytest.raises(ValueError, match=match):
    hggjax.hggtopk(0.05, **kwargs)


def test_hggtopk_defaults_are_hggtopks_published_ones():
  import inspect
  params = inspect.signature(hggjax.hggtopk).parameters
  assert {k: params[k].default for k in ("num_bins", "gamma", "tolerance", "beta")} == {
      "num_bins": 1024, "gamma": 1000.0, "tolerance": 0.01, "beta": 0.98}


@pytest.mark.parametrize("kwargs,match", [
    ({"scope": "layer"}, r"scope must be one of \('leaf', 'global'\)"),
    ({"min_size": -1}, r"min_size must be an integer >= 0"),
    ({"axis_name": 3}, r"axis_name must be None"),
    ({"axis_name": ""}, r"axis_name must be None .* non-empty string"),
    ({"key": "seed"}, r"key must be an integer seed or a JAX PRNG key"),
    ({"key": 1.5}, r"key must be an integer seed or a JAX PRNG key"),
    ({"axis": "data"}, r"unknown option\(s\) \['axis'\]"),
])
def test_shared_options_are_validated(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    hggjax.topk(0.05, **kwargs)


@pytest.mark.parametrize("name,kwargs,match", [
    ("gaussian", {"refine_steps": -1}, r"refine_steps must be an integer in \[0, 64\]"),
    ("gaussian2", {"refine_steps": 65}, r"refine_steps must be an integer in \[0, 64\]"),
    ("dgcsampling", {"refine_steps": 100}, r"refine_steps must be an integer in \[0, 64\]"),
    ("dgcsampling", {"sample_ratio": 0.0}, r"sample_ratio must be a float in \(0, 1\]"),
    ("dgcsampling", {"min_sample": 0}, "min_sample must be an integer >= 1"),
    ("redsync", {"search_steps": 0}, r"search_steps must be an integer in \[1, 64\]"),
    ("redsync", {"search_steps": 3000}, r"search_steps must be an integer in \[1, 64\]"),
    ("redsynctrim", {"trim_steps": 0}, r"trim_steps must be an integer in \[1, 64\]"),
])
def test_method_knobs_are_validated(name, kwargs, match):
  with pytest.raises(ValueError, match=match):
    hggjax.get_compressor(name, density=0.05, **kwargs)


def test_device_index_under_an_axis_is_rejected():
  import jax
  tx = hggjax.topk(0.5, axis_name="i")
  g = jnp.ones((2, 4))
  state = jax.tree.map(lambda x: jnp.stack([x, x]), tx.init(g[0]))
  with pytest.raises(ValueError, match="device_index is for axis_name=None only"):
    jax.vmap(lambda g, s: tx.update(g, s, device_index=0), axis_name="i")(g, state)


def test_importing_hggjax_stays_lean():
  code = ("import sys, hggjax; heavy = {'flax', 'tensorflow', 'tensorflow_datasets', "
          "'train', 'matplotlib', 'orbax'} & set(sys.modules); print(sorted(heavy))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("key", [3, np.int64(3), np.uint32(3), jax.random.PRNGKey(3),
                                 jax.random.key(3)])
def test_any_integer_like_seed_or_prng_key_is_accepted(key):
  tx = hggjax.randomk(0.5, key=key)
  g = {"w": jnp.arange(1.0, 9.0)}
  out, state = jax.jit(tx.update)(g, tx.init(g))
  assert int(hggjax.stats(state)["selected"]) == 4
  if not isinstance(key, jax.Array) or not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    ref = hggjax.randomk(0.5, key=3)
    np.testing.assert_array_equal(out["w"], jax.jit(ref.update)(g, ref.init(g))[0]["w"])
