"""Error feedback and momentum correction: what is compressed, and what is kept.

Per compressed leaf and step (Step 1 and Step 4 of `hggjax.sparsify`):

    velocity' = momentum * velocity + g        (momentum correction, when momentum > 0)
    acc       = (velocity' or g) + decay * residual   (float32; decay 1 unless set)
    residual' = acc - sent                      (sent in the wire dtype, widened back)

so ``acc == sent + residual'`` holds bit for bit: nothing is lost, only delayed.
With ScaleCom's low-pass filter (``residual_lowpass`` b < 1) the kept residual is
``(1 - b) * residual + b * (acc - sent)`` instead (`low_pass`).
Sums that would overflow float32 saturate at +-3.4e38 instead of becoming inf.
On a step whose gradient is not finite (``ok`` False) velocity' = velocity and
acc = residual: the step adds nothing, and with nothing sent the residual stays.
`accumulated` gives users (and diagnostics) the same acc without running a step.
"""

from collections.abc import Sequence
import math
from typing import Any

import jax
import jax.numpy as jnp

from hggjax import state as state_lib

_MAX = float(jnp.finfo(jnp.float32).max)


def saturate(x: jax.Array) -> jax.Array:
  """x with overflowed sums held at the largest finite float32 (the same bits otherwise)."""
  return jnp.clip(x, -_MAX, _MAX)


def all_finite(leaves: Sequence[Any]) -> jax.Array:
  """bool[]: no NaN or Inf in any floating leaf, in one read of each.

  x - x is 0 for finite x and NaN for NaN and +-Inf, so one float sum per leaf
  tells (IEEE semantics keep XLA from folding it to 0). XLA:CPU runs it as a plain
  vectorised pass, where ``jnp.all(jnp.isfinite(x))`` first writes a boolean array
  of x's size, and where ``x * 0`` shared its zero with other broadcasts and had
  an array of zeros written out for it.
  """
  total = jnp.zeros((), jnp.float32)
  for x in leaves:
    if jnp.issubdtype(x.dtype, jnp.floating):
      total = total + jnp.sum(x - x, dtype=jnp.float32)
  return jnp.isfinite(total)


def momentum_step(leaves: Sequence[Any], velocity, floating: Sequence[int], momentum: float,
                  ok: jax.Array):
  """(what to compress per leaf, the new velocity tuple or None).

  With momentum correction (Lin et al., 2018, DGC) each device compresses its own
  velocity u = momentum * u + g instead of g. When not `ok` the velocity stays.
  """
  grads = list(leaves)
  if not momentum:
    return grads, None
  velocity = list(velocity)
  for i in floating:
    new = saturate(momentum * velocity[i] + leaves[i].astype(jnp.float32))
    velocity[i] = jnp.where(ok, new, velocity[i])
    grads[i] = velocity[i]
  return grads, tuple(velocity)


def accumulate(grads, groups: Sequence[Sequence[int]], stored, local, in_place: bool,
               ok: jax.Array, decay: float = 1.0) -> tuple[jax.Array, jax.Array | None]:
  """Step 1: (acc float32[m, n], one row per group; acc in the stored residual's shape or None).

  `stored` is the residual tuple as the caller passed it (with the device axis),
  `local` the same without it (None without error feedback). With `in_place` (one
  group of one leaf, error feedback on) acc is formed in the stored residual's own
  shape so that Step 4 can scatter into it and XLA writes the new residual into
  the old one's buffer when the caller donates the state. When not `ok` acc is the
  residual as it was (Step 3 then sends nothing, so Step 4 keeps it). `decay` < 1
  (``residual_decay``) shrinks the residual before the gradient is added: the
  residual is then a momentum buffer that what was sent has left (DeMo).
  """

  def add(g, r):
    if r is None:  # no error feedback: what a skipped step selects is never sent
      return g
    return jnp.where(ok, saturate(g + (r if decay == 1.0 else decay * r)), r)

  if in_place:
    (leaf,), = groups
    kept = add(grads[leaf].astype(jnp.float32).reshape(stored[leaf].shape), stored[leaf])
    return kept.ravel()[None], kept
  rows = []
  for group in groups:
    acc = [add(grads[i].astype(jnp.float32).ravel(), None if local is None else local[i].ravel())
           for i in group]
    rows.append(acc[0] if len(acc) == 1 else jnp.concatenate(acc))
  return jnp.stack(rows), None


def _unravel(flat: jax.Array, shape: tuple[int, ...]) -> tuple[jax.Array, ...]:
  """Index arrays into `shape` for flat positions; a position >= the size stays out
  of range (in the first dimension), so ``mode="drop"`` still drops padding slots."""
  strides = [math.prod(shape[j + 1:]) for j in range(len(shape))]
  return tuple(flat // s if j == 0 else (flat // s) % d
               for j, (s, d) in enumerate(zip(strides, shape)))


def keep(x: jax.Array, kept: jax.Array | None, indices: jax.Array, values: jax.Array,
         threshold: jax.Array) -> jax.Array:
  """Step 4: residual' = acc - sent, as float32[m, n] rows, or in `kept`'s shape.

  Args:
    x: float32[m, n], acc per group (Step 1).
    kept: acc in the stored residual's shape (one group of one leaf), or None.
    indices: int32[m, C] sent positions (n in unused slots: dropped).
    values: [m, C] the sent values in the wire dtype; their rounding stays behind.
    threshold: float32[m], the selections' cuts.

  Three ways, each chosen so that XLA reads acc once and writes the result over
  a buffer it already has:
  - `kept`: scattered in the stored shape (device axis included), the new residual
    is written into the old one's buffer when the state is donated; through a
    reshape or an added device axis XLA copied all n elements once more. Every read
    of acc must come before this in-place scatter, or XLA copies acc first: reads
    that feed the indices or values do, and the selector's cut (it reads the sent
    magnitudes again) is tied in here. That changes nothing unless the cut is NaN,
    i.e. acc holds NaN already.
  - one row: on the 1-D row itself, the value the selector read; scattering into
    the [1, n] view made XLA compute acc twice.
  - m rows: one 2-D scatter.
  """
  if kept is not None:
    sent = values[0].astype(jnp.float32)
    sent = jnp.where(jnp.isnan(threshold[0]), jnp.nan, sent)
    return kept.at[_unravel(indices[0], kept.shape)].add(-sent, mode="drop")
  if x.shape[0] == 1:
    return x[0].at[indices[0]].add(-values[0].astype(jnp.float32), mode="drop")[None]
  row = jnp.arange(x.shape[0])[:, None]
  return x.at[row, indices].add(-values.astype(jnp.float32), mode="drop")


def low_pass(rest: jax.Array, kept: jax.Array | None, stored, local, groups,
             b: float, ok: jax.Array) -> jax.Array:
  """ScaleCom's filter on Step 4's result: (1 - b) * residual + b * rest, in `rest`'s
  layout (the stored shape with `kept`, else rows of `groups`), the old residual kept
  as it was on a skipped step (not `ok`).

  Reference:
    Chen et al., ScaleCom: Scalable Sparsified Gradient Compression for
    Communication-Efficient Distributed Training, NeurIPS 2020 (the low-pass filter
    on each worker's local memory).
  """
  if kept is not None:
    (leaf,), = groups
    old = stored[leaf]
  else:
    old = jnp.stack([jnp.concatenate([local[i].ravel() for i in group]) for group in groups])
  return jnp.where(ok, (1.0 - b) * old + b * rest, old)


def accumulated(updates: Any, opt_state: Any, *, momentum: float = 0.0,
                residual_decay: float = 1.0) -> Any:
  """What the compressor in `opt_state` selects from when given `updates`.

  Per floating leaf, float32 ``momentum * velocity + updates + decay * residual`` (the
  velocity and residual terms only where the state keeps them), in the leaf's
  shape, computed in the same order as the update itself, so it is bit for bit the
  vector the selector sees. Other leaves come back as they are. Pass the
  compressor's own `momentum` and `residual_decay`; call it where the update would run (under
  ``shard_map`` the state holds this device's slice).

  Args:
    updates: the gradient pytree the compressor would receive (after any
      transformation chained before it).
    opt_state: a `CompressionState`, or an optimizer state holding one.
    momentum: the compressor's momentum (0 without momentum correction).
    residual_decay: the compressor's (1 unless it was built with one).

  Example:
    >>> import jax.numpy as jnp, hggjax
    >>> tx = hggjax.topk(density=0.5)
    >>> state = tx.init({"w": jnp.zeros(4)})
    >>> _, state = tx.update({"w": jnp.array([1., -3., 0.5, 2.])}, state)
    >>> hggjax.accumulated({"w": jnp.ones(4)}, state)["w"]
    Array([2. , 1. , 1.5, 1. ], dtype=float32)
  """
  state = state_lib.find(opt_state)
  leaves, treedef = jax.tree.flatten(updates)

  def local(field):
    if field is None:
      return [None] * len(leaves)
    return [None if v is None else v.reshape(leaves[i].shape) for i, v in enumerate(field)]

  velocity, residual = local(state.velocity), local(state.residual)
  out = []
  for g, v, r in zip(leaves, velocity, residual):
    if not jnp.issubdtype(g.dtype, jnp.floating):
      out.append(g)
      continue
    acc = g.astype(jnp.float32)
    if momentum and v is not None:
      acc = saturate(momentum * v + acc)
    if r is not None:
      acc = saturate(acc + (r if residual_decay == 1.0 else residual_decay * r))
    out.append(acc)
  return jax.tree.unflatten(treedef, out)
