"""Compaction of a mask into positions, radix select, and the exact top-k built on them.

Every result has a static shape: capacities are Python ints fixed at trace time,
and unused slots hold the out-of-range index n, so that a later
``.at[...].add(..., mode="drop")`` ignores them.

The fast exact top-k (`top_k`, shared by topk, hggtopk and the threshold methods):
  1. a low cut from a cache-line-blocked sample, chosen so that between k and a
     static capacity K elements pass with near certainty (`sampling.low_cut`);
  2. one pass packs the mask ``|x| >= low`` into words (`bits.pack`); population
     counts and a prefix sum over the words (n/32 of them, never a full-length
     cumsum) give the count and every candidate's slot (`compact`);
  3. the exact k-th largest key among the K candidates by two radix rounds
     (`kth_largest`), then the k winners (`take_largest`).
When the count falls outside [k, K] a ``lax.cond`` takes ``lax.top_k`` instead:
exact, only slower. Nothing syncs with the host and no loop depends on data.
That is the CPU's path; on accelerators (``lax.platform_dependent``) `top_k` and
`largest_above` use `counting` and plain reductions, with no ``lax.cond``.
"""

import jax
import jax.numpy as jnp
import numpy as np

from hggjax.kernels import bits, counting, sampling
from hggjax.kernels.bits import MIN_FAST_N
from hggjax.kernels.scan import cumsum, materialize

# Up to this many candidates, `take_largest` ranks them with lax.top_k on their
# float values: cheaper than two radix rounds over 2**15-2**16 bins.
SMALL_CANDIDATES = 8192


def fast_path(n: int, k: int, capacity: int, min_fast_n: int = MIN_FAST_N) -> bool:
  """Whether a selection of k from n goes through packed candidates (a Python bool).

  Short vectors, large k, or a candidate capacity near n gain nothing from
  sampling and compaction: ``lax.top_k`` (or ``jnp.nonzero``) does them directly.
  """
  return n >= min_fast_n and k <= n // 4 and capacity < n // 2


def first_true(mask: jax.Array, size: int) -> jax.Array:
  """int32[size]: positions of the first `size` True entries of `mask`, padded with n.

  By ``jnp.nonzero`` (a full-length cumsum: slow on long vectors, fine on short ones).
  """
  n = mask.shape[0]
  (idx,) = jnp.nonzero(mask, size=size, fill_value=n)
  return idx.astype(jnp.int32)


def _bit_table() -> np.ndarray:
  """int32[256 * 8]: entry v * 8 + r = position of the r-th set bit of byte v (0 if none)."""
  table = np.zeros((256, 8), np.int32)
  for v in range(256):
    set_bits = [b for b in range(8) if v >> b & 1]
    table[v, : len(set_bits)] = set_bits
  return table.reshape(-1)


_BIT_TABLE = _bit_table()


def compact(words: jax.Array, length: int, capacity: int,
            linear: bool = False) -> tuple[jax.Array, jax.Array]:
  """(positions int32[capacity] padded with `length`, count int32[]) of the set bits.

  `words` is `bits.pack(mask)` of a bool[length]. Positions come in `pack`'s order
  (blocks of 256 in index order; inside a block by lane, then bit); when more
  than `capacity` bits are set, the first `capacity` in that order are returned;
  count is exact. With `linear`, bit j of word w is element 32 w + j instead, so
  positions come out sorted.

  Slot -> word in two levels, with no scatter over all words: blocks of 32 words
  own the slots between their prefix sums (a histogram of block ends over the
  slots, then a prefix sum over the slots); inside the block a 5-step binary
  search on the words' prefix sums; inside the word the byte from the bytes'
  popcounts, and the bit from a 256 x 8 table.
  """
  words = words.reshape(-1)
  width = words.shape[0]
  rows = -(-width // 32)
  words = jnp.pad(words, (0, rows * 32 - width)).reshape(rows, 32)
  pop = bits.popcounts(words)
  # Prefix sums kept 2-D (row = block of 32 words): within rows by a matmul,
  # across rows by `cumsum` on the row totals. Reshaping, slicing and padding
  # a long 1-D scan inside one fusion is much slower on XLA:CPU.
  inside = jnp.dot(pop.astype(jnp.float32), jnp.triu(jnp.ones((32, 32), jnp.float32)),
                   precision=jax.lax.Precision.HIGHEST).astype(jnp.int32)
  block_end = cumsum(inside[:, -1], 1024)
  start = materialize(inside - pop + (block_end - inside[:, -1])[:, None]).reshape(-1)
  words = words.reshape(-1)
  count = block_end[-1]
  # block of slot s = #blocks ending at or before s.
  ends = jnp.zeros(capacity, jnp.int32).at[block_end].add(1, mode="drop")
  block = jnp.minimum(cumsum(ends, rows), rows - 1)
  slot = jnp.arange(capacity, dtype=jnp.int32)
  owner = block * 32
  for step in (16, 8, 4, 2, 1):
    probe = owner + step
    owner = materialize(jnp.where(start[probe] <= slot, probe, owner))
  word = words[owner]
  rank = slot - start[owner]  # which set bit of the word this slot takes
  # The rank-th set bit: pick the byte from the bytes' popcounts, then look
  # the bit up in the table (no dependent chain for XLA to recompute).
  counts = [bits.popcounts((word >> (8 * b)) & jnp.uint32(255)) for b in range(3)]
  c1 = counts[0]
  c2 = c1 + counts[1]
  c3 = c2 + counts[2]
  byte = (rank >= c1).astype(jnp.int32) + (rank >= c2) + (rank >= c3)
  before = jnp.where(byte == 0, 0, jnp.where(byte == 1, c1, jnp.where(byte == 2, c2, c3)))
  value = ((word >> (8 * byte).astype(jnp.uint32)) & jnp.uint32(255)).astype(jnp.int32)
  bit = 8 * byte + jnp.asarray(_BIT_TABLE)[value * 8 + jnp.clip(rank - before, 0, 7)]
  pos = owner * 32 + bit if linear else bits.element_of(owner, bit)
  return jnp.where(slot < count, pos, length).astype(jnp.int32), count


def sort_distinct(indices: jax.Array, n: int) -> jax.Array:
  """int32[m, C]: each row of `indices` (int32[m, C], distinct positions in [0, n) and
  any number of n) sorted ascending, the n last.

  Where the positions are dense (n <= 64 C, C >= 4096: 1/64 of n and more), as a bitmap:
  each row's positions set bits in n / 32 words (one k-sized scatter) and `compact`
  reads them back in order. XLA:CPU's sort of a selector's order (sorted by blocks of
  256) is faster below that density and slower above it: 2.6x the bitmap's time at 5%
  of 1e7 (`python -m benchmarks.wire_code`). Rows with a repeated position (no selector makes
  one) would carry into a neighbouring bit; the bits set then fall short of the
  positions, and a ``lax.cond`` sorts instead.
  """
  m, c = indices.shape
  if c < 4096 or n > 64 * c:
    return jax.lax.sort(indices, dimension=1, is_stable=False)
  words = -(-n // 32)
  real = indices < n
  at = jnp.where(real, indices >> 5, words)  # unused slots dropped
  bit = jnp.uint32(1) << (indices & 31).astype(jnp.uint32)

  def row(at, bit):
    mask = jnp.zeros(words, jnp.uint32).at[at].add(bit, mode="drop")
    return compact(mask, n, c, linear=True)

  ordered, count = jax.vmap(row)(at, bit)
  distinct = jnp.all(count == jnp.sum(real, axis=1, dtype=jnp.int32))
  return jax.lax.cond(distinct, lambda: ordered,
                      lambda: jax.lax.sort(indices, dimension=1, is_stable=False))


def kth_largest(keys: jax.Array, k: int | jax.Array) -> jax.Array:
  """int32[]: the k-th largest of `keys` (int32 >= 0; negative entries are ignored).

  Two radix rounds of 16 bits each (int32 scatter-add histograms, suffix sums).
  Returns -1 when fewer than k keys are valid.
  """
  valid = keys >= 0
  hi = jnp.where(valid, keys >> 16, 1 << 15)  # keys < 2**31: 15 high bits
  hist = jnp.zeros(1 << 15, jnp.int32).at[hi].add(1, mode="drop")
  suffix = cumsum(hist[::-1])[::-1]
  b1 = jnp.sum(suffix >= k, dtype=jnp.int32) - 1
  above = jnp.where(b1 + 1 < (1 << 15), suffix[jnp.minimum(b1 + 1, (1 << 15) - 1)], 0)
  lo = jnp.where(valid & ((keys >> 16) == b1), keys & 0xFFFF, 1 << 16)
  hist = jnp.zeros(1 << 16, jnp.int32).at[lo].add(1, mode="drop")
  suffix = cumsum(hist[::-1])[::-1]
  b2 = jnp.sum(suffix >= k - above, dtype=jnp.int32) - 1
  return jnp.where(b1 >= 0, (b1 << 16) | b2, -1).astype(jnp.int32)


def place(chosen: jax.Array, positions: jax.Array, size: int, fill: int) -> jax.Array:
  """int32[size]: the `positions` whose `chosen` is set, in slot order, padded with `fill`.

  A prefix sum and one scatter over the slots; chosen entries beyond `size` are dropped.
  """
  slot = jnp.where(chosen, cumsum(chosen.astype(jnp.int32), 1) - 1, size)
  return jnp.full(size, fill, jnp.int32).at[slot].set(positions, mode="drop")


def take_largest(
    keys: jax.Array, positions: jax.Array, k: int, floor: jax.Array, fill: int
) -> jax.Array:
  """int32[k]: positions of the (at most) k largest keys that are >= floor.

  `keys` int32[K] (negative = empty slot), `positions` int32[K] what to return
  for each, `floor` an int32[] key. Ties at the k-th key are broken by slot
  order. Unused slots hold `fill`. Over K slots a prefix sum and one scatter
  place the winners (cheaper than `compact` at this size, and fewer ops to compile).
  """
  cap = keys.shape[0]
  take = min(k, cap)
  if cap <= SMALL_CANDIDATES:
    values = jnp.where(keys >= 0, bits.key_to_float(keys), -1.0)
    top, at = jax.lax.top_k(values, take)
    keep = (top >= bits.key_to_float(floor)) & (top >= 0)
    out = jnp.where(keep, positions[at], fill)
  else:
    kth = kth_largest(keys, k)
    cut = jnp.maximum(kth, floor)
    above = keys > cut
    room = take - jnp.sum(above, dtype=jnp.int32)  # slots left for ties at the cut
    equal = (keys == cut) & (keys >= 0)
    chosen = above | (equal & (cumsum(equal.astype(jnp.int32), 1) <= room))
    out = place(chosen, positions, take, fill)
  if take < k:
    out = jnp.concatenate([out, jnp.full(k - take, fill, jnp.int32)])
  return out.astype(jnp.int32)


def candidates(x: jax.Array, low: jax.Array, cap: int):
  """(positions int32[cap] padded with n, their keys int32[cap] (-1 when empty), count).

  count = #(|x| >= low), exact; when it exceeds cap the first cap (`compact`'s order)
  are returned. One pass over x (the mask packing); the rest is over n/32 words.
  """
  n = x.shape[0]
  pos, count = compact(bits.pack(jnp.abs(x) >= low), n, cap)
  cand = jnp.where(pos < n, bits.magnitude_keys(x.at[pos].get(mode="fill", fill_value=0)), -1)
  return pos, cand, count


def top_k(x: jax.Array, k: int, min_fast_n: int = MIN_FAST_N) -> jax.Array:
  """int32[k]: positions of the k largest |x| (exact; ties broken arbitrarily).

  On the CPU the sampled, packed path below; on accelerators `counting.top_k`.
  """
  if x.shape[0] < min_fast_n:
    return _top_k_cpu(x, k, min_fast_n)
  return jax.lax.platform_dependent(
      x, cpu=lambda v: _top_k_cpu(v, k, min_fast_n),
      default=lambda v: counting.top_k(v, k)[0])


def _top_k_cpu(x: jax.Array, k: int, min_fast_n: int) -> jax.Array:
  n = x.shape[0]

  def slow():
    return jax.lax.top_k(jnp.abs(x), k)[1].astype(jnp.int32)

  if not fast_path(n, k, sampling.low_cut_capacity(n, k), min_fast_n):
    return slow()
  low, cap = sampling.low_cut(x, k)
  pos, cand, count = candidates(x, low, cap)

  def fast():
    return take_largest(cand, pos, k, jnp.int32(0), n)

  return jax.lax.cond((count >= k) & (count <= cap), fast, slow)


def lean_top_k(x: jax.Array, k: int) -> jax.Array:
  """int32[k]: positions of the k largest |x|, exact, with no n-sized temporary.

  For fallbacks that almost never run: XLA:CPU sizes one temporary block for every
  branch of a function, so a fallback holding an n-sized buffer (``lax.top_k`` of
  |x|, a prefix sum over n) makes every call allocate (and page in) a block that
  large, taken or not. Here the k-th largest key is found by a bitwise search, 31
  counting passes over x (slow, and only packed masks and counts in memory); the
  positions above it and then the ties at it are compacted from packed masks.
  Positions of zeros may fill the last slots when fewer than k are nonzero.
  """
  n = x.shape[0]

  def keys_with(value):
    # x tied to a value that differs at each use: XLA can then neither hoist the keys
    # out of the loop nor share one materialised keys buffer between the uses.
    tied, _ = jax.lax.optimization_barrier((x, value))
    return bits.magnitude_keys(tied)

  def step(_, bounds):
    lo, hi = bounds  # #(keys >= lo) >= k > #(keys >= hi)
    mid = lo + (hi - lo) // 2
    enough = jnp.sum(bits.popcounts(bits.pack(keys_with(mid) >= mid))) >= k
    return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

  # The bounds start typed like x (under shard_map: varying over its axes, as the
  # loop's outputs are); zeros_like keeps that type and XLA folds it away.
  zero = jnp.zeros_like(x[0], jnp.int32)
  kth, _ = jax.lax.fori_loop(0, 31, step, (zero, zero + 0x7F800000))
  above, n_above = compact(bits.pack(keys_with(kth) > kth), n, k)
  ties, _ = compact(bits.pack(keys_with(n_above) == kth), n, k)
  slot = jnp.arange(k, dtype=jnp.int32)
  return jnp.where(slot < n_above, above, ties[jnp.clip(slot - n_above, 0, k - 1)])


def largest_above(
    a: jax.Array, threshold: jax.Array, k: int, capacity: int,
    min_fast_n: int = MIN_FAST_N, at_least: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Positions of the (at most) k largest `a` among those with a >= threshold.

  Args:
    a: float32[n], non-negative magnitudes.
    threshold: float32[], the cut. Zeros never pass: they carry nothing.
    k: how many positions to return (the payload's capacity).
    capacity: how many passing positions are considered (>= k). When more pass,
      the first `capacity` are kept (index order below `min_fast_n`, else
      `compact`'s block order), so a threshold that lets far too many through
      costs recall; selectors aim their thresholds close to k.
    min_fast_n: from this many elements on, the packed path; shorter vectors use
      ``jnp.nonzero`` + ``lax.top_k``.
    at_least: for exact methods: when fewer than this many pass, or more than
      `capacity`, the exact k largest of all of `a` are returned instead (a
      ``lax.cond``: the exact top-k runs only then).

  Returns:
    (indices int32[k] padded with n, passed int32[] = number of a >= threshold,
    cut float32[] = the smallest magnitude returned, 0 when none is).

  One pass over `a` packs the mask into bits; the count, the compaction and the
  trim to k work on n/32 words and `capacity` slots.
  """
  n = a.shape[0]
  if n >= min_fast_n:
    return jax.lax.platform_dependent(
        a, threshold,
        cpu=lambda a, t: _largest_above_cpu(a, t, k, capacity, min_fast_n, at_least),
        default=lambda a, t: _largest_above_gpu(a, t, k, capacity, at_least))
  return _largest_above_cpu(a, threshold, k, capacity, min_fast_n, at_least)


def _largest_above_gpu(a, threshold, k, capacity, at_least):
  """`largest_above` without branches: compaction by one prefix sum; the exact
  variant is the counting top-k outright (its answer whenever it would fall back)."""
  n = a.shape[0]
  mask = (a >= threshold) & (a > 0)
  passed = jnp.sum(mask, dtype=jnp.int32)
  if at_least is not None:
    idx = counting.top_k(a, k)[0]
    return idx, passed, smallest_sent(a, idx)
  idx = first_true(mask, capacity)
  scores = a.at[idx].get(mode="fill", fill_value=-1.0)
  top_scores, at = jax.lax.top_k(scores, min(k, capacity))
  idx = jnp.where(top_scores >= 0, idx[at], n).astype(jnp.int32)
  if capacity < k:
    idx = jnp.concatenate([idx, jnp.full(k - capacity, n, jnp.int32)])
  return idx, passed, smallest_sent(a, idx)


def _largest_above_cpu(a, threshold, k, capacity, min_fast_n, at_least):
  n = a.shape[0]
  mask = (a >= threshold) & (a > 0)
  if n < min_fast_n:
    # Small vectors: index-order compaction and lax.top_k; few ops, fast to compile.
    passed = jnp.sum(mask, dtype=jnp.int32)
    idx = first_true(mask, capacity)
    if capacity > k:
      # Padding reads as -1 so it sorts below every real magnitude.
      scores = a.at[idx].get(mode="fill", fill_value=-1.0)
      top_scores, at = jax.lax.top_k(scores, k)
      idx = jnp.where(top_scores >= 0, idx[at], n).astype(jnp.int32)
    elif capacity < k:
      idx = jnp.concatenate([idx, jnp.full(k - capacity, n, jnp.int32)])
  else:
    idx, passed = compact(bits.pack(mask), n, capacity)
    if capacity > k:
      keys = jnp.where(idx < n, bits.float_to_key(a.at[idx].get(mode="fill", fill_value=0)), -1)
      idx = take_largest(keys, idx, k, jnp.int32(0), n)
    elif capacity < k:
      idx = jnp.concatenate([idx, jnp.full(k - capacity, n, jnp.int32)])
  if at_least is not None:
    exact = (passed >= at_least) & (passed <= capacity)
    idx = jax.lax.cond(exact, lambda: idx, lambda: top_k(a, k, min_fast_n))
  return idx, passed, smallest_sent(a, idx)


def smallest_sent(x: jax.Array, idx: jax.Array) -> jax.Array:
  """float32[]: the smallest nonzero |x| over the valid positions in idx (0 when none).

  What a selection reports as its cut: unused slots (index n) and zeros, which
  carry nothing, do not count. |.| is taken after the gather, so `x` may be the
  signed vector or its magnitudes.
  """
  sent = jnp.abs(x.at[idx].get(mode="fill", fill_value=0.0))
  low = jnp.min(jnp.where(sent > 0, sent, jnp.inf))
  return jnp.where(jnp.isfinite(low), low, 0.0).astype(jnp.float32)
