"""A seeded property battery over every compressor.

Random pytrees (float32, bfloat16, float16 leaves of several sizes, one of them on
the packed fast paths), densities and value distributions (normal, Laplace,
Student-t 2 and 3, all equal, few distinct values, wide dynamic range, 1e-30 and
1e30 scales, sparse with exact zeros), with NaN and Inf injected now and then.
Invariants checked on every step:
  - error feedback: acc == sent + residual' bit for bit, per leaf;
  - counts: nothing beyond k; exact methods send min(k, nonzeros); HGG-TopK at
    least min(nonzeros, max(1, k - tol_k)); threshold methods never nothing when
    something is nonzero, so no step stalls;
  - a non-finite step sends nothing and leaves every state but the statistics;
  - the same updates under jit, pmap and shard_map (2 devices) as device by device.
The default draws take about a minute; ``-m slow`` runs a longer battery.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import hggjax

METHODS = [(name, {}) for name in sorted(hggjax.compressors)] + [("hggtopk", {"pipeline": True})]
EXACT = {"topk", "topk2", "redsynctrim"}
THRESHOLD = {"gaussian", "gaussian2", "dgcsampling", "redsync"}
DISTRIBUTIONS = ("normal", "laplace", "t2", "t3", "equal", "few", "wide", "tiny", "huge",
                 "sparse")
SIZES = (7, 300, 4096, 70_001)  # the last above the packed paths' MIN_FAST_N
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _values(rng, distribution: str, size: int) -> np.ndarray:
  if distribution == "normal":
    x = rng.standard_normal(size)
  elif distribution == "laplace":
    x = rng.laplace(size=size)
  elif distribution in ("t2", "t3"):
    x = rng.standard_t(int(distribution[1]), size)
  elif distribution == "equal":
    x = np.full(size, rng.choice([-1.0, 1.0]) * 0.5)
  elif distribution == "few":
    x = rng.choice([-2.0, -0.5, 0.5, 1.0, 3.0], size)
  elif distribution == "wide":
    big = rng.random(size) < 0.001
    x = np.where(big, rng.normal(0, 1e-2, size), rng.normal(0, 1e-6, size))
  elif distribution == "tiny":
    x = rng.standard_normal(size) * 1e-30
  elif distribution == "huge":
    x = rng.standard_normal(size) * 1e30
  else:  # sparse, with exact zeros
    x = np.where(rng.random(size) < 0.02, rng.standard_normal(size), 0.0)
  return x


def _draw_config(rng):
  """(shapes, dtypes, density): a random pytree of 1-3 leaves."""
  count = int(rng.integers(1, 4))
  sizes = rng.choice(SIZES, count, replace=False)
  dtypes = [DTYPES[int(i)] for i in rng.integers(0, len(DTYPES), count)]
  density = float(rng.choice([0.01, 0.05, 0.3]))
  return tuple(int(s) for s in sizes), tuple(dtypes), density


def _draw_grads(rng, sizes, dtypes, poison: bool):
  grads = {}
  for i, (size, dtype) in enumerate(zip(sizes, dtypes)):
    x = _values(rng, str(rng.choice(DISTRIBUTIONS)), size)
    if dtype == jnp.float16:
      x = np.clip(x, -6e4, 6e4)  # inside float16's range
    grads[f"l{i}"] = np.asarray(x, np.float32)
  if poison:
    leaf = f"l{int(rng.integers(0, len(sizes)))}"
    grads[leaf][int(rng.integers(0, grads[leaf].size))] = rng.choice([np.nan, np.inf, -np.inf])
  return {k: jnp.asarray(v, dtype) for (k, v), dtype in zip(grads.items(), dtypes)}


@functools.cache
def _compiled(name, pipeline, density, sizes, dtypes):
  kwargs = {} if name == "none" else {"density": density}
  if pipeline:
    kwargs["pipeline"] = True
  tx = hggjax.get_compressor(name, key=7, **kwargs)
  params = {f"l{i}": jnp.zeros(s, d) for i, (s, d) in enumerate(zip(sizes, dtypes))}
  return tx, params, jax.jit(tx.update), jax.jit(hggjax.accumulated)


def _tol(k):
  return max(1, int(0.01 * k))


def _check_step(name, tx, grads, state, new, out):
  stats = {k: np.asarray(v) for k, v in hggjax.stats(new).items()}
  finite = all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads.values())
  if not finite:
    assert int(stats["nonfinite"]) == 1 and int(stats["selected"]) == 0
    for g in jax.tree.leaves(out):
      assert not np.any(np.asarray(g, np.float32))
    for a, b in zip(jax.tree.leaves(state._replace(stats=None)),
                    jax.tree.leaves(new._replace(stats=None))):
      np.testing.assert_array_equal(a, b)
    return
  assert int(stats["nonfinite"]) == 0
  acc = {k: np.asarray(v, np.float32) for k, v in hggjax.accumulated(grads, state).items()}
  sent = {k: np.asarray(v, np.float32) for k, v in out.items()}
  names = sorted(grads)
  if new.residual is not None:  # error feedback, bit for bit
    for i, leaf in enumerate(names):
      if new.residual[i] is not None:
        np.testing.assert_array_equal(acc[leaf], sent[leaf] + np.asarray(new.residual[i]),
                                      err_msg=leaf)
  if name == "none":
    return
  ks = [max(1, round(tx_density(tx) * a.size)) for a in acc.values()]  # scope="leaf"
  assert int(stats["selected"]) <= sum(ks)
  for leaf, k in zip(names, ks):
    nonzero = int(np.count_nonzero(acc[leaf]))
    got = int(np.count_nonzero(sent[leaf]))
    if k >= acc[leaf].size:  # density 1 for this leaf: everything
      assert got == nonzero
    elif name in EXACT:
      assert got == min(k, nonzero), (leaf, got, k, nonzero)
    elif name == "hggtopk":
      assert min(nonzero, max(1, k - _tol(k))) <= got <= k, (leaf, got, k, nonzero)
    elif name in THRESHOLD:
      assert got <= k and (got >= 1 or nonzero == 0), (leaf, got, k, nonzero)


def tx_density(tx):
  return tx.density


def _run_battery(configs: int, steps: int, seed: int):
  rng = np.random.default_rng(seed)
  for (name, extra) in METHODS:
    for _ in range(configs):
      sizes, dtypes, density = _draw_config(rng)
      tx, params, update, _ = _compiled(name, bool(extra), density, sizes, dtypes)
      state = tx.init(params)
      for step in range(steps):
        grads = _draw_grads(rng, sizes, dtypes, poison=rng.random() < 0.2)
        out, new = update(grads, state)
        try:
          _check_step(name, _Density(density), grads, state, new, out)
        except AssertionError as err:
          raise AssertionError(f"{name}{extra} sizes={sizes} dtypes={dtypes} density={density} "
                               f"step={step}: {err}") from None
        state = new


class _Density:
  def __init__(self, density):
    self.density = density


def test_battery():
  _run_battery(configs=2, steps=4, seed=0)


@pytest.mark.slow
def test_battery_long():
  _run_battery(configs=6, steps=12, seed=1)


@pytest.mark.parametrize("name,extra", METHODS, ids=[n + ("-pipeline" if e else "") for n, e in METHODS])
def test_jit_pmap_and_shard_map_agree_with_device_by_device(name, extra):
  devices = 2
  mesh = jax.make_mesh((devices,), ("data",), devices=jax.devices()[:devices])
  kwargs = dict(extra, **({} if name == "none" else {"density": 0.05}))
  sharded = hggjax.get_compressor(name, axis_name="data", key=3, **kwargs)
  local = hggjax.get_compressor(name, key=3, **kwargs)
  rng = np.random.default_rng(5)
  params = {"l0": jnp.zeros(300), "l1": jnp.zeros(5000, jnp.bfloat16)}
  per_device = [_draw_grads(rng, (300, 5000), (jnp.float32, jnp.bfloat16), poison=d == 1)
                for d in range(devices)]
  grads = jax.tree.map(lambda *g: jnp.stack(g), *per_device)
  expected = [jax.jit(functools.partial(local.update, device_index=d))(per_device[d],
                                                                        local.init(params))[0]
              for d in range(devices)]
  mean = {k: (sum(np.asarray(e[k], np.float32) for e in expected) / devices) for k in params}

  state = hggjax.shard_state(sharded.init(params), mesh, "data")
  specs = hggjax.state_specs(state, "data")
  step = jax.jit(jax.shard_map(lambda g, s: sharded.update(jax.tree.map(lambda x: x[0], g), s),
                               mesh=mesh, in_specs=(P("data"), specs), out_specs=(P(), specs)))
  out, _ = step(jax.device_put(grads, NamedSharding(mesh, P("data"))), state)
  stacked = jax.tree.map(lambda x: jnp.stack([x] * devices), sharded.init(params))
  pout, _ = jax.pmap(sharded.update, axis_name="data", devices=jax.devices()[:devices])(
      grads, stacked)
  for k in params:
    np.testing.assert_allclose(np.asarray(out[k], np.float32), mean[k], rtol=1e-2, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(pout[k][0]), np.asarray(out[k]))
    np.testing.assert_array_equal(np.asarray(pout[k][1]), np.asarray(out[k]))
