"""The compressors by name, each an optax transformation.

Every method takes ``error_feedback``: with it (the default for all but
``randomk``) each device adds what it did not send to the next step's gradient.
The traditional names without error feedback (``topk2``, ``gaussian2``,
``randomk``) and ``randomkec`` (random-k with it) are the same constructors with
that keyword set; `ERROR_FEEDBACK` is derived from the constructors' defaults.

Options shared by every constructor (`Options`):
  axis_name: None (default) compresses and decompresses locally. A mapped axis
    name ("data") exchanges the sparse payloads over it and returns their mean,
    identical on every device. Call the update inside ``jax.shard_map`` or
    ``jax.pmap`` over that axis; see `hggjax.shard_state`. A pair of mesh axes
    (slow, fast), e.g. ("hosts", "local"), is a two-level exchange (under
    ``shard_map``): a dense mean over the fast axis (inside a host), then
    compression and the sparse exchange over the slow axis only; the devices of a
    host select alike and share one residual (docs/exchange.md).
  exchange: how the sparse payloads travel (docs/exchange.md). "allgather"
    (default): every device gathers every device's k slots, (P - 1) k slots
    received per device. "sparse_allreduce": Ok-Topk's sparse reduce-scatter
    (``all_to_all`` by index region) + ``all_gather`` of each region's kept
    largest means, about 3k (P - 1) / P slots received per device; slots that
    overflow their region's bucket or that the region does not keep stay in the
    sender's residual. "leader_mask": ScaleCom's cyclic top-k (Chen et al. 2020):
    each step one device in turn selects, every device sends its own values at
    those k positions, and a reduction of k values and k positions gives the mean
    (received bytes do not grow with P; what a device had at other positions
    stays in its residual). "union_mask": every device's k positions are
    gathered and every device sends its values at all of them (each once), so
    the mean at each of them holds every device's part; k positions and P k
    values sent per device. Without an axis it makes no difference.
  scope: "leaf" (default) selects k = max(1, round(density * n)) elements
    within every leaf, as HGG-TopK does per layer, and it keeps every layer
    learning: one global threshold starves layers whose gradients are small in
    magnitude (biases, late layers), and it copies the whole model into one
    vector each step. "global" selects over all compressed leaves concatenated.
  min_size: leaves with fewer elements are sent dense (averaged, no residual).
    Default 0: every floating leaf is compressed; leaves smaller than 1/density
    still send one element.
  key: PRNG key or integer seed (randomised selectors: randomk, randomkec,
    dgcsampling). Each device folds in its index, so selections differ per device
    and per step.
  momentum: momentum correction (DGC, Lin et al. 2018). Default 0: the compressor
    sends (a share of) the gradient, and momentum belongs to the optimizer after
    it. With momentum=m in [0, 1), each device keeps a velocity u = m * u + g and
    compresses u plus its residual; chain a momentum-free optimizer after it,
    e.g. ``optax.chain(hggjax.hggtopk(0.01, momentum=0.9), optax.sgd(lr))``.
    Momentum then acts before sparsification, as dense momentum SGD would, instead
    of on the sparse mean (where coordinates sent rarely get little of it). With
    density 1 and the exact wire (value_dtype=None) it is exactly
    ``optax.sgd(lr, momentum=m)``.
  residual_decay: in (0, 1], default 1 (plain error feedback). Below 1 each step
    first shrinks the residual, acc = g + residual_decay * residual: the residual is
    then a momentum buffer that what was sent leaves, as in DeMo (Peng et al.),
    where it replaces the optimizer's momentum (`hggjax.adamw(method="demo")`).
    Needs error feedback.
  residual_lowpass: in (0, 1], default 1 (plain error feedback). ScaleCom's low-pass
    filter on the residual (Chen et al. 2020): residual' = (1 - b) * residual +
    b * (acc - sent) for b = residual_lowpass, so a step enters the residual at b of
    its size and what was sent leaves only b of it. What the devices sent and kept
    then no longer sums to acc; the filtered residual is exact to that formula.
    Needs error feedback.

  value_dtype: the dtype values travel in (`hggjax.wire`). "auto" (default):
    "float8_e4m3fn" when the compressor keeps error feedback and the exchange is
    "allgather" or "sparse_allreduce" (the residual keeps what rounding loses), else
    the gradient's own dtype. None: the gradient's own dtype; or "float32",
    "bfloat16", "float16", "float8_e4m3fn", "float8_e5m2" (names or jnp dtypes).
    With error feedback, acc == sent + residual' holds bit for bit whatever it is.
  scale_group: one float32 power-of-two scale per this many slots, sent along (4
    bytes per group); float8 needs it (its smallest e4m3fn step is 2^-9: smaller
    gradients would not travel). "auto" (default): 256 for a float8 value_dtype,
    else None (no scales).
  index_coding: "packed": each row's sorted positions in an Elias-Fano code of
    static size, 2 + log2(n / k) bits a position (8.6 at 1%), bit-identical results;
    or "int32" (4 bytes a position). "auto" (default): "packed" for "allgather" and
    "sparse_allreduce", "int32" for the mask exchanges, which take no wire options.
    At 1% the defaults send about 2.1 bytes a slot instead of 8; the exact wire of
    float32 (or the gradient's dtype) values at int32 positions is
    ``value_dtype=None, index_coding="int32"``.

Integer and boolean leaves pass through untouched (their gradients carry no
information: JAX gives them float0 or zeros). Floating leaves of any width work:
selection and residuals run in float32.
"""

import functools
import inspect
from typing import Any, TypedDict, Unpack

import jax
import optax

from hggjax import selectors, validate
from hggjax.dense import dense_mean
from hggjax.selectors.base import Selector
from hggjax.transform import sparsify


# Every counting round is a pass over the vector unrolled at trace time: beyond this
# many, compiling takes minutes and float32 thresholds stop moving anyway.
MAX_STEPS = 64
MAX_BINS = 1 << 20


class Options(TypedDict, total=False):
  axis_name: str | tuple[str, str] | None
  exchange: str
  scope: str
  min_size: int
  key: jax.Array | int
  momentum: float
  residual_decay: float
  residual_lowpass: float
  value_dtype: Any
  scale_group: int | None
  index_coding: str


def _options(options: Options, error_feedback: bool = True) -> dict:
  """The shared options, validated, with their defaults (the wire's "auto" resolved for a
  compressor with or without `error_feedback`)."""
  if "pipeline" in options:
    raise TypeError(
        "pipeline= is offered by hggtopk only (its selection reuses the previous "
        "step's threshold); use hggjax.hggtopk(..., pipeline=True).")
  unknown = set(options) - set(Options.__annotations__)
  if unknown:
    raise TypeError(
        f"unknown option(s) {sorted(unknown)}; shared options are "
        f"{sorted(Options.__annotations__)}.")
  return dict(
      axis_name=validate.axis_name(options.get("axis_name")),
      exchange=validate.exchange(options.get("exchange", "allgather")),
      scope=validate.scope(options.get("scope", "leaf")),
      min_size=validate.int_at_least("min_size", options.get("min_size", 0), 0),
      key=validate.key(options.get("key", 0)),
      momentum=validate.momentum(options.get("momentum", 0.0)),
      residual_decay=validate.in_unit_interval(
          "residual_decay", options.get("residual_decay", 1.0)),
      residual_lowpass=validate.in_unit_interval(
          "residual_lowpass", options.get("residual_lowpass", 1.0)),
      wire_format=validate.wire_format(
          options.get("value_dtype", "auto"), options.get("scale_group", "auto"),
          options.get("index_coding", "auto"), options.get("exchange", "allgather"),
          error_feedback),
  )


def _build(selector: Selector, density, error_feedback, options: Options):
  error_feedback = validate.boolean("error_feedback", error_feedback)
  shared = _options(options, error_feedback)
  for name in ("residual_decay", "residual_lowpass"):
    if shared[name] != 1.0 and not error_feedback:
      raise ValueError(
          f"{name} acts on the error-feedback residual, and this compressor keeps "
          f"none: pass error_feedback=True, or leave {name} at 1.")
  return sparsify(selector, validate.density(density), error_feedback=error_feedback,
                  **shared)


def none(density: float | None = None, **options: Unpack[Options]) -> optax.GradientTransformationExtraArgs:
  """No compression: the dense mean over `axis_name` (identity without one).

  Args:
    density: accepted so that every name takes the same arguments; unused.
    **options: see `Options`; `scope`, `min_size`, `exchange`, `residual_decay`,
      `residual_lowpass` and the wire options do not apply (nothing is left behind;
      the mean travels in the gradient's dtype).
  """
  if density is not None:
    validate.density(density)
  shared = _options(options)
  return dense_mean(axis_name=shared["axis_name"], momentum=shared["momentum"],
                    key=shared["key"])


def topk(density: float, *, error_feedback: bool = True,
         **options: Unpack[Options]) -> optax.GradientTransformationExtraArgs:
  """Exact top-k by magnitude (Aji & Heafield, 2017).

  Args:
    density: share of elements sent, in (0, 1].
    error_feedback: keep what was not sent for the next step.
    **options: see `Options`.

  Example:
    >>> import jax.numpy as jnp, optax, hggjax
    >>> tx = optax.chain(hggjax.topk(density=0.5), optax.sgd(1.0))
    >>> params = {"w": jnp.zeros(4)}
    >>> updates, state = tx.update({"w": jnp.array([1., -3., 0.5, 2.])}, tx.init(params))
    >>> updates["w"]
    Array([-0., 3., -0., -2.], dtype=float32)

  References:
    Aji & Heafield, `Sparse Communication for Distributed Gradient Descent
    <https://arxiv.org/abs/1704.05021>`_, 2017
  """
  return _build(selectors.exact_topk(), density, error_feedback, options)


def gaussian(density: float, *, refine_steps: int = 3, error_feedback: bool = True,
             **options: Unpack[Options]) -> optax.GradientTransformationExtraArgs:
  """Gaussian-k (Shi et al., 2019); see `hggjax.selectors.gaussian`.

  Args:
    density: share of elements sent, in (0, 1].
    refine_steps: count-and-adjust rounds after the Gaussian estimate (0 to 64).
    error_feedback: keep what was not sent for the next step.
    **options: see `Options`.
  """
  steps = validate.int_at_least("refine_steps", refine_steps, 0, MAX_STEPS)
  return _build(selectors.gaussian(steps), density, error_feedback, options)


def randomk(density: float, *, error_feedback: bool = False,
            **options: Unpack[Options]) -> optax.GradientTransformationExtraArgs:
  """k uniformly random elements, new per device and step (a baseline).

  Args:
    density: share of elements sent, in (0, 1].
    error_feedback: keep what was not sent for the next step (``randomkec``).
    **options: see `Options`.
  """
  return _build(selectors.random_k(), density, error_feedback, options)


def dgcsampling(
    density: float,
    *,
    sample_ratio: float = 0.01,
    min_sample: int = 1024,
    refine_steps: int = 2,
    error_feedback: bool = True,
    **options: Unpack[Options],
) -> optax.GradientTransformationExtraArgs:
  """DGC's sampled threshold (Lin et al., 2018).

  Args:
    density: share of elements sent, in (0, 1].
    sample_ratio: share of elements sampled to estimate the threshold, (0, 1].
    min_sample: floor on the sample size (>= 1).
    refine_steps: count-and-adjust rounds on the whole vector (0 to 64).
    error_feedback: keep what was not sent for the next step.
    **options: see `Options`.
  """
  selector = selectors.dgc_sampling(
      validate.in_unit_interval("sample_ratio", sample_ratio),
      validate.int_at_least("min_sample", min_sample, 1),
      validate.int_at_least("refine_steps", refine_steps, 0, MAX_STEPS))
  return _build(selector, density, error_feedback, options)


def redsync(density: float, *, search_steps: int = 12, error_feedback: bool = True,
            **options: Unpack[Options]) -> optax.GradientTransformationExtraArgs:
  """RedSync's threshold binary search (Fang et al., 2019).

  Args:
    density: share of elements sent, in (0, 1].
    search_steps: bisection rounds between mean and max of |acc| (1 to 64; float32
      resolves no more than about 24).
    error_feedback: keep what was not sent for the next step.
    **options: see `Options`.
  """
  steps = validate.int_at_least("search_steps", search_steps, 1, MAX_STEPS)
  return _build(selectors.redsync(steps), density, error_feedback, options)


def redsynctrim(density: float, *, trim_steps: int = 10, error_feedback: bool = True,
                **options: Unpack[Options]) -> optax.GradientTransformationExtraArgs:
  """RedSync's trimmed top-k (Fang et al., 2019).

  Args:
    density: share of elements sent, in (0, 1].
    trim_steps: cuts tried from max down to mean of |acc| (1 to 64).
    error_feedback: keep what was not sent for the next step.
    **options: see `Options`.
  """
  steps = validate.int_at_least("trim_steps", trim_steps, 1, MAX_STEPS)
  return _build(selectors.redsync_trim(steps), density, error_feedback, options)


def hggtopk(
    density: float,
    *,
    num_bins: int = 1024,
    gamma: float = 1000.0,
    tolerance: float = 0.01,
    beta: float = 0.98,
    pipeline: bool = False,
    error_feedback: bool = True,
    **options: Unpack[Options],
) -> optax.GradientTransformationExtraArgs:
  """HGG-TopK: history-guided log-histogram threshold.

  The algorithm (steps in `hggjax.selectors.hgg`): the previous step's threshold
  (kept in state) is accepted when it passes k within tolerance; otherwise a
  histogram over log1p(gamma * |acc|) finds the bin of the k-th element and the
  threshold interpolates inside it. The k largest above it are sent.

  Args:
    density: share of elements sent, in (0, 1].
    num_bins: histogram bins (NUM_BINS, 2 to 2**20).
    gamma: log-scaling factor (GAMMA, finite, > 0): bins are uniform in log1p(gamma*|x|).
    tolerance: accepted miss, as a share of k (TOLERANCE, in (0, 1]).
    beta: interpolation coefficient inside the chosen bin (BETA, in (0, 1]);
      below 1 it lowers the threshold so that a few more pass and the trim keeps
      the exact k largest.
    pipeline: select in one pass from state carried over from the previous step
      (`hggjax.selectors.hgg_pipelined`, docs/pipeline.md): the previous cut,
      corrected on a sample, and 16 + 16 thresholds counted on the candidates
      that one pass compacts; k - tol to k elements are sent, or exactly k after
      a trim; when the candidates miss k, a bounded second pass (a sampled exact
      top-k) runs, and the state records which (``carry.path``). Every leaf gets
      its own selection and all_gather. `num_bins`, `gamma` and `beta` do not
      apply to it.
    error_feedback: keep what was not sent for the next step.
    **options: see `Options`.

  Example:
    >>> import optax, hggjax
    >>> tx = optax.chain(hggjax.hggtopk(density=0.05), optax.sgd(0.1))
  """
  num_bins = validate.int_at_least("num_bins", num_bins, 2, MAX_BINS)
  gamma = validate.positive("gamma", gamma)
  tolerance = validate.in_unit_interval("tolerance", tolerance)
  beta = validate.in_unit_interval("beta", beta)
  if validate.boolean("pipeline", pipeline):
    selector = selectors.hgg_topk_pipelined(tolerance=tolerance)
  else:
    selector = selectors.hgg_topk(num_bins=num_bins, gamma=gamma, tolerance=tolerance, beta=beta)
  return _build(selector, density, error_feedback, options)


def _variant(base, name: str, doc: str, **fixed):
  """`base` with keywords fixed: a traditional name for one setting of a method."""
  variant = functools.partial(base, **fixed)
  variant.__name__ = variant.__qualname__ = name
  variant.__doc__ = doc
  return variant


topk2 = _variant(topk, "topk2", "Exact top-k by magnitude, without error feedback.",
                 error_feedback=False)
gaussian2 = _variant(gaussian, "gaussian2",
                     "Gaussian-k without error feedback; arguments as in `gaussian`.",
                     error_feedback=False)
randomkec = _variant(randomk, "randomkec", "k uniformly random elements, with error feedback.",
                     error_feedback=True)

compressors = {
    "none": none,
    "topk": topk,
    "topk2": topk2,
    "gaussian": gaussian,
    "gaussian2": gaussian2,
    "randomk": randomk,
    "randomkec": randomkec,
    "dgcsampling": dgcsampling,
    "redsync": redsync,
    "redsynctrim": redsynctrim,
    "hggtopk": hggtopk,
}


def _error_feedback_default(constructor) -> bool:
  param = inspect.signature(constructor).parameters.get("error_feedback")
  return bool(param is not None and param.default)


ERROR_FEEDBACK = frozenset(name for name, fn in compressors.items() if _error_feedback_default(fn))


def get_compressor(name: str, **kwargs) -> optax.GradientTransformationExtraArgs:
  """The compressor registered as `name`, built with `kwargs`.

  Example:
    >>> import hggjax
    >>> tx = hggjax.get_compressor("gaussian2", density=0.01)
  """
  if name not in compressors:
    raise ValueError(f"unknown compressor {name!r}; valid names: {', '.join(sorted(compressors))}.")
  return compressors[name](**kwargs)
