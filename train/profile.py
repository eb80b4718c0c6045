"""Time breakdown of a train step, measured as separately jitted, synchronised pieces.

Every piece runs under the same `shard_map` over the same mesh as the real step, is
compiled and run once before timing, and each timed call ends in
`jax.block_until_ready`; the result is the median over `reps` calls.

- step:      the real train step (gradient, compression, exchange, optimizer), on a copy
             of the state (it is donated), each call continuing from the last.
- compute:   per-device forward + backward only (BatchNorm statistics still pmean'd).
- compressor_update: the compressor's whole update without an exchange: the trained
             compressor built with `axis_name=None` (selection, error feedback and
             momentum, local decompress) on that step's gradients as the compressor
             receives them (after the parts of the optimizer before it); its state is
             fed forward between calls so history-based methods run warm.
- exchange_and_update: step - compute - compressor_update, i.e. the collective exchange
             plus the optimizer; derived, so it carries the noise of all three
             measurements. When that noise makes it negative it is reported as 0 with
             `exchange_and_update_below_noise` set: a time is never negative.
- dense_allreduce: a `pmean` of the full gradients, for comparison with a dense exchange.
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any

import hggjax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from train import optim
from train.mesh import data_axes
from train.steps import TrainState, compressor_input, local_grads, make_train_step


def interleaved_medians(pieces: dict[str, tuple], reps: int) -> dict[str, float]:
  """Median seconds per piece; pieces alternate within each round, so background load
  (other processes on a shared host) hits all of them alike.

  `pieces` maps a name to (fn, args, feed): each call is fn(*args), after one untimed
  call; feed(args, last output) -> the next args, or None to reuse args (a donating fn
  must be fed its own outputs).
  """
  state = {}
  for name, (fn, args, _) in pieces.items():  # compile and warm up
    state[name] = (args, fn(*args))
    jax.block_until_ready(state[name][1])
  times = {name: [] for name in pieces}
  for _ in range(reps):
    for name, (fn, _, feed) in pieces.items():
      args, out = state[name]
      if feed is not None:
        args = feed(args, out)
      t0 = time.perf_counter()
      out = fn(*args)
      jax.block_until_ready(out)
      times[name].append(time.perf_counter() - t0)
      state[name] = (args, out)
  return {name: statistics.median(t) for name, t in times.items()}


def time_breakdown(state: TrainState, cfg, batch: tuple, step_fn=None,
                   reps: int = 5) -> dict[str, Any]:
  """Seconds per piece of one step on `batch`, a tuple of sharded global arrays (see the
  module docstring)."""
  mesh = state.mesh
  axes = data_axes(mesh)  # per device, also on a two-level mesh
  n_dev = mesh.size
  step_fn = step_fn or make_train_step(state)
  step = np.int32(state.step)
  specs = hggjax.state_specs(state.opt_state, axes)

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P(), P(), P(axes)),
                     out_specs=P(axes))
  def compute(params, batch_stats, step, batch):
    *_, grads = local_grads(state, params, batch_stats, batch, step)
    return jax.tree.map(lambda g: g[None], grads)

  # The gradients as the compressor receives them (after the parts of the chain before
  # it), per device: the input of the local compressor below.
  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P(), specs, P(), P(axes)),
                     out_specs=P(axes))
  def received(params, batch_stats, opt_state, step, batch):
    updates = compressor_input(state, params, batch_stats, opt_state, batch, step)
    return jax.tree.map(lambda u: u[None], updates)

  local_tx = optim.make_compressor(cfg, axis_name=None)
  local_state = local_tx.init(state.params)
  stacked = NamedSharding(mesh, P(axes))
  local_state = jax.device_put(
      jax.tree.map(lambda x: jnp.broadcast_to(x[None], (n_dev,) + x.shape), local_state), stacked)

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(axes), P(axes), P()),
                     out_specs=(P(axes), P(axes)))
  def compressor_update(grads, cstate, params):
    grads = jax.tree.map(lambda g: g[0], grads)
    cstate = jax.tree.map(lambda x: x[0], cstate)
    updates, cstate = local_tx.update(grads, cstate, params)
    return jax.tree.map(lambda u: u[None], updates), jax.tree.map(lambda x: x[None], cstate)

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=P(axes), out_specs=P())
  def dense_allreduce(grads):
    return jax.tree.map(lambda g: jax.lax.pmean(g[0], axes), grads)

  grads = compute(state.params, state.batch_stats, step, batch)
  updates = received(state.params, state.batch_stats, state.opt_state, step, batch)
  t = interleaved_medians({
      # The step donates its state: it runs on a copy, each call on the last one's output.
      "step": (step_fn, (*jax.tree.map(jnp.copy, (state.params, state.batch_stats,
                                                   state.opt_state)), step, batch),
               lambda args, out: (*out[:3], *args[3:])),
      "compute": (compute, (state.params, state.batch_stats, step, batch), None),
      "compressor_update": (compressor_update, (updates, local_state, state.params),
                            lambda args, out: (args[0], out[1], args[2])),
      "dense_allreduce": (dense_allreduce, (grads,), None),
  }, reps)
  rows = jax.tree.leaves(batch)[0].shape[0]
  return summarize(t, reps=reps, devices=n_dev, global_batch=int(rows))


def summarize(t: dict[str, float], *, reps: int, devices: int,
              global_batch: int) -> dict[str, Any]:
  """timing.json from the medians of `interleaved_medians` (seconds per piece)."""
  derived = t["step"] - t["compute"] - t["compressor_update"]
  return {
      "method": "separately jitted shard_map pieces, interleaved, median of reps, "
                "block_until_ready",
      "reps": reps, "devices": devices, "global_batch": global_batch,
      "step_s": t["step"], "compute_s": t["compute"],
      "compressor_update_s": t["compressor_update"],
      "exchange_and_update_s": max(0.0, derived),
      "exchange_and_update_below_noise": derived <= 0.0,
      "dense_allreduce_s": t["dense_allreduce"],
  }


# Unless asked for (--profile) or not (--no-profile), the pass runs when it is cheap: under
# a minute, or under a tenth of the training time it follows.
AUTO_ALWAYS_S = 60.0
AUTO_SHARE = 0.1


def estimate_s(first_step_s: float, step_s: float, reps: int) -> float:
  """About how long `time_breakdown` takes, from the run's own first (compiling) step and
  step time: three more pieces to compile, then 1 + reps rounds of four step-sized calls."""
  return 3 * first_step_s + 4 * (reps + 1) * step_s


def wanted(first_step_s: float, step_s: float, reps: int,
           train_s: float) -> tuple[bool, float]:
  """(whether the pass is cheap enough to run by default, its estimated seconds)."""
  estimate = estimate_s(first_step_s, step_s, reps)
  return estimate <= max(AUTO_ALWAYS_S, AUTO_SHARE * train_s), estimate


def describe(t: dict[str, Any]) -> str:
  ms = lambda s: f"{1e3 * s:.1f} ms"  # noqa: E731
  exchange = ("~0 ms (derived; below the measurement noise)"
              if t["exchange_and_update_below_noise"]
              else f"{ms(t['exchange_and_update_s'])} (derived)")
  return (f"time per step ({t['devices']} devices, median of {t['reps']}): step {ms(t['step_s'])}"
          f" = compute {ms(t['compute_s'])} + compressor update (local, no exchange) "
          f"{ms(t['compressor_update_s'])} + exchange and update {exchange}; dense all-reduce "
          f"alone {ms(t['dense_allreduce_s'])}")
