"""Wire formats side by side in training: the embedded defaults, one run per format and seed.

    python -m benchmarks.wire_study                       # images, seeds 0 and 1 (~10 min on 2 cores)
    python -m benchmarks.wire_study --task lm --seeds 0   # text, 1200 steps (~35 min)
    python -m benchmarks.wire_study --render benchmarks/results/wire_study_image_cpu.json

Every run is ``python -m train.cifar`` (``--task lm``: ``python -m train.lm``) as README
runs it, with the flags in `FORMATS`, ``--seed S --no-checkpoint --no-profile`` and
``--log-dir <log-dir>/<format>-s<S>``; a run whose summary.json exists is read, not rerun.
The table has per format and seed the final metric (test accuracy, or validation loss),
its difference to the ``int32`` format of the same seed (float32 values, int32
positions), and the bytes one device sends per step (`hggjax.stats`, the coded rows plus
the leaves sent dense). Extra arguments after ``--`` go to every run.
"""

import argparse
import json
import os
import subprocess
import sys

# Wire formats by name: the compressors' options (the other benchmarks use these too).
WIRES = {
    "auto": {},  # the constructors' default: float8 + packed with error feedback
    "int32": {"value_dtype": None, "index_coding": "int32"},  # exact: the gradient's dtype
    "bf16-packed": {"value_dtype": "bfloat16", "index_coding": "packed"},
    "fp8-packed": {"value_dtype": "float8_e4m3fn", "scale_group": 256, "index_coding": "packed"},
    "fp8-e5m2-packed": {"value_dtype": "float8_e5m2", "scale_group": 256,
                        "index_coding": "packed"},
}


def add_wire_flag(parser: argparse.ArgumentParser) -> None:
  """--wire: a name in `WIRES`, for the benchmarks that build compressors themselves."""
  parser.add_argument("--wire", default="auto", choices=sorted(WIRES),
                      help="wire format of the compressed rows (auto: the compressors' "
                      "default, float8 + packed; int32: float32 values at int32 positions)")


# ... and as the harness's flags.
FORMATS = {name: [x for key, value in options.items()
                  for x in ("--" + key.replace("_", "-"), "none" if value is None else str(value))]
           for name, options in WIRES.items()}
PROGRAMS = {"image": "train.cifar", "lm": "train.lm"}
METRIC = {"image": "test_accuracy", "lm": "valid_loss"}


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--task", choices=sorted(PROGRAMS), default="image")
  p.add_argument("--seeds", default="0,1", help="comma-separated seeds")
  p.add_argument("--formats", default="int32,bf16-packed,fp8-packed",
                 help=f"comma-separated names of {', '.join(FORMATS)}")
  p.add_argument("--log-dir", default=None, help="default: logs/wire_study/<task>")
  p.add_argument("--out", default=None, help="JSON of the table (default: <log-dir>/study.json)")
  p.add_argument("--render", metavar="JSON", help="print the table of a saved study and exit")
  p.add_argument("extra", nargs="*", help="after --: flags for every run")
  return p.parse_args(argv)


def command(task: str, name: str, seed: int, log_dir: str, extra) -> list[str]:
  return [sys.executable, "-m", PROGRAMS[task], *FORMATS[name], "--seed", str(seed),
          "--no-checkpoint", "--no-profile", "--log-dir", os.path.join(log_dir, f"{name}-s{seed}"),
          *extra]


def row(task: str, name: str, seed: int, log_dir: str) -> dict:
  with open(os.path.join(log_dir, f"{name}-s{seed}", "summary.json"), encoding="utf-8") as f:
    s = json.load(f)
  return {"format": name, "seed": seed, "flags": " ".join(FORMATS[name]),
          "metric": s[METRIC[task]], "sent_bytes": s.get("mean_sent_bytes", s["sent_bytes"]),
          "dense_bytes": s["dense_bytes"], "steps": s["step"], "train_wall_s": s["train_wall_s"]}


def table(study: dict) -> str:
  task = study["task"]
  base = {r["seed"]: r for r in study["rows"] if r["format"] == "int32"}
  name = "test accuracy" if task == "image" else "validation loss"
  lines = [f"{PROGRAMS[task]}, extra flags `{' '.join(study['extra']) or '(none)'}`", "",
           f"| format | flags | seed | {name} | vs int32 | bytes sent per step per device | "
           "fewer than int32 |", "|---|---|---:|---:|---:|---:|---:|"]
  for r in study["rows"]:
    b = base.get(r["seed"])
    if task == "image":
      value = f"{100 * r['metric']:.2f}%"
      gap = "" if b is None or b is r else f"{100 * (r['metric'] - b['metric']):+.2f} points"
    else:
      value = f"{r['metric']:.4f}"
      gap = "" if b is None or b is r else f"{100 * (r['metric'] / b['metric'] - 1):+.2f}%"
    ratio = "" if b is None else f"{b['sent_bytes'] / r['sent_bytes']:.2f}x"
    lines.append(f"| {r['format']} | `{r['flags'] or '(default)'}` | {r['seed']} | {value} | "
                 f"{gap} | {r['sent_bytes'] / 1024:.1f} KiB | {ratio} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  args = _parse(argv)
  if args.render:
    with open(args.render, encoding="utf-8") as f:
      print(table(json.load(f)))
    return 0
  names = args.formats.split(",")
  unknown = [n for n in names if n not in FORMATS]
  try:
    seeds = [int(s) for s in args.seeds.split(",")]
  except ValueError:
    seeds = None
  if unknown or not seeds:
    print(f"error: unknown format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}"
          if unknown else f"error: --seeds must be comma-separated integers, got {args.seeds!r}",
          file=sys.stderr)
    return 2
  log_dir = args.log_dir or os.path.join("logs", "wire_study", args.task)
  for seed in seeds:
    for name in names:
      if os.path.isfile(os.path.join(log_dir, f"{name}-s{seed}", "summary.json")):
        continue
      cmd = command(args.task, name, seed, log_dir, args.extra)
      print(f"== {name} seed {seed}: {' '.join(cmd[1:])}", flush=True)
      done = subprocess.run(cmd, check=False)
      if done.returncode != 0:
        print(f"error: run {name} seed {seed} exited with {done.returncode}", file=sys.stderr)
        return done.returncode
  study = {"task": args.task, "extra": args.extra,
           "rows": [row(args.task, n, s, log_dir) for s in seeds for n in names]}
  out = args.out or os.path.join(log_dir, "study.json")
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out, "w", encoding="utf-8") as f:
    json.dump(study, f, indent=1)
  print(table(study))
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
