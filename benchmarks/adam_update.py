"""What `hggjax.adamw` costs per step: its whole jitted update next to optax.adamw's.

    python -m benchmarks.adam_update                       # tiny transformer shapes, ~2 min
    python -m benchmarks.adam_update --pytree gpt2-small --reps 5
    python -m benchmarks.adam_update --render benchmarks/results/adam_update_cpu.json

Per row, one optimizer's ``jax.jit(tx.update)`` with the state donated, on the parameter
shapes of a `train.lm` model (no axis: one device's work; the exchange itself is
measured by benchmarks.network): ``optax.adamw`` (dense, nothing compressed) and
``hggjax.adamw`` with hggtopk at `--density` for each mechanism (Adam's moments per
device with a local or shared second moment, the residual low-pass filtered (the
default) or not, one selection over all leaves or k per leaf, the chunked DCT, DeMo). The shared second
moment's refresh runs on the steps of its schedule only; the rows time a step between
refreshes. Times are medians of `--reps` calls interleaved call by call (load hits the
rows alike), each ending in ``block_until_ready``; the ratio column is each row over
optax.adamw's in the same run. Host memory is reused across calls as the harness does
(`hggjax.cpu_host`). Prints a table and writes JSON.
"""

import argparse
import json
import os
import platform
import sys

from benchmarks.wire_study import WIRES, add_wire_flag
from hggjax import cpu_host

ROWS = {  # name -> hggjax.adamw mechanism options (None: optax.adamw itself)
    "optax.adamw (dense)": None,
    "adam, local second moment": {},  # the default: ScaleCom's low-pass filter on
    "adam, local, plain error feedback": {"residual_lowpass": 1.0},  # ... and without it
    "adam, local, k per leaf": {"scope": "leaf"},
    "adam, shared second moment": {"second_moment": "shared"},
    "adam, local, DCT": {"basis": "dct"},
    "DeMo (sign), DCT": {"method": "demo", "basis": "dct"},
}


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--pytree", default="tiny", help="a train.lm model name (its shapes)")
  p.add_argument("--density", type=float, default=0.01)
  p.add_argument("--reps", type=int, default=9)
  add_wire_flag(p)
  p.add_argument("--out", default="benchmarks/results/adam_update.json")
  p.add_argument("--render", metavar="JSON", help="print the table of a saved run and exit")
  return p.parse_args(argv)


def model_shapes(name: str) -> dict:
  """The parameter shapes of a train.lm model with byte tokens, from its module alone."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from train.lm.models import create_lm_model  # pylint: disable=import-outside-toplevel
  abstract = nnx.eval_shape(lambda: create_lm_model(name, vocab_size=256, seed=0))
  _, params = nnx.split(abstract, nnx.Param)
  return {jax.tree_util.keystr(k): v.shape
          for k, v in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(params))[0]}


def run(args) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  import hggjax  # pylint: disable=import-outside-toplevel
  from benchmarks.update import interleaved  # pylint: disable=import-outside-toplevel

  shapes = model_shapes(args.pytree)
  n = sum(int(np.prod(s)) for s in shapes.values())
  rng = np.random.default_rng(0)
  grads = [{k: jnp.asarray(rng.standard_normal(s).astype(np.float32) * 1e-3)
            for k, s in shapes.items()} for _ in range(3)]
  params = {k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()}
  pieces, calls = {}, {"i": 0}

  def next_g():
    calls["i"] += 1
    return grads[calls["i"] % len(grads)]

  for name, options in ROWS.items():
    if options is None:
      tx = optax.adamw(1e-3, b1=0.9, b2=0.95, weight_decay=0.1)
    else:
      # A refresh every 10**6 steps: the timed calls are steps between refreshes.
      tx = hggjax.adamw(1e-3, compressor="hggtopk", density=args.density, weight_decay=0.1,
                        refresh_every=10**6, **options, **WIRES[args.wire])
    update = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p)[::-1], donate_argnums=(1,))
    state = tx.init(params)
    # Past the first steps (the shared second moment's first refreshes run there).
    for _ in range(3):
      state, _ = update(next_g(), state, params)
    pieces[name] = (update, (next_g(), state, params), lambda a, o: (next_g(), o[0], a[2]))
  times = interleaved(pieces, args.reps)
  base = times["optax.adamw (dense)"]
  rows = [{"row": name, "update_ms": ms, "vs_optax_adamw": ms / base} for name, ms in times.items()]
  return {"pytree": args.pytree, "elements": n, "density": args.density, "reps": args.reps,
          "rows": rows, "machine": {"backend": jax.default_backend(),
                                    "devices": str(jax.devices()[0].device_kind),
                                    "jax": jax.__version__, "cpus": os.cpu_count(),
                                    "python": platform.python_version(),
                                    "load_1min": os.getloadavg()[0]}}


def table(result: dict) -> str:
  lines = [f"{result['pytree']} shapes ({result['elements']:,} parameters), hggtopk at "
           f"density {result['density']}, median of {result['reps']} calls, "
           f"{result['machine']['backend']}, 1-min load {result['machine']['load_1min']:.1f}",
           "", "| optimizer | update ms | vs optax.adamw |", "|---|---:|---:|"]
  lines += [f"| {r['row']} | {r['update_ms']:.2f} | {r['vs_optax_adamw']:.2f}x |"
            for r in result["rows"]]
  return "\n".join(lines)


def main(argv=None) -> int:
  args = _parse(argv)
  if args.render:
    with open(args.render, encoding="utf-8") as f:
      print(table(json.load(f)))
    return 0
  if args.reps < 1 or not 0 < args.density <= 1:
    print("error: --reps must be >= 1 and --density in (0, 1]", file=sys.stderr)
    return 2
  cpu_host.reuse_freed_memory()
  result = run(args)
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  print(table(result))
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
