"""Gaussian-k: a threshold from the mean and standard deviation (Shi et al., 2019)."""

from statistics import NormalDist

import jax.numpy as jnp

from hggjax.kernels.bits import MIN_FAST_N
from hggjax.payload import Selection
from hggjax.selectors.base import (Selector, candidate_capacity, count_and_adjust,
                                   largest_above_or, no_history, power_of_two_scale,
                                   stateless)


def gaussian(refine_steps: int = 3, min_fast_n: int = MIN_FAST_N) -> Selector:
  """Gaussian-k.

  Treats x as N(mean, std): the cut that leaves a share `k/n` in both tails is
  |mean| + std * z with z = Phi^-1(1 - k/(2n)). Then `refine_steps` rounds of the
  paper's correction: halve the cut below 2k/3 passing, x1.5 above 4k/3. The k
  largest of those that pass are sent. When the last correction lets nothing
  through (equal magnitudes, a few distinct values), the last cut that some
  passed is used instead, so a nonzero vector never sends nothing. Counts and
  the compaction take the packed path from `min_fast_n` elements on.

  References:
    Shi, Chu, Cheung & See, `Understanding Top-k Sparsification in Distributed
    Deep Learning <https://arxiv.org/abs/1911.08772>`_, 2019
  """

  def select(x, k, key):
    del key
    n = x.shape[0]
    a = jnp.abs(x)
    top = jnp.max(a)
    # Moments of x scaled by a power of two near 1 / max|x|: the same bits as
    # unscaled wherever those do not overflow (|x| > 1e19 squares past float32)
    # or underflow (|x| < 1e-19 squares below its normal range).
    scale = power_of_two_scale(top)
    z = NormalDist().inv_cdf(max(1.0 - k / (2.0 * n), 0.5))
    xs = x * scale
    threshold = (jnp.abs(jnp.mean(xs)) + jnp.std(xs) * z) / scale
    threshold, fallback = count_and_adjust(a, threshold, k, refine_steps, 2 / 3, 4 / 3, 0.5,
                                           1.5, min_fast_n, fallback=top)
    idx, passed, cut = largest_above_or(a, threshold, fallback, k, candidate_capacity(n, k),
                                        min_fast_n)
    return Selection(idx, passed, cut, no_history())

  return stateless(select)
