"""Pipelined HGG-TopK: one pass over the gradient per step, from a carried histogram.

Steps per group, one jitted function, no host sync, no data-dependent loop:
  1. The carried threshold t (last step's k-th largest |acc|, exact or
     interpolated) and slope s = -d ln(count) / d ln(threshold) around it
     (measured by last step's pass) are corrected for the new scale on a
     cache-line-blocked sample: counts at 8 probe thresholds t * exp(-o / s),
     o in ln(count) units, two rounds (coarse, then fine), interpolated in
     log-log to where the sample count is k * m / n.
  2. One pass over |acc| packs the mask |acc| >= a low edge set 3 sigma of the
     estimate's error (plus one tolerance) below it, so that between k and `cap`
     elements pass w.h.p.; they are compacted out with their values (the
     candidates, ~1.1k). This step's histogram is counted on them: EDGES
     thresholds spanning the estimate's +-3 sigma, then EDGES more between the
     two that bracket k. Above the low edge these counts are exact counts over
     all of |acc|; the outer ones give the next step's slope.
  3. Path 0 (one pass): an edge passes between k - tol and k elements: the
     candidates >= it are sent (no trim).
     Path 1 (one pass + trim): no edge lands there (ties at the k-th value, or
     tol = 0): the k largest candidates are kept (`topk.take_largest`), exactly k.
     Path 2 (bounded second pass): fewer than k or more than `cap` passed the low
     edge (or a cold start): a second pass packs |acc| >= a low cut from a larger
     sample (`sampling.low_cut`: between k and K pass, 5 sigma), and the k largest
     of those are kept, exactly the top k. Path 3 flags the rare step where that
     sample missed: the exact top-k of the whole vector is taken (`topk.top_k`).
     One ``lax.switch`` picks the path; only the taken branch runs under jit.
  4. The next carry: the k-th largest estimate (the cut sent on paths 1-2,
     the log-log crossing of k between the fine edges on path 0) and the slope
     from the outer edges' counts (geometric mean with the old one).
Every group is selected and exchanged on its own (``separate_groups``), so that
a leaf's exchange may start as soon as its gradient exists.

That is the CPU's path. On accelerators the carried centre guides HGG-TopK's
branch-free counting passes (`hgg.on_accelerator`), which send the exact top-k;
`path` then records 0 when the centre's window held the k-th largest, else 2.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from hggjax.kernels import bits, sampling
from hggjax.kernels import topk as topk_kernels
from hggjax.kernels.bits import MIN_FAST_N
from hggjax.payload import Selection
from hggjax.selectors import hgg
from hggjax.selectors.base import Selector, varying_like

EDGES = 16  # thresholds per counting round on the candidates (two rounds)
# Probe offsets in ln(count) for the sample rounds, ascending threshold. The coarse
# round covers a count off by up to e^2 = 7.4x from one step to the next
# (docs/pipeline.md has how far the default run's leaves move); the fine round
# brackets the sample's own noise around the coarse answer.
COARSE = (2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, -3.0)  # 0.0: the carried threshold itself
FINE = (0.24, 0.12, 0.06, 0.02, -0.02, -0.06, -0.12, -0.24)
# Before any measurement: at the top 1%, ln(100) ~ 4.6 for a Laplace tail, ~7.5 for a
# Gaussian one, less for heavier tails.
DEFAULT_SLOPE = 4.0
SLOPE_RANGE = (0.25, 64.0)
SAMPLE_HITS = 2048   # the sample holds ~this many of the k largest ...
MAX_RATE = 64        # ... reading at least one cache line in 64
SIGMA_FLOOR = 0.01   # ln(count) error of the estimate besides the sample's binomial noise


class PipelineCarry(NamedTuple):
  """What a pipelined step leaves for the next, per selection group ([G] arrays)."""
  center: jax.Array  # float32[G]: last step's k-th largest |acc| (exact or interpolated); 0 = none yet
  slope: jax.Array   # float32[G]: -d ln(count)/d ln(threshold) near it, from the last pass; 0 = unknown
  path: jax.Array    # int32[G]: how the last step selected: 0 one pass, 1 one pass + trim,
                     # 2 second pass (fallback, or cold start), 3 second pass whose
                     # sample missed (exact top-k of the whole vector); -1 = no step yet


class PipelinePlan(NamedTuple):
  """Static layout of one pipelined selection (Python numbers, fixed at trace time)."""
  tol: int           # accepted shortfall: path 0 sends k - tol to k elements
  f: float           # one tolerance in ln(count) (at least one element)
  rate: int          # the sample reads one cache line in `rate`
  m: int             # sampled elements
  sigma: float       # expected ln(count) error of the sample's estimate
  low: float         # ln(count) offset of the packed low edge above the estimate's count
  cap: int           # most candidates the low edge may pass: k * e^(low + 3 sigma)
  offsets: tuple[float, ...]  # the first counting round's EDGES offsets, `low` down to `-low`


def plan(n: int, k: int, tolerance: float) -> PipelinePlan:
  tol = math.floor(tolerance * k)
  f = max(tol, 1) / k
  rate = sampling.sample_rate(k, SAMPLE_HITS, MAX_RATE)
  m = sampling.blocked_sample_size(n, rate)
  sigma = math.sqrt(1.0 / max(k * m / n, 1.0) + SIGMA_FLOOR**2)
  low = 3.0 * sigma + f
  cap = min(n, -(-(math.ceil(k * math.exp(low + 3.0 * sigma) * 1.02) + 32) // 32) * 32)
  offsets = tuple(low * (1.0 - 2.0 * i / (EDGES - 1)) for i in range(EDGES))
  return PipelinePlan(tol, f, rate, m, sigma, low, cap, offsets)


def crossing(edges: jax.Array, counts: jax.Array, target, slope: jax.Array) -> jax.Array:
  """float32[]: where count(threshold) crosses `target`, interpolated in log-log.

  `edges` ascending (> 0) with non-increasing `counts`; between the two edges
  that bracket `target` the interpolation is linear in (ln edge, ln count);
  outside them it extrapolates with `slope`.
  """
  lc = jnp.log(counts.astype(jnp.float32) + 0.5)
  le = jnp.log(edges)
  lt = jnp.log(jnp.float32(target))
  last = edges.shape[0] - 1
  i = jnp.sum(lc >= lt, dtype=jnp.int32) - 1  # last edge passing at least target
  j = jnp.clip(i, 0, last - 1)
  w = (lc[j] - lt) / jnp.maximum(lc[j] - lc[j + 1], 1e-6)
  inside = le[j] + jnp.clip(w, 0.0, 1.0) * (le[j + 1] - le[j])
  lower = le[0] + (lc[0] - lt) / slope        # every edge passes fewer: go lower
  higher = le[last] + (lc[last] - lt) / slope  # every edge passes more: go higher
  return jnp.exp(jnp.where(i < 0, lower, jnp.where(i >= last, higher, inside)))


def _finite(t: jax.Array) -> jax.Array:
  """Thresholds held inside the positive normal float32 range: probes and edges
  scaled from a cut near 3.4e38 or 1e-38 must neither overflow nor reach 0."""
  info = jnp.finfo(jnp.float32)
  return jnp.clip(jnp.where(jnp.isnan(t), info.max, t), info.tiny, info.max)


def _measured_slope(edges: jax.Array, counts: jax.Array, old: jax.Array) -> jax.Array:
  """The outer edges' log-log slope, averaged (geometrically) with `old`; `old` if uninformative."""
  lo, hi = counts[0], counts[-1]
  span = jnp.log(edges[-1]) - jnp.log(edges[0])
  meas = (jnp.log(lo + 0.5) - jnp.log(hi + 0.5)) / jnp.maximum(span, 1e-12)
  valid = (hi >= 1) & (lo > hi) & (span > 0)
  new = jnp.where(valid, jnp.sqrt(old * jnp.maximum(meas, 1e-6)), old)
  return jnp.clip(new, *SLOPE_RANGE).astype(jnp.float32)


def hgg_topk_pipelined(tolerance: float = 0.01, min_fast_n: int = MIN_FAST_N) -> Selector:
  """The pipelined HGG-TopK selector (steps above); `tolerance` as in `hggjax.hggtopk`.

  `tolerance` sets the accepted shortfall of path 0.
  """

  def init(num_groups: int) -> PipelineCarry:
    return PipelineCarry(center=jnp.zeros((num_groups,), jnp.float32),
                         slope=jnp.zeros((num_groups,), jnp.float32),
                         path=jnp.full((num_groups,), -1, jnp.int32))

  def select(x: jax.Array, k: int, carry: PipelineCarry, key) -> tuple[Selection, PipelineCarry]:
    del key
    n = x.shape[0]
    p = plan(n, k, tolerance)
    fast = topk_kernels.fast_path(n, k, p.cap, min_fast_n)
    x = x.astype(jnp.float32)
    # |x| is formed inside each consumer: one shared jnp.abs(x) made XLA write it
    # out in full before the cond (an extra pass over n).
    slope = jnp.where(carry.slope > 0, carry.slope, DEFAULT_SLOPE).astype(jnp.float32)

    def with_cut(idx):
      """(idx, the smallest |x| sent): zeros carry nothing and are never sent."""
      sent = jnp.abs(x.at[idx].get(mode="fill", fill_value=0.0))
      return jnp.where(sent > 0, idx, n).astype(jnp.int32), topk_kernels.smallest_sent(x, idx)

    def second_pass():
      """Paths 2-3: (idx, cut, passed, missed) of a sampled top-k over the whole vector.

      No full-length fallback: a ``lax.top_k`` over all n elements, or the
      whole-vector histogram, present in a branch that never runs, still made
      every call slower on XLA:CPU.
      """
      if not fast:
        exact = with_cut(jax.lax.top_k(jnp.abs(x), k)[1].astype(jnp.int32))
        return (*exact, *varying_like((jnp.int32(k), jnp.bool_(False)), x))
      low, cap2 = sampling.low_cut(x, k)
      pos, keys, count = topk_kernels.candidates(x, low, cap2)
      missed = (count < k) | (count > cap2)
      # A sample that missed (rare) gives way to the exact top-k of the whole vector,
      # found without an n-sized buffer (`lean_top_k`: its docstring says why).
      idx = jax.lax.cond(missed, lambda: topk_kernels.lean_top_k(x, k),
                         lambda: topk_kernels.take_largest(keys, pos, k, jnp.int32(0), n))
      idx, cut = with_cut(idx)
      return idx, cut, count, missed

    def estimate():
      """Step 1: the carried threshold corrected on the sample (two probe rounds)."""
      s = jnp.abs(sampling.blocked_sample(x, p.rate) if fast else x)
      m = s.shape[0]
      target = k * m / n
      probes = _finite(carry.center * jnp.exp(-jnp.asarray(COARSE, jnp.float32) / slope))
      counts = bits.count_many(s, probes)
      est = _finite(crossing(probes, counts, target, slope))
      probes = _finite(est * jnp.exp(-jnp.asarray(FINE, jnp.float32) / slope))
      est = _finite(crossing(probes, bits.count_many(s, probes), target, slope))
      # The carried threshold stays when the sample cannot tell it from the truth
      # (its count within 2 binomial sd of target): on a slowly changing gradient
      # it is far more precise than the sample.
      noise = math.sqrt(target * (1.0 - m / n))
      at_center = counts[COARSE.index(0.0)].astype(jnp.float32)
      return jnp.where(jnp.abs(at_center - target) <= 2.0 * noise + 0.5, carry.center, est)

    def warm():
      # Step 2: one pass packs everything >= the low edge; the candidates' counts
      # at EDGES thresholds, then EDGES more between the two around k.
      edges = _finite(estimate() * jnp.exp(-jnp.asarray(p.offsets, jnp.float32) / slope))
      mask = jnp.abs(x) >= edges[0]
      if fast:
        pos, count = topk_kernels.compact(bits.pack(mask), n, p.cap)
      else:
        pos, count = topk_kernels.first_true(mask, p.cap), jnp.sum(mask, dtype=jnp.int32)
      values = jnp.where(pos < n, jnp.abs(x.at[pos].get(mode="fill", fill_value=0.0)), -1.0)
      counts = bits.count_many(values, edges)
      i = jnp.sum(counts >= k, dtype=jnp.int32) - 1  # highest edge passing >= k
      below = edges[jnp.clip(i, 0, EDGES - 1)]
      above = jnp.where(i + 1 < EDGES, edges[jnp.clip(i + 1, 0, EDGES - 1)], jnp.max(values))
      fine = _finite(below * (above / below) ** jnp.linspace(0.0, 1.0, EDGES, dtype=jnp.float32))
      fine_counts = bits.count_many(values, fine)
      # Step 3: the path.
      cuts = jnp.concatenate([edges, fine])
      passing = jnp.concatenate([counts, fine_counts])
      within = (passing >= k - p.tol) & (passing <= k)
      j = jnp.argmax(jnp.where(within, passing, -1)).astype(jnp.int32)
      enough = (count >= k) & (count <= p.cap)
      path = jnp.where(enough, jnp.where(jnp.any(within), 0, 1), 2).astype(jnp.int32)
      not_missed = varying_like(jnp.bool_(False), x)

      def one_pass():
        # Every candidate >= cuts[j] (k - tol to k of them) is sent; cuts[j] is the cut.
        return topk_kernels.place(values >= cuts[j], pos, k, n), cuts[j], passing[j], not_missed

      def trim():
        keys = jnp.where(values >= 0, bits.float_to_key(values), -1)
        idx, cut = with_cut(topk_kernels.take_largest(keys, pos, k, jnp.int32(0), n))
        return idx, cut, count, not_missed

      idx, cut, passed, missed = jax.lax.switch(path, (one_pass, trim, second_pass))
      path = jnp.where(missed, 3, path).astype(jnp.int32)
      # Step 4: the next carry. Paths 1-2 sent the largest (k of them on path 1),
      # so their cut is the k-th largest or next to it; path 0 interpolates it
      # between the fine edges.
      center = jnp.where(path == 0, _finite(crossing(fine, fine_counts, k, slope)), cut)
      return idx, cut, passed, path, center, _measured_slope(edges, counts, slope)

    def cold():
      idx, cut, passed, missed = second_pass()
      path = jnp.where(missed, 3, 2).astype(jnp.int32)
      return idx, cut, passed, path, cut, slope

    def on_accelerator(x, center):
      # The carried centre guides branch-free counting passes; the exact top-k is sent.
      sel = hgg.on_accelerator(x, k, center)
      path = jnp.where(sel.history_hit, 0, 2).astype(jnp.int32)
      return sel.indices, sel.threshold, sel.passed, path, sel.threshold, slope

    idx, cut, passed, path, center, new_slope = jax.lax.platform_dependent(
        x, carry.center, cpu=lambda *_: jax.lax.cond(carry.center > 0, warm, cold),
        default=on_accelerator)
    selection = Selection(idx, passed.astype(jnp.int32), cut, path <= 1)
    return selection, PipelineCarry(center.astype(jnp.float32), new_slope, path)

  return Selector(init, select, separate_groups=True)
