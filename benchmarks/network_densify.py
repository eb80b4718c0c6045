"""The densify cost: P gathered sparse payloads -> one dense float32 mean, n = 25M.

    python -m benchmarks.network_densify                       # both allocator settings
    python -m benchmarks.network_densify --hugepages off       # only glibc's default

Times, as separately jitted functions on one device, each with `block_until_ready`,
interleaved round by round, median of `--reps` after a warm-up call:

- previous: the code before this change (2-D (row, index) scatter-add into an [m, n]
  zero buffer, then a division of the whole output by P), copied here verbatim;
- current: `hggjax.exchange.densify_mean` (1-D scatter for one row, scaling of the
  P * C values instead of the n outputs when P is a power of two);
- fill: `jnp.zeros(n)` plus a scalar, the floor of any densify (one fresh n-element
  output written once).

Inputs are what `sparse_mean` sees after the all_gather: values [P, 1, C] and int32
indices [P, 1, C], each device's C positions distinct and sorted (as the selectors
emit them), overlapping across devices, the last slots unused (index n). Results are
checked equal to each other (bit for bit) before timing.

XLA:CPU gives every large output a fresh mmap, so its first touch page-faults: with
`--hugepages both` each setting runs in its own subprocess, once with glibc's default
and once with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (transparent huge pages).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

TUNABLE = "glibc.malloc.hugetlb=1"


def previous_densify(values, indices, n):
  """hggjax/exchange.py's scatter before this change (commit a741abf), for comparison."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  values = values.astype(jnp.float32)
  devices = values.shape[0]
  m = values.shape[-2]
  row = jnp.broadcast_to(jnp.arange(m)[:, None], indices.shape)
  total = jnp.zeros((m, n), jnp.float32).at[row, indices].add(values, mode="drop")
  return total if devices == 1 else total / devices


def measure(n: int, densities, processes, reps: int) -> list[dict]:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from hggjax import exchange  # pylint: disable=import-outside-toplevel

  fns = {"previous": jax.jit(previous_densify, static_argnums=2),
         "current": jax.jit(exchange.densify_mean, static_argnums=2),
         "fill": jax.jit(lambda v, i, n: jnp.zeros((1, n), jnp.float32) + v[0, 0, 0],
                         static_argnums=2)}
  rows = []
  rng = np.random.default_rng(0)
  for d in densities:
    c = max(1, round(d * n))
    for p in processes:
      idx = np.stack([np.sort(rng.choice(n, c, replace=False)) for _ in range(p)])
      idx[:, -3:] = n  # unused slots
      idx = jnp.asarray(idx.astype(np.int32)[:, None])
      vals = jnp.asarray(rng.standard_normal((p, 1, c)).astype(np.float32))
      outs = {name: np.asarray(f(vals, idx, n)) for name, f in fns.items()}
      if not np.array_equal(outs["previous"], outs["current"]):
        raise AssertionError(f"d={d} P={p}: current densify differs from previous")
      del outs
      times = {name: [] for name in fns}
      for _ in range(reps):
        for name, f in fns.items():
          t0 = time.perf_counter()
          out = f(vals, idx, n)
          jax.block_until_ready(out)
          times[name].append(time.perf_counter() - t0)
          del out
      row = {"n": n, "density": d, "P": p, "scattered": p * c}
      row.update({f"{name}_ms": 1e3 * statistics.median(t) for name, t in times.items()})
      rows.append(row)
      print(f"  d={d:g} P={p}: previous {row['previous_ms']:.1f} ms, current "
            f"{row['current_ms']:.1f} ms, fill floor {row['fill_ms']:.1f} ms", flush=True)
  return rows


def _args(argv=None):
  p = argparse.ArgumentParser(prog="python -m benchmarks.network_densify")
  p.add_argument("--n", type=int, default=25_000_000)
  p.add_argument("--densities", default="0.01,0.05")
  p.add_argument("--processes", default="2,4")
  p.add_argument("--reps", type=int, default=9)
  p.add_argument("--hugepages", choices=("both", "on", "off", "inherit"), default="both")
  p.add_argument("--out", default="benchmarks/results/network_densify_cpu.json")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = _args(argv)
  if args.hugepages == "inherit":  # a child: measure under the environment it was given
    rows = measure(args.n, [float(d) for d in args.densities.split(",")],
                   [int(p) for p in args.processes.split(",")], args.reps)
    print("ROWS " + json.dumps(rows))
    return 0
  settings = {"both": ("off", "on"), "on": ("on",), "off": ("off",)}[args.hugepages]
  report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "load_avg_start": os.getloadavg()},
            "command": " ".join(["python", "-m", "benchmarks.network_densify",
                                 *(argv if argv is not None else sys.argv[1:])]),
            "runs": {}}
  for setting in settings:
    env = dict(os.environ)
    env.pop("GLIBC_TUNABLES", None)
    if setting == "on":
      env["GLIBC_TUNABLES"] = TUNABLE
    print(f"hugepages {setting}:", flush=True)
    child = ["--n", str(args.n), "--densities", args.densities, "--processes", args.processes,
             "--reps", str(args.reps), "--hugepages", "inherit"]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.network_densify", *child],
                          env=env, capture_output=True, text=True, check=False)
    sys.stdout.write("".join(line + "\n" for line in proc.stdout.splitlines()
                             if not line.startswith("ROWS ")))
    if proc.returncode:
      sys.stderr.write(proc.stderr[-3000:])
      return proc.returncode
    rows = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("ROWS "))[5:])
    report["runs"][f"hugepages_{setting}"] = rows
  report["machine"]["load_avg_end"] = os.getloadavg()
  import jax  # pylint: disable=import-outside-toplevel
  report["machine"]["jax"] = jax.__version__
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(report, f, indent=1)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
