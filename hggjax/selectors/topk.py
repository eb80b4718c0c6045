"""Exact top-k by magnitude (Aji & Heafield, 2017)."""

import jax.numpy as jnp

from hggjax.kernels import topk as topk_kernels
from hggjax.kernels.bits import MIN_FAST_N
from hggjax.payload import Selection
from hggjax.selectors.base import Selector, no_history, stateless


def exact_topk(min_fast_n: int = MIN_FAST_N) -> Selector:
  """The exact k largest |x|.

  From `min_fast_n` elements on, `kernels.topk.top_k` (sample, packed-mask
  compaction, radix select; exact, with a ``lax.top_k`` fallback) instead of
  ``lax.top_k``, which XLA:CPU runs as a single-threaded partial sort.

  References:
    Aji & Heafield, `Sparse Communication for Distributed Gradient Descent
    <https://arxiv.org/abs/1704.05021>`_, 2017
  """

  def select(x, k, key):
    del key
    idx = topk_kernels.top_k(x, k, min_fast_n)
    return Selection(idx, jnp.int32(k), topk_kernels.smallest_sent(x, idx), no_history())

  return stateless(select)
