"""Gaussian-k: a threshold from the mean and standard deviation (Shi et al., 2019)."""

from statistics import NormalDist

import jax.numpy as jnp

from hggjax.kernels.bits import MIN_FAST_N
from hggjax.kernels.topk import largest_above
from hggjax.payload import Selection
from hggjax.selectors.base import (Selector, candidate_capacity, count_and_adjust,
                                   no_history, stateless)


def gaussian(refine_steps: int = 3, min_fast_n: int = MIN_FAST_N) -> Selector:
  """Gaussian-k.

  Treats x as N(mean, std): the cut that leaves a share `k/n` in both tails is
  |mean| + std * z with z = Phi^-1(1 - k/(2n)). Then `refine_steps` rounds of the
  paper's correction: halve the cut below 2k/3 passing, x1.5 above 4k/3. The k
  largest of those that pass are sent. Counts and the compaction take the packed
  path from `min_fast_n` elements on.

  References:
    Shi, Chu, Cheung & See, `Understanding Top-k Sparsification in Distributed
    Deep Learning <https://arxiv.org/abs/1911.08772>`_, 2019
  """

  def select(x, k, key):
    del key
    n = x.shape[0]
    a = jnp.abs(x)
    z = NormalDist().inv_cdf(max(1.0 - k / (2.0 * n), 0.5))
    threshold = jnp.abs(jnp.mean(x)) + jnp.std(x) * z
    threshold = count_and_adjust(a, threshold, k, refine_steps, 2 / 3, 4 / 3, 0.5, 1.5,
                                 min_fast_n)
    idx, passed, cut = largest_above(a, threshold, k, candidate_capacity(n, k), min_fast_n)
    return Selection(idx, passed, cut, no_history())

  return stateless(select)
