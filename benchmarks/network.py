"""What compression buys on a slow network: N processes on bandwidth-shaped links.

    sudo python -m benchmarks.network --model bag   # 2 and 4 processes, 1 Gbit/s and 100 Mbit/s
    sudo python -m benchmarks.network --processes 2 --rates 1gbit --reps 2

Needs root (network namespaces, `tc`); without it, or where namespaces cannot be made,
it prints why and exits 0 without measuring.

The network: one namespace per process plus one holding a bridge; each process's
namespace has one veth link to the bridge, and both ends of every link are shaped with
`tc ... tbf` to the rate (a full-duplex port of that speed; bandwidth only: netem, for
latency, is not on this kernel). Every namespace gets its own hosts file (via
/etc/netns/<ns>/hosts) mapping this machine's hostname to its own address: gloo
advertises the address the hostname resolves to, and without it connecting fails.
Only addresses inside these namespaces are used (10.213.0.0/24, isolated from the
host). Everything made here (namespaces, hence links and qdiscs, /etc/netns entries, the
temporary directory) is removed at the end, also on failure or Ctrl-C.

The workers (`benchmarks/network_worker.py`, one per namespace, joined through
jax.distributed with gloo; process i pinned to core i mod cpus unless `--no-pin`, so
each computes on its own core as it would on its own host, with tcmalloc preloaded when
it is installed (`--malloc`) and huge pages via the launcher's GLIBC_TUNABLES) compile everything on unshaped links, then for each rate ask
for the shaping and measure: the raw exchange (dense pmean vs the packed all_gather,
`sparse_mean` and the densify alone; `sparse_mean` with the sparse_allreduce scheme) and
full train steps of a 25M-parameter model per
compressor (`--model`: `mlp`, a wide MLP, or `bag`, an embedding table whose compute
is nearly free; `benchmarks/models.py`). "ideal" is bytes per process / link rate: for
the dense mean a ring all-reduce's 2 (P-1)/P * 4n bytes, for the all_gather
(P-1) * C * 8 bytes, for sparse_allreduce what `hggjax.exchange.traffic` counts
(about 3 (P-1)/P * C * 8 bytes); its "x ag" compares its sparse_mean with the
all_gather's sparse_mean (gather + densify), the same result.

Prints a table and writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes.util
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import jax

from benchmarks.models import MODELS
from benchmarks.wire_study import add_wire_flag
from train import distributed

SUBNET = "10.213.0"
PORT = 12355  # inside process 0's fresh namespace every port is free
NETNS_ETC = "/etc/netns"
RATE_BITS = {"gbit": 1e9, "mbit": 1e6, "kbit": 1e3}
UNSHAPED = "unshaped"


def rate_bits_per_s(rate: str) -> float | None:
  """'1gbit' -> 1e9, 'unshaped' -> None."""
  if rate == UNSHAPED:
    return None
  for unit, scale in RATE_BITS.items():
    if rate.endswith(unit):
      return float(rate[:-len(unit)]) * scale
  raise ValueError(f"rate {rate!r}: use e.g. 1gbit, 100mbit, 500kbit or {UNSHAPED}")


def _sh(*cmd: str) -> None:
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip() or proc.returncode}")


class Network:
  """Namespaces joined by a bridge, with tbf on both ends of every link."""

  def __init__(self, processes: int):
    self.tag = f"hgg{os.getpid() % 100000}"
    self.bridge_ns = f"{self.tag}-br"
    self.ns = [f"{self.tag}-{i}" for i in range(processes)]
    self.made_ns: list[str] = []
    self.made_etc: list[str] = []
    self.made_netns_etc = False  # whether /etc/netns itself is ours to remove

  def address(self, i: int) -> str:
    return f"{SUBNET}.{i + 1}"

  def up(self) -> None:
    hostname = socket.gethostname()
    self.made_netns_etc = not os.path.isdir(NETNS_ETC)
    for ns in (self.bridge_ns, *self.ns):
      _sh("ip", "netns", "add", ns)
      self.made_ns.append(ns)
      _sh("ip", "-n", ns, "link", "set", "lo", "up")
    _sh("ip", "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
    _sh("ip", "-n", self.bridge_ns, "link", "set", "br0", "up")
    for i, ns in enumerate(self.ns):
      port = f"p{i}"
      _sh("ip", "-n", self.bridge_ns, "link", "add", port, "type", "veth", "peer", "name",
          "eth0", "netns", ns)
      _sh("ip", "-n", self.bridge_ns, "link", "set", port, "master", "br0")
      _sh("ip", "-n", self.bridge_ns, "link", "set", port, "up")
      _sh("ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
      _sh("ip", "-n", ns, "link", "set", "eth0", "up")
      etc = os.path.join(NETNS_ETC, ns)
      os.makedirs(etc)
      self.made_etc.append(etc)
      with open(os.path.join(etc, "hosts"), "w") as f:
        f.write(f"127.0.0.1 localhost\n{self.address(i)} {hostname}\n")

  def links(self):
    for i, ns in enumerate(self.ns):
      yield ns, "eth0"                   # process -> bridge (upload)
      yield self.bridge_ns, f"p{i}"      # bridge -> process (download)

  def shape(self, rate: str) -> None:
    bits = rate_bits_per_s(rate)
    for ns, dev in self.links():
      subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"],
                     capture_output=True, timeout=30, check=False)  # none yet: fine
      if bits is not None:
        # burst: >= one 64 KiB GSO segment and one timer tick (HZ >= 250) of data;
        # measured 975 Mbit/s through a 1gbit link with python sockets.
        burst = max(65536, int(bits / 8 / 250))
        _sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
            "rate", rate, "burst", str(burst), "latency", "200ms")

  def prefix(self, i: int) -> list[str]:
    return ["ip", "netns", "exec", self.ns[i]]

  def down(self) -> list[str]:
    """Removes everything made; returns what could not be removed."""
    left = []
    for ns in reversed(self.made_ns):  # links, bridge and qdiscs go with their namespace
      proc = subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30,
                            check=False)
      if proc.returncode:
        left.append(f"netns {ns}")
    for etc in self.made_etc:
      shutil.rmtree(etc, ignore_errors=True)
      if os.path.exists(etc):
        left.append(etc)
    if self.made_netns_etc:
      with contextlib.suppress(OSError):  # still holds others' entries: leave it
        os.rmdir(NETNS_ETC)
      self.made_netns_etc = False
    self.made_ns, self.made_etc = [], []
    return left


def cannot_run() -> str | None:
  """Why this machine cannot run the benchmark, or None."""
  if os.geteuid() != 0:
    return "needs root (network namespaces and tc): run it with sudo"
  for tool in ("ip", "tc"):
    if shutil.which(tool) is None:
      return f"needs the `{tool}` command (iproute2)"
  probe = f"hggprobe{os.getpid() % 100000}"
  proc = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True,
                        timeout=30, check=False)
  if proc.returncode:
    return f"cannot create a network namespace here: {proc.stderr.strip()}"
  subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30, check=False)
  return None


def tcmalloc(choice: str) -> str | None:
  """The tcmalloc library to preload for `--malloc` (auto: if installed), or None.

  XLA:CPU allocates each step's large temporaries (the gradient, the dense update) with
  malloc; glibc maps blocks that size fresh every call and the kernel zeroes and faults
  in their pages, tcmalloc reuses them (`benchmarks.step_local` under either allocator
  shows the difference; docs/multihost.md). apt package: libtcmalloc-minimal4.
  """
  if choice == "glibc":
    return None
  found = ctypes.util.find_library("tcmalloc_minimal")
  if found is None and choice == "tcmalloc":
    raise SystemExit("--malloc tcmalloc: libtcmalloc_minimal is not installed "
                     "(apt-get install libtcmalloc-minimal4), or pass --malloc glibc")
  return found


def run_processes(args, processes: int) -> list[dict]:
  """One run of `processes` workers over every rate; their result files."""
  net = Network(processes)
  tmp = tempfile.mkdtemp(prefix="hggjax-network-")
  try:
    net.up()
    net.shape(UNSHAPED)
    done: set[str] = set()

    def on_tick():  # the workers ask for each rate in turn (see network_worker)
      for name in os.listdir(tmp):
        if name.startswith("want-") and name not in done:
          rate = name[len("want-"):]
          net.shape(rate)
          open(os.path.join(tmp, f"set-{rate}"), "w").close()
          done.add(name)
          print(f"  {processes} processes: links at {rate}", flush=True)

    worker = ["-m", "benchmarks.network_worker", "--dir", tmp, "--phases", args.rates,
              "--n", str(args.n), "--densities", args.densities, "--compressors",
              args.compressors, "--train-density", str(args.train_density),
              "--reps", str(args.reps), "--model", args.model, "--wire", args.wire]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {"JAX_PLATFORMS": "cpu", "PYTHONPATH": repo}
    if args.preload:
      env["LD_PRELOAD"] = args.preload
    prefix = net.prefix
    if args.pin:
      # Process i on core i mod cpus: each process computes on its own core, as it
      # would on its own host, instead of two XLA thread pools fighting for both.
      cpus = os.cpu_count() or 1
      prefix = lambda i: [*net.prefix(i), "taskset", "-c", str(i % cpus)]  # noqa: E731
    results = distributed.launch_local(
        worker, processes, timeout_s=args.timeout, env=env, cwd=repo,
        coordinator=f"{net.address(0)}:{PORT}", prefix=prefix, on_tick=on_tick)
    failed = [r for r in results if r.returncode != 0]
    if failed:
      r = failed[0]
      why = "killed at the time limit" if r.returncode is None else f"exit {r.returncode}"
      raise RuntimeError(f"{processes} processes: process {r.process_id} {why}:\n"
                         f"{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    out = []
    for i in range(processes):
      with open(os.path.join(tmp, f"result-{i}.json")) as f:
        out.append(json.load(f))
    return out
  finally:
    left = net.down()
    shutil.rmtree(tmp, ignore_errors=True)
    if left:
      print(f"could not remove: {', '.join(left)}", file=sys.stderr)


def summarize(results: list[dict]) -> list[dict]:
  """Rows for the table from process 0's numbers (all processes' are in the JSON)."""
  rows = []
  r0 = results[0]
  nproc = r0["processes"]
  for phase in r0["phases"]:
    bits = rate_bits_per_s(phase["phase"])
    ex = phase["exchange"]
    dense = ex["dense"]
    ideal = (lambda b: None if bits is None else 8 * b / bits)  # noqa: E731
    rows.append({"processes": nproc, "rate": phase["phase"], "what": "exchange",
                 "method": "dense pmean", "ms": 1e3 * dense["s"],
                 "ideal_ms": _ms(ideal(dense["bytes_per_process"]))})
    for key, s in ex.items():
      if not key.startswith("sparse@"):
        continue
      rows.append({"processes": nproc, "rate": phase["phase"], "what": "exchange",
                   "method": f"all_gather {key[7:]}", "ms": 1e3 * s["all_gather_s"],
                   "ideal_ms": _ms(ideal(s["bytes_per_process"])),
                   "sparse_mean_ms": 1e3 * s["sparse_mean_s"], "densify_ms": 1e3 * s["densify_s"],
                   "vs_dense": dense["s"] / s["all_gather_s"]})
      if "sparse_allreduce_s" in s:
        rows.append({"processes": nproc, "rate": phase["phase"], "what": "exchange",
                     "method": f"sparse_ar {key[7:]}", "ms": 1e3 * s["sparse_allreduce_s"],
                     "ideal_ms": _ms(ideal(s["sparse_allreduce_bytes_per_process"])),
                     "vs_dense": dense["s"] / s["sparse_allreduce_s"],
                     "vs_all_gather_mean": s["sparse_mean_s"] / s["sparse_allreduce_s"]})
    tr = phase["train"]
    base = tr.get("none", {}).get("step_s")
    for name, s in tr.items():
      if name == "compute_only_s":
        continue
      rows.append({"processes": nproc, "rate": phase["phase"], "what": "train step",
                   "method": name, "ms": 1e3 * s["step_s"],
                   "compute_ms": 1e3 * tr["compute_only_s"],
                   "sent_mb": s["sent_bytes"] / 1e6,
                   "vs_dense": base / s["step_s"] if base else None})
  return rows


def _ms(s):
  return None if s is None else 1e3 * s


def print_table(rows: list[dict]) -> None:
  print(f"{'P':>2} {'rate':>9} {'what':<10} {'method':<16} {'ms':>9} {'ideal ms':>9} "
        f"{'x dense':>8}  notes")
  for r in rows:
    ideal = "" if r.get("ideal_ms") is None else f"{r['ideal_ms']:.1f}"
    vs = "" if r.get("vs_dense") is None else f"{r['vs_dense']:.1f}"
    notes = ""
    if "densify_ms" in r:
      notes = f"sparse_mean {r['sparse_mean_ms']:.1f} ms, densify {r['densify_ms']:.1f} ms"
    if "vs_all_gather_mean" in r:
      notes = (f"{r['vs_all_gather_mean']:.2f}x the all_gather's sparse_mean "
               "(gather + densify, the same result)")
    if "compute_ms" in r:
      notes = f"compute {r['compute_ms']:.1f} ms, sends {r['sent_mb']:.2f} MB"
    print(f"{r['processes']:>2} {r['rate']:>9} {r['what']:<10} {r['method']:<16} "
          f"{r['ms']:>9.1f} {ideal:>9} {vs:>8}  {notes}")


def _interrupt(signum, frame):
  del signum, frame
  raise KeyboardInterrupt


def _args(argv=None):
  p = argparse.ArgumentParser(prog="python -m benchmarks.network", description=__doc__.split(
      "\n\n")[0])
  p.add_argument("--processes", default="2,4", help="process counts, e.g. 2,4")
  p.add_argument("--rates", default="1gbit,100mbit",
                 help=f"link rates in tc syntax, or {UNSHAPED} (default: 1gbit,100mbit)")
  p.add_argument("--n", type=int, default=25_000_000, help="raw exchange size (elements)")
  p.add_argument("--densities", default="0.01,0.05", help="raw exchange densities")
  p.add_argument("--compressors",
                 default="none,hggtopk,hggtopk+pipeline,hggtopk+exchange=sparse_allreduce,topk,"
                         "gaussian,randomk",
                 help='train-step compressors; "hggtopk+pipeline" is hggtopk(pipeline=True), '
                      '"hggtopk+exchange=sparse_allreduce" sets that option')
  p.add_argument("--train-density", type=float, default=0.01)
  add_wire_flag(p)
  p.add_argument("--model", choices=sorted(MODELS), default="mlp",
                 help="train-step model: mlp (wide MLP) or bag (embedding table)")
  p.add_argument("--reps", type=int, default=3, help="timed calls per row (median)")
  p.add_argument("--timeout", type=float, default=3000.0,
                 help="seconds per process count before every worker is killed")
  p.add_argument("--no-pin", dest="pin", action="store_false",
                 help="do not pin process i to core i mod cpus (taskset)")
  p.add_argument("--malloc", choices=("auto", "tcmalloc", "glibc"), default="auto",
                 help="workers' allocator: tcmalloc (preloaded), glibc with huge pages, or "
                      "auto: tcmalloc when installed")
  p.add_argument("--out", default="benchmarks/results/network_cpu.json")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = _args(argv)
  for rate in args.rates.split(","):
    rate_bits_per_s(rate)  # reject a bad rate before building anything
  args.preload = tcmalloc(args.malloc)
  why = cannot_run()
  if why:
    print(f"benchmarks.network skipped: {why}")
    return 0
  # Ctrl-C or SIGTERM: unwind through the finally blocks that remove the namespaces.
  signal.signal(signal.SIGTERM, _interrupt)
  report = {"pinned": args.pin, "malloc": args.preload or "glibc (huge pages)",
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "jax": jax.__version__, "load_avg_start": os.getloadavg()},
            "command": " ".join(["python", "-m", "benchmarks.network", *(argv or sys.argv[1:])]),
            "runs": []}
  all_rows = []
  for processes in (int(p) for p in args.processes.split(",")):
    t0 = time.perf_counter()
    print(f"{processes} processes ...", flush=True)
    results = run_processes(args, processes)
    rows = summarize(results)
    all_rows += rows
    report["runs"].append({"processes": processes, "wall_s": time.perf_counter() - t0,
                           "rows": rows, "per_process": results})
  report["machine"]["load_avg_end"] = os.getloadavg()
  print_table(all_rows)
  with contextlib.suppress(FileNotFoundError):
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(report, f, indent=1)
  print(json.dumps({"rows": all_rows}))
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
