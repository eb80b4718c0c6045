"""Selectors: a flat vector in, k positions out, under one contract (`base.Selector`).

One file per method; `base` holds the contract and what the threshold methods share.
"""

from hggjax.selectors.base import Selector, stateless
from hggjax.selectors.dgc import dgc_sampling
from hggjax.selectors.gaussian import gaussian
from hggjax.selectors.hgg import History, hgg_topk
from hggjax.selectors.hgg_pipelined import PipelineCarry, hgg_topk_pipelined
from hggjax.selectors.random import random_k
from hggjax.selectors.redsync import redsync, redsync_trim
from hggjax.selectors.topk import exact_topk

__all__ = [
    "History", "PipelineCarry", "Selector", "dgc_sampling", "exact_topk", "gaussian",
    "hgg_topk", "hgg_topk_pipelined", "random_k", "redsync", "redsync_trim", "stateless",
]
