"""One process of `benchmarks/network.py`: join the run, then time exchanges and steps.

    JAX_COORDINATOR_ADDRESS=... JAX_NUM_PROCESSES=P JAX_PROCESS_ID=i \\
        python -m benchmarks.network_worker --dir DIR --phases 1gbit,100mbit ...

Everything is compiled once; then, per phase (link rate), process 0 asks the
orchestrator to shape the links (writes DIR/want-<phase>, waits for DIR/set-<phase>),
and every process measures, in this order:

1. raw exchange of n float32 elements: the dense `pmean` vs hggjax's sparse exchange at
   each density: the packed all_gather alone, and `sparse_mean` (gather + densify);
   the densify alone is timed locally on the gathered payload; and `sparse_mean` with
   ``scheme="sparse_allreduce"`` (all_to_all by index region, the owners' choice,
   all_gather, densify: `hggjax.exchange`);
2. full train steps of a 25M-parameter model with cheap compute (`--model`, see
   `benchmarks/models.py`) for each compressor, plus its compute alone (forward +
   backward, no exchange).

Every timed call starts after a barrier (a scalar psum) and ends in
`block_until_ready`; a row is the median of `--reps` calls after one warm-up call at
that rate. Each process writes DIR/result-<i>.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time

from benchmarks.wire_study import WIRES, add_wire_flag
from train import distributed


def _args(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--dir", required=True)
  p.add_argument("--phases", required=True, help="comma-separated link rates, in order")
  p.add_argument("--n", type=int, default=25_000_000)
  p.add_argument("--densities", default="0.01,0.05")
  p.add_argument("--compressors", default="none,hggtopk,topk,gaussian,randomk",
                 help='comma-separated names; "hggtopk+pipeline" is hggtopk(pipeline=True), '
                      '"hggtopk+exchange=sparse_allreduce" sets that option')
  p.add_argument("--train-density", type=float, default=0.01)
  add_wire_flag(p)
  p.add_argument("--model", default="mlp", help="a name in benchmarks.models.MODELS")
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--handshake-timeout", type=float, default=300.0)
  return p.parse_args(argv)


def main(argv=None) -> None:
  args = _args(argv)
  spec = distributed.spec_from()
  distributed.initialize(spec, cpu_devices=1, timeout_s=120, heartbeat_s=60)
  try:
    result = _run(args, spec)
  except Exception as err:  # noqa: BLE001 - one line, then out (peers see the reset)
    distributed.exit_on_failure(spec, err)
  with open(os.path.join(args.dir, f"result-{spec.process_id}.json"), "w") as f:
    json.dump(result, f, indent=1)


def _run(args, spec) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding  # pylint: disable=import-outside-toplevel
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel

  import hggjax  # pylint: disable=import-outside-toplevel
  from benchmarks.models import MODELS  # pylint: disable=import-outside-toplevel
  from hggjax import exchange, wire  # pylint: disable=import-outside-toplevel
  from hggjax.payload import Payload  # pylint: disable=import-outside-toplevel

  nproc = jax.process_count()
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  per_device = NamedSharding(mesh, P("data"))
  smap = functools.partial(jax.shard_map, mesh=mesh)

  def local_rows(x):  # this process's block of a global array sharded over "data"
    return jax.make_array_from_process_local_data(per_device, x)

  barrier_fn = jax.jit(smap(lambda x: jax.lax.psum(x, "data"), in_specs=P("data"),
                            out_specs=P()))
  one = local_rows(np.ones((1,), np.float32))

  def barrier():
    jax.block_until_ready(barrier_fn(one))

  def timed(fn, *xs, feed=None):
    """Median seconds of `reps` barrier-aligned calls after a warm-up call."""
    out = fn(*xs)
    jax.block_until_ready(out)
    times = []
    for _ in range(args.reps):
      if feed is not None:
        xs = feed(xs, out)
      barrier()
      t0 = time.perf_counter()
      out = fn(*xs)
      jax.block_until_ready(out)
      times.append(time.perf_counter() - t0)
    return statistics.median(times), out

  # --- 1. raw exchange -------------------------------------------------------------
  n = args.n
  rng = np.random.default_rng(spec.process_id)
  dense_x = local_rows(rng.standard_normal((1, n), np.float32))
  dense_fn = jax.jit(smap(lambda x: jax.lax.pmean(x[0], "data"), in_specs=P("data"),
                          out_specs=P()))
  sparse = {}
  for d in (float(s) for s in args.densities.split(",")):
    c = max(1, round(d * n))
    idx = np.sort(rng.choice(n, c, replace=False)).astype(np.int32)[None, None]  # [1, m=1, C]
    vals = rng.standard_normal((1, 1, c)).astype(np.float32)
    encode = lambda v, i: wire.encode(v, i, n, wire.DEFAULT)[0]  # noqa: E731  # the wire row
    gather_fn = jax.jit(smap(
        lambda v, i: jax.lax.all_gather(encode(v[0], i[0]), "data", to="invarying"),
        in_specs=(P("data"), P("data")), out_specs=P()))
    mean_fn = jax.jit(smap(lambda v, i: exchange.sparse_mean(Payload(v[0], i[0]), n, "data")[0],
                           in_specs=(P("data"), P("data")), out_specs=P()))
    # Its payload in `regions.region_order` (by position mod P, then position), as the
    # transform builds it for this scheme.
    sar_fn = jax.jit(smap(
        lambda v, i: exchange.sparse_mean(Payload(v[0], i[0]), n, "data", "sparse_allreduce")[0],
        in_specs=(P("data"), P("data")), out_specs=P()))
    gathered_v = np.concatenate([vals] * nproc)  # what densify sees: [P, 1, C] payloads
    gathered_i = np.concatenate([idx] * nproc)
    densify_fn = jax.jit(lambda v, i: exchange.densify_mean(v, i, n))
    order = np.lexsort((idx // nproc, idx % nproc), axis=-1)
    sar_payload = (local_rows(np.take_along_axis(vals, order, -1)),
                   local_rows(np.take_along_axis(idx, order, -1)))
    sparse[d] = (c, gather_fn, mean_fn, densify_fn, (local_rows(vals), local_rows(idx)),
                 (jnp.asarray(gathered_v), jnp.asarray(gathered_i)), sar_fn, sar_payload)

  # --- 2. train steps ------------------------------------------------------------------
  model = MODELS[args.model]
  params = model.init_params()
  num_params = sum(v.size for v in params.values())
  replicated = NamedSharding(mesh, P())
  params = {k: jax.make_array_from_callback(v.shape, replicated, lambda i, v=v: v[i])
            for k, v in params.items()}
  images, labels = (local_rows(a) for a in model.batch(rng))
  loss_fn = model.loss_fn

  compute_fn = jax.jit(smap(
      lambda p, x, y: jax.grad(loss_fn)(jax.lax.pcast(p, "data", to="varying"), x, y),
      in_specs=(P(), P("data"), P("data")), out_specs=P("data")))

  steps = {}
  for name in args.compressors.split(","):
    # "hggtopk+pipeline": hggtopk(pipeline=True); "hggtopk+exchange=sparse_allreduce".
    base, _, option = name.partition("+")
    key, _, value = option.partition("=")
    extra = {key: value or True} if option else {}
    tx = optax.chain(hggjax.get_compressor(base, density=args.train_density, axis_name="data",
                                           **extra, **WIRES[args.wire]), optax.sgd(1e-3))
    state = hggjax.shard_state(tx.init(params), mesh, "data")
    specs = hggjax.state_specs(state, "data")

    def step(p, s, x, y, tx=tx):
      local = jax.lax.pcast(p, "data", to="varying")
      grads = jax.grad(loss_fn)(local, x, y)
      updates, s = tx.update(grads, s, p)
      return optax.apply_updates(p, updates), s

    # Donated like the harness's step: new params and state reuse the old buffers.
    step_fn = jax.jit(smap(step, in_specs=(P(), specs, P("data"), P("data")),
                           out_specs=(P(), specs)), donate_argnums=(0, 1))
    steps[name] = [step_fn, (jax.tree.map(jnp.copy, params), state)]

  # Compile everything before the first phase (unshaped links compile-and-run fast).
  t_compile = time.perf_counter()
  jax.block_until_ready(dense_fn(dense_x))
  for c, gather_fn, mean_fn, densify_fn, payload, gathered, sar_fn, sar_payload in sparse.values():
    jax.block_until_ready((gather_fn(*payload), mean_fn(*payload), densify_fn(*gathered),
                           sar_fn(*sar_payload)))
  jax.block_until_ready(compute_fn(params, images, labels))
  for run in steps.values():
    run[1] = run[0](*run[1], images, labels)
    jax.block_until_ready(run[1])
  compile_s = time.perf_counter() - t_compile

  phases = []
  for phase in args.phases.split(","):
    _handshake(args, spec, phase)
    barrier()
    row = {"phase": phase, "exchange": {}, "train": {}}
    dense_s, _ = timed(dense_fn, dense_x)
    row["exchange"]["dense"] = {"s": dense_s, "n": n,
                                "bytes_per_process": 2 * (nproc - 1) / nproc * 4 * n}
    for d, (c, gather_fn, mean_fn, densify_fn, payload, gathered, sar_fn,
            sar_payload) in sparse.items():
      gather_s, _ = timed(gather_fn, *payload)
      mean_s, _ = timed(mean_fn, *payload)
      densify_s, _ = timed(densify_fn, *gathered)
      sar_s, _ = timed(sar_fn, *sar_payload)
      row["exchange"][f"sparse@{d:g}"] = {
          "all_gather_s": gather_s, "sparse_mean_s": mean_s, "densify_s": densify_s,
          "capacity": c, "bytes_per_process": exchange.traffic("allgather", nproc, 1, c, n, 4)[1],
          "sparse_allreduce_s": sar_s,
          "sparse_allreduce_bytes_per_process": exchange.traffic(
              "sparse_allreduce", nproc, 1, c, n, 4)[1]}
    compute_s, _ = timed(compute_fn, params, images, labels)
    row["train"]["compute_only_s"] = compute_s
    for name, run in steps.items():
      # Each call continues from the last one's (donated) params and state.
      step_s, run[1] = timed(run[0], *run[1], images, labels,
                             feed=lambda xs, out: (*out, *xs[2:]))
      stats = hggjax.stats(run[1][1])
      row["train"][name] = {
          "step_s": step_s,
          "sent_bytes": float(np.asarray(stats["sent_bytes"].addressable_shards[0].data)[0]),
          "dense_bytes": float(np.asarray(stats["dense_bytes"].addressable_shards[0].data)[0])}
    phases.append(row)
    print(f"process {spec.process_id}: phase {phase} done", flush=True)
  return {"process_id": spec.process_id, "processes": nproc, "compile_s": compile_s,
          "num_params": int(num_params), "per_process_batch": model.PER_PROCESS_BATCH,
          "model": model.DESCRIPTION, "train_density": args.train_density, "reps": args.reps,
          "phases": phases}


def _handshake(args, spec, phase: str) -> None:
  """Process 0 asks the orchestrator for `phase`'s link shaping and waits until it is set;
  the caller's barrier then holds the other processes back until process 0 returns."""
  if spec.process_id != 0:
    return
  with open(os.path.join(args.dir, f"want-{phase}"), "w") as f:
    f.write(phase)
  done = os.path.join(args.dir, f"set-{phase}")
  deadline = time.monotonic() + args.handshake_timeout
  while not os.path.exists(done):
    if time.monotonic() > deadline:
      raise TimeoutError(f"the orchestrator did not shape the links for {phase} within "
                         f"{args.handshake_timeout:.0f} s")
    time.sleep(0.05)


if __name__ == "__main__":
  main()
