"""The exchange schemes on 8 fake CPU devices (and a 2 x 4 two-level mesh), against the
NumPy references in `exchange_reference`: the mean, what each device delivered, the
residual identity, the same update everywhere, and bytes equal to the HLO's."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import hggjax
from hggjax import exchange, regions
from hggjax.payload import Payload
from tests.hggjax import exchange_reference as ref
from tests.hggjax import helpers, hlo_bytes

DEVICES = 8
HOSTS, LOCAL = 2, 4


def _mesh(p=DEVICES):
  return jax.make_mesh((p,), ("data",), devices=jax.devices()[:p])


def _two_level_mesh():
  return jax.make_mesh((HOSTS, LOCAL), ("hosts", "local"), devices=jax.devices()[:HOSTS * LOCAL])


def test_reference_constants_are_the_library_constants():
  assert (ref.CAPACITY, ref.SHARE) == (regions.CAPACITY, regions.SHARE)


def _payloads(p, m, c, n, rng, skewed):
  """Per device m rows of c distinct positions (the last 2 slots unused). Skewed: every
  position a multiple of P, all in region 0, whose buckets overflow."""
  stride = p if skewed else 1
  idx = np.stack([[rng.choice(n // stride, c, replace=False) * stride for _ in range(m)]
                  for _ in range(p)])
  idx[:, :, -2:] = n
  vals = rng.standard_normal((p, m, c)).astype(np.float32)
  vals[:, :, -2:] = 0
  return vals, idx.astype(np.int32)


@pytest.mark.parametrize("scheme,p,dtype", [
    ("sparse_allreduce", 8, jnp.float32), ("sparse_allreduce", 8, jnp.bfloat16),
    ("sparse_allreduce", 3, jnp.float32), ("allgather", 8, jnp.float32)])
def test_sparse_mean_equals_the_numpy_reference(scheme, p, dtype):
  n, m, c = 1000, 2, 60
  mesh = _mesh(p)

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("data"), P("data")),
                     out_specs=(P("data"), P("data"), P("data")))
  def run(v, i):
    mean, sent = exchange.sparse_mean(Payload(v[0], i[0]), n, "data", scheme)
    return mean[None], sent.values[None], sent.indices[None]

  rng = np.random.default_rng(p)
  overflowed = 0
  for skewed in (False, True):
    vals, idx = _payloads(p, m, c, n, rng, skewed)
    size = regions.region_size(n, p)  # regions.region_order: by (region, local position)
    order = np.argsort(np.where(idx < n, idx % p * size + idx // p, p * size), axis=-1)
    vals, idx = np.take_along_axis(vals, order, -1), np.take_along_axis(idx, order, -1)
    vals = np.asarray(jnp.asarray(vals, dtype))  # what the wire carries
    sharding = NamedSharding(mesh, P("data"))
    means, sent_values, sent_indices = map(np.asarray, run(*jax.device_put((vals, idx), sharding)))
    if scheme == "allgather":
      expected, delivered = ref.allgather(vals, idx, n)
    else:
      expected, delivered, _ = ref.sparse_allreduce(vals, idx, n)
      overflowed += int(np.sum((idx < n) & ~delivered))
    for d in range(p):  # every device holds the same mean, bit for bit the reference's
      np.testing.assert_array_equal(means[d], expected, err_msg=(skewed, d))
    for d in range(p):  # delivered: the reference's (position, value) pairs, any slot order
      for r in range(m):
        got = sent_indices[d, r] < n
        np.testing.assert_array_equal(np.sort(sent_indices[d, r][got]), np.sort(idx[d, r][delivered[d, r]]))
        order = np.argsort(sent_indices[d, r][got])
        np.testing.assert_array_equal(sent_values[d, r][got][order],
                                      vals[d, r][delivered[d, r]][np.argsort(idx[d, r][delivered[d, r]])])
        assert np.all(sent_values[d, r][~got] == 0)
  assert scheme == "allgather" or overflowed > 0


# --- the transform with exchange="sparse_allreduce" ----------------------------------

SHAPES = {"skewed": (4096,), "wide": (64, 32), "bias": (10,)}


def _gradients(step: int, p: int) -> dict[str, np.ndarray]:
  """[p, ...] per leaf; "skewed" is large at every 8th position on every device, so the
  top-k of each device crowds region 0 and overflows its bucket."""
  grads = [helpers.gradients(100 * step + d, shapes=SHAPES) for d in range(p)]
  out = {name: np.stack([g[name] for g in grads]) for name in SHAPES}
  out["skewed"][:, ::8] *= 10
  return out


@functools.lru_cache(maxsize=None)
def _sharded_update(scheme: str, density: float, shapes: tuple, two_level: bool = False,
                    dtype=jnp.float32):
  """(tx, mesh, jitted shard_map update returning the per-device updates) for `shapes`."""
  axis = ("hosts", "local") if two_level else "data"
  mesh = _two_level_mesh() if two_level else _mesh()
  tx = hggjax.topk(density, axis_name=axis, exchange=scheme, **helpers.EXACT_WIRE)
  params = {name: jnp.zeros(shape, dtype) for name, shape in shapes}
  state = hggjax.shard_state(tx.init(params), mesh, axis)
  specs = hggjax.state_specs(state, axis)
  batch = P(axis)

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(batch, specs),
                     out_specs=(batch, specs))
  def update(grads, state):
    out, state = tx.update(jax.tree.map(lambda g: g[0], grads), state)
    return jax.tree.map(lambda u: u[None], out), state  # each device's own copy

  return mesh, state, update, batch


def _reference_step(grads, residual, density, p, reference):
  """Per leaf: the exact top-k of each device's acc, exchanged by `reference`.

  Returns ({leaf: mean}, {leaf: new residual [p, ...]}, {leaf: sent [p, ...]},
  {leaf: delivered count per device [p]}).
  """
  means, residuals, sents, counts = {}, {}, {}, {}
  for i, name in enumerate(sorted(grads)):
    acc = grads[name].reshape(p, -1).astype(np.float32) + residual[i].reshape(p, -1)
    n = acc.shape[1]
    k = helpers.k_of(density, n)
    idx = np.stack([helpers.exact_topk_positions(a, k) for a in acc]).astype(np.int32)
    vals = np.take_along_axis(acc, idx, axis=1)
    mean, delivered = reference(vals[:, None], idx[:, None], n)[:2]
    sent = np.zeros_like(acc)
    for d in range(p):
      sent[d, idx[d][delivered[d, 0]]] = vals[d][delivered[d, 0]]
    shape = grads[name].shape[1:]
    means[name] = mean[0].reshape(shape)
    sents[name] = sent.reshape((p,) + shape)
    residuals[name] = (acc - sent).reshape((p,) + shape)
    counts[name] = delivered.sum(axis=(1, 2))
  return means, residuals, sents, counts


def test_sparse_allreduce_update_matches_the_reference_and_keeps_what_was_not_sent():
  density = 0.05
  mesh, state, update, batch = _sharded_update("sparse_allreduce", density,
                                               tuple(SHAPES.items()))
  for step in range(2):
    grads = _gradients(step, DEVICES)
    residual = [np.asarray(r) for r in state.residual]
    out, state = update(jax.device_put(grads, NamedSharding(mesh, batch)), state)
    means, residuals, sents, counts = _reference_step(grads, residual, density, DEVICES,
                                                      ref.sparse_allreduce)
    # Each device's top-k of "skewed" holds more of region 0 than its bucket takes.
    n, k = 4096, helpers.k_of(density, 4096)
    acc = grads["skewed"] + residual[sorted(SHAPES).index("skewed")]
    in_region_0 = [np.sum(helpers.exact_topk_positions(a, k) % DEVICES == 0) for a in acc]
    assert min(in_region_0) > regions.bucket_capacity(k, DEVICES)
    for i, name in enumerate(sorted(SHAPES)):
      for d in range(DEVICES):  # the same update on every device: the reference mean
        np.testing.assert_array_equal(np.asarray(out[name])[d], means[name], err_msg=(name, d))
      np.testing.assert_array_equal(np.asarray(state.residual[i]), residuals[name], err_msg=name)
      # acc == sent + residual', bit for bit, overflow and dropped slots included.
      acc = grads[name] + residual[i]
      np.testing.assert_array_equal(acc, sents[name] + np.asarray(state.residual[i]))
      # The mean is the average of what the devices sent (power-of-two P: exact).
      np.testing.assert_array_equal(means[name], np.sum(sents[name] * np.float32(1 / DEVICES), 0))
    # `selected` counts the delivered slots.
    np.testing.assert_array_equal(np.asarray(hggjax.stats(state)["selected"]),
                                  sum(counts[name] for name in SHAPES))


def _first_device_bytes(stats):
  return float(np.asarray(stats["sent_bytes"]).ravel()[0]), float(
      np.asarray(stats["received_bytes"]).ravel()[0])


@pytest.mark.parametrize("scheme,dtype,two_level", [
    pytest.param("allgather", jnp.float32, False, marks=pytest.mark.slow),  # test_exchange has it
    ("sparse_allreduce", jnp.float32, False),
    ("sparse_allreduce", jnp.bfloat16, False), ("sparse_allreduce", jnp.float32, True)])
def test_statistics_are_the_bytes_of_the_collectives_in_the_hlo(scheme, dtype, two_level):
  density = 0.01
  shapes = (("w", (200, 500)), ("b", (300,)))  # k = 1000 and 3 (odd: bfloat16 pads)
  mesh, state, update, batch = _sharded_update(scheme, density, shapes, two_level, dtype)
  grads = {name: jnp.asarray(np.random.default_rng(0).standard_normal((DEVICES,) + shape), dtype)
           for name, shape in shapes}
  grads = jax.device_put(grads, NamedSharding(mesh, batch))
  _, new = update(grads, state)
  hlo = update.lower(grads, state).compile().as_text()
  stats = hggjax.stats(new)
  for key in ("sent_bytes", "received_bytes"):  # the same on every device
    assert len(set(np.asarray(stats[key]).tolist())) == 1
  sent, received = _first_device_bytes(stats)
  assert (sent, received) == hlo_bytes.sent_and_received(hlo)
  reduces = [c for c in hlo_bytes.collectives(hlo) if c["kind"] == "all-reduce"]
  if two_level:  # one dense mean over the fast axis, the gradients' size
    assert sum(c["bytes"] for c in reduces) == 200 * 500 * 4 + 300 * 4
    assert {c["group"] for c in reduces} == {LOCAL}
  else:
    assert not reduces
  if dtype == jnp.float32 and not two_level:  # the target at P = 8, d = 0.01
    slots = received / 8 - ref.received_slots(scheme, DEVICES, 3)  # "b" (k = 3) aside
    assert slots == ref.received_slots(scheme, DEVICES, 1000)
    assert slots <= (3 if scheme == "sparse_allreduce" else 7) * 1000


# --- two levels: ("hosts", "local") --------------------------------------------------

@pytest.mark.parametrize("scheme", [pytest.param("allgather", marks=pytest.mark.slow),
                                    "sparse_allreduce"])
def test_two_level_equals_the_reference_over_hosts(scheme):
  """Equal gradients on a host's 4 devices make its fast-axis mean exact, so the update
  is bit for bit the reference exchange over the 2 hosts; then unequal ones: the mean
  over the host first (to float32 rounding), the same state on a host's devices."""
  density = 0.05
  mesh, state, update, batch = _sharded_update(scheme, density, tuple(SHAPES.items()),
                                               two_level=True)
  assert state.residual[0].shape[0] == HOSTS  # one residual per host
  reference = ref.sparse_allreduce if scheme == "sparse_allreduce" else ref.allgather
  per_host = _gradients(0, HOSTS)
  grads = {name: np.repeat(g, LOCAL, axis=0) for name, g in per_host.items()}
  residual = [np.asarray(r) for r in state.residual]
  out, state = update(jax.device_put(grads, NamedSharding(mesh, batch)), state)
  means, residuals, _, _ = _reference_step(per_host, residual, density, HOSTS, reference)
  for i, name in enumerate(sorted(SHAPES)):
    for d in range(HOSTS * LOCAL):
      np.testing.assert_array_equal(np.asarray(out[name])[d], means[name], err_msg=(name, d))
    np.testing.assert_array_equal(np.asarray(state.residual[i]), residuals[name])

  grads = _gradients(1, HOSTS * LOCAL)
  residual = [np.asarray(r) for r in state.residual]
  out, state = update(jax.device_put(grads, NamedSharding(mesh, batch)), state)
  host_mean = {name: g.reshape((HOSTS, LOCAL) + g.shape[1:]).mean(1) for name, g in grads.items()}
  means, _, _, _ = _reference_step(host_mean, residual, density, HOSTS, reference)
  for i, name in enumerate(sorted(SHAPES)):
    for d in range(HOSTS * LOCAL):
      np.testing.assert_allclose(np.asarray(out[name])[d], means[name], rtol=1e-5, atol=1e-6)
      np.testing.assert_array_equal(np.asarray(out[name])[d], np.asarray(out[name])[0])
    shards = state.residual[i].addressable_shards  # a host's devices hold the same residual
    by_host = {}
    for s in shards:
      by_host.setdefault(s.index[0].start, []).append(np.asarray(s.data))
    assert len(by_host) == HOSTS
    for copies in by_host.values():
      assert len(copies) == LOCAL and all(np.array_equal(c, copies[0]) for c in copies)


# --- options -------------------------------------------------------------------------

def test_unknown_exchange_says_what_to_use():
  with pytest.raises(ValueError, match="allgather.*sparse_allreduce"):
    hggjax.topk(0.1, exchange="ring")
  with pytest.raises(ValueError, match="allgather"):
    hggjax.get_compressor("hggtopk", density=0.1, exchange=None)
  hggjax.none(exchange="sparse_allreduce")  # accepted everywhere, nothing to do dense


@pytest.mark.parametrize("axis", [("hosts",), ("a", "a"), ("a", ""), ("a", "b", "c"), ("a", 1)])
def test_two_level_axis_name_is_two_distinct_names(axis):
  with pytest.raises(ValueError, match="two distinct non-empty axis names"):
    hggjax.topk(0.1, axis_name=axis)


def test_sparse_allreduce_without_an_axis_is_the_local_update():
  grads = {"w": np.arange(-50, 50, dtype=np.float32)}
  results = []
  for scheme in ("allgather", "sparse_allreduce"):
    tx = hggjax.topk(0.05, exchange=scheme)
    results.append(jax.jit(tx.update)(grads, tx.init(grads)))
  jax.tree.map(np.testing.assert_array_equal, *results)


def test_two_level_state_is_sharded_over_the_slow_axis():
  tx = hggjax.topk(0.1, axis_name=("hosts", "local"))
  state = hggjax.shard_state(tx.init({"w": jnp.ones(64)}), _two_level_mesh(), ("hosts", "local"))
  assert state.residual[0].shape == (HOSTS, 64)
  assert state.residual[0].sharding.spec == P("hosts")
  specs = hggjax.state_specs(state, ("hosts", "local"))
  assert specs.residual[0] == P("hosts")


@pytest.mark.slow
def test_sparse_allreduce_under_pmap_equals_shard_map():
  density = 0.05
  mesh, state, update, batch = _sharded_update("sparse_allreduce", density, tuple(SHAPES.items()))
  tx = hggjax.topk(density, axis_name="data", exchange="sparse_allreduce")
  params = {name: jnp.zeros(shape) for name, shape in SHAPES.items()}
  pstate = jax.tree.map(lambda x: jnp.stack([x] * DEVICES), tx.init(params))
  pmapped = jax.pmap(tx.update, axis_name="data", devices=jax.devices()[:DEVICES])
  for step in range(2):
    grads = _gradients(step, DEVICES)
    out, state = update(jax.device_put(grads, NamedSharding(mesh, batch)), state)
    pout, pstate = pmapped(grads, pstate)
    for name in SHAPES:
      np.testing.assert_array_equal(np.asarray(pout[name]), np.asarray(out[name]))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a)[:, 0], np.asarray(b)),
                 pstate.residual, state.residual)


def test_traffic_meets_the_scaling_targets_at_one_percent():
  """n = 25M float32, d = 1%: <= 3k slots received at P = 8 (allgather 7k), >= 5x and
  >= 50x fewer bytes than allgather at P = 64 and 1024, below a dense ring at every P."""
  n = 25_000_000
  k = n // 100
  received = lambda scheme, p: exchange.traffic(scheme, p, 1, k, n, 4)[1]  # noqa: E731
  assert received("sparse_allreduce", 8) <= 3 * k * 8 < received("allgather", 8) == 7 * k * 8
  assert received("allgather", 64) >= 5 * received("sparse_allreduce", 64)
  assert received("allgather", 1024) >= 50 * received("sparse_allreduce", 1024)
  for p in (2 ** i for i in range(1, 11)):
    dense_ring = exchange.dense_traffic(p, 4 * n)[1]
    assert received("sparse_allreduce", p) < dense_ring
