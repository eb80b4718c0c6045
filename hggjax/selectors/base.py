"""The one contract every selector follows, and pieces the threshold methods share.

A selector chooses k positions of a flat float32 vector; it never reads values
for the wire, keeps residuals or calls a collective (the transform does).

    carry = selector.init(num_groups)                     # per-group arrays, [G] each
    selection, carry_g = selector.select(x, k, carry_g, key)  # one group's slice

``x`` is float32[n] (the error-compensated gradient), ``k`` a Python int (the
payload's capacity), ``carry_g`` this group's slice of the carry (what the
previous step left: HGG-TopK's threshold, the pipelined selector's histogram;
``()`` for selectors without memory) and ``key`` a PRNG key that differs per
device, group and step.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from hggjax.kernels import bits
from hggjax.kernels import topk
from hggjax.payload import Selection

# Threshold methods may let a few more than k through; the k largest of up to
# this many candidates are kept (see kernels.topk.largest_above).
CANDIDATE_FACTOR = 2


class Selector(NamedTuple):
  """init(num_groups) -> carry; select(x, k, carry, key) -> (Selection, carry)."""
  init: Callable[[int], Any]
  select: Callable[[jax.Array, int, Any, jax.Array], tuple[Selection, Any]]
  # Select and exchange every group on its own (no batching of same-sized groups),
  # so XLA may start a leaf's exchange as soon as its gradient exists.
  separate_groups: bool = False


def stateless(select: Callable[[jax.Array, int, jax.Array], Selection]) -> Selector:
  """A Selector from ``select(x, k, key) -> Selection`` for selectors that carry nothing."""

  def init(num_groups: int) -> tuple:
    del num_groups
    return ()

  def select_with_carry(x, k, carry, key):
    return select(x, k, key), carry

  return Selector(init, select_with_carry)


def candidate_capacity(n: int, k: int, factor: int = CANDIDATE_FACTOR) -> int:
  """Passing positions a threshold method considers before keeping the k largest."""
  return min(n, factor * k)


def no_history() -> jax.Array:
  return jnp.zeros((), bool)


def count_and_adjust(a, threshold, k, steps, low, high, down, up,
                     min_fast_n: int = bits.MIN_FAST_N, fallback=None):
  """`steps` rounds: scale the threshold while the count is outside [low*k, high*k].

  Returns (threshold, fallback): the last threshold counted with at least one
  element passing, or `fallback` (a cut known to pass one) when none did. On the
  CPU each round is one packed counting pass; on accelerators, for up to
  `TREE_STEPS` rounds, every threshold the rounds could reach is counted in one
  fused pass and the rounds are replayed on those counts (the same thresholds,
  bit for bit).
  """
  if fallback is None:
    fallback = threshold
  rule = (k, steps, low, high, down, up)
  if a.shape[0] < min_fast_n or steps > TREE_STEPS:
    return _adjust_rounds(a, threshold, fallback, rule, min_fast_n)
  return jax.lax.platform_dependent(
      a, threshold, fallback,
      cpu=lambda a, t, f: _adjust_rounds(a, t, f, rule, min_fast_n),
      default=lambda a, t, f: _adjust_tree(a, t, f, rule))


# Rounds replayed from one counting pass on accelerators: 3^i thresholds at round i.
TREE_STEPS = 4


def _decide(c, t, fallback, rule):
  k, _, low, high, down, up = rule
  fallback = jnp.where(c >= 1, t, fallback)
  branch = jnp.where(c < low * k, 0, jnp.where(c > high * k, 1, 2))
  factor = jnp.where(branch == 0, down, jnp.where(branch == 1, up, 1.0))
  return branch, t * factor, fallback


def _adjust_rounds(a, threshold, fallback, rule, min_fast_n):
  for _ in range(rule[1]):
    c = bits.count_at_least(a, threshold, min_fast_n)
    _, threshold, fallback = _decide(c, threshold, fallback, rule)
  return threshold, fallback


def _adjust_tree(a, threshold, fallback, rule):
  _, steps, _, _, down, up = rule
  # Level i holds the 3^i thresholds round i may count; node j's children are
  # j (scaled down), j + 3^i (up) and j + 2 * 3^i (kept), as in `_decide`.
  levels = [threshold[None]]
  for _ in range(steps - 1):
    t = levels[-1]
    levels.append(jnp.concatenate([t * down, t * up, t * 1.0]))
  counts = bits.count_edges_at_least(a, jnp.concatenate(levels))
  offset, node = 0, jnp.int32(0)
  for i, t in enumerate(levels):
    branch, threshold, fallback = _decide(counts[offset + node], t[node], fallback, rule)
    offset += t.shape[0]
    node = node + branch.astype(jnp.int32) * (3**i)
  return threshold, fallback


def largest_above_or(a, threshold, fallback, k, capacity, min_fast_n: int = bits.MIN_FAST_N):
  """`topk.largest_above` at `threshold`, or at `fallback` when nothing passes the first.

  The second selection runs (under ``lax.cond``) only when the first sent nothing.
  """
  first = topk.largest_above(a, threshold, k, capacity, min_fast_n)
  return jax.lax.cond(first[1] > 0, lambda: first,
                      lambda: topk.largest_above(a, fallback, k, capacity, min_fast_n))


def power_of_two_scale(top: jax.Array) -> jax.Array:
  """float32[]: 2^-e with 2^e <= top < 2^(e+1) (1 for top 0 or not finite).

  Multiplying by it is exact, so statistics of x * scale, divided back, carry the
  same bits as statistics of x wherever neither overflows or underflows.
  """
  e = jnp.floor(jnp.log2(jnp.where((top > 0) & jnp.isfinite(top), top, 1.0)))
  return bits.exp2(-jnp.clip(e, -126, 126))


def varying_like(tree, *refs):
  """`tree` (constants) typed like values computed from `refs`.

  Under ``shard_map`` both branches of a ``lax.cond`` must agree on which mesh
  axes their outputs vary over; a branch that returns constants must say so.
  ``zeros_like`` keeps its argument's type, and ``where`` joins the types; XLA
  folds the no-op away. Outside ``shard_map`` nothing changes.
  """
  anchor = sum(jnp.zeros_like(r.ravel()[0] if r.ndim else r, jnp.int32) for r in refs) == 0
  return jax.tree.map(lambda v: jnp.where(anchor, v, v), tree)
