"""What a coded wire costs one device per step: the position sort, the encode and the decode.

    python -m benchmarks.wire_code                                   # n = 1e6, 1e7 at 1% and 5%
    python -m benchmarks.wire_code --sizes 1e7 --densities 0.01 --rows 8 --reps 21

Per (n, density): one row of k = density x n distinct positions in a selector's order
(blocks of 256 in index order, shuffled inside each block, as `kernels.topk.compact`
leaves them) with float32 values, and `--rows` received rows (a device decodes one per
device on the axis). Each piece is jitted on its own and timed interleaved with the
others (median of `--reps` calls, `benchmarks.update.interleaved`):

- ``lax.sort``: XLA's sort of the k positions, the reference;
- ``sort_distinct``: `kernels.topk.sort_distinct`, what the transform sorts with;
- ``encode``: `wire.encode` of the sorted row, float32 + int32 and float8 (a float32
  scale per 256) + packed positions;
- ``decode``: `wire.decode` of the `--rows` rows in both formats.

The last lines are each pair's ratio (the packed code's extra work per device per step).
"""

import argparse
import json
import os
import sys
import time


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", default="1e6,1e7", help="row lengths n")
  p.add_argument("--densities", default="0.01,0.05")
  p.add_argument("--rows", type=int, default=4, help="rows decoded (devices on the axis)")
  p.add_argument("--reps", type=int, default=15)
  p.add_argument("--out", default=None, help="write the rows as JSON")
  return p.parse_args(argv)


def block_order(rng, n: int, k: int):
  """int32[k]: k distinct positions of [0, n), blocks of 256 ascending, shuffled inside."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  pos = np.sort(rng.choice(n, k, replace=False))
  key = (pos // 256) * 1.0 + rng.random(k)  # the block, then a random order inside it
  return pos[np.argsort(key, kind="stable")].astype(np.int32)


def measure(n: int, density: float, rows: int, reps: int) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from benchmarks.update import interleaved  # pylint: disable=import-outside-toplevel
  from hggjax import wire  # pylint: disable=import-outside-toplevel
  from hggjax.kernels import topk  # pylint: disable=import-outside-toplevel

  k = max(1, round(density * n))
  rng = np.random.default_rng(0)
  chosen = jnp.asarray(block_order(rng, n, k))[None]
  ordered = jnp.sort(chosen, axis=1)
  values = jnp.asarray(rng.standard_normal((1, k)).astype(np.float32))
  exact = wire.WireFormat()
  coded = wire.WireFormat("float8_e4m3fn", 256, "packed")
  received = {name: jnp.tile(wire.encode(values, ordered, n, fmt)[0], (rows, 1))
              for name, fmt in (("int32", exact), ("packed", coded))}
  pieces = {
      "lax.sort": (jax.jit(lambda i: jax.lax.sort(i, dimension=1, is_stable=False)), (chosen,), None),
      "sort_distinct": (jax.jit(lambda i: topk.sort_distinct(i, n)), (chosen,), None),
      "encode int32": (jax.jit(lambda v, i: wire.encode(v, i, n, exact)), (values, ordered), None),
      "encode packed": (jax.jit(lambda v, i: wire.encode(v, i, n, coded)), (values, ordered), None),
      "decode int32": (jax.jit(lambda w: wire.decode(w, k, n, jnp.float32, exact)),
                       (received["int32"],), None),
      "decode packed": (jax.jit(lambda w: wire.decode(w, k, n, jnp.float32, coded)),
                        (received["packed"],), None),
  }
  same = np.array_equal(np.asarray(pieces["sort_distinct"][0](chosen)), np.asarray(ordered))
  return {"n": n, "density": density, "k": k, "rows": rows, "sorted_equal": bool(same),
          "ms": interleaved(pieces, reps)}


def table(results: list[dict]) -> list[str]:
  names = list(results[0]["ms"])
  lines = [f"{'n':>9} {'dens':>5} {'k':>8} " + " ".join(f"{n:>14}" for n in names)]
  for r in results:
    lines.append(f"{r['n']:>9.0e} {r['density']:>5.2f} {r['k']:>8} "
                 + " ".join(f"{r['ms'][n]:>14.2f}" for n in names))
  lines.append("")
  for r in results:
    ms = r["ms"]
    lines.append(f"n={r['n']:.0e} d={r['density']:.2f}: sort_distinct {ms['sort_distinct'] / ms['lax.sort']:.2f}x "
                 f"lax.sort; encode packed {ms['encode packed'] / ms['encode int32']:.2f}x int32; "
                 f"decode of {r['rows']} rows packed {ms['decode packed'] / ms['decode int32']:.2f}x int32")
  return lines


def main(argv=None) -> int:
  args = _parse(argv)
  try:
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    densities = [float(d) for d in args.densities.split(",")]
  except ValueError:
    print(f"error: --sizes and --densities take comma-separated numbers, got {args.sizes!r} "
          f"and {args.densities!r}", file=sys.stderr)
    return 2
  if (not all(s >= 1 for s in sizes) or not all(0 < d <= 1 for d in densities)
      or args.rows < 1 or args.reps < 1):
    print("error: sizes >= 1, densities in (0, 1], --rows and --reps >= 1", file=sys.stderr)
    return 2
  from benchmarks.update import machine  # pylint: disable=import-outside-toplevel
  start = time.perf_counter()
  results = [measure(n, d, args.rows, args.reps) for n in sizes for d in densities]
  print("\n".join(table(results)))
  if not all(r["sorted_equal"] for r in results):
    print("error: sort_distinct differs from the sort", file=sys.stderr)
    return 1
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump({"machine": {**machine(), "wall_s": time.perf_counter() - start},
                 "args": vars(args), "rows": results}, f, indent=1)
    print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
