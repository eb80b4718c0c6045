"""Coded wire formats through whole updates on 8 fake CPU devices (and a 2 x 4 mesh):
the mean is the mean of what every device's residual gave up, positions are coded
without loss, values are what the wire dtype holds, and the statistics are the
compiled program's collective bytes."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import hggjax
from tests.hggjax import helpers, hlo_bytes

DEVICES = 8
SHAPES = (("w", (200, 500)), ("b", (300,)))  # k = 1000 and 3 at 1%

BF16 = {"value_dtype": "bfloat16", "index_coding": "packed"}
FP8 = {"value_dtype": "float8_e4m3fn", "scale_group": 256, "index_coding": "packed"}
F32_PACKED = {"value_dtype": None, "index_coding": "packed"}


@functools.lru_cache(maxsize=None)
def _update(options: tuple, two_level: bool = False, density: float = 0.01,
            shapes: tuple = SHAPES, method: str = "topk"):
  """(mesh, state, jitted shard_map update returning each device's update and state)."""
  options = dict(options)
  axis = ("hosts", "local") if two_level else "data"
  if two_level:
    mesh = jax.make_mesh((2, 4), axis, devices=jax.devices()[:DEVICES])
  else:
    mesh = jax.make_mesh((DEVICES,), (axis,), devices=jax.devices()[:DEVICES])
  tx = getattr(hggjax, method)(density, axis_name=axis, **options)
  state = hggjax.shard_state(tx.init({name: jnp.zeros(s) for name, s in shapes}), mesh, axis)
  specs = hggjax.state_specs(state, axis)

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(axis), specs),
                     out_specs=(P(axis), specs))
  def update(grads, state):
    out, state = tx.update(jax.tree.map(lambda g: g[0], grads), state)
    return jax.tree.map(lambda u: u[None], out), state

  return mesh, state, update, P(axis)


def _grads(step: int, shapes=SHAPES) -> dict:
  rng = np.random.default_rng(step)
  return {name: (rng.standard_normal((DEVICES,) + s) * 1e-3).astype(np.float32)
          for name, s in shapes}


def _run(options: dict, steps: int = 2, **kwargs):
  """Per step: (grads, old residuals, updates, new residuals), all as NumPy."""
  mesh, state, update, batch = _update(tuple(sorted(options.items())), **kwargs)
  shapes = kwargs.get("shapes", SHAPES)
  out = []
  for step in range(steps):
    grads = _grads(step, shapes)
    old = [np.asarray(r) for r in state.residual]
    updates, state = update(jax.device_put(grads, NamedSharding(mesh, batch)), state)
    out.append((grads, old, jax.tree.map(np.asarray, updates),
                [np.asarray(r) for r in state.residual]))
  return out


CASES = {
    "allgather-bf16": (BF16, {}),
    "allgather-fp8": (FP8, {}),
    "allgather-fp8-e5m2": ({**FP8, "value_dtype": "float8_e5m2"}, {}),
    "sparse_allreduce-bf16": ({**BF16, "exchange": "sparse_allreduce"}, {}),
    "sparse_allreduce-fp8": ({**FP8, "exchange": "sparse_allreduce"}, {}),
    "global-bf16": ({**BF16, "scope": "global"}, {}),
    "pipelined-bf16": ({**BF16, "pipeline": True}, {"method": "hggtopk"}),
}


def _representable(sent: np.ndarray, options: dict) -> bool:
  """Every value a wire value: in the dtype, or (scaled) with its significant bits."""
  dtype = np.dtype(getattr(ml_dtypes, options["value_dtype"], options["value_dtype"]))
  if not options.get("scale_group"):
    return np.array_equal(sent.astype(dtype).astype(np.float32), sent)
  mantissa = int(jnp.finfo(dtype).nmant)
  low = sent.view(np.int32) & ((1 << (23 - mantissa)) - 1)  # bits below the dtype's
  return not np.any(low[sent != 0])


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_mean_is_what_every_residual_gave_up_in_wire_values(case):
  options, kwargs = CASES[case]
  k = sum(max(1, round(0.01 * np.prod(s))) for _, s in SHAPES)  # 1003, leaf or global
  for grads, old, updates, new in _run(options, **kwargs):
    nonzero = 0
    for i, (name, _) in enumerate(sorted(SHAPES)):
      acc = grads[name] + old[i]
      sent = acc - new[i]  # exact: acc == sent + residual' (wire.py says why)
      np.testing.assert_array_equal(sent + new[i], acc)
      mean = np.sum(sent * np.float32(1 / DEVICES), axis=0)  # P a power of two: exact
      for d in range(DEVICES):
        np.testing.assert_array_equal(updates[name][d], mean, err_msg=(case, name, d))
      assert _representable(sent, options), (case, name)
      nonzero = nonzero + np.count_nonzero(sent, axis=tuple(range(1, sent.ndim)))
    # allgather delivers what rounding keeps; sparse_allreduce what the owners keep.
    low = 0.1 if "sparse" in case else 0.5
    assert np.all(nonzero <= k) and np.all(nonzero >= low * k), (case, nonzero)


@pytest.mark.parametrize("options,kwargs", [
    (F32_PACKED, {}),
    (BF16, {}),
    ({**BF16, "exchange": "sparse_allreduce"}, {}),
    (BF16, {"two_level": True}),
    ({**BF16, "scope": "global"}, {"density": 0.05}),  # 5000 slots: sorted by a bitmap
], ids=["float32", "bfloat16", "sparse_allreduce", "two-level", "global-5%"])
def test_packed_positions_change_nothing_but_the_bytes(options, kwargs):
  int32 = {**options, "index_coding": "int32"}
  for packed_step, int32_step in zip(_run(options, **kwargs), _run(int32, **kwargs)):
    jax.tree.map(np.testing.assert_array_equal, packed_step, int32_step)


def _bytes(options: dict, n: int, two_level: bool = False):
  """(stats sent, stats received, HLO sent, HLO received) for one leaf of n elements."""
  shapes = (("w", (n,)),)
  mesh, state, update, batch = _update(tuple(sorted(options.items())), two_level,
                                       shapes=shapes)
  grads = jax.device_put(_grads(0, shapes), NamedSharding(mesh, batch))
  _, new = update(grads, state)
  stats = hggjax.stats(new)
  hlo = update.lower(grads, state).compile().as_text()
  first = lambda key: float(np.asarray(stats[key]).ravel()[0])  # noqa: E731
  return (first("sent_bytes"), first("received_bytes"), *hlo_bytes.sent_and_received(hlo))


@pytest.mark.parametrize("options,two_level", [
    (BF16, False), (FP8, False), (F32_PACKED, False),
    ({**BF16, "exchange": "sparse_allreduce"}, False),
    ({**FP8, "exchange": "sparse_allreduce"}, False), (BF16, True),
    ({"value_dtype": "float16", "scale_group": 7, "index_coding": "int32"}, False),
], ids=["bf16", "fp8", "f32-packed", "sar-bf16", "sar-fp8", "two-level-bf16", "f16-odd-groups"])
def test_statistics_are_the_collective_bytes_of_the_compiled_program(options, two_level):
  sent, received, hlo_sent, hlo_received = _bytes(options, 100_003, two_level)
  assert (sent, received) == (hlo_sent, hlo_received)


@pytest.mark.parametrize("n", [100_000, pytest.param(1_000_000, marks=pytest.mark.slow)])
def test_bytes_per_slot_at_one_percent_from_the_hlo(n):
  k = n // 100
  per_slot = {name: _bytes(options, n)[3] / ((DEVICES - 1) * k)
              for name, options in (("int32", helpers.EXACT_WIRE), ("bf16", BF16),
                                    ("fp8", FP8), ("default", {}))}
  assert per_slot["int32"] == 8.0
  assert per_slot["default"] == per_slot["fp8"]
  assert per_slot["bf16"] <= 3.2
  assert per_slot["fp8"] <= 2.2
