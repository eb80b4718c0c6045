"""DGC's sampled threshold (Lin et al., 2018)."""

import math

import jax
import jax.numpy as jnp

from hggjax.kernels.bits import MIN_FAST_N
from hggjax.kernels.sampling import strided_sample
from hggjax.payload import Selection
from hggjax.selectors.base import (Selector, candidate_capacity, count_and_adjust,
                                   largest_above_or, no_history, stateless)


def dgc_sampling(
    sample_ratio: float = 0.01, min_sample: int = 1024, refine_steps: int = 2,
    min_fast_n: int = MIN_FAST_N,
) -> Selector:
  """DGC: the threshold from the top of a random sample.

  The sample holds max(min_sample, ceil(sample_ratio * n)) positions (all of x
  when n is smaller); the threshold is the ceil(k * m / n)-th largest sampled
  magnitude. `refine_steps` rounds then scale it by 1.3 above 1.3k passing and by
  0.7 below 0.7k (0 disables the refinement). When the last correction lets
  nothing through, the last cut that some passed is used instead. Counts and the
  compaction take the packed path from `min_fast_n` elements on.

  References:
    Lin, Han, Mao, Wang & Dally, `Deep Gradient Compression: Reducing the
    Communication Bandwidth for Distributed Training
    <https://arxiv.org/abs/1712.01887>`_, 2018
  """

  def select(x, k, key):
    n = x.shape[0]
    a = jnp.abs(x)
    m = min(n, max(min_sample, math.ceil(sample_ratio * n)))
    sample = a if m == n else a[strided_sample(key, n, m)]
    k_sample = max(1, math.ceil(k * m / n))
    threshold = jnp.min(jax.lax.top_k(sample, k_sample)[0])
    # The sampled cut lets its own sample through: the fallback if refining overshoots.
    threshold, fallback = count_and_adjust(a, threshold, k, refine_steps, 0.7, 1.3, 0.7, 1.3,
                                           min_fast_n, fallback=threshold)
    idx, passed, cut = largest_above_or(a, threshold, fallback, k, candidate_capacity(n, k),
                                        min_fast_n)
    return Selection(idx, passed, cut, no_history())

  return stateless(select)
