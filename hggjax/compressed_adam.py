"""`adamw`: AdamW with a hggjax compressor in the right place, for transformers.

The obvious chain, ``optax.chain(hggjax.hggtopk(0.01, axis_name="data"),
optax.adamw(lr))``, runs Adam after the exchange, on a sparse mean: a coordinate sent
once after many steps of accumulation is normalised by Adam and moves by a few
learning-rate units in all, however much its residual held, where dense Adam moves it
by up to one unit every step. Error feedback keeps the direction but not the distance,
and a transformer trained so trails dense AdamW by tens of percent in loss.

`adamw` builds the chain with Adam's moments on each device, before the compressor,
and the learning rate before it too, so that the residual holds parameter changes::

    clip (optional, each device's own gradient)
    -> Adam's moments           method="adam": per device; the second moment local
                                or shared (below)
    -> learning rate            each device's parameter change at this step's rate
    -> [chunked DCT]            basis="dct": select in DCT coefficients (`hggjax.dct`)
    -> compressor               select, exchange, keep the rest (error feedback,
                                through ScaleCom's low-pass filter by default)
    -> [inverse DCT]
    -> decoupled weight decay   -lr * weight_decay * param, the same on every device

Mechanisms (options; docs/lm.md has them measured):

- ``second_moment="local"``: each device normalises by its own second moment. The
  mean of the devices' steps is then not Adam's step of the mean gradient (Adam is not
  linear in the gradient), and each device's second moment, from a quarter or less of
  the batch, is larger than dense Adam's.
- ``second_moment="shared"`` (1-bit Adam, Tang et al. 2021; 0/1 Adam, Lu et al. 2023):
  every device normalises by one second moment, the mean of the devices' own, taken by
  a dense mean at refresh steps only and frozen in between: after steps 1, 2, 4, ...
  up to `refresh_every`, then every `refresh_every` steps, and never after
  `freeze_after`. The step is then linear in the gradient, so the mean of the devices'
  steps is Adam's step of the mean gradient under that second moment, and error
  feedback on it is exact. Each refresh sends the second moment dense (`refresh_bytes`
  in `hggjax.stats`).
- ``method="demo"`` (DeMo, Peng et al.): no Adam. The compressor's residual is the
  momentum (``residual_decay=b1``: acc = g + b1 * residual, and what was sent leaves
  it), and the step is the sign of the exchanged mean, times the learning rate; with
  ``basis="dct"`` the sign is taken after the inverse DCT, so every coordinate moves.
- ``basis="dct"``: the compressor selects in chunked DCT-II coefficients of the
  update (`hggjax.dct`), with error feedback in that domain.
- ``residual_lowpass`` (ScaleCom's low-pass filter, Chen et al. 2020; 0.5 by default):
  the residual kept is (1 - b) x the old one + b x what was not sent, so a step enters
  the residual at b of its size and what was sent leaves only b of it; sending then
  follows the accumulated steps smoothly instead of in bursts. Plain error feedback is
  ``residual_lowpass=1``.
- ``density_warmup`` (DGC's sparsity warm-up): the compressor sends more in the first
  steps, each density for ``warmup_every`` steps, before `density`.
- ``mask_momentum=True`` (DGC's momentum factor masking, Lin et al. 2018): where a
  device's selection sent its accumulated step, that device's first moment restarts
  from 0, so that momentum built while the step waited in the residual does not push
  the coordinate again once the step has been applied.

With ``compressor="none"`` nothing is compressed and `adamw` is standard data-parallel
AdamW: the mean of the (clipped) gradients, then ``optax.adamw``, identically on every
device; that is the baseline every compressed run is measured against. A named
compressor takes the wire options of every hggjax compressor: by default its values
travel in float8 with a scale per 256 at packed positions, and its residual keeps what
the rounding loses (``value_dtype=None, index_coding="int32"``: the exact wire).

State: Adam's moments are per device (`AdamState` inside a `hggjax.PerDeviceState`, so
`hggjax.shard_state` and `state_specs` give them the device axis); the learning-rate
count and the DCT are stateless or replicated; the compressor keeps its own state.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from hggjax import chunked_dct as dct_lib
from hggjax import density_warmup as warmup_lib
from hggjax import error_feedback as ef
from hggjax import exchange, validate
from hggjax.per_device import PerDeviceState
from hggjax.registry import ERROR_FEEDBACK, compressors, get_compressor
from hggjax.state import find as find_state, with_device_axis, without_device_axis

METHODS = ("adam", "demo")
# ScaleCom's low-pass filter on the residual, on by default with Adam before a named
# compressor that keeps one: at 1200 steps it took 3.7-5.8 points off the gap to dense
# AdamW on the transformer of docs/lm.md.
DEFAULT_LOWPASS = 0.5
SECOND_MOMENTS = ("local", "shared")
BASES = (None, "dct")


class AdamState(NamedTuple):
  """Adam's moments on one device (`adamw`'s first part). With an axis every field has
  a leading device axis (length 1 as the update sees it, P once sharded)."""
  count: jax.Array      # int32[]: steps taken, skipped ones included (the same on every
                        # device: it drives the bias correction and the refreshes)
  mu: Any               # per gradient leaf, float32[*leaf.shape]: this device's first
                        # moment (None for non-floating leaves)
  nu: Any               # the same: this device's second moment
  shared_nu: Any        # second_moment="shared": the same shape, the bias-corrected mean
                        # of every device's nu at the last refresh; None with "local"
  refreshes: jax.Array  # int32[]: refreshes so far (each a dense mean of nu)


class ChainParts(NamedTuple):
  """`adamw_parts`: the chain cut around its compressor."""
  before: tuple[optax.GradientTransformation, ...]  # on each device's own gradient
  compressor: optax.GradientTransformation
  after: tuple[optax.GradientTransformation, ...]   # on the exchanged mean


def _refresh_now(count: jax.Array, every: int, freeze_after: int | None) -> jax.Array:
  """bool[]: refresh the shared second moment at step `count` (0-based): after steps 1,
  2, 4, ... while the interval is below `every`, then every `every` steps."""
  step = count + 1
  doubling = ((step & (step - 1)) == 0) & (step <= every)
  now = doubling | (step % every == 0)
  if freeze_after is not None:
    now = now & (count < freeze_after)
  return now


def adam_moments(b1: float, b2: float, eps: float, *, second_moment: str = "local",
                 refresh_every: int = 64, freeze_after: int | None = None,
                 axis_name=None) -> optax.GradientTransformation:
  """Adam's bias-corrected step m / (sqrt(v) + eps) from each device's own gradient.

  Like ``optax.scale_by_adam``, with the second moment local or shared (module
  docstring) and a non-finite gradient guarded: on such a step this device's moments
  stay as they were and the gradient passes through unchanged, so that the compressor
  after it skips the step and counts it. The count and the refreshes still advance on
  every device alike (a refresh is a collective every device takes part in).
  """
  axis_name = validate.axis_name(axis_name)
  if second_moment not in SECOND_MOMENTS:
    raise ValueError(f"second_moment must be one of {SECOND_MOMENTS}, got {second_moment!r}.")
  refresh_every = validate.int_at_least("refresh_every", refresh_every, 1)
  shared = second_moment == "shared"

  def init(params):
    zeros = lambda: jax.tree.map(  # noqa: E731
        lambda p: jnp.zeros(p.shape, jnp.float32) if jnp.issubdtype(p.dtype, jnp.floating)
        else None, params)
    state = AdamState(jnp.zeros([], jnp.int32), zeros(), zeros(),
                      zeros() if shared else None, jnp.zeros([], jnp.int32))
    return PerDeviceState(with_device_axis(state, axis_name))

  def update(updates, state, params=None):
    del params
    st = without_device_axis(state.inner, axis_name)
    leaves, treedef = jax.tree.flatten(updates)
    ok = ef.all_finite(leaves)
    g = [x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else None
         for x in leaves]
    flat = lambda tree: treedef.flatten_up_to(tree)  # noqa: E731
    mu, nu = flat(st.mu), flat(st.nu)
    mu = [None if x is None else jnp.where(ok, b1 * m + (1 - b1) * x, m) for x, m in zip(g, mu)]
    nu = [None if x is None else jnp.where(ok, b2 * v + (1 - b2) * x * x, v) for x, v in zip(g, nu)]
    t = (st.count + 1).astype(jnp.float32)
    c1, c2 = 1 - b1 ** t, 1 - b2 ** t
    refreshes, shared_nu = st.refreshes, None
    if shared:
      now = _refresh_now(st.count, refresh_every, freeze_after)

      def refreshed():  # over every device (both axes of a pair): each has its own nu
        return [None if v is None else exchange.dense_mean(v, axis_name) / c2 for v in nu]

      old = flat(st.shared_nu)
      shared_nu = jax.lax.cond(now, refreshed, lambda: old)
      refreshes = refreshes + now.astype(jnp.int32)
      denom = [None if v is None else jnp.sqrt(v) + eps for v in shared_nu]
    else:
      denom = [None if v is None else jnp.sqrt(v / c2) + eps for v in nu]
    out = [x if m is None else jnp.where(ok, (m / c1) / d, x).astype(x.dtype)
           for x, m, d in zip(leaves, mu, denom)]
    new = AdamState(st.count + 1, treedef.unflatten(mu), treedef.unflatten(nu),
                    None if shared_nu is None else treedef.unflatten(shared_nu), refreshes)
    return treedef.unflatten(out), PerDeviceState(with_device_axis(new, axis_name))

  return optax.GradientTransformation(init, update)


def scheduled_weight_decay(learning_rate, rate: float, mask=None) -> optax.GradientTransformation:
  """AdamW's decoupled weight decay alone: adds -learning_rate(t) * rate * param (where
  `mask` says) to updates that carry their learning rate already."""
  schedule = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

  def init(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("weight decay needs the params: call tx.update(updates, state, params).")
    step = -schedule(state.count) * rate
    where = mask(params) if callable(mask) else mask
    if where is None:
      where = jax.tree.map(lambda _: True, params)
    decayed = jax.tree.map(lambda u, p, m: u + step * p if m else u, updates, params, where)
    return decayed, optax.ScaleByScheduleState(optax.safe_int32_increment(state.count))
  return optax.GradientTransformation(init, update)


def _momentum_masked(moments: optax.GradientTransformation,
                     scale: optax.GradientTransformation,
                     compressor: optax.GradientTransformation, residual_decay: float,
                     axis_name) -> optax.GradientTransformation:
  """Adam's moments, the learning rate and the compressor as one transformation whose
  state is their three states, with DGC's momentum factor masking: after the exchange,
  each device's first moment is set to 0 where its own selection sent a value.

  Sent, per element: the new residual holds less than half of acc (acc = step + decay x
  residual, `error_feedback.accumulated`): 0 with the exact wire, the rounding (at most
  1/16 of the value in float8_e4m3fn) with a coded one, acc itself where nothing was
  sent. A step with a non-finite gradient sends nothing and masks nothing.
  """

  def init(params):
    return moments.init(params), scale.init(params), compressor.init(params)

  def update(updates, state, params=None):
    adam_state, scale_state, compression_state = state
    steps, adam_state = moments.update(updates, adam_state, params)
    steps, scale_state = scale.update(steps, scale_state, params)
    acc = jax.tree.leaves(ef.accumulated(steps, compression_state,
                                         residual_decay=residual_decay))
    ok = ef.all_finite(jax.tree.leaves(steps))
    out, compression_state = compressor.update(steps, compression_state, params)
    residual = find_state(compression_state).residual
    inner = without_device_axis(adam_state.inner, axis_name)
    mu, treedef = jax.tree.flatten(inner.mu, is_leaf=lambda x: x is None)
    masked = [m if m is None or r is None else
              jnp.where(ok & (jnp.abs(r.reshape(a.shape)) < 0.5 * jnp.abs(a)), 0.0, m)
              for m, r, a in zip(mu, residual, acc)]
    inner = inner._replace(mu=treedef.unflatten(masked))
    adam_state = PerDeviceState(with_device_axis(inner, axis_name))
    return out, (adam_state, scale_state, compression_state)

  return optax.GradientTransformation(init, update)


def _sign() -> optax.GradientTransformation:
  return optax.stateless(lambda updates, params=None: jax.tree.map(jnp.sign, updates))


def adamw_parts(
    learning_rate: float | optax.Schedule,
    *,
    compressor: str | optax.GradientTransformation = "hggtopk",
    density: float = 0.03,
    axis_name: str | tuple[str, str] | None = None,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Any | Callable[[Any], Any] | None = None,
    clip_norm: float | None = None,
    method: str = "adam",
    second_moment: str = "local",
    refresh_every: int = 64,
    freeze_after: int | None = None,
    basis: str | None = None,
    chunk: int = 64,
    scope: str | None = None,
    residual_lowpass: float | None = None,
    mask_momentum: bool = False,
    density_warmup: tuple[float, ...] = (),
    warmup_every: int = 25,
    **compressor_options,
) -> ChainParts:
  """`adamw`'s chain, cut around its compressor (for harnesses that time or probe the
  compressor's input); arguments as `adamw`'s."""
  if not callable(learning_rate):
    validate.positive("learning_rate", learning_rate)
  built = not isinstance(compressor, str)
  if built and not (hasattr(compressor, "init") and hasattr(compressor, "update")):
    raise ValueError(f"compressor must be a name from hggjax.compressors or a built "
                     f"compressor (e.g. hggjax.hggtopk(0.01, axis_name='data')), got "
                     f"{compressor!r}.")
  if not built and compressor not in compressors:
    raise ValueError(f"unknown compressor {compressor!r}; choose one of {sorted(compressors)}.")
  if built and (method == "demo" or compressor_options or scope is not None
                or residual_lowpass is not None):
    raise ValueError("with a built compressor, pass its options to its constructor; "
                     "method='demo' sets the compressor's residual_decay, so it needs the "
                     "compressor by name (compressor='hggtopk', density=...).")
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS} ('adam': Adam's moments per device "
                     f"before the compressor; 'demo': DeMo's sign step), got {method!r}.")
  if second_moment not in SECOND_MOMENTS:
    raise ValueError(f"second_moment must be one of {SECOND_MOMENTS} ('local': each "
                     "device's own; 'shared': the devices' mean, refreshed at intervals), "
                     f"got {second_moment!r}.")
  if basis not in BASES:
    raise ValueError(f"basis must be None or 'dct' (select in chunked DCT coefficients), "
                     f"got {basis!r}.")
  for name, value in (("b1", b1), ("b2", b2)):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
      raise ValueError(f"{name} must be a number in [0, 1), got {value!r}.")
  validate.positive("eps", eps)
  if (not isinstance(weight_decay, (int, float)) or isinstance(weight_decay, bool)
      or weight_decay < 0):
    raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}.")
  if clip_norm is not None:
    validate.positive("clip_norm", clip_norm)
  refresh_every = validate.int_at_least("refresh_every", refresh_every, 1)
  if freeze_after is not None:
    freeze_after = validate.int_at_least("freeze_after", freeze_after, 1)
  if method == "demo" and second_moment != "local":
    raise ValueError("method='demo' keeps no second moment: leave second_moment at 'local'.")
  if method == "demo" and b1 == 0:
    raise ValueError("method='demo' keeps its momentum in the residual, decayed by b1: "
                     "b1 must be in (0, 1).")
  if "momentum" in compressor_options:
    raise ValueError("adamw keeps its momentum in Adam's first moment (or, with "
                     "method='demo', in the residual): leave the compressor's momentum out.")
  if method == "demo" and "residual_decay" in compressor_options:
    raise ValueError("method='demo' decays the residual by b1 (it is DeMo's momentum): "
                     "leave residual_decay out.")
  if not isinstance(mask_momentum, bool):
    raise ValueError(f"mask_momentum must be True or False, got {mask_momentum!r}.")
  # A named compressor's residual: its constructor's default, or error_feedback= as given
  # (randomk keeps one with error_feedback=True, topk none with False).
  keeps_residual = not built and bool(compressor_options.get(
      "error_feedback", compressor in ERROR_FEEDBACK))
  if mask_momentum and (not keeps_residual or method != "adam" or basis is not None
                        or residual_lowpass not in (None, 1.0)):
    raise ValueError("mask_momentum=True resets Adam's first moment where the compressor "
                     "sent, which its residual tells: it needs method='adam', no basis, no "
                     "residual_lowpass, and a compressor with error feedback by name (e.g. "
                     "compressor='hggtopk'; "
                     f"not {sorted(set(compressors) - ERROR_FEEDBACK)}).")
  density_warmup = tuple(density_warmup)
  if density_warmup and (built or compressor == "none"):
    raise ValueError("density_warmup builds the compressor at each density: name it "
                     "(compressor='hggtopk', density=...), and not 'none'.")
  chunk = validate.int_at_least("chunk", chunk, 1, 4096)
  axis_name = validate.axis_name(axis_name)
  clip = (optax.clip_by_global_norm(clip_norm),) if clip_norm else ()
  decay = (scheduled_weight_decay(learning_rate, weight_decay, mask),) if weight_decay else ()

  if compressor == "none":  # (a name; a built one is used as it is)
    # Nothing to compress: Adam on the exchanged mean is standard data-parallel AdamW.
    dense = get_compressor("none", axis_name=axis_name, **compressor_options)
    return ChainParts(clip, dense, (optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps,
                                                weight_decay=weight_decay, mask=mask),))
  if built:
    tx = compressor
  else:
    # One selection over all compressed leaves: Adam's steps are about one learning-rate
    # unit everywhere, so magnitudes compare across leaves, and the leaves that move
    # most take more of the budget (docs/lm.md measures it against "leaf").
    options = dict(compressor_options, density=density, axis_name=axis_name,
                   scope="global" if scope is None else scope)
    if method == "demo":
      options["residual_decay"] = b1
    if residual_lowpass is not None or (method == "adam" and not mask_momentum and keeps_residual):
      options["residual_lowpass"] = DEFAULT_LOWPASS if residual_lowpass is None else residual_lowpass
    if density_warmup:
      tx = warmup_lib.density_warmup(
          lambda d: get_compressor(compressor, **dict(options, density=d)), density,
          density_warmup, warmup_every, axis_name)
    else:
      tx = get_compressor(compressor, **options)
  to_basis = (dct_lib.dct(chunk),) if basis == "dct" else ()
  from_basis = (dct_lib.inverse_dct(chunk),) if basis == "dct" else ()
  if method == "demo":
    return ChainParts(clip + to_basis, tx,
                      from_basis + (_sign(), optax.scale_by_learning_rate(learning_rate)) + decay)
  moments = adam_moments(b1, b2, eps, second_moment=second_moment,
                         refresh_every=refresh_every, freeze_after=freeze_after,
                         axis_name=axis_name)
  # The learning-rate count is the same on every device: its state needs no device axis.
  scale = optax.scale_by_learning_rate(learning_rate)
  if mask_momentum:  # the compressor's part starts at Adam: it resets Adam's state
    return ChainParts(clip, _momentum_masked(
        moments, scale, tx, compressor_options.get("residual_decay", 1.0), axis_name), decay)
  return ChainParts(clip + (moments, scale) + to_basis, tx, from_basis + decay)


def adamw(learning_rate: float | optax.Schedule, **kwargs) -> optax.GradientTransformation:
  """AdamW around a hggjax compressor, the way that trains transformers (module docstring).

  Example, in a ``jit(shard_map)`` step over "data" (README, docs/lm.md)::

      tx = hggjax.adamw(optax.warmup_cosine_decay_schedule(0, 2e-3, 100, 1200),
                        compressor="hggtopk", density=0.03, axis_name="data",
                        weight_decay=0.1, clip_norm=1.0)
      opt_state = hggjax.shard_state(tx.init(params), mesh, "data")

  Args:
    learning_rate: a number or an optax schedule (of the step count).
    compressor: a name from `hggjax.compressors` ("none" gives standard AdamW on the
      mean gradient), or a compressor built with the same `axis_name`, e.g.
      ``hggjax.hggtopk(0.01, axis_name="data")`` (then `density` and the options
      are its own).
    density: the compressor's share of elements sent (with a name): of all compressed
      leaves together by default, of each leaf with ``scope="leaf"``. 0.03 (default):
      with the other defaults, within 2.2% of dense AdamW's validation loss at 58x fewer
      bytes in docs/lm.md's 1200-step transformer runs on two seeds (+4.5% on its
      second corpus; 0.01: +4.3% to +7.0% at 122x).
    axis_name: the mapped axis (or (slow, fast) pair) the compressor exchanges over;
      Adam's moments are kept per device along it.
    b1, b2, eps: Adam's (b1 is DeMo's momentum decay with ``method="demo"``).
    weight_decay: decoupled weight decay, applied after the exchange on every device
      alike; `mask` (a pytree of bools or a function of the params) says where.
    clip_norm: clip each device's own gradient to this global norm first (None: no
      clipping). Clipped before the compressor, a spike cannot sit in the residual.
    method: "adam" (Adam's moments per device, before the compressor) or "demo".
    second_moment: "local" or "shared" (with `refresh_every` and `freeze_after`).
    basis: None, or "dct" to select in chunked DCT-II coefficients of `chunk`.
    scope: the named compressor's selection: None or "global" (one top-k over all
      compressed leaves together, so the leaves whose Adam steps are largest take more
      of the budget; closer to dense than "leaf" in every transformer run of
      docs/lm.md) or "leaf" (k per leaf, the compressors' own default).
    residual_lowpass: ScaleCom's low-pass filter on the named compressor's residual,
      residual' = (1 - b) residual + b (acc - sent) for b = residual_lowpass. None
      (default): `DEFAULT_LOWPASS` (0.5) with method="adam" and a compressor with
      error feedback (without mask_momentum), else none; 1: plain error feedback.
    density_warmup, warmup_every: DGC's sparsity warm-up (`hggjax.density_warmup`): the
      named compressor at each of these densities for `warmup_every` steps, then at
      `density`; e.g. ``density_warmup=(0.25, 0.0625, 0.015625)``.
    mask_momentum: DGC's momentum factor masking (module docstring): each device's
      first moment restarts from 0 where its selection sent. The chain's compressor
      part (`adamw_parts`) then holds Adam's moments and the learning rate too.
    **compressor_options: passed to the compressor (e.g. ``exchange``, ``min_size``,
      ``residual_decay``, ``pipeline`` for hggtopk). ``residual_decay`` below 1 lets
      Adam steps that wait long in the residual fade (docs/lm.md measures it).

  Returns:
    One optax transformation; with `axis_name` call its update inside ``shard_map``
    or ``pmap`` over that axis, with the state placed by `hggjax.shard_state`.
  """
  parts = adamw_parts(learning_rate, **kwargs)
  return optax.chain(*parts.before, parts.compressor, *parts.after)
