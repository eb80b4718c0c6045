"""Pipelined vs non-pipelined HGG-TopK: selection time, train-step time, quality, overlap.

    python -m benchmarks.pipeline --sizes 1e7 --out benchmarks/results/pipeline_cpu.json
    python -m benchmarks.pipeline --sizes 1e7,2.5e7,1e8 --steps 12 --reps 5 \\
        --train-steps 20 --out pipeline_gpu.json        # one GPU run (< 4 min)
    python -m benchmarks.pipeline --run-dir /tmp/pipe_run   # quality of a harness run
    python -m benchmarks.pipeline --sizes 0 --hlo /tmp/step_hlo.txt   # overlap check only

Selection (the part the speed target is about): both selectors run on the same
sequence of vectors, each carrying its own state from step to step as the
transform does (hggtopk: `selectors.History`, last step's threshold; pipelined:
`selectors.PipelineCarry`).
Two sequences:

  ef     error feedback: acc_t = g_t + r_{t-1}, g_t = c_t * s * z_t with a fixed
         heavy-tailed per-element scale s = |t3|, fresh z_t ~ N(0, 1) and a
         per-step global factor ln c_t ~ N(0, `--scale-noise`), which sets how
         far the k-th largest |acc| moves from step to step; r_t keeps what the
         exact top-k did not send, so both selectors see the same acc_t.
  drift  x_t = x_{t-1} + 0.01 * sd * N(0, 1) (benchmarks.selection's sequence,
         where the non-pipelined history check nearly always accepts).

Each step's time is the median of `--reps` calls on that step's input and
state, after one warm-up step (compilation); the row reports the median over
steps 1..T-1 (step 0 is a cold start for both). Quality per step: count/k
(valid indices sent / k) and recall (share of the exact top-k among them), and
for the pipeline the path taken (0 one pass, 1 one pass + trim, 2 second pass).

Train step: `train.steps`'s jit(shard_map) step of the harness CNN on synthetic
data over all local devices (4 fake CPU devices on a CPU host), hggtopk with and
without pipeline, interleaved step by step, median of `--train-steps` timed steps each.

Overlap: `--hlo FILE` writes the compiled HLO of that train step (pipelined)
and prints, per all-gather, whether it is an async start/done pair and how
many compute ops XLA scheduled between start and done.
"""

import argparse
import json
import os
import platform
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.wire_study import WIRES, add_wire_flag
from hggjax import selectors
from hggjax.kernels import bits, sampling
from hggjax.kernels import topk as topk_kernels
from hggjax.selectors import hgg_pipelined

SEQUENCES = ("ef", "drift")


def _timed(f, reps: int):
  """(median wall ms, median process CPU ms of `reps` calls after one untimed call, output).

  CPU time (all threads of this process) is reported beside wall time because the
  shared 2-core machine's load moves wall times by tens of percent between runs.
  """
  out = jax.block_until_ready(f())
  wall, cpu = [], []
  for _ in range(reps):
    start, start_cpu = time.perf_counter(), time.process_time()
    out = jax.block_until_ready(f())
    wall.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
  return 1e3 * statistics.median(wall), 1e3 * statistics.median(cpu), out


def sequence(kind: str, n: int, k: int, steps: int, key, scale_noise: float):
  """Yields (acc_t, exact top-k positions of acc_t) as device arrays."""
  k_scale, k_run = jax.random.split(key)
  exact = jax.jit(lambda x: topk_kernels.top_k(x, k))
  if kind == "drift":
    x = jax.random.t(k_scale, 3.0, (n,), jnp.float32)
    sd = jnp.std(x)
    step = jax.jit(lambda x, key: x + 0.01 * sd * jax.random.normal(key, x.shape, x.dtype))
    for t in range(steps):
      if t:
        x = step(x, jax.random.fold_in(k_run, t))
      yield x, exact(x)
    return
  scale = jnp.abs(jax.random.t(k_scale, 3.0, (n,), jnp.float32))

  @jax.jit
  def grad(key):
    k_c, k_z = jax.random.split(key)
    c = jnp.exp(scale_noise * jax.random.normal(k_c, ()))
    return c * scale * jax.random.normal(k_z, (n,), jnp.float32)

  @jax.jit
  def keep_rest(acc, idx):
    return acc.at[idx].set(0.0, mode="drop")

  residual = jnp.zeros((n,), jnp.float32)
  for t in range(steps):
    acc = grad(jax.random.fold_in(k_run, t)) + residual
    idx = exact(acc)
    yield acc, idx
    residual = keep_rest(acc, idx)


def _quality(indices, exact, n, k):
  sent = np.asarray(indices)
  sent = sent[sent < n]
  return sent.size / k, float(np.isin(np.asarray(exact), sent).sum()) / k


def selection_rows(sizes, density, steps, reps, sequences, scale_noise, tolerance, seed=0):
  rows = []
  for n in sizes:
    k = max(1, round(density * n))
    plain = selectors.hgg_topk(tolerance=tolerance)
    piped = selectors.hgg_topk_pipelined(tolerance=tolerance)
    run_plain = jax.jit(lambda x, prev: plain.select(x, k, selectors.History(prev), None)[0])
    run_piped = jax.jit(lambda x, carry: piped.select(x, k, carry, None))
    for kind in sequences:
      prev = jnp.float32(0)
      carry = jax.tree.map(lambda v: v[0], piped.init(1))
      per_step = []
      for t, (x, exact) in enumerate(sequence(kind, n, k, steps, jax.random.PRNGKey(seed), scale_noise)):
        ms_plain, cpu_plain, sel = _timed(lambda: run_plain(x, prev), reps)
        ms_piped, cpu_piped, (psel, new_carry) = _timed(lambda: run_piped(x, carry), reps)
        c_plain, r_plain = _quality(sel.indices, exact, n, k)
        c_piped, r_piped = _quality(psel.indices, exact, n, k)
        per_step.append(dict(step=t, plain_ms=ms_plain, pipe_ms=ms_piped, plain_cpu_ms=cpu_plain,
                             pipe_cpu_ms=cpu_piped, plain_hit=bool(sel.history_hit),
                             path=int(new_carry.path), plain_count=c_plain, plain_recall=r_plain,
                             pipe_count=c_piped, pipe_recall=r_piped))
        prev, carry = sel.threshold, new_carry
        del x
      warm = per_step[1:]
      plain_ms = statistics.median(s["plain_ms"] for s in warm)
      pipe_ms = statistics.median(s["pipe_ms"] for s in warm)
      plain_cpu = statistics.median(s["plain_cpu_ms"] for s in warm)
      pipe_cpu = statistics.median(s["pipe_cpu_ms"] for s in warm)
      paths = [s["path"] for s in warm]
      row = dict(
          n=n, k=k, density=density, sequence=kind, steps=steps, reps=reps,
          plain_ms=plain_ms, pipe_ms=pipe_ms, speedup=plain_ms / pipe_ms,
          plain_cpu_ms=plain_cpu, pipe_cpu_ms=pipe_cpu, cpu_speedup=plain_cpu / pipe_cpu,
          plain_history_share=float(np.mean([s["plain_hit"] for s in warm])),
          path_share=[paths.count(p) / len(paths) for p in (0, 1, 2, 3)],
          pipe_ms_by_path={p: statistics.median([s["pipe_ms"] for s in warm if s["path"] == p])
                           for p in (0, 1, 2, 3) if p in paths},
          pipe_count_min=min(s["pipe_count"] for s in warm),
          pipe_count_in_098_102=float(np.mean([0.98 <= s["pipe_count"] <= 1.02 for s in warm])),
          pipe_recall_min=min(s["pipe_recall"] for s in warm),
          plain_count_min=min(s["plain_count"] for s in warm),
          plain_recall_min=min(s["plain_recall"] for s in warm),
          per_step=per_step)
      rows.append(row)
      print(_format(row), flush=True)
  return rows


HEADER = (f"{'n':>8} {'seq':>5} {'plain ms':>9} {'pipe ms':>8} {'speedup':>7} {'cpu x':>6} {'plain hist':>10} "
          f"{'paths 0/1/2/3':>20} {'pipe count min':>14} {'in [.98,1.02]':>13} {'pipe recall min':>15}")


def _format(r) -> str:
  paths = "/".join(f"{s:.2f}" for s in r["path_share"])
  return (f"{r['n']:>8.2g} {r['sequence']:>5} {r['plain_ms']:>9.2f} {r['pipe_ms']:>8.2f} "
          f"{r['speedup']:>7.2f} {r['cpu_speedup']:>6.2f} {r['plain_history_share']:>10.2f} {paths:>20} "
          f"{r['pipe_count_min']:>14.4f} {r['pipe_count_in_098_102']:>13.2f} {r['pipe_recall_min']:>15.4f}")


def parts(n: int, density: float, reps: int) -> dict:
  """Median wall ms of the pieces of one pipelined selection at n, interleaved round by round.

  The pipelined call starts from the carry its own cold step left on the same
  vector; the path that call took is recorded (`pipelined_path`).
  """
  k = max(1, round(density * n))
  x = jax.random.t(jax.random.PRNGKey(0), 3.0, (n,), jnp.float32)
  kth = jnp.sort(jnp.abs(x))[-k]
  p = hgg_pipelined.plan(n, k, 0.01)
  edges = kth * jnp.exp(-jnp.asarray(p.offsets, jnp.float32) / 3.0)
  low = edges[0]
  pos = jax.jit(lambda x: topk_kernels.compact(bits.pack(jnp.abs(x) >= low), n, p.cap)[0])(x)
  values = jnp.where(pos < n, jnp.abs(x.at[pos].get(mode="fill", fill_value=0.0)), -1.0)
  piped, plain = selectors.hgg_topk_pipelined(), selectors.hgg_topk()
  run_piped = jax.jit(lambda x, carry: piped.select(x, k, carry, None))
  carry = run_piped(x, jax.tree.map(lambda v: v[0], piped.init(1)))[1]
  path = int(run_piped(x, carry)[1].path)

  def send_above(values, pos):
    return topk_kernels.place(values >= edges[8], pos, k, n)

  pieces = {
      "floor: abs(x).max()": (jax.jit(lambda x: jnp.max(jnp.abs(x))), (x,)),
      "sample (rate r)": (jax.jit(lambda x: jnp.abs(sampling.blocked_sample(x, p.rate))), (x,)),
      "bits.pack (the low edge's mask)": (jax.jit(lambda x: bits.pack(jnp.abs(x) >= low)), (x,)),
      "pack + compact(cap)": (jax.jit(lambda x: topk_kernels.compact(bits.pack(jnp.abs(x) >= low), n, p.cap)[0]), (x,)),
      "gather the candidates' |x|": (jax.jit(lambda x, pos: jnp.abs(x.at[pos].get(mode="fill", fill_value=0.0))), (x, pos)),
      f"bits.count_many ({hgg_pipelined.EDGES} edges, candidates)": (jax.jit(bits.count_many), (values, edges)),
      "send the candidates >= an edge": (jax.jit(send_above), (values, pos)),
      "pipelined select": (run_piped, (x, carry)),
      "hggtopk select (history hit)": (jax.jit(lambda x: plain.select(x, k, selectors.History(kth), None)[0]), (x,)),
  }
  for fn, args in pieces.values():
    jax.block_until_ready(fn(*args))
  times = {name: [] for name in pieces}
  for _ in range(reps):
    for name, (fn, args) in pieces.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  out = {name: 1e3 * statistics.median(t) for name, t in times.items()}
  out.update(n=n, k=k, rate=p.rate, cap=p.cap, reps=reps, pipelined_path=path)
  return out


def train_step_times(steps: int, seed: int = 0, wire: dict | None = None) -> dict:
  """Median ms of the harness's jit(shard_map) train step, hggtopk with and without pipeline."""
  from train import data as data_lib  # pylint: disable=import-outside-toplevel
  from train import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from train import steps as steps_lib  # pylint: disable=import-outside-toplevel
  from train.config import Config  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel

  ds = data_lib.load_dataset("synthetic", None, synthetic_size=512)
  devices = jax.device_count()
  batch = 16 * devices
  mesh = mesh_lib.make_mesh(devices)
  runs = {}
  for pipeline in (False, True):
    cfg = Config(dataset="synthetic", batch_size=batch, use_pipeline=pipeline, seed=seed,
                 **(wire or {}))
    state = steps_lib.create_train_state(cfg, ds.image_shape, ds.num_classes, mesh, steps)
    runs[pipeline] = [state, steps_lib.make_train_step(state)]
  sharding = NamedSharding(mesh, P(mesh_lib.AXIS))
  images, labels = jax.device_put(data_lib.train_batch(ds, 0, batch, seed, False), sharding)
  times = {False: [], True: []}
  for step in range(steps + 1):  # step 0 compiles
    for pipeline, run in runs.items():
      start = time.perf_counter()
      run[0], metrics = steps_lib.train_step(run[0], run[1], images, labels)
      jax.block_until_ready((run[0].params, metrics))
      if step:
        times[pipeline].append(time.perf_counter() - start)
  return {"plain_ms": 1e3 * statistics.median(times[False]),
          "pipe_ms": 1e3 * statistics.median(times[True]),
          "steps": steps, "devices": devices, "batch": batch, "model": "cnn (synthetic data)"}


def training_paths(steps: int, dataset: str = "fashion_mnist", wire: dict | None = None) -> dict:
  """The harness's default run with --use-pipeline: every step's paths and count/k.

  The same state, batches and jit(shard_map) step as `python -m train.cifar
  --use-pipeline` (without evaluation, checkpoints or the threshold probe), reading
  the compressor state after every step: per step, how many (device, group) pairs
  took each path and each device's selected / k.
  """
  from train import data as data_lib  # pylint: disable=import-outside-toplevel
  from train import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from train import steps as steps_lib  # pylint: disable=import-outside-toplevel
  from train.config import Config  # pylint: disable=import-outside-toplevel
  import hggjax  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel

  cfg = Config(dataset=dataset, use_pipeline=True, **(wire or {}))
  ds = data_lib.load_dataset(cfg.dataset, cfg.data_dir)
  devices = jax.device_count()
  mesh = mesh_lib.make_mesh(devices)
  total = steps or cfg.epochs * data_lib.steps_per_epoch(ds, cfg.batch_size)
  state = steps_lib.create_train_state(cfg, ds.image_shape, ds.num_classes, mesh, total)
  step_fn = steps_lib.make_train_step(state)
  sharding = NamedSharding(mesh, P(mesh_lib.AXIS))
  paths, ratios, centers = [], [], []
  for step in range(total):
    batch = jax.device_put(data_lib.train_batch(ds, step, cfg.batch_size, cfg.seed, False), sharding)
    state, _ = steps_lib.train_step(state, step_fn, *batch)
    s = hggjax.compression_state(state.opt_state)
    paths.append(np.bincount(np.asarray(s.carry.path).ravel(), minlength=4)[:4])
    ratios.append(np.asarray(s.stats.selected) / np.asarray(s.stats.k))
    centers.append(np.asarray(s.carry.center))
  paths, ratios = np.array(paths[1:]), np.array(ratios[1:])  # step 0: cold start
  # How far each group's k-th largest |acc| moves from one step to the next.
  moves = np.abs(np.diff(np.log(np.array(centers)), axis=0))  # [steps - 1, P, G]
  pairs = paths.sum(axis=1)
  return {"steps": total, "devices": devices, "groups": int(pairs[0] // devices),
          "path_share": (paths.sum(axis=0) / pairs.sum()).tolist(),
          "steps_all_one_pass": float(np.mean(paths[:, 2:].sum(axis=1) == 0)),
          "device_steps_count_in_098_102": float(np.mean((ratios >= 0.98) & (ratios <= 1.02))),
          "count_over_k_min": float(ratios.min()), "count_over_k_median": float(np.median(ratios)),
          "kth_step_move_median_per_group": np.median(moves, axis=(0, 1)).tolist()}


def overlap_report(path: str, wire: dict | None = None) -> dict:
  """Compiles the pipelined harness step, writes its HLO to `path`, and reads the all-gathers."""
  from train import data as data_lib  # pylint: disable=import-outside-toplevel
  from train import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from train import steps as steps_lib  # pylint: disable=import-outside-toplevel
  from train.config import Config  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel

  ds = data_lib.load_dataset("synthetic", None, synthetic_size=64)
  devices = jax.device_count()
  mesh = mesh_lib.make_mesh(devices)
  cfg = Config(dataset="synthetic", batch_size=16 * devices, use_pipeline=True,
               **(wire or {}))
  state = steps_lib.create_train_state(cfg, ds.image_shape, ds.num_classes, mesh, 10)
  step = steps_lib.make_train_step(state)
  sharding = NamedSharding(mesh, P(mesh_lib.AXIS))
  images, labels = jax.device_put(data_lib.train_batch(ds, 0, cfg.batch_size, 0, False), sharding)
  hlo = step.lower(state.params, state.batch_stats, state.opt_state, np.int32(0),
                   (images, labels)).compile().as_text()
  with open(path, "w") as f:
    f.write(hlo)
  return analyse_hlo(hlo)


def analyse_hlo(hlo: str) -> dict:
  """All-gathers of the entry computation: sync or async, and the ops scheduled inside each."""
  entry = hlo[hlo.index("ENTRY"):]
  lines = [l.strip() for l in entry.splitlines()[1:] if "=" in l]
  names = [l.split("=")[0].strip().lstrip("%").split(" ")[0] for l in lines]
  report = {"sync_all_gathers": 0, "async_pairs": [], "convolutions": 0, "dots": 0}
  starts = {}
  for i, line in enumerate(lines):
    op = re.search(r"\b([a-z][a-z0-9-]*)\(", line.split("=", 1)[1])
    op = op.group(1) if op else ""
    if op == "all-gather":
      report["sync_all_gathers"] += 1
    elif op == "all-gather-start":
      starts[names[i]] = i
    elif op == "all-gather-done":
      src = re.search(r"all-gather-done\(%?([\w.\-]+)", line)
      j = starts.get(src.group(1) if src else "", i)
      between = [re.search(r"\b(fusion|convolution|dot|custom-call|while|conditional)\(", l)
                 for l in lines[j + 1:i]]
      report["async_pairs"].append({"start": j, "done": i, "compute_ops_between": sum(b is not None for b in between)})
    report["convolutions"] += op == "convolution"
    report["dots"] += op == "dot"
  return report


def quality_of_run(run_dir: str) -> dict:
  """Count and path shares from a harness run's metrics.jsonl (train lines) and its final accuracy."""
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  train = [r for r in rows if r["kind"] == "train" and r.get("k")]
  evals = [r for r in rows if r["kind"] == "eval"]
  ratios = np.array([r["selected"] / r["k"] for r in train])
  out = {"logged_steps": len(train),
         "count_in_098_102": float(np.mean((ratios >= 0.98) & (ratios <= 1.02))),
         "count_over_k_min": float(ratios.min()), "count_over_k_median": float(np.median(ratios)),
         "final_test_accuracy": evals[-1]["test_accuracy"] if evals else None}
  with open(os.path.join(run_dir, "config.json")) as f:
    cfg = json.load(f)
  summary_path = os.path.join(run_dir, "summary.json")
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      out["train_wall_s"] = json.load(f).get("train_wall_s")
  # history_hits: (device, group) selections that reused the previous threshold; with
  # the pipeline, those that took one pass (path 0 or 1). Summed over devices.
  hits = [r["history_hits"] for r in train if r.get("history_hits") is not None]
  if hits:
    out["history_hits_mean"], out["history_hits_min"] = float(np.mean(hits)), int(np.min(hits))
  out["use_pipeline"] = cfg.get("use_pipeline")
  return out


def machine() -> dict:
  device = jax.devices()[0]
  return dict(platform=device.platform, device=device.device_kind, devices=jax.device_count(),
              jax=jax.__version__, python=platform.python_version(),
              cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
              load_average=os.getloadavg() if hasattr(os, "getloadavg") else None)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="1e7", help="comma-separated n; 0 skips selection")
  parser.add_argument("--density", type=float, default=0.01)
  parser.add_argument("--tolerance", type=float, default=0.01)
  parser.add_argument("--steps", type=int, default=20, help="steps per sequence (step 0 is cold)")
  parser.add_argument("--reps", type=int, default=5, help="timed calls per step and selector")
  parser.add_argument("--sequences", default=",".join(SEQUENCES))
  parser.add_argument("--scale-noise", type=float, default=0.1)
  parser.add_argument("--train-steps", type=int, default=0, help="time the harness step (0: skip)")
  parser.add_argument("--hlo", metavar="FILE", help="write the pipelined step's HLO, report all-gathers")
  parser.add_argument("--train-paths", type=int, metavar="STEPS", help="paths and count/k of every "
                      "step of the harness's default run with --use-pipeline (0: all its steps)")
  add_wire_flag(parser)
  parser.add_argument("--run-dir", help="summarise a harness run's metrics.jsonl and exit")
  parser.add_argument("--parts", type=float, metavar="N", help="time the pieces of a selection at n = N")
  parser.add_argument("--out", default="benchmarks/results/pipeline.json")
  args = parser.parse_args(argv)
  if args.run_dir:
    print(json.dumps(quality_of_run(args.run_dir), indent=1))
    return
  if args.train_steps or args.hlo or args.train_paths is not None:
    # Before the first backend use; only the CPU backend reads it (4 fake devices, like
    # the harness); a GPU host keeps its own devices.
    jax.config.update("jax_num_cpu_devices", 4)
  info = machine()
  print(json.dumps(info))
  start = time.perf_counter()
  result = dict(machine=info, args=vars(args))
  sizes = [int(float(s)) for s in args.sizes.split(",") if float(s) > 0]
  if sizes:
    print(HEADER, flush=True)
    result["selection"] = selection_rows(sizes, args.density, args.steps, args.reps,
                                         args.sequences.split(","), args.scale_noise, args.tolerance)
  if args.parts:
    result["parts"] = parts(int(args.parts), args.density, max(args.reps, 10))
    for name, ms in result["parts"].items():
      print(f"  {name:32s} {ms:.2f}" if isinstance(ms, float) else f"  {name:32s} {ms}")
  if args.train_steps:
    result["train_step"] = train_step_times(args.train_steps, wire=WIRES[args.wire])
    print("train step:", json.dumps(result["train_step"]), flush=True)
  if args.train_paths is not None:
    result["train_paths"] = training_paths(args.train_paths, wire=WIRES[args.wire])
    print("training run:", json.dumps(result["train_paths"]), flush=True)
  if args.hlo:
    result["overlap"] = overlap_report(args.hlo, wire=WIRES[args.wire])
    print("overlap:", json.dumps({k: v for k, v in result["overlap"].items()}), flush=True)
  info["wall_s"] = time.perf_counter() - start
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {args.out} ({info['wall_s']:.0f} s)")


if __name__ == "__main__":
  main()
