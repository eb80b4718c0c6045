"""Selection speed and quality of every registered compressor vs ``jax.lax.top_k``.

    python -m benchmarks.selection                  # CPU default grid (~10 min on 2 cores)
    python -m benchmarks.selection --large          # adds n = 1e8 (for GPU)
    python -m benchmarks.selection --sizes 1e6 --densities 0.01 --methods hggtopk,topk

What is timed is the selector: the jitted selection kernel on one flat float32
vector (``selector.select(x, k, carry, key)``, `hggjax.selectors`); HGG-TopK's
carry is the previous threshold. `python -m benchmarks.update` times the whole
``tx.update`` a train step pays. Each time is the median of `--reps` calls
after one warm-up call (compilation), with ``block_until_ready``. The exact
reference ``lax.top_k(|x|, k)`` runs in the same process on the same vectors,
so "x top_k" ratios never mix runs.

The reference row also records `floor_ms`, one ``jnp.abs(x).max()`` pass (the
floor for a selection that must read x once).

Quality columns: count/k = valid indices sent / k; recall = share of the exact
top-k (from ``lax.top_k``) among them.

For hggtopk, a 20-step slowly drifting sequence (x_t = x_{t-1} + 0.01 * sd *
N(0, 1)) is run with the threshold carried from step to step as the transform
does: `hist` is the share of steps 1..19 on which the previous threshold was
accepted, `hist ms` the median time of the selection on those steps (with
their previous threshold), `cold ms` the median time on the same vectors with
no history (prev_threshold = 0).

Prints a table and writes JSON (`--out`).
"""

import argparse
import functools
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from hggjax import registry, selectors

# Selector behind each registered name (the transform only adds error feedback).
SELECTORS = {
    "topk": selectors.exact_topk,
    "topk2": selectors.exact_topk,
    "gaussian": selectors.gaussian,
    "gaussian2": selectors.gaussian,
    "randomk": selectors.random_k,
    "randomkec": selectors.random_k,
    "dgcsampling": selectors.dgc_sampling,
    "redsync": selectors.redsync,
    "redsynctrim": selectors.redsync_trim,
    "hggtopk": selectors.hgg_topk,
}
# Names that share a selector are timed once, under the first name.
ALIASES = {"topk2": "topk", "gaussian2": "gaussian", "randomkec": "randomk"}
REFERENCE = "lax.top_k"
DISTRIBUTIONS = ("normal", "laplace", "t3")
DRIFT_STEPS = 20
DRIFT = 0.01


def _check_registry():
  missing = set(registry.compressors) - set(SELECTORS) - {"none"}
  if missing:
    raise SystemExit(f"benchmarks.selection: no selector mapped for {sorted(missing)}")


def draw(distribution: str, n: int, key) -> jax.Array:
  if distribution == "normal":
    return jax.random.normal(key, (n,), jnp.float32)
  if distribution == "laplace":
    return jax.random.laplace(key, (n,), jnp.float32)
  if distribution == "t3":
    return jax.random.t(key, 3.0, (n,), jnp.float32)
  raise ValueError(distribution)


def _select(selector: selectors.Selector, k: int, x, prev, key):
  """One group's selection; `prev` is the previous threshold (HGG-TopK's carry)."""
  carry = jax.tree.map(lambda c: c[0], selector.init(1))
  if isinstance(carry, selectors.History):
    carry = selectors.History(cut=prev)
  return selector.select(x, k, carry, key)[0]


def timed(f, *args, reps: int) -> tuple[float, object]:
  """(median ms over `reps` calls after a warm-up call, last output)."""
  out = jax.block_until_ready(f(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    out = jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times), out


def quality(indices: np.ndarray, exact: np.ndarray, n: int, k: int) -> tuple[float, float]:
  valid = indices[indices < n]
  return len(valid) / k, float(np.isin(exact, valid).sum()) / k


def drift_run(kernel, x0, key, reps):
  """History acceptance share, and median ms with history vs cold, over a drifting sequence.

  `kernel(x, prev_threshold, key)` is the jitted selector (compiled already).
  """
  sd = jnp.std(x0)
  step = jax.jit(lambda x, key: x + DRIFT * sd * jax.random.normal(key, x.shape, x.dtype))

  def f(x, prev):
    return kernel(x, prev, key)

  xs, prevs, hits = [x0], [], []
  prev = jnp.float32(0)
  for t in range(DRIFT_STEPS):
    if t:
      xs.append(step(xs[-1], jax.random.fold_in(key, t)))
    sel = jax.block_until_ready(f(xs[t], prev))
    prevs.append(prev)
    if t:
      hits.append(bool(sel.history_hit))
    prev = sel.threshold
  hist_times, cold_times = [], []
  for _ in range(reps):
    for t in range(1, DRIFT_STEPS):
      start = time.perf_counter()
      jax.block_until_ready(f(xs[t], prevs[t]))
      hist_times.append(time.perf_counter() - start)
      start = time.perf_counter()
      jax.block_until_ready(f(xs[t], jnp.float32(0)))
      cold_times.append(time.perf_counter() - start)
  del xs
  return (sum(hits) / len(hits), 1e3 * statistics.median(hist_times),
          1e3 * statistics.median(cold_times))


def run(sizes, densities, methods, distributions, reps, reference_reps, drift_reps, seed=0):
  _check_registry()
  key = jax.random.PRNGKey(seed)
  floor = jax.jit(lambda x: jnp.max(jnp.abs(x)))  # one memory pass: the floor
  rows = []
  for n in sizes:
    for density in densities:
      k = max(1, round(density * n))
      reference = jax.jit(lambda x: jax.lax.top_k(jnp.abs(x), k)[1])
      kernels = {m: jax.jit(functools.partial(_select, SELECTORS[m](), k)) for m in methods}
      for dist in distributions:
        x = jax.block_until_ready(draw(dist, n, jax.random.fold_in(key, DISTRIBUTIONS.index(dist))))
        ref_ms, exact = timed(reference, x, reps=reference_reps)
        exact = np.asarray(exact)
        floor_ms, _ = timed(floor, x, reps=reps)
        base = dict(n=n, density=density, k=k, distribution=dist)
        rows.append(dict(base, method=REFERENCE, ms=ref_ms, speedup=1.0, count=1.0, recall=1.0,
                         floor_ms=floor_ms))
        print(_format(rows[-1]), flush=True)
        for m in methods:
          ms, sel = timed(kernels[m], x, jnp.float32(0), key, reps=reps)
          count, recall = quality(np.asarray(sel.indices), exact, n, k)
          row = dict(base, method=m, ms=ms, speedup=ref_ms / ms, count=count, recall=recall)
          if m == "hggtopk":
            share, hist_ms, cold_ms = drift_run(kernels[m], x, key, drift_reps)
            row.update(history_share=share, history_ms=hist_ms, cold_ms=cold_ms)
          rows.append(row)
          print(_format(row), flush=True)
        del x
  return rows


HEADER = (f"{'n':>9} {'dist':>7} {'dens':>5} {'method':>12} {'ms':>9} {'x top_k':>8} "
          f"{'count/k':>8} {'recall':>7} {'hist':>5} {'hist ms':>8} {'cold ms':>8}")


def _format(r) -> str:
  s = (f"{r['n']:>9.2g} {r['distribution']:>7} {r['density']:>5.2f} {r['method']:>12} "
       f"{r['ms']:>9.2f} {r['speedup']:>8.1f} {r['count']:>8.4f} {r['recall']:>7.4f}")
  if "history_share" in r:
    s += f" {r['history_share']:>5.2f} {r['history_ms']:>8.2f} {r['cold_ms']:>8.2f}"
  return s


def table(rows) -> str:
  return "\n".join([HEADER] + [_format(r) for r in rows])


def markdown(rows) -> str:
  """The rows as a markdown table (what docs/benchmarks.md shows)."""
  head = ("| n | dist | density | method | ms | x top_k | count/k | recall "
          "| hist | hist ms | cold ms |\n"
          "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
  lines = [head]
  for r in rows:
    extra = ("| {history_share:.2f} | {history_ms:.1f} | {cold_ms:.1f} |".format(**r)
             if "history_share" in r else "| | | |")
    lines.append(
        f"| {r['n']:.2g} | {r['distribution']} | {r['density']:.2f} | {r['method']} | "
        f"{r['ms']:.2f} | {r['speedup']:.1f} | {r['count']:.4f} | {r['recall']:.4f} " + extra)
  return "\n".join(lines)


def machine() -> dict:
  device = jax.devices()[0]
  return dict(
      platform=device.platform, device=device.device_kind, devices=jax.device_count(),
      jax=jax.__version__, python=platform.python_version(),
      cpu=platform.processor() or platform.machine(),
      cores=os.cpu_count())


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="1e5,1e6,1e7,2.5e7")
  parser.add_argument("--large", action="store_true", help="add n = 1e8 (GPU)")
  parser.add_argument("--densities", default="0.01,0.05")
  parser.add_argument("--methods", default=",".join(m for m in SELECTORS if m not in ALIASES))
  parser.add_argument("--distributions", default=",".join(DISTRIBUTIONS))
  parser.add_argument("--reps", type=int, default=5, help="timed calls per kernel (median)")
  parser.add_argument("--reference-reps", type=int, default=3, help="timed lax.top_k calls")
  parser.add_argument("--drift-reps", type=int, default=1,
                      help="passes over the 19 history steps (hggtopk)")
  parser.add_argument("--out", default="benchmarks/results/selection.json")
  parser.add_argument("--render", metavar="JSON",
                      help="print the markdown table of a saved run and exit")
  args = parser.parse_args(argv)
  if args.render:
    with open(args.render) as f:
      saved = json.load(f)
    print(json.dumps(saved["machine"]))
    print(markdown(saved["rows"]))
    return
  sizes = [int(float(s)) for s in args.sizes.split(",")] + ([10**8] if args.large else [])
  densities = [float(d) for d in args.densities.split(",")]
  methods = [m.strip() for m in args.methods.split(",")]
  unknown = set(methods) - set(SELECTORS)
  if unknown:
    parser.error(f"unknown methods {sorted(unknown)}; choose from {sorted(SELECTORS)}")
  info = machine()
  print(json.dumps(info))
  print(HEADER, flush=True)
  start = time.perf_counter()
  rows = run(sizes, densities, methods, args.distributions.split(","), args.reps,
             args.reference_reps, args.drift_reps)
  info["wall_s"] = time.perf_counter() - start
  print()
  print(table(rows))
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(dict(machine=info, args=vars(args), rows=rows), f, indent=1)
  print(f"\nwrote {args.out} ({info['wall_s']:.0f} s)")


if __name__ == "__main__":
  main()
