"""Bytes per device per step of each exchange, P = 2 to 1024: analytic, checked by measurement.

    python -m benchmarks.exchange_bytes                 # n = 25M, d = 1%, 8 devices per host
    python -m benchmarks.exchange_bytes --density 0.05 --out /tmp/bytes.json --chart ''

The analytic rows are `hggjax.exchange.traffic`, the formula the statistics report,
for one float32 gradient of n elements and k = round(d * n) slots (bytes other devices'
data bring to each device, "received"):

- dense ring: a ring all-reduce's 2 (P - 1) / P * 4n;
- allgather: (P - 1) * k slots of 8 bytes;
- sparse_allreduce: the all_to_all's (P - 1) buckets of ceil(1.5k / P) slots plus the
  all_gather's (P - 1) * ceil(1.5k / P) float32 slots (`hggjax.regions`);
- two-level (P / L hosts of L devices, `--local`): what each device receives over the
  slow link, the scheme run over the hosts only; the dense mean over the fast link moves
  2 (L - 1) / L * 4n more per device (the "fast" column), not counted in the rest.

The check runs the real transform (`hggjax.topk`) under `jit(shard_map)` on P = 2, 4
and 8 fake CPU devices (and the 8 as 2 hosts x 4) on an n = `--check-n` gradient and
compares the `received_bytes` and `sent_bytes` it reports with the formula (the test
suite compares the same statistics with the collectives in the compiled HLO).

Prints a table, writes JSON (`--out`) and a log-log chart (`--chart`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys

from benchmarks.wire_study import WIRES

PS = [2 ** i for i in range(1, 11)]
SCHEMES = ("allgather", "sparse_allreduce")


def _format(options: dict):
  from hggjax import validate  # pylint: disable=import-outside-toplevel
  return validate.wire_format(options.get("value_dtype", "auto"),
                              options.get("scale_group", "auto"),
                              options.get("index_coding", "auto"), "allgather")


def analytic(n: int, density: float, local: int, wires=("int32",)) -> list[dict]:
  """One row per P: bytes received per device by each scheme (`exchange.traffic`);
  ``row["wire"][format][scheme]`` for each coded wire format."""
  from hggjax import exchange  # pylint: disable=import-outside-toplevel
  k = max(1, round(density * n))
  rows = []
  for p in PS:
    row = {"P": p, "n": n, "k": k, "dense_ring": 2 * (p - 1) / p * 4 * n, "wire": {}}
    for name in wires:
      fmt = _format(WIRES[name])
      size = fmt.dtype("float32").itemsize
      row["wire"][name] = {scheme: exchange.traffic(scheme, p, 1, k, n, size, fmt)[1]
                           for scheme in SCHEMES}
    for scheme in SCHEMES:
      row[scheme] = exchange.traffic(scheme, p, 1, k, n, 4)[1]
      hosts = p // local
      row[f"two_level_{scheme}"] = (exchange.traffic(scheme, hosts, 1, k, n, 4)[1]
                                    if p >= local and p % local == 0 else None)
    row["fast_dense"] = 2 * (local - 1) / local * 4 * n if p >= local else None
    rows.append(row)
  return rows


def measure(n: int, density: float, wires=("int32",)) -> list[dict]:
  """Statistics of one real step vs the formula, on fake CPU devices."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding  # pylint: disable=import-outside-toplevel
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel

  import hggjax  # pylint: disable=import-outside-toplevel
  from hggjax import exchange  # pylint: disable=import-outside-toplevel

  k = max(1, round(density * n))
  cases = [(p, None, s, "int32") for p in (2, 4, 8) for s in SCHEMES] + [
      (8, 4, s, "int32") for s in SCHEMES] + [
      (8, local, s, w) for w in wires if w != "int32" for local in (None, 4) for s in SCHEMES]
  out = []
  for p, local, scheme, wire in cases:
    if local is None:
      mesh = jax.make_mesh((p,), ("data",), devices=jax.devices()[:p])
      axis = "data"
    else:
      mesh = jax.make_mesh((p // local, local), ("hosts", "local"), devices=jax.devices()[:p])
      axis = ("hosts", "local")
    tx = hggjax.topk(density, axis_name=axis, exchange=scheme, **WIRES[wire])
    state = hggjax.shard_state(tx.init({"w": jnp.zeros(n)}), mesh, axis)
    specs = hggjax.state_specs(state, axis)
    update = jax.jit(jax.shard_map(lambda g, s: tx.update({"w": g[0]}, s), mesh=mesh,  # noqa: B023
                                   in_specs=(P(axis), specs), out_specs=(P(), specs)))
    grads = np.random.default_rng(p).standard_normal((p, n)).astype(np.float32)
    _, state = update(jax.device_put(grads, NamedSharding(mesh, P(axis))), state)
    stats = hggjax.stats(state)
    over = p if local is None else p // local
    fmt = _format(WIRES[wire])
    sent, received = exchange.traffic(scheme, over, 1, k, n, fmt.dtype("float32").itemsize, fmt)
    row = {"P": p, "local": local, "scheme": scheme, "wire": wire, "n": n, "k": k,
           "received_bytes": float(np.asarray(stats["received_bytes"])[0]),
           "sent_bytes": float(np.asarray(stats["sent_bytes"])[0]),
           "formula_received": received, "formula_sent": sent,
           "delivered": int(np.asarray(stats["selected"])[0])}
    row["match"] = (row["received_bytes"] == received and row["sent_bytes"] == sent)
    out.append(row)
  return out


def _mb(b) -> str:
  return "—" if b is None else f"{b / 1e6:.3g}"


def print_tables(rows: list[dict], checks: list[dict], local: int) -> None:
  k = rows[0]["k"]
  print(f"MB received per device per step, n = {rows[0]['n']:,}, k = {k:,} (float32); "
        f"two-level: {local} devices per host, slow link only")
  print(f"{'P':>5} {'dense ring':>11} {'allgather':>10} {'sparse_ar':>10} {'ag/sar':>7} "
        f"{'2lvl ag':>8} {'2lvl sar':>9} {'fast dense':>11} {'sar slots/k':>11}")
  for r in rows:
    print(f"{r['P']:>5} {_mb(r['dense_ring']):>11} {_mb(r['allgather']):>10} "
          f"{_mb(r['sparse_allreduce']):>10} {r['allgather'] / r['sparse_allreduce']:>7.1f} "
          f"{_mb(r['two_level_allgather']):>8} {_mb(r['two_level_sparse_allreduce']):>9} "
          f"{_mb(r['fast_dense']):>11} {r['sparse_allreduce'] / 8 / k:>11.3f}")
  if checks:
    print(f"\nmeasured statistics vs formula (n = {checks[0]['n']:,}, k = {checks[0]['k']:,}):")
    print(f"{'P':>3} {'mesh':>6} {'scheme':<17} {'wire':<12} {'received':>10} {'formula':>10} "
          f"{'sent':>9} {'formula':>9} {'slots/k':>8} {'delivered':>9}  ok")
    for c in checks:
      mesh = f"{c['P'] // c['local']}x{c['local']}" if c["local"] else str(c["P"])
      print(f"{c['P']:>3} {mesh:>6} {c['scheme']:<17} {c['wire']:<12} {c['received_bytes']:>10.0f} "
            f"{c['formula_received']:>10} {c['sent_bytes']:>9.0f} {c['formula_sent']:>9} "
            f"{c['received_bytes'] / 8 / c['k']:>8.3f} {c['delivered']:>9}  "
            f"{'yes' if c['match'] else 'NO'}")
  wires = list(rows[0]["wire"])
  print("\nbytes per slot received (allgather: (P - 1) k slots; sparse_allreduce: (P - 1) "
        "(bucket + share) slots), by wire format:")
  print(f"{'P':>5} " + " ".join(f"{w + ' ' + s[:3]:>18}" for w in wires for s in SCHEMES))
  for r in rows:
    print(f"{r['P']:>5} " + " ".join(f"{r['wire'][w][s] / _slots(s, r['P'], k):>18.3f}"
                                     for w in wires for s in SCHEMES))


def _slots(scheme: str, p: int, k: int) -> int:
  """Slots received per device (`hggjax.regions` sizes the sparse_allreduce ones)."""
  from hggjax import regions  # pylint: disable=import-outside-toplevel
  if scheme == "allgather":
    return (p - 1) * k
  return (p - 1) * (regions.bucket_capacity(k, p) + regions.region_share(k, p))


def chart(rows: list[dict], path: str, local: int) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(7, 4.5))
  ps = [r["P"] for r in rows]
  series = [("dense_ring", "dense ring all-reduce", "k-"),
            ("allgather", "allgather", "C0o-"),
            ("sparse_allreduce", "sparse_allreduce", "C1s-"),
            ("two_level_allgather", f"two-level allgather ({local}/host, slow link)", "C0o:"),
            ("two_level_sparse_allreduce", f"two-level sparse_allreduce ({local}/host, slow link)",
             "C1s:")]
  for key, label, style in series:
    pts = [(r["P"], r[key] / 1e6) for r in rows if r[key]]
    ax.plot(*zip(*pts), style, label=label)
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xticks(ps, [str(p) for p in ps])
  ax.set_xlabel("devices P")
  ax.set_ylabel("MB received per device per step")
  ax.set_title(f"n = {rows[0]['n'] / 1e6:g}M float32, k = {rows[0]['k']:,} "
               f"(d = {rows[0]['k'] / rows[0]['n']:g})")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=110)
  print(f"wrote {path}")


def _args(argv=None):
  p = argparse.ArgumentParser(prog="python -m benchmarks.exchange_bytes",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--n", type=int, default=25_000_000, help="gradient elements (analytic)")
  p.add_argument("--density", type=float, default=0.01)
  p.add_argument("--local", type=int, default=8, help="devices per host (two-level rows)")
  p.add_argument("--check-n", type=int, default=100_000,
                 help="gradient elements of the measured check (0: skip it)")
  p.add_argument("--wire", default="int32,bf16-packed,fp8-packed",
                 help="wire formats (benchmarks.wire_study.WIRES), comma-separated")
  p.add_argument("--out", default="benchmarks/results/exchange_bytes.json")
  p.add_argument("--chart", default="docs/img/exchange_bytes.png", help="'' for none")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = _args(argv)
  wires = args.wire.split(",")
  unknown = [w for w in wires if w not in WIRES]
  if unknown:
    print(f"error: unknown wire format(s) {', '.join(unknown)}; choose from {', '.join(WIRES)}",
          file=sys.stderr)
    return 2
  checks = []
  if args.check_n:
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_num_cpu_devices", 8)  # before the first backend use
    checks = measure(args.check_n, args.density, wires)
  rows = analytic(args.n, args.density, args.local, wires)
  print_tables(rows, checks, args.local)
  by_p = {r["P"]: r for r in rows}
  targets = {
      "sar_vs_allgather_P64": by_p[64]["allgather"] / by_p[64]["sparse_allreduce"],
      "sar_vs_allgather_P1024": by_p[1024]["allgather"] / by_p[1024]["sparse_allreduce"],
      "sar_below_dense_at_every_P": all(r["sparse_allreduce"] < r["dense_ring"] for r in rows),
      "sar_slots_per_k_P8": by_p[8]["sparse_allreduce"] / 8 / by_p[8]["k"],
      "measured_equals_formula": all(c["match"] for c in checks) if checks else None,
      **{f"allgather_bytes_per_slot_P8_{w}": by_p[8]["wire"][w]["allgather"] / 7 / by_p[8]["k"]
         for w in wires},
  }
  print("\n" + json.dumps(targets))
  if args.chart:
    chart(rows, args.chart, args.local)
  report = {"command": " ".join(["python", "-m", "benchmarks.exchange_bytes",
                                 *(sys.argv[1:] if argv is None else argv)]),
            "platform": platform.platform(), "density": args.density, "local": args.local,
            "analytic": rows, "checks": checks, "targets": targets}
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(report, f, indent=1)
  print(f"wrote {args.out}")
  return 0 if targets["measured_equals_formula"] in (True, None) else 1


if __name__ == "__main__":
  sys.exit(main())
