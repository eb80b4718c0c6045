"""How one row of slots travels: the values' format and the positions' code.

Every row an exchange sends is one int32 array of static length (`row_words`), in
this order:

  values   the slots' values in the wire dtype, their bits packed into words
           (``ceil(C * itemsize / 4)`` words: two bfloat16 or four float8 per word);
  scales   with ``scale_group`` G: one float32 power-of-two scale per G slots
           (``ceil(C / G)`` words); a slot travels as value / scale;
  indices  ``"int32"``: one word per position. ``"packed"``: an Elias-Fano code of the
           row's positions, which must be sorted (non-decreasing) in [0, u], u (the
           universe) marking an unused slot: with L = floor(log2(u / C)) low bits,
           the C low parts packed (``ceil(C * L / 32)`` words) and the high parts as a
           unary bit vector of C + (u >> L) bits (position i sets bit
           (p_i >> L) + i). About 2 + log2(u / C) bits a position: 8.6 at 1%.

Rounding happens once, here (`encode` returns the values as they will be decoded), so
the sender knows exactly what the receivers add, and error feedback keeps the rest:
for a float32 value v and its decoded r (round to nearest), r is 0 or has v's sign
with |v| / 2 <= |r| <= 2 |v| and fewer significant bits than float32, so v - r is a
multiple of v's last bit no larger than v: exact, and ``v == r + (v - r)`` bit for bit.
Power-of-two scales keep that (multiplying by them is exact) and always fit the group
in the dtype's range; without a scale, a value beyond the dtype's largest (65504 for
float16, 448 for float8_e4m3fn) is sent as that largest and the identity holds to the
last bit of v only. Encoding and decoding
read k-sized data only (C slots, and C + u >> L bits of the code).

References:
  Elias, `Efficient storage and retrieval by content and address of static files
  <https://doi.org/10.1145/321812.321820>`_, JACM 1974; Fano, 1971.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from hggjax.kernels import bits
from hggjax.kernels.scan import cumsum, materialize

INDEX_CODINGS = ("int32", "packed")
# Names accepted for value_dtype (None: the gradient's own dtype).
VALUE_DTYPES = ("float32", "bfloat16", "float16", "float8_e4m3fn", "float8_e5m2")


@dataclasses.dataclass(frozen=True)
class WireFormat:
  """What a compressor puts on the wire per slot (validated by `hggjax.validate`)."""
  value_dtype: str | None = None  # one of VALUE_DTYPES; None: the payload's own dtype
  scale_group: int | None = None  # slots per float32 scale; None: no scales
  index_coding: str = "int32"     # one of INDEX_CODINGS

  def dtype(self, payload_dtype) -> np.dtype:
    """The dtype values travel in, for a payload of `payload_dtype`."""
    return jnp.dtype(self.value_dtype or payload_dtype)

  @property
  def packed(self) -> bool:
    return self.index_coding == "packed"


DEFAULT = WireFormat()  # float32 values (the gradient's dtype), int32 positions: exact

# What the constructors' "auto" options choose (`hggjax.validate.wire_format`): float8
# values with a power-of-two scale per 256 slots and Elias-Fano positions, about 2.1 bytes
# a slot at 1% against 8; error feedback keeps what the rounding loses.
AUTO = "auto"
AUTO_VALUE_DTYPE = "float8_e4m3fn"
AUTO_SCALE_GROUP = 256
# The schemes that code their rows (the mask schemes sum float32 values at int32 positions).
CODED_SCHEMES = ("allgather", "sparse_allreduce")


def low_bits(c: int, universe: int) -> int:
  """L, the low bits each packed position keeps: floor(log2(u / C)), 0 when C >= u."""
  return int(math.floor(math.log2(universe / c))) if universe > c else 0


def index_words(c: int, universe: int, coding: str) -> int:
  """Words of one row's C positions in [0, universe]."""
  if coding == "int32":
    return c
  low = low_bits(c, universe)
  return -(-c * low // 32) + -(-(c + (universe >> low)) // 32)


def row_words(c: int, universe: int, itemsize: int, fmt: WireFormat) -> int:
  """int32 words of one row of C slots whose values travel `itemsize` bytes each."""
  values = -(-c * itemsize // 4)
  scales = -(-c // fmt.scale_group) if fmt.scale_group else 0
  return values + scales + index_words(c, universe, fmt.index_coding)


def encode(values: jax.Array, indices: jax.Array, universe: int,
           fmt: WireFormat) -> tuple[jax.Array, jax.Array]:
  """(int32 words [..., `row_words`], the values as receivers decode them, float32 [..., C]).

  Args:
    values: [..., C] floating, 0 in unused slots.
    indices: int32[..., C] positions in [0, universe]; sorted along the last axis for
      ``"packed"``.
    universe: the unused-slot marker, one past the largest position.
    fmt: the wire format.
  """
  coded, scales = _round(values, fmt)
  words = [_value_words(coded)]
  if scales is not None:
    words.append(jax.lax.bitcast_convert_type(scales, jnp.int32))
  words.append(_encode_positions(indices, universe) if fmt.packed else indices.astype(jnp.int32))
  return jnp.concatenate(words, axis=-1), _decoded(coded, scales, fmt, values.dtype)


def decode(words: jax.Array, c: int, universe: int, payload_dtype,
           fmt: WireFormat) -> tuple[jax.Array, jax.Array]:
  """Inverse of `encode` on [..., W] words: (float32 values [..., C], int32 positions [..., C])."""
  dtype = fmt.dtype(payload_dtype)
  nv = -(-c * dtype.itemsize // 4)
  ns = -(-c // fmt.scale_group) if fmt.scale_group else 0
  value_words = words[..., :nv]
  if dtype.itemsize > 4:  # float64 (x64 mode): several words make one value
    value_words = value_words.reshape(*words.shape[:-1], c, dtype.itemsize // 4)
  coded = jax.lax.bitcast_convert_type(value_words, dtype)
  coded = coded.reshape(*words.shape[:-1], -1)[..., :c]
  scales = (jax.lax.bitcast_convert_type(words[..., nv:nv + ns], jnp.float32)
            if ns else None)
  code = words[..., nv + ns:]
  indices = _decode_positions(code, c, universe) if fmt.packed else code
  return _decoded(coded, scales, fmt, payload_dtype), indices


# --- values ------------------------------------------------------------------------


def _round(values: jax.Array, fmt: WireFormat) -> tuple[jax.Array, jax.Array | None]:
  """(values in the wire dtype, float32 scales [..., ceil(C / G)] or None)."""
  dtype = fmt.dtype(values.dtype)
  if not fmt.scale_group:
    return saturating_cast(values, dtype), None
  *lead, c = values.shape
  g = fmt.scale_group
  groups = -(-c // g)
  x = jnp.pad(values.astype(jnp.float32), [(0, 0)] * len(lead) + [(0, groups * g - c)])
  x = x.reshape(*lead, groups, g)
  scales = _power_of_two_scales(jnp.max(jnp.abs(x), axis=-1), float(jnp.finfo(dtype).max))
  coded = saturating_cast(x * (1.0 / scales)[..., None], dtype)
  return coded.reshape(*lead, groups * g)[..., :c], scales


def _power_of_two_scales(top: jax.Array, largest: float) -> jax.Array:
  """float32 2^e, the smallest with top / 2^e <= largest (1 for 0 or not finite)."""
  ratio = jnp.where((top > 0) & jnp.isfinite(top), top / largest, 1.0)
  e = jnp.clip(jnp.ceil(jnp.log2(ratio)), -126, 126).astype(jnp.int32)
  # log2 may land one off near a power of two: one step either way settles it.
  e = jnp.where(top * bits.exp2(-e) > largest, e + 1, e)
  e = jnp.where((e > -126) & (top * bits.exp2(1 - e) <= largest), e - 1, e)
  return bits.exp2(e)


def saturating_cast(x: jax.Array, dtype) -> jax.Array:
  """`x` in `dtype`, held at its largest finite value instead of overflowing (float8's
  e4m3fn has no inf and would turn an overflow into NaN)."""
  dtype = jnp.dtype(dtype)
  if dtype.itemsize < x.dtype.itemsize and jnp.issubdtype(dtype, jnp.floating):
    top = float(jnp.finfo(dtype).max)
    x = jnp.clip(x, -top, top)
  return x.astype(dtype)


def _decoded(coded: jax.Array, scales: jax.Array | None, fmt: WireFormat,
             payload_dtype) -> jax.Array:
  """float32 [..., C]: the values as they arrive.

  A scaled value is held inside the payload dtype's finite range: rounding to the wire
  dtype may round a value near that dtype's largest up past it (65504 in float16 rounds
  to 65536 in float8), which the update, written in the leaf's dtype, would turn into
  Inf. The held value is the dtype's largest, so v - r stays exact.
  """
  x = coded.astype(jnp.float32)
  if scales is None:
    return x
  c = x.shape[-1]
  x = x * jnp.repeat(scales, fmt.scale_group, axis=-1)[..., :c]
  top = float(min(jnp.finfo(payload_dtype).max, jnp.finfo(jnp.float32).max))
  return jnp.clip(x, -top, top)


def _value_words(coded: jax.Array) -> jax.Array:
  """int32[..., ceil(C * itemsize / 4)]: the values' bits, a narrow row padded to a
  whole word. The bitcast keeps narrow values narrow on the wire: XLA:CPU otherwise
  moves the widening convert in front of a bfloat16 all_gather."""
  *lead, c = coded.shape
  size = coded.dtype.itemsize
  if size >= 4:
    words = jax.lax.bitcast_convert_type(coded, jnp.int32)
    return words.reshape(*lead, c * size // 4)
  ratio = 4 // size
  padded = -(-c // ratio) * ratio
  coded = jnp.pad(coded, [(0, 0)] * len(lead) + [(0, padded - c)])
  return jax.lax.bitcast_convert_type(coded.reshape(*lead, padded // ratio, ratio), jnp.int32)


# --- positions (Elias-Fano) --------------------------------------------------------


def _encode_positions(indices: jax.Array, universe: int) -> jax.Array:
  """int32[..., index_words]: packed low parts, then the unary high parts.

  Each is written by one k-sized scatter-add into zeroed words: the ones' bits are
  distinct (strictly increasing for sorted positions) and the low parts' bit ranges
  disjoint, so adding is or-ing, with no C-bit boolean row to pack.
  """
  *lead, c = indices.shape
  low = low_bits(c, universe)
  indices = indices.astype(jnp.int32).reshape(-1, c)
  slot = jnp.arange(c, dtype=jnp.int32)
  ones = (indices >> low) + slot
  unary_words = -(-(c + (universe >> low)) // 32)

  def unary(o):
    bit = jnp.uint32(1) << (o & 31).astype(jnp.uint32)
    return jnp.zeros(unary_words, jnp.uint32).at[o >> 5].add(bit, indices_are_sorted=True)

  words = [jax.vmap(unary)(ones)]
  if low:
    nl = -(-c * low // 32)
    at = slot * low
    shift = (at & 31).astype(jnp.uint32)
    straddles = shift + low > 32  # the part's top bits go into the next word

    def parts(part):
      spill = jnp.where(straddles, part >> jnp.where(straddles, 32 - shift, 0), 0)
      w = jnp.zeros(nl + 1, jnp.uint32).at[at >> 5].add(part << shift, indices_are_sorted=True)
      return w.at[(at >> 5) + 1].add(spill, indices_are_sorted=True)[:nl]

    words.insert(0, jax.vmap(parts)((indices & ((1 << low) - 1)).astype(jnp.uint32)))
  code = jnp.concatenate(words, axis=-1)
  return jax.lax.bitcast_convert_type(code, jnp.int32).reshape(*lead, -1)


def _decode_positions(code: jax.Array, c: int, universe: int) -> jax.Array:
  """int32[..., C] from `_encode_positions`'s words, by k-sized gathers: the word of
  each set bit from a prefix sum of the words' popcounts, the bit by a 5-step select."""
  *lead, _ = code.shape
  low = low_bits(c, universe)
  nl = -(-c * low // 32)
  slot = jnp.arange(c, dtype=jnp.int32)
  unary = jax.lax.bitcast_convert_type(code[..., nl:], jnp.uint32).reshape(-1, code.shape[-1] - nl)
  counts = jax.lax.population_count(unary).astype(jnp.int32)
  # Prefix sums by `kernels.scan.cumsum` (XLA:CPU's reduce-window cumsum is slower).
  ends = jax.vmap(lambda v: cumsum(v, 32))(counts)  # set bits in words 0..w
  # Slot j's one is the (j+1)-th set bit: in the first word whose prefix count exceeds j,
  # i.e. word j = #(words w with ends[w] <= j): a histogram of the ends over [0, C] and
  # its prefix sum (XLA:CPU's searchsorted of C queries is several times slower).
  hist = jax.vmap(lambda e: jnp.zeros((c + 1,), jnp.int32).at[jnp.minimum(e, c)].add(1))(ends)
  word = jax.vmap(lambda h: cumsum(h, unary.shape[1]))(hist[:, :c])
  # Materialised: left to fusion, XLA:CPU recomputed the prefix sums at every slot.
  start = materialize(ends - counts)
  rank = slot - jnp.take_along_axis(start, word, axis=1)  # set bits of its word before slot j
  high = word * 32 + _select_bit(jnp.take_along_axis(unary, word, axis=1), rank) - slot
  high = high.reshape(*lead, c)
  if not low:
    return high
  words = jax.lax.bitcast_convert_type(code[..., :nl], jnp.uint32)
  words = jnp.pad(words, [(0, 0)] * len(lead) + [(0, 1)])  # a straddling last part reads it
  at = slot * low
  first = jnp.broadcast_to(at >> 5, (*lead, c))
  shift = (at & 31).astype(jnp.uint32)
  part = jnp.take_along_axis(words, first, axis=-1) >> shift
  # The bits that spill into the next word (a shift by 32 is not defined: masked off).
  spill = jnp.take_along_axis(words, first + 1, axis=-1) << jnp.where(shift > 0, 32 - shift, 0)
  part = part | jnp.where(shift + low > 32, spill, 0)
  return (high << low) | (part & ((1 << low) - 1)).astype(jnp.int32)


def _select_bit(w: jax.Array, rank: jax.Array) -> jax.Array:
  """int32: the position of the set bit of rank `rank` (0 = lowest) in each uint32 `w`."""
  pos = jnp.zeros(w.shape, jnp.uint32)
  rank = rank.astype(jnp.int32)
  for width in (16, 8, 4, 2, 1):
    below = jax.lax.population_count((w >> pos) & ((1 << width) - 1)).astype(jnp.int32)
    up = rank >= below
    pos = pos + jnp.where(up, width, 0).astype(jnp.uint32)
    rank = rank - jnp.where(up, below, 0)
  return pos.astype(jnp.int32)
