"""Time breakdown of a train step, measured as separately jitted, synchronised pieces.

Every piece runs under the same `shard_map` over the same mesh as the real step, is
compiled and run once before timing, and each timed call ends in
`jax.block_until_ready`; the result is the median over `reps` calls.

- step:      the real train step (gradient, compression, exchange, optimizer), on a copy
             of the state (it is donated), each call continuing from the last.
- compute:   per-device forward + backward only (BatchNorm statistics still pmean'd).
- selection: the trained compressor built with `axis_name=None` (local compress +
             decompress, no collective) on that step's gradients as the compressor
             receives them; its state is fed forward between calls so history-based
             methods run warm.
- exchange_and_update: step - compute - selection, i.e. the collective exchange plus the
             optimizer; derived, so it carries the noise of all three measurements.
- dense_allreduce: a `pmean` of the full gradients, for comparison with a dense exchange.
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from train import optim
from train.mesh import data_axes
from train.steps import TrainState, local_grads, make_train_step


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


def time_breakdown(state: TrainState, cfg, batch, step_fn=None,
                   reps: int = 5) -> dict[str, Any]:
  """Seconds per piece of one step on `batch` (see the module docstring)."""
  mesh, graphdef = state.mesh, state.graphdef
  axes = data_axes(mesh)
  n_dev = mesh.size
  images, labels = batch
  step_fn = step_fn or make_train_step(state)

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P(), P(axes), P(axes)),
                     out_specs=P(axes))
  def compute(params, batch_stats, images, labels):
    *_, grads = local_grads(graphdef, params, batch_stats, images, labels, axes)
    return jax.tree.map(lambda g: g[None], grads)

  local_tx = optim.make_compressor(cfg, axis_name=None)
  local_state = local_tx.init(state.params)
  stacked = NamedSharding(mesh, P(axes))
  local_state = jax.device_put(
      jax.tree.map(lambda x: jnp.broadcast_to(x[None], (n_dev,) + x.shape), local_state), stacked)

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(axes), P(axes), P()),
                     out_specs=(P(axes), P(axes)))
  def selection(grads, cstate, params):
    grads = jax.tree.map(lambda g: g[0], grads)
    cstate = jax.tree.map(lambda x: x[0], cstate)
    updates, cstate = local_tx.update(grads, cstate, params)
    return jax.tree.map(lambda u: u[None], updates), jax.tree.map(lambda x: x[None], cstate)

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=P(axes), out_specs=P())
  def dense_allreduce(grads):
    return jax.tree.map(lambda g: jax.lax.pmean(g[0], axes), grads)

  grads = compute(state.params, state.batch_stats, images, labels)
  before = optim.before_compressor(cfg)  # grads carry a device axis; params broadcast
  updates = jax.jit(lambda g, p: before.update(g, before.init(p), p)[0])(grads, state.params)
  t = interleaved_medians({
      # The step donates its state: it runs on a copy, each call on the last one's output.
      "step": (step_fn, (*jax.tree.map(jnp.copy, (state.params, state.batch_stats,
                                                   state.opt_state)), images, labels),
               lambda args, out: (*out[:3], *args[3:])),
      "compute": (compute, (state.params, state.batch_stats, images, labels), None),
      "selection": (selection, (updates, local_state, state.params),
                    lambda args, out: (args[0], out[1], args[2])),
      "dense_allreduce": (dense_allreduce, (grads,), None),
  }, reps)
  return {
      "method": "separately jitted shard_map pieces, interleaved, median of reps, "
                "block_until_ready",
      "reps": reps, "devices": n_dev, "global_batch": int(images.shape[0]),
      "step_s": t["step"], "compute_s": t["compute"], "selection_s": t["selection"],
      "exchange_and_update_s": t["step"] - t["compute"] - t["selection"],
      "dense_allreduce_s": t["dense_allreduce"],
  }


def describe(t: dict[str, Any]) -> str:
  ms = lambda s: f"{1e3 * s:.1f} ms"  # noqa: E731
  return (f"time per step ({t['devices']} devices, median of {t['reps']}): step {ms(t['step_s'])}"
          f" = compute {ms(t['compute_s'])} + selection {ms(t['selection_s'])} + exchange and "
          f"update {ms(t['exchange_and_update_s'])} (derived); dense all-reduce alone "
          f"{ms(t['dense_allreduce_s'])}")
