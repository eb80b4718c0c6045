"""`dense_mean`: no compression, the plain mean over devices (the ``none`` baseline).

It keeps the same `CompressionState` as every compressor (no residual, no
selection groups), so `hggjax.stats`, `shard_state` and momentum correction work
the same way for it.
"""

import jax
import jax.numpy as jnp
import optax

from hggjax import error_feedback as ef
from hggjax import exchange
from hggjax.state import CompressionState, empty_stats, with_device_axis, without_device_axis
from hggjax.transform import device_of, fast_mean, prng_key
from hggjax.wire import saturating_cast


def dense_mean(*, axis_name: str | tuple[str, str] | None = None, momentum: float = 0.0,
               key: jax.Array | int = 0) -> optax.GradientTransformationExtraArgs:
  """Every floating leaf's mean over `axis_name` (identity without one).

  Args:
    axis_name: mapped axis to average over; None leaves gradients as they are. A
      (slow, fast) pair averages over the fast axis, then over the slow one, as the
      compressors do with it (the state then has one entry per slow-axis position).
    momentum: momentum correction, as in `hggjax.sparsify`: each device keeps
      u = momentum * u + g and the mean of u is sent.
    key: kept in the state like every compressor's (nothing here is random).
  """

  def floating(leaves):
    return tuple(i for i, x in enumerate(leaves) if jnp.issubdtype(x.dtype, jnp.floating))

  def init_fn(params):
    leaves = jax.tree.leaves(params)
    velocity = None
    if momentum:
      dense = floating(leaves)
      velocity = tuple(jnp.zeros(x.shape, jnp.float32) if i in dense else None
                       for i, x in enumerate(leaves))
    return with_device_axis(CompressionState(
        count=jnp.zeros((), jnp.int32), rng_key=prng_key(key), residual=None,
        velocity=velocity, carry=(), stats=empty_stats(0, 0)), axis_name)

  def update_fn(updates, state, params=None, *, device_index=None, **extra_args):
    del params, extra_args
    device_of(axis_name, device_index)  # checks the arguments as every compressor does
    state = without_device_axis(state, axis_name)
    leaves, treedef = jax.tree.flatten(updates)
    dense = floating(leaves)
    slow, _ = exchange.split_axes(axis_name)
    # A gradient holding NaN or Inf (with two levels: a host's mean over the fast
    # axis) adds nothing this step and changes no state.
    leaves = fast_mean(leaves, axis_name)
    ok = ef.all_finite(leaves)
    grads, velocity = ef.momentum_step(leaves, state.velocity, dense, momentum, ok)
    out = list(leaves)
    for i in dense:
      out[i] = exchange.dense_mean(saturating_cast(jnp.where(ok, grads[i], 0), leaves[i].dtype),
                                   slow)
    nbytes = sum(leaves[i].size * leaves[i].dtype.itemsize for i in dense)
    sent, received = exchange.dense_traffic(exchange.axis_size(slow), nbytes)
    stats = state.stats._replace(
        sent_bytes=jnp.asarray(sent, jnp.float32),
        received_bytes=jnp.asarray(received, jnp.float32),
        dense_bytes=jnp.asarray(nbytes, jnp.float32), nonfinite=(~ok).astype(jnp.int32),
        run_sent_bytes=state.stats.run_sent_bytes + sent)
    new_state = state._replace(count=state.count + ok.astype(jnp.int32), velocity=velocity,
                               stats=stats)
    return jax.tree.unflatten(treedef, out), with_device_axis(new_state, axis_name)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
