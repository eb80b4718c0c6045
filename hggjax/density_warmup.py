"""DGC's sparsity warm-up: a compressor that sends more in the first steps.

Lin et al. (Deep Gradient Compression, ICLR 2018) start training with a higher density
and lower it step by step to the target, so that the first, fast-changing steps are not
held back in the residual. `density_warmup` builds one compressor per density (their
states have the same shapes: k is not part of them) and runs the one for the current
phase with ``lax.switch`` on the step count, so a step compiles every phase and runs
one; the phase's k stays static. `hggjax.stats` then counts each step's own bytes.
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from hggjax import state as state_lib
from hggjax import validate


def density_warmup(build: Callable[[float], optax.GradientTransformationExtraArgs],
                   density: float, warmup: Sequence[float], every: int,
                   axis_name=None) -> optax.GradientTransformationExtraArgs:
  """The compressor `build(d)` at density ``warmup[i]`` for the steps ``i * every`` to
  ``(i + 1) * every - 1`` it takes (its own count: a skipped, non-finite step does not
  advance the phase), then at `density`.

  Args:
    build: a compressor constructor of one argument, the density (e.g.
      ``lambda d: hggjax.hggtopk(d, axis_name="data")``).
    density: the density after the warm-up.
    warmup: the densities of the warm-up phases, each in (0, 1], e.g. DGC's
      (0.25, 0.0625, 0.015625) before 0.004.
    every: steps per phase.
    axis_name: the compressor's axis (its state carries a device axis with one).
  """
  warmup = tuple(validate.density(d) for d in warmup)
  if not warmup:
    raise ValueError("density_warmup needs at least one warm-up density, e.g. (0.25, 0.0625).")
  every = validate.int_at_least("every", every, 1)
  phases = [build(d) for d in warmup] + [build(density)]

  def init(params):
    return phases[-1].init(params)

  def update(updates, state, params=None, **extra_args):
    count = state_lib.without_device_axis(state_lib.find(state), axis_name).count
    phase = jnp.minimum(count // every, len(warmup))
    branches = [lambda u, s, tx=tx: tx.update(u, s, params, **extra_args) for tx in phases]
    return jax.lax.switch(phase, branches, updates, state)

  return optax.GradientTransformationExtraArgs(init, update)
