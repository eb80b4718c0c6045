"""The optimizer a config describes: learning-rate schedule, hggjax compressor, SGD.

`make_compressor` is the one place the harness builds a compressor from a config: the
train step, the time breakdown and the CLI's validation all go through it, so they see
the same compressor.
"""

from __future__ import annotations

import hggjax
import optax

from train.config import Config
from train.mesh import AXIS
from train.task import Optimizer


def lr_schedule(cfg: Config, total_steps: int) -> optax.Schedule:
  """Step decay: lr, x0.1 at 50% and x0.1 again at 75% of the steps."""
  return optax.piecewise_constant_schedule(
      cfg.lr, {int(0.5 * total_steps): 0.1, int(0.75 * total_steps): 0.1})


def compressor_momentum(cfg: Config) -> float:
  """The momentum the compressor keeps per device: `cfg.momentum` with momentum
  correction, else 0 (SGD applies it after the exchange)."""
  return cfg.momentum if cfg.momentum_correction else 0.0


def compressor_options(cfg: Config, axis_name) -> dict:
  """The options of the compressor `cfg` names (`hggjax.get_compressor`'s keywords but the
  name), exchanging over `axis_name`."""
  options = {"density": cfg.density, "axis_name": axis_name, "min_size": cfg.min_size,
             "exchange": cfg.exchange}
  for name in ("value_dtype", "scale_group", "index_coding"):  # "auto": hggjax's rule
    options[name] = getattr(cfg, name)
  options["scope"] = cfg.scope  # always: hggjax.adamw's default is not the compressors'
  for name in ("residual_decay", "residual_lowpass"):  # hggjax's defaults are 1
    if getattr(cfg, name) not in (None, 1.0):
      options[name] = getattr(cfg, name)
  if cfg.momentum_correction:
    options["momentum"] = cfg.momentum
  if cfg.use_pipeline:
    options["pipeline"] = True
  return options


def make_compressor(cfg: Config, axis_name) -> optax.GradientTransformation:
  """The hggjax compressor `cfg` names, exchanging over `axis_name` (None: local only;
  a (slow, fast) pair for a two-level mesh).

  Construction validates the options and starts no JAX backend, so the CLI builds one
  to check a config before it sets the device count.

  Raises:
    ValueError, TypeError: hggjax rejects the options (e.g. `use_pipeline` with a
      compressor other than hggtopk), with a message saying why.
  """
  return hggjax.get_compressor(cfg.compressor, **compressor_options(cfg, axis_name))


def before_compressor(cfg: Config) -> optax.GradientTransformation:
  """What the chain applies to the gradients before the compressor sees them.

  With momentum correction it is weight decay, so that each device's velocity holds
  gradient + decay as dense momentum SGD's would; without it, nothing (decay follows
  the exchange).
  """
  if cfg.momentum_correction:
    return optax.add_decayed_weights(cfg.weight_decay)
  return optax.identity()


def optimizer_parts(cfg: Config, total_steps: int, axis_name=AXIS) -> Optimizer:
  """Compressor, weight decay and SGD; where momentum acts depends on the config.

  With `momentum_correction` (the default) each device keeps its own velocity of
  gradient + weight decay inside the compressor (DGC's momentum correction, hggjax's
  `momentum` option) and plain SGD applies the exchanged mean; without it the
  compressor sends the gradient and SGD applies momentum to the exchanged mean.
  """
  lr = lr_schedule(cfg, total_steps)
  compressor = make_compressor(cfg, axis_name)
  if cfg.momentum_correction:
    return Optimizer((before_compressor(cfg), compressor, optax.sgd(lr)), 1)
  return Optimizer((compressor, optax.add_decayed_weights(cfg.weight_decay),
                    optax.sgd(lr, momentum=cfg.momentum)), 0)


def make_optimizer(cfg: Config, total_steps: int, axis_name=AXIS) -> optax.GradientTransformation:
  """The chain of `optimizer_parts` as one optax transformation."""
  return optimizer_parts(cfg, total_steps, axis_name).tx
