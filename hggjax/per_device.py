"""`per_device`: an optax transformation run on each device's own updates.

A compressor exchanges what comes out of the transformations chained before it, and
those see each device's own gradient. Their state is then per device too, like a
compressor's residual: `per_device` gives it the same leading device axis, so that
`hggjax.shard_state` and `state_specs` place it per device. The use that needs it:
an adaptive optimizer's moments before the compressor, so that what is compressed
(with error feedback) is each device's Adam step rather than a raw gradient, e.g.

    optax.chain(hggjax.per_device(optax.scale_by_adam(), axis_name="data"),
                hggjax.topk(0.01, axis_name="data"), optax.scale(-lr))
"""

from typing import Any, NamedTuple

import optax

from hggjax import validate
from hggjax.state import with_device_axis, without_device_axis


class PerDeviceState(NamedTuple):
  """State of `per_device(inner)`."""
  inner: Any  # the inner transformation's state; with an axis every leaf has a
              # leading device axis (length 1 as the update sees it, P once sharded)


def per_device(inner: optax.GradientTransformation, *,
               axis_name: str | None = None) -> optax.GradientTransformationExtraArgs:
  """`inner`, with its state kept per device (a leading device axis with `axis_name`).

  Args:
    inner: any optax transformation; it sees this device's updates, before any
      exchange, and its own state.
    axis_name: the mapped axis the compressor after it exchanges over (None: no
      device axis, e.g. a single device).
  """
  inner = optax.with_extra_args_support(inner)
  axis_name = validate.axis_name(axis_name)

  def init_fn(params):
    return PerDeviceState(with_device_axis(inner.init(params), axis_name))

  def update_fn(updates, state, params=None, **extra_args):
    inner_state = without_device_axis(state.inner, axis_name)
    updates, inner_state = inner.update(updates, inner_state, params, **extra_args)
    return updates, PerDeviceState(with_device_axis(inner_state, axis_name))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
