"""`hggjax.adamw`'s mechanisms side by side: one `python -m train.lm` run each, one table.

    python -m benchmarks.lm_study                          # 300 steps, seed 0 (~1.5 h on 2 cores)
    python -m benchmarks.lm_study --steps 1200 --seed 1 --runs none,hggtopk-local
    python -m benchmarks.lm_study --render benchmarks/results/lm_adamw_study_300steps_cpu.json

Every run is the embedded default (`python -m train.lm`: tiny transformer, stdlib bytes, 4
devices, hggtopk at 3% of all compressed leaves together, Adam's moments per device before
the compressor) with the flags in
`RUNS`, plus ``--steps --seed --no-checkpoint --no-profile`` and ``--log-dir
<log-dir>/<name>``. A run whose summary.json exists is read, not rerun. The table has each
run's final validation loss, its gap to the ``none`` run (standard AdamW on the mean
gradient, the baseline), and the bytes one device sends per step averaged over the run: a
shared second moment's dense refreshes count at their full size (``mean_sent_bytes``).
Extra arguments after ``--`` go to every run (e.g. ``-- --data-dir DIR``).
"""

import argparse
import json
import os
import subprocess
import sys

# float8 values with a float32 scale per 256 and Elias-Fano positions (docs/exchange.md):
# 3% of the elements cost fewer bytes than 1% in float32 + int32.
FP8_PACKED = ["--value-dtype", "float8_e4m3fn", "--scale-group", "256", "--index-coding", "packed"]

# The exact wire (float32 values, int32 positions): python -m train.lm sends float8 values
# at packed positions by default; the rows that ran with the exact wire say so.
EXACT = ["--value-dtype", "none", "--index-coding", "int32"]

# Selection per leaf: python -m train.lm selects over all compressed leaves at once by
# default; the per-leaf rows say so, so that each row's flags name its run whatever the default.
LEAF = ["--scope", "leaf"]
LEAF_EXACT = [*LEAF, *EXACT]

# Plain error feedback: python -m train.lm filters the residual by default (ScaleCom's
# low-pass filter, `--residual-lowpass 0.5`, with Adam before the compressor); the rows
# that ran without it say so (`_plain`, below).
PLAIN = ["--residual-lowpass", "1"]

RUNS = {  # name -> flags of python -m train.lm, in the table's order
    "none": ["--compressor", "none"],
    "none-adam-before": ["--compressor", "none", "--adam", "before_compression"],
    "none-lr3e-3": ["--compressor", "none", "--lr", "0.003"],
    "none-adam-before-lr3e-3": ["--compressor", "none", "--adam", "before_compression",
                                "--lr", "0.003"],
    "hggtopk-local": LEAF_EXACT,
    "hggtopk-local-d0.005": [*LEAF_EXACT, "--density", "0.005"],
    "hggtopk-local-d0.05": [*LEAF_EXACT, "--density", "0.05"],
    "hggtopk-lr3e-3": [*LEAF_EXACT, "--lr", "0.003"],
    "hggtopk-global": ["--scope", "global", *EXACT],
    "hggtopk-decay0.99": [*LEAF_EXACT, "--residual-decay", "0.99"],
    "hggtopk-d0.03-fp8": [*LEAF, "--density", "0.03", *FP8_PACKED],
    "hggtopk-decay0.99-d0.03-fp8": [*LEAF, "--residual-decay", "0.99", "--density", "0.03",
                                    *FP8_PACKED],
    "hggtopk-global-fp8": ["--scope", "global", *FP8_PACKED],
    "hggtopk-global-d0.05": ["--scope", "global", "--density", "0.05", *EXACT],
    "hggtopk-global-d0.1": ["--scope", "global", "--density", "0.1", *EXACT],
    "hggtopk-global-d0.3": ["--scope", "global", "--density", "0.3", *EXACT],
    "hggtopk-global-d1": ["--scope", "global", "--density", "1.0", *EXACT],
    "hggtopk-global-mask": ["--scope", "global", *EXACT, "--mask-momentum"],
    "hggtopk-global-warmup": ["--scope", "global", *EXACT, "--density-warmup",
                              "0.25,0.0625,0.015625", "--density-warmup-every", "25"],
    "hggtopk-global-lowpass0.5": ["--scope", "global", *EXACT, "--residual-lowpass", "0.5"],
    "hggtopk-global-lowpass0.3": ["--scope", "global", *EXACT, "--residual-lowpass", "0.3"],
    "hggtopk-global-lowpass0.7": ["--scope", "global", *EXACT, "--residual-lowpass", "0.7"],
    "hggtopk-global-fp8-lowpass0.5": ["--scope", "global", *FP8_PACKED,
                                      "--residual-lowpass", "0.5"],
    "hggtopk-global-fp8-d0.02-lowpass0.5": ["--scope", "global", "--density", "0.02",
                                            *FP8_PACKED, "--residual-lowpass", "0.5"],
    "hggtopk-global-fp8-d0.03-lowpass0.5": ["--scope", "global", "--density", "0.03",
                                            *FP8_PACKED, "--residual-lowpass", "0.5"],
    "hggtopk-global-fp8-d0.05-lowpass0.5": ["--scope", "global", "--density", "0.05",
                                            *FP8_PACKED, "--residual-lowpass", "0.5"],
    "hggtopk-global-decay0.99-d0.03-fp8": ["--scope", "global", "--residual-decay", "0.99",
                                           "--density", "0.03", *FP8_PACKED],
    "hggtopk-shared": [*LEAF_EXACT, "--second-moment", "shared"],
    "hggtopk-shared-r4": [*LEAF_EXACT, "--second-moment", "shared", "--refresh-every", "4"],
    "hggtopk-dct": [*LEAF_EXACT, "--basis", "dct"],
    "hggtopk-shared-dct": [*LEAF_EXACT, "--second-moment", "shared", "--basis", "dct"],
    "hggtopk-demo": [*LEAF_EXACT, "--method", "demo"],
    "hggtopk-demo-lr5e-4": [*LEAF_EXACT, "--method", "demo", "--lr", "0.0005"],
    "hggtopk-demo-dct": [*LEAF_EXACT, "--method", "demo", "--basis", "dct"],
    "hggtopk-demo-dct-lr5e-4": [*LEAF_EXACT, "--method", "demo", "--basis", "dct",
                                "--lr", "0.0005"],
    "hggtopk-leader": [*LEAF, "--exchange", "leader_mask"],
    "hggtopk-union": [*LEAF, "--exchange", "union_mask"],
    "hggtopk-union-d0.004": [*LEAF, "--exchange", "union_mask", "--density", "0.004"],
    "hggtopk-adam-after": [*LEAF_EXACT, "--adam", "after_exchange"],
}


# Density 1%: python -m train.lm sends 3% by default; the compressed rows that ran at
# 1% without naming a density say so (`_pinned`, below).
ONE_PERCENT = ["--density", "0.01"]


def _plain(flags: list[str]) -> list[str]:
  """`flags` with PLAIN added where the default filter would apply and the run had none:
  a compressor with Adam before it, no filter of its own, not DeMo or momentum masking."""
  filtered = not any(f in flags for f in ("--compressor", "--residual-lowpass", "--method",
                                          "--mask-momentum", "after_exchange"))
  return [*flags, *PLAIN] if filtered else flags


def _pinned(flags: list[str]) -> list[str]:
  """`flags` with ONE_PERCENT added to a compressed run that names no density."""
  return flags if "--density" in flags or "--compressor" in flags else [*flags, *ONE_PERCENT]


RUNS = {name: _pinned(_plain(flags)) for name, flags in RUNS.items()}


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--runs", default="all", help="comma-separated names of RUNS, or all")
  p.add_argument("--log-dir", default=None, help="default: logs/lm_study/<steps>steps_seed<seed>")
  p.add_argument("--out", default=None, help="JSON of the table (default: <log-dir>/study.json)")
  p.add_argument("--render", metavar="JSON", help="print the table of a saved study and exit")
  p.add_argument("extra", nargs="*", help="after --: flags for every run")
  return p.parse_args(argv)


def command(name: str, args) -> list[str]:
  return ([sys.executable, "-m", "train.lm", *RUNS[name], "--steps", str(args.steps),
           "--seed", str(args.seed), "--no-checkpoint", "--no-profile",
           "--log-dir", os.path.join(args.log_dir, name), *args.extra])


def row(name: str, log_dir: str) -> dict:
  with open(os.path.join(log_dir, name, "summary.json"), encoding="utf-8") as f:
    s = json.load(f)
  sent = s.get("mean_sent_bytes", s["sent_bytes"])
  return {"run": name, "flags": " ".join(RUNS[name]), "valid_loss": s["valid_loss"],
          "valid_bits_per_byte": s["valid_bits_per_byte"], "mean_sent_bytes": sent,
          "dense_bytes": s["dense_bytes"], "train_wall_s": s["train_wall_s"]}


def table(study: dict) -> str:
  rows = {r["run"]: r for r in study["rows"]}
  dense = rows.get("none", {}).get("valid_loss")
  lines = [f"{study['steps']} steps, seed {study['seed']}" +
           (f", extra flags `{' '.join(study['extra'])}`" if study["extra"] else ""), "",
           "| run | flags | validation loss | vs dense AdamW | bytes sent per step per device "
           "(run mean) | fewer than dense |", "|---|---|---:|---:|---:|---:|"]
  for r in study["rows"]:
    gap = "" if dense is None or r["run"] == "none" else f"{100 * (r['valid_loss'] / dense - 1):+.1f}%"
    sent = r["mean_sent_bytes"]
    size = f"{sent / 2**20:.2f} MiB" if sent >= 2**20 else f"{sent / 1024:.1f} KiB"
    lines.append(f"| {r['run']} | `{r['flags'] or '(default)'}` | {r['valid_loss']:.4f} | {gap} | "
                 f"{size} | {r['dense_bytes'] / sent:.1f}x |")
  return "\n".join(lines)


def main(argv=None) -> int:
  args = _parse(argv)
  if args.render:
    with open(args.render, encoding="utf-8") as f:
      print(table(json.load(f)))
    return 0
  names = list(RUNS) if args.runs == "all" else args.runs.split(",")
  unknown = [n for n in names if n not in RUNS]
  if unknown or args.steps < 1:
    print(f"error: unknown run(s) {', '.join(unknown)}; choose from {', '.join(RUNS)}"
          if unknown else "error: --steps must be >= 1", file=sys.stderr)
    return 2
  args.log_dir = args.log_dir or os.path.join("logs", "lm_study", f"{args.steps}steps_seed{args.seed}")
  for name in names:
    if os.path.isfile(os.path.join(args.log_dir, name, "summary.json")):
      continue
    print(f"== {name}: {' '.join(command(name, args)[1:])}", flush=True)
    done = subprocess.run(command(name, args), check=False)
    if done.returncode != 0:
      print(f"error: run {name} exited with {done.returncode}", file=sys.stderr)
      return done.returncode
  study = {"steps": args.steps, "seed": args.seed, "extra": args.extra,
           "rows": [row(n, args.log_dir) for n in names]}
  out = args.out or os.path.join(args.log_dir, "study.json")
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out, "w", encoding="utf-8") as f:
    json.dump(study, f, indent=1)
  print(table(study))
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
