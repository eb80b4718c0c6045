"""Exact top-k for accelerators: a fixed number of counting passes and no branches.

On a GPU the CPU path's tools are the wrong ones: a ``lax.cond`` or ``while`` makes
XLA:GPU copy its predicate to the host and wait for it, XLA's ``lax.top_k`` sorts
the whole vector once k is more than a few hundred, and bit-packing a mask buys
nothing where a boolean sum is already one fused, parallel reduction. Following the
idea of AIR Top-K (Zhang, Naruse, Li & Wang, *Parallel Top-K Algorithms on GPU: A
Comprehensive Study and New Methods*, SC 2023), the k-th
largest |x| is pinned down on the device by counting:

  1. keys = the bits of |x| (they order like |x|). Pass 1 counts, in one fused
     reduction over x, how many keys reach each of `EDGES` edges: `COARSE` of them
     spread over every float32 exponent, the rest in a window of +-`WINDOW`
     octaves around a hint (the previous step's cut, when there is one).
  2. The two edges around the k-th key bracket it: [lo, hi) with at least k keys
     >= lo and fewer than k >= hi. Every further pass counts `EDGES` edges evenly
     spread inside the bracket, narrowing it `EDGES`-fold (in key space, which
     is about logarithmic in |x|).
  3. The candidates, keys >= lo (about k of them on any smooth distribution),
     are compacted in index order by one prefix sum (``jnp.nonzero`` with a
     static size), and the exact k largest among them are taken (``lax.top_k``
     on the candidates only).
Every step is a static-shaped XLA op, so the same code runs (and is tested) on
the CPU; `hggjax.kernels.topk` is what the CPU runs.
"""

import jax
import jax.numpy as jnp

from hggjax.kernels import bits

EDGES = 32      # thresholds counted per pass (one fused reduction)
COARSE = 12     # of them in pass 1 spread over all 255 exponents (hint or not)
WINDOW = 2.0    # octaves either side of the hint covered by the rest of pass 1
PASSES = 3      # counting passes over the vector
_TOP_KEY = 0x7F800000  # the key of +inf: every finite magnitude is below it


def slack(k: int) -> int:
  """Candidates kept beyond k: what three passes leave inside the bracket on smooth data."""
  return max(k // 8, 1024)


def count_edges(keys: jax.Array, edges: jax.Array) -> jax.Array:
  """int32[J]: #(keys >= edges[j]) for every edge, in one pass over `keys`."""
  return jnp.sum(keys[:, None] >= edges[None, :], axis=0, dtype=jnp.int32)


def _bracket(edges: jax.Array, counts: jax.Array, k: int, lo, hi):
  """Narrow [lo, hi) to the tightest pair of `edges` around the k-th key."""
  reaching = counts >= k
  lo = jnp.maximum(lo, jnp.max(jnp.where(reaching, edges, 0)))
  hi = jnp.minimum(hi, jnp.min(jnp.where(reaching, _TOP_KEY + 1, edges)))
  return lo, hi


def first_edges(hint: jax.Array) -> jax.Array:
  """int32[EDGES]: pass 1's edges: `COARSE` over every exponent, the rest around `hint`."""
  coarse = (jnp.arange(1, COARSE + 1, dtype=jnp.int32) * (255 // (COARSE + 1))) << 23
  fine = EDGES - COARSE
  h = jnp.where(hint > 0, bits.float_to_key(hint), coarse[COARSE // 2])
  span = int(WINDOW * (1 << 23))  # WINDOW octaves in key space
  base = jnp.clip(h - span, 0, _TOP_KEY - 2 * span)  # keeps base + 2 span inside int32
  window = base + ((2 * span) // (fine + 1)) * jnp.arange(1, fine + 1, dtype=jnp.int32)
  return jnp.clip(jnp.concatenate([coarse, window]), 1, _TOP_KEY)


def kth_bracket(keys: jax.Array, k: int, hint: jax.Array, passes: int = PASSES):
  """(lo, hi, guided): #(keys >= lo) >= k > #(keys >= hi) after `passes` counting
  passes; guided says that pass 1 found the k-th key inside the hint's window."""
  lo, hi = jnp.int32(0), jnp.int32(_TOP_KEY + 1)
  edges = first_edges(hint)
  guided = jnp.bool_(False)
  for p in range(passes):
    if p:
      width = hi - lo
      # lo + width * j / EDGES without overflowing int32 (width < 2**31).
      j = jnp.arange(1, EDGES, dtype=jnp.int32)
      edges = lo + (width // EDGES) * j + ((width % EDGES) * j) // EDGES
      edges = jnp.concatenate([edges, hi[None]])
    lo, hi = _bracket(edges, count_edges(keys, edges), k, lo, hi)
    if not p:
      window = edges[COARSE:]
      guided = (hint > 0) & (lo >= window[0]) & (hi <= window[-1])
  return lo, hi, guided


def top_k(x: jax.Array, k: int, hint: jax.Array | None = None, passes: int = PASSES):
  """(int32[k] positions of the k largest |x|, int32[] candidates, bool[] guided).

  Exact unless more than `slack(k)` distinct magnitudes crowd the bracket around
  the k-th (then the first of them by position compete): the second value says
  how many candidates there were; the third whether the hint's window held the
  k-th. Ties at the k-th value are broken by position.
  """
  n = x.shape[0]
  keys = bits.magnitude_keys(x)
  hint = jnp.float32(0) if hint is None else hint
  lo, _, guided = kth_bracket(keys, k, hint, passes)
  size = min(n, k + slack(k))
  (pos,) = jnp.nonzero(keys >= lo, size=size, fill_value=n)
  cand = jnp.where(pos < n, keys.at[pos].get(mode="fill", fill_value=0), -1)
  # lax.top_k on float32 values of the candidates (keys as floats order alike).
  _, at = jax.lax.top_k(bits.key_to_float(jnp.maximum(cand, 0)) - (cand < 0), min(k, size))
  idx = pos[at].astype(jnp.int32)
  if size < k:
    idx = jnp.concatenate([idx, jnp.full(k - size, n, jnp.int32)])
  return idx, jnp.sum(keys >= lo, dtype=jnp.int32), guided
