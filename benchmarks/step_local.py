"""Where a compressed train step's time goes on one CPU core, with no network.

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 taskset -c 1 python -m benchmarks.step_local
    LD_PRELOAD=libtcmalloc_minimal.so.4 taskset -c 1 python -m benchmarks.step_local --model bag

One process, one device: one of the network benchmark's 25.2M-parameter models
(`--model`, `benchmarks/models.py`; the MLP by default) under the same jit(shard_map)
step, for each compressor at density 0.01 followed by ``optax.sgd``. Per compressor it
times the whole step with the params and optimizer state donated (as the harness does)
and without, and the compressor's update alone on fixed gradients (state fed forward, so
history-based selectors run warm); plus forward + backward alone. The pieces alternate
within each round, so load drifts hit all of them alike; a row is the median of `--reps`
rounds after a warm-up call, each call ending in `block_until_ready`. Run it pinned to
one core with the allocator `benchmarks.network` gives its workers (tcmalloc when
installed, else huge pages; commands above) to see what one of its processes computes
per step.
"""

import argparse
import functools
import json
import os
import platform
import sys

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import hggjax
from benchmarks.models import MODELS
from benchmarks.wire_study import WIRES, add_wire_flag
from train import profile

AXIS = "data"


def _args(argv=None):
  p = argparse.ArgumentParser(prog="python -m benchmarks.step_local",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--compressors", default="none,randomk,randomkec,topk,hggtopk,hggtopk+pipeline",
                 help='comma-separated names; "hggtopk+pipeline" is hggtopk(pipeline=True)')
  p.add_argument("--model", choices=sorted(MODELS), default="mlp")
  p.add_argument("--density", type=float, default=0.01)
  add_wire_flag(p)
  p.add_argument("--reps", type=int, default=9, help="timed rounds (median)")
  p.add_argument("--out", default="benchmarks/results/step_local_cpu.json")
  return p.parse_args(argv)


def main(argv=None) -> None:
  args = _args(argv)
  model = MODELS[args.model]
  mesh = jax.make_mesh((1,), (AXIS,), devices=jax.devices()[:1])
  smap = functools.partial(jax.shard_map, mesh=mesh)
  rows = NamedSharding(mesh, P(AXIS))
  host_params = model.init_params()
  images, labels = jax.device_put(model.batch(np.random.default_rng(0)), rows)

  def fresh_params():
    return jax.device_put(host_params, NamedSharding(mesh, P()))

  def local_grads(p, x, y):
    return jax.grad(model.loss_fn)(jax.lax.pcast(p, AXIS, to="varying"), x, y)

  compute = jax.jit(smap(local_grads, in_specs=(P(), P(AXIS), P(AXIS)), out_specs=P(AXIS)))
  grads = compute(fresh_params(), images, labels)  # one device: its block is the whole array
  # name -> (fn, args, feed(args, out) -> next args)
  pieces = {"compute": (compute, (fresh_params(), images, labels), None)}
  for name in args.compressors.split(","):
    base, _, option = name.partition("+")
    tx = optax.chain(hggjax.get_compressor(base, density=args.density, axis_name=AXIS,
                                           **({option: True} if option else {}), **WIRES[args.wire]),
                     optax.sgd(1e-3))
    specs = hggjax.state_specs(tx.init(host_params), AXIS)

    def step(p, s, x, y, tx=tx):
      updates, s = tx.update(local_grads(p, x, y), s, p)
      return optax.apply_updates(p, updates), s

    def update(g, s, tx=tx):
      return tx.update(g, s)[1]

    mapped = smap(step, in_specs=(P(), specs, P(AXIS), P(AXIS)), out_specs=(P(), specs))
    for donate in (True, False):
      fn = jax.jit(mapped, donate_argnums=(0, 1) if donate else ())
      state = hggjax.shard_state(tx.init(host_params), mesh, AXIS)
      pieces[f"{name} step" + ("" if donate else " (no donation)")] = (
          fn, (fresh_params(), state, images, labels), lambda a, out: (*out, *a[2:]))
    fn = jax.jit(smap(update, in_specs=(P(AXIS), specs), out_specs=specs), donate_argnums=(1,))
    pieces[f"{name} update"] = (fn, (grads, hggjax.shard_state(tx.init(host_params), mesh, AXIS)),
                                lambda a, out: (a[0], out))

  ms = {key: 1e3 * t for key, t in profile.interleaved_medians(pieces, args.reps).items()}
  base = ms.get("none step")
  print(f"{'piece':<36} {'ms':>8} {'x none step':>12}")
  for key, value in ms.items():
    ratio = f"{value / base:.2f}" if base and key.endswith("step") else ""
    print(f"{key:<36} {value:>8.1f} {ratio:>12}")
  report = {"command": " ".join(["python -m benchmarks.step_local", *(argv or sys.argv[1:])]),
            "affinity": sorted(os.sched_getaffinity(0)),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
            "ld_preload": os.environ.get("LD_PRELOAD"),
            "machine": {"platform": platform.platform(), "jax": jax.__version__,
                        "load_avg": os.getloadavg()},
            "model": model.DESCRIPTION,
            "num_params": int(sum(v.size for v in host_params.values())),
            "density": args.density, "reps": args.reps, "median_ms": ms}
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(report, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
