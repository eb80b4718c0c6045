"""What the training log reports about the compressor, beyond the loss.

The threshold probe computes, for the largest parameter leaf (with scope="global": for
all compressed leaves together, one selection group), the exact k-th largest |acc| per
device: the reference the compressor's own threshold (`hggjax.stats(...)["threshold"]`)
is compared to in metrics.jsonl.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import hggjax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from train import optim
from train.config import Config
from train.mesh import data_axes, host_value
from train.steps import TrainState, compressor_input


def largest_leaf(params, min_size: int = 0, scope: str = "leaf") -> tuple[int, int, str]:
  """The leaf the threshold probe samples: the largest parameter leaf.

  Returns its index among all leaves, its selection group (scope="leaf": its index among
  the compressed leaves, those with at least `min_size` elements; scope="global": 0, the
  one group) and its path.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  sizes = [leaf.size for _, leaf in flat]
  i = int(np.argmax(sizes))
  if scope == "global":
    return i, 0, GLOBAL_GROUP
  group = sum(1 for s in sizes[:i] if s >= max(min_size, 1))
  return i, group, jax.tree_util.keystr(flat[i][0])


GLOBAL_GROUP = "all compressed leaves"  # threshold_leaf's value with scope="global"


def make_threshold_probe(state: TrainState, leaf_index: int, cfg: Config) -> Callable:
  """Per-device exact top-k threshold |acc|_(k) of one selection group (`largest_leaf`).

  acc is `hggjax.accumulated` of the gradients as the compressor receives them (after
  the parts of the chain before it, with their current state). Run on the same inputs
  as the following train step, the result is the reference for that step's compressor
  threshold.
  """
  density = cfg.density
  momentum = optim.compressor_momentum(cfg)
  axes = data_axes(state.mesh)
  # Two-level: the compressor selects from a host's mean over "local" (one per host).
  slow, fast = axes if isinstance(axes, tuple) else (axes, None)
  specs = hggjax.state_specs(state.opt_state, axes)

  @jax.jit
  @functools.partial(jax.shard_map, mesh=state.mesh,
                     in_specs=(P(), P(), specs, P(), P(axes)), out_specs=P())
  def probe(params, batch_stats, opt_state, step, batch):
    updates = compressor_input(state, params, batch_stats, opt_state, batch, step)
    if fast is not None:
      updates = jax.lax.pmean(updates, fast)
    acc = jax.tree.leaves(hggjax.accumulated(updates, opt_state, momentum=momentum))
    if cfg.scope == "global":  # one group: the floating leaves hggjax compresses
      acc = jnp.concatenate([a.reshape(-1) for a in acc
                             if jnp.issubdtype(a.dtype, jnp.floating)
                             and a.size >= max(cfg.min_size, 1)])
    else:
      acc = acc[leaf_index].reshape(-1)
    k = max(1, round(density * acc.size))
    # float32[P], replicated: readable on every process of a multi-process run.
    return jax.lax.all_gather(jnp.min(jax.lax.top_k(jnp.abs(acc), k)[0]), slow, to="invarying")

  return probe


def compressor_stats(opt_state, group: int) -> dict[str, Any]:
  """Host-side summary of `hggjax.stats`: totals over devices and the probed leaf's threshold."""
  s = {name: host_value(v) for name, v in hggjax.stats(opt_state).items()}
  out: dict[str, Any] = {}
  if "selected" in s:
    out["selected"] = int(np.sum(s["selected"]))
  if "k" in s:
    out["k"] = int(np.sum(s["k"]))
  if "sent_bytes" in s and "dense_bytes" in s:
    out["sent_bytes"] = float(np.mean(s["sent_bytes"]))
    out["dense_bytes"] = float(np.mean(s["dense_bytes"]))
  if "received_bytes" in s:
    out["received_bytes"] = float(np.mean(s["received_bytes"]))
  if "run_sent_bytes" in s:  # so far in the run, every step's own
    out["run_sent_bytes"] = float(np.mean(s["run_sent_bytes"]))
  if "refresh_bytes" in s:  # so far in the run (hggjax.adamw's shared second moment)
    out["refresh_bytes"] = float(np.mean(s["refresh_bytes"]))
  if "history_hits" in s:
    out["history_hits"] = int(np.sum(s["history_hits"]))
  thr = s.get("threshold")  # float32[P, G]: one group per compressed leaf (scope="leaf")
  if thr is not None and np.ndim(thr) == 2 and group < np.shape(thr)[1]:
    out["_threshold"] = np.asarray(thr, np.float64)[:, group]
  return out
