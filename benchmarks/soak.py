"""A long image run through faults: NaN gradients, SIGKILL, resume on other meshes.

    python -m benchmarks.soak                          # 20,000 steps on 4 devices
    python -m benchmarks.soak --steps 4000 --nan-steps 8 --out benchmarks/results/soak.json
    python -m benchmarks.soak --steps 16 --meshes 2 -- --dataset synthetic --batch-size 16

Two runs of `python -m train.cifar` (the image default: Fashion-MNIST, the small CNN,
hggtopk at 1%, checkpoints every epoch) with ``--on-nonfinite skip``, both with one NaN
image, so one device's NaN gradient, at the same random steps:

1. the reference: uninterrupted, on ``--devices``;
2. the soak: killed with SIGKILL and resumed with ``--resume`` on the next mesh of
   ``--meshes`` each time (``8/2``: 8 devices in 2 hosts). A kill waits until the segment
   has saved a checkpoint past the one it resumed from (so every segment makes progress),
   then a random 0..``--max-kill-delay`` seconds: it lands anywhere, mid-step,
   mid-evaluation or mid-save.

Reported (printed, and JSON in ``--out``): the final test accuracy of both and their gap
(target: within 0.3 points); whether the soak's metrics.jsonl holds every train and eval
line of the reference exactly once, and every skipped step counted once; the reference's
resident memory (VmRSS, sampled each second) and step time (1 / steps_per_s of its train
lines), median of the first quarter after warm-up against the last (target: flat within
5%); each segment of the soak. Arguments after ``--`` go to every run of train.cifar.
Exit code 1 when a run fails or a step is lost or doubled; 2 for bad arguments.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

POLL_S = 0.25    # how often the resident memory is read and the checkpoints looked at
WARMUP = 0.2     # share of the reference's samples (by time) left out as start-up


class SoakError(Exception):
  """Bad arguments: one line, exit 2."""


def _parse(argv):
  p = argparse.ArgumentParser(prog="python -m benchmarks.soak",
                              description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=20000, help="steps of each run (default 20000)")
  p.add_argument("--devices", type=int, default=4, help="devices of the reference and of "
                 "the soak's first segment (default 4)")
  p.add_argument("--meshes", default="2,8/2,8,4", help="the mesh of each resume, one per "
                 "kill: N devices, or N/H for N devices in H hosts (default 2,8/2,8,4)")
  p.add_argument("--nan-steps", type=int, default=20, help="steps whose batch holds a NaN "
                 "image (default 20)")
  p.add_argument("--max-kill-delay", type=float, default=30.0, help="a kill comes a random "
                 "0..this many seconds after the segment's first new checkpoint (default 30: "
                 "about an epoch of the default run on 2 CPU cores)")
  p.add_argument("--seed", type=int, default=0, help="seed of the runs, the NaN steps and "
                 "the kill delays (default 0)")
  p.add_argument("--work-dir", default=None, help="where both runs live (default "
                 "logs/soak/<steps>steps_seed<seed>); it must not hold a soak yet")
  p.add_argument("--out", default=None, help="the JSON report (default <work-dir>/soak.json)")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--poison", default="", help=argparse.SUPPRESS)
  p.add_argument("extra", nargs="*", help="after --: flags for every train.cifar run")
  return p.parse_args(argv)


def _mesh_flags(spec: str) -> list[str]:
  """`--devices N --hosts H|none` for a mesh spec "N" or "N/H"."""
  devices, _, hosts = spec.strip().partition("/")
  if not devices.isdigit() or int(devices) < 1 or (hosts and (not hosts.isdigit()
                                                               or int(hosts) < 1)):
    raise SoakError(f"--meshes: {spec!r} is not a mesh: give N devices or N/H (N devices "
                    "in H hosts), e.g. 2,8/2,4")
  return ["--devices", devices, "--hosts", hosts or "none"]


def _worker(args) -> int:
  """One train.cifar process whose batches at the --poison steps hold a NaN image."""
  from train import cli, data  # pylint: disable=import-outside-toplevel
  poisoned = {int(s) for s in args.poison.split(",") if s}
  real = data.train_batch

  def batch(ds, step, *a, **kw):
    images, labels = real(ds, step, *a, **kw)
    if step in poisoned:  # row 0: the first device's rows, so one device's gradient
      images = images.copy()
      images[0] = np.nan
    return images, labels

  data.train_batch = batch
  return cli.main(args.extra)


def _rss_kib(pid: int) -> int | None:
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1])
  except OSError:
    return None
  return None


def _newest_checkpoint(log_dir: str) -> int | None:
  """The newest step whose save finished (its checksums.json exists)."""
  root = os.path.join(log_dir, "checkpoints")
  steps = [int(n) for n in os.listdir(root) if n.isdigit()
           and os.path.isfile(os.path.join(root, n, "checksums.json"))] \
      if os.path.isdir(root) else []
  return max(steps, default=None)


def _segment(flags, poison, log_dir, output, rng=None, after=None, delay=0.0) -> dict:
  """Runs one train.cifar process; with `rng`, SIGKILLs it a random 0..`delay` seconds
  after it has saved a checkpoint past `after`. Returns what happened and its memory."""
  cmd = [sys.executable, "-m", "benchmarks.soak", "--worker",
         "--poison", ",".join(map(str, poison)), "--", *flags, "--log-dir", log_dir]
  t0 = time.monotonic()
  with open(output, "a") as out:
    out.write(f"$ {' '.join(cmd)}\n")
    out.flush()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
  samples, kill_at, saved = [], None, None
  while proc.poll() is None:
    now = time.monotonic() - t0
    rss = _rss_kib(proc.pid)
    if rss is not None:
      samples.append((round(now, 2), rss))
    if rng is not None and kill_at is None:
      saved = _newest_checkpoint(log_dir)
      if saved is not None and (after is None or saved > after):
        kill_at = now + float(rng.uniform(0.0, delay))
    if kill_at is not None and now >= kill_at:
      os.kill(proc.pid, signal.SIGKILL)
      proc.wait()
      break
    time.sleep(POLL_S)
  killed = proc.returncode == -signal.SIGKILL
  return {"flags": flags, "killed": killed, "returncode": proc.returncode,
          "wall_s": round(time.monotonic() - t0, 1), "checkpoint_before_kill": saved,
          "rss_kib": samples}


def _quarters(values: list[float]) -> tuple[float | None, float | None, float | None]:
  """(median of the first quarter, of the last, last / first - 1)."""
  if len(values) < 4:
    return None, None, None
  q = len(values) // 4
  first, last = float(np.median(values[:q])), float(np.median(values[-q:]))
  return first, last, (last / first - 1.0) if first else None


def _lines(log_dir: str) -> list[dict]:
  with open(os.path.join(log_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def _summary(log_dir: str) -> dict:
  with open(os.path.join(log_dir, "summary.json")) as f:
    return json.load(f)


def _step_times(lines: list[dict]) -> list[float]:
  return [1.0 / e["steps_per_s"] for e in lines if e["kind"] == "train" and e.get("steps_per_s")]


def _flat(reference_seg: dict, reference_lines: list[dict]) -> dict:
  samples = reference_seg["rss_kib"]
  start = WARMUP * (samples[-1][0] if samples else 0.0)
  rss = [kib for t, kib in samples if t >= start]
  times = _step_times(reference_lines)
  times = times[max(1, int(len(times) * WARMUP // 2)):]  # the first line holds compilation
  r_first, r_last, r_change = _quarters(rss)
  t_first, t_last, t_change = _quarters(times)
  return {"rss_mib_first_quarter": r_first and r_first / 1024,
          "rss_mib_last_quarter": r_last and r_last / 1024, "rss_change": r_change,
          "step_ms_first_quarter": t_first and t_first * 1e3,
          "step_ms_last_quarter": t_last and t_last * 1e3, "step_time_change": t_change}


def _check_args(args) -> None:
  if args.steps < 1:
    raise SoakError(f"--steps must be >= 1, got {args.steps}")
  if args.max_kill_delay < 0:
    raise SoakError(f"--max-kill-delay must be >= 0, got {args.max_kill_delay}")
  if args.devices < 1:
    raise SoakError(f"--devices must be >= 1, got {args.devices}")
  if not 0 <= args.nan_steps <= args.steps:
    raise SoakError(f"--nan-steps must be in 0..--steps ({args.steps}), got {args.nan_steps}")
  if any(a in ("--log-dir", "--resume", "--devices", "--hosts", "--steps", "--on-nonfinite")
         for a in args.extra):
    raise SoakError("flags after -- may not set --log-dir, --resume, --devices, --hosts, "
                    "--steps or --on-nonfinite: the soak sets them")


def run(args) -> dict:
  """Both runs and the report (module docstring)."""
  _check_args(args)
  meshes = [_mesh_flags(m) for m in args.meshes.split(",") if m.strip()]
  work = args.work_dir or os.path.join("logs", "soak", f"{args.steps}steps_seed{args.seed}")
  ref_dir, soak_dir = os.path.join(work, "reference"), os.path.join(work, "soak")
  if os.path.exists(ref_dir) or os.path.exists(soak_dir):
    raise SoakError(f"{work} already holds a soak (reference/ or soak/): pass another "
                    "--work-dir or remove it")
  os.makedirs(work, exist_ok=True)
  rng = np.random.default_rng(args.seed)
  poison = sorted(int(s) for s in rng.choice(args.steps, args.nan_steps, replace=False))
  base = ["--steps", str(args.steps), "--seed", str(args.seed), "--on-nonfinite", "skip",
          "--no-profile", *args.extra]
  output = os.path.join(work, "output.txt")
  first = _mesh_flags(str(args.devices))

  print(f"reference: {args.steps} steps on {args.devices} devices, NaN at steps "
        f"{', '.join(str(s + 1) for s in poison)}", flush=True)
  reference = _segment(base + first, poison, ref_dir, output)
  if reference["returncode"] != 0:
    raise RuntimeError(f"the reference run failed (exit {reference['returncode']}); see {output}")

  segments = []
  after = None
  for i, mesh in enumerate([first] + meshes):
    last = i == len(meshes)
    flags = base + mesh + (["--resume"] if i else [])
    seg = _segment(flags, poison, soak_dir, output, rng=None if last else rng, after=after,
                   delay=args.max_kill_delay)
    segments.append(seg)
    ended = "killed" if seg["killed"] else f"exit {seg['returncode']}"
    print(f"soak segment {i + 1}: {' '.join(mesh)}: {ended} after {seg['wall_s']} s",
          flush=True)
    if not seg["killed"] and seg["returncode"] != 0:
      raise RuntimeError(f"soak segment {i + 1} failed (exit {seg['returncode']}); see {output}")
    if not seg["killed"]:
      break  # finished before its kill: the run is done
    after = _newest_checkpoint(soak_dir)  # what the next segment resumes from
  if segments[-1]["killed"]:  # every mesh was used up by kills: finish on the last one
    segments.append(_segment(base + meshes[-1] + ["--resume"], poison, soak_dir, output))
    if segments[-1]["returncode"] != 0:
      raise RuntimeError(f"the soak's last segment failed; see {output}")

  ref_lines, soak_lines = _lines(ref_dir), _lines(soak_dir)
  key = lambda e: (e["kind"], e["step"])  # noqa: E731
  ref_keys = [key(e) for e in ref_lines]
  soak_keys = [key(e) for e in soak_lines]
  ref_acc, soak_acc = (_summary(d)["test_accuracy"] for d in (ref_dir, soak_dir))
  nonfinite = [sum(e.get("nonfinite_steps") or 0 for e in lines if e["kind"] == "train")
               for lines in (ref_lines, soak_lines)]
  report = {
      "steps": args.steps, "devices": args.devices, "meshes": args.meshes, "seed": args.seed,
      "nan_steps": [s + 1 for s in poison], "extra_flags": args.extra,
      "command": "python -m benchmarks.soak " + " ".join(
          a for a in sys.argv[1:] if a != "--worker"),
      "reference_test_accuracy": ref_acc, "soak_test_accuracy": soak_acc,
      "accuracy_gap_points": 100.0 * (soak_acc - ref_acc),
      "every_line_once": soak_keys == ref_keys,
      "lost_lines": sorted(set(ref_keys) - set(soak_keys)),
      "doubled_lines": sorted({k for k in soak_keys if soak_keys.count(k) > 1}),
      "nonfinite_steps_counted": {"reference": nonfinite[0], "soak": nonfinite[1]},
      "kills": sum(s["killed"] for s in segments),
      "reference_flatness": _flat(reference, ref_lines),
      "reference_wall_s": reference["wall_s"],
      "segments": [{"flags": " ".join(s["flags"][len(base):]), "killed": s["killed"],
                    "wall_s": s["wall_s"],
                    "rss_mib_max": max((k for _, k in s["rss_kib"]), default=0) / 1024}
                   for s in segments],
  }
  with open(args.out or os.path.join(work, "soak.json"), "w") as f:
    json.dump(report, f, indent=2, sort_keys=True)
  return report


def _describe(r: dict) -> str:
  flat = r["reference_flatness"]
  pct = lambda x: "n/a" if x is None else f"{100 * x:+.1f}%"  # noqa: E731
  return "\n".join([
      f"final test accuracy: soak {100 * r['soak_test_accuracy']:.2f}% vs uninterrupted "
      f"{100 * r['reference_test_accuracy']:.2f}% ({r['accuracy_gap_points']:+.2f} points), "
      f"{r['kills']} kills",
      f"metrics.jsonl: every line once: {r['every_line_once']} (lost {len(r['lost_lines'])}, "
      f"doubled {len(r['doubled_lines'])}); non-finite steps counted "
      f"{r['nonfinite_steps_counted']['soak']} (reference "
      f"{r['nonfinite_steps_counted']['reference']}, injected {len(r['nan_steps'])})",
      f"uninterrupted run, first vs last quarter: resident memory {pct(flat['rss_change'])}, "
      f"step time {pct(flat['step_time_change'])}"])


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    args = _parse(argv)
    if args.worker:
      return _worker(args)
    report = run(args)
  except SoakError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  except RuntimeError as err:
    print(f"error: {err}", file=sys.stderr)
    return 1
  print(_describe(report))
  return 0 if report["every_line_once"] else 1


if __name__ == "__main__":
  sys.exit(main())
