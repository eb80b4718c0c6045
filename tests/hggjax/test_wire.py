"""The wire format alone: the position code and the value rounding, against NumPy."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import hggjax
from hggjax import validate, wire

FORMATS = [
    wire.DEFAULT,
    wire.WireFormat(index_coding="packed"),
    wire.WireFormat("bfloat16", None, "packed"),
    wire.WireFormat("float16", 7, "packed"),
    wire.WireFormat("float8_e4m3fn", 32, "packed"),
    wire.WireFormat("float8_e5m2", 16, "int32"),
    wire.WireFormat("float8_e4m3fn", None, "int32"),
]


def _row(rng, n, c, unused):
  """c sorted positions of [0, n) (distinct where n allows), the last `unused` n."""
  used = min(c - unused, n)
  idx = np.sort(rng.choice(n, used, replace=False))
  idx = np.concatenate([idx, np.full(c - used, n)]).astype(np.int32)
  values = (rng.standard_normal(c) * np.exp(rng.uniform(-15, 15, c))).astype(np.float32)
  values[idx == n] = 0
  return values, idx


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("n,c", [(100_000, 1000), (1000, 10), (50, 60), (7, 3), (2**20, 5),
                                 (64, 64), (2**30, 33)])
def test_decode_inverts_encode_and_the_row_has_its_stated_length(fmt, n, c):
  rng = np.random.default_rng(n + c)
  rows = [_row(rng, n, c, unused) for unused in (0, 2, c)]
  values, idx = (np.stack(x)[:, None] for x in zip(*rows))  # [3, 1, C]
  words, decoded = wire.encode(jnp.asarray(values), jnp.asarray(idx), n, fmt)
  assert words.dtype == jnp.int32
  assert words.shape == (3, 1, wire.row_words(c, n, fmt.dtype(jnp.float32).itemsize, fmt))
  got_values, got_idx = wire.decode(words, c, n, jnp.float32, fmt)
  np.testing.assert_array_equal(np.asarray(got_idx), idx)
  np.testing.assert_array_equal(np.asarray(got_values), np.asarray(decoded))


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f.value_dtype], ids=str)
def test_rounding_loses_only_what_the_difference_keeps_exactly(fmt):
  """v == r + (v - r) in float32 bit for bit; r is v in the wire dtype (times its scale)."""
  rng = np.random.default_rng(1)
  c = 4096
  values = (rng.standard_normal(c) * np.exp(rng.uniform(-30, 30, c))).astype(np.float32)
  if not fmt.scale_group:  # without a scale, values inside the dtype's range
    values = np.clip(values, -200, 200)
  words, decoded = wire.encode(jnp.asarray(values), jnp.zeros(c, jnp.int32), 1, fmt)
  r = np.asarray(decoded)
  np.testing.assert_array_equal(r + (values - r), values)
  assert np.all((r == 0) | (np.sign(r) == np.sign(values)))
  assert np.all(np.abs(r) <= 2 * np.abs(values))
  dtype = getattr(ml_dtypes, fmt.value_dtype, None) or np.dtype(fmt.value_dtype)
  if fmt.scale_group:
    nv = -(-c * np.dtype(dtype).itemsize // 4)  # the scales follow the value words
    stored = np.asarray(words)[nv:nv - (-c // fmt.scale_group)].view(np.float32)
    scales = np.repeat(stored, fmt.scale_group)[:c]
    assert np.all(np.log2(scales) == np.round(np.log2(scales)))  # powers of two
    q = r / scales
  else:
    q = r
  np.testing.assert_array_equal(q.astype(dtype).astype(np.float32), q)  # representable


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f.scale_group], ids=str)
def test_scales_carry_small_gradients_that_float8_alone_would_drop(fmt):
  """Top-k values of a gradient of scale 1e-4: every one arrives, within the dtype's step."""
  values = (np.random.default_rng(2).standard_normal(4096) * 1e-4).astype(np.float32)
  _, decoded = wire.encode(jnp.asarray(values), jnp.zeros(4096, jnp.int32), 1, fmt)
  r = np.asarray(decoded)
  big = np.abs(values) > 1e-5
  assert np.all(r[big] != 0)
  eps = float(jnp.finfo(fmt.value_dtype).eps)
  assert np.all(np.abs(r[big] - values[big]) <= eps * np.abs(values[big]))
  _, unscaled = wire.encode(jnp.asarray(values), jnp.zeros(4096, jnp.int32), 1,
                            wire.WireFormat("float8_e4m3fn"))
  assert np.mean(np.asarray(unscaled) != 0) < 0.1  # why float8 wants a scale


def test_bytes_per_slot_at_one_percent():
  """The coded row's size alone (the exchange tests compare it with compiled HLO)."""
  for n in (100_000, 1_000_000, 10_000_000):
    k = n // 100
    per_slot = lambda fmt, size: 4 * wire.row_words(k, n, size, fmt) / k  # noqa: E731
    assert per_slot(wire.DEFAULT, 4) == 8.0
    assert per_slot(wire.WireFormat("bfloat16", None, "packed"), 2) <= 3.1
    assert per_slot(wire.WireFormat("float8_e4m3fn", 256, "packed"), 1) <= 2.1


def test_low_bits_is_elias_fano_choice():
  assert wire.low_bits(1000, 100_000) == 6  # floor(log2(100))
  assert wire.low_bits(10, 10) == 0 and wire.low_bits(60, 50) == 0


@pytest.mark.parametrize("options,message", [
    ({"value_dtype": "int8"}, "value_dtype must be None"),
    ({"value_dtype": "float64"}, "value_dtype must be None"),
    ({"scale_group": 0, "value_dtype": "bfloat16"}, "scale_group must be an integer"),
    ({"scale_group": 64, "value_dtype": None}, "pass value_dtype too"),
    ({"value_dtype": "auto", "exchange": "union_mask", "index_coding": "packed",
      "axis_name": "data"}, "union_mask"),
    ({"index_coding": "elias"}, "index_coding must be one of"),
    ({"index_coding": "packed", "exchange": "leader_mask", "axis_name": "data"},
     "leader_mask"),
])
def test_bad_wire_options_are_refused_at_construction(options, message):
  with pytest.raises(ValueError, match=message):
    hggjax.topk(0.01, **options)


@pytest.mark.parametrize("exchange", ["allgather", "sparse_allreduce", "leader_mask",
                                      "union_mask"])
@pytest.mark.parametrize("error_feedback", [True, False])
def test_auto_is_float8_and_packed_where_a_residual_keeps_the_rounding(exchange, error_feedback):
  coded = exchange in ("allgather", "sparse_allreduce")
  expected = wire.WireFormat(
      "float8_e4m3fn" if coded and error_feedback else None,
      256 if coded and error_feedback else None, "packed" if coded else "int32")
  assert validate.wire_format("auto", "auto", "auto", exchange, error_feedback) == expected
  # A value dtype given, the scales follow it: float8 gets them, the others none.
  assert validate.wire_format("float8_e5m2", "auto", "auto", "allgather") == (
      wire.WireFormat("float8_e5m2", 256, "packed"))
  assert validate.wire_format("bfloat16", "auto", "int32", "allgather").scale_group is None


def test_the_constructors_default_to_auto():
  """topk sends float8 values (4 per word), topk2 float32 ones, both at packed positions."""
  g = {"w": jnp.asarray(np.random.default_rng(0).standard_normal(10_000), jnp.float32)}
  k = 100
  for name, fmt in (("topk", wire.WireFormat("float8_e4m3fn", 256, "packed")),
                    ("topk2", wire.WireFormat(None, None, "packed"))):
    tx = hggjax.get_compressor(name, density=0.01)
    _, state = tx.update(g, tx.init(g))
    itemsize = 1 if fmt.value_dtype else 4
    assert float(state.stats.sent_bytes) == 4 * wire.row_words(k, 10_000, itemsize, fmt), name


def test_dtype_objects_are_accepted_by_name():
  tx = hggjax.topk(0.5, value_dtype=jnp.bfloat16, index_coding="packed")
  update, _ = tx.update({"w": jnp.array([1.0, -3.0, 0.5, 2.0])}, tx.init({"w": jnp.zeros(4)}))
  np.testing.assert_array_equal(np.asarray(update["w"]), [0, -3, 0, 2])


def test_float64_values_travel_in_two_words_each():
  """x64 mode: a float64 value is two int32 words on the wire (decoded in float32, as
  every mean and residual is)."""
  with jax.enable_x64(True):
    values = jnp.asarray(np.random.default_rng(3).standard_normal((2, 5)))
    idx = jnp.asarray([[0, 3, 9, 10, 10], [1, 2, 4, 5, 10]], jnp.int32)
    for fmt in (wire.DEFAULT, wire.WireFormat(index_coding="packed")):
      words, decoded = wire.encode(values, idx, 10, fmt)
      assert words.shape[-1] == wire.row_words(5, 10, 8, fmt)
      got_values, got_idx = wire.decode(words, 5, 10, jnp.float64, fmt)
      np.testing.assert_array_equal(np.asarray(got_idx), np.asarray(idx))
      np.testing.assert_array_equal(np.asarray(got_values), np.asarray(values, np.float32))
      np.testing.assert_array_equal(np.asarray(decoded), np.asarray(values, np.float32))
