"""Multi-process training on `jax.distributed`: who this process is, joining, launching.

Every process runs the same program. `jax.distributed.initialize` connects them through a
coordination service that process 0 hosts; afterwards `jax.devices()` lists every
process's devices, one global mesh spans them all, and each process feeds the rows of
the global batch that live on its own devices. Collectives between processes go over
NCCL on GPUs and over gloo (TCP) on CPUs.

A process learns its place from flags or from the environment (flags win):

  coordinator  --coordinator HOST:PORT   JAX_COORDINATOR_ADDRESS   process 0's address
  processes    --num-processes N         JAX_NUM_PROCESSES
  this one     --process-id I            JAX_PROCESS_ID            0 .. N-1

`python -m train.distributed -n 2 -- -m train.cifar ...` starts N copies of a command on
this host, each with the three variables set, and kills them all (SIGKILL, by PID) when
one fails or the time limit passes: a process stuck in a gloo connect ignores SIGTERM.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Callable, Mapping, NamedTuple, Sequence

from train.errors import UsageError

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"  # the name jax.distributed itself reads
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
# Large buffers (a 25M-element dense update is 100 MB) are fresh mmaps in XLA:CPU; with
# transparent huge pages their first touch costs ~1/3 (docs/multihost.md, measured).
HUGEPAGES_ENV = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


class ProcessSpec(NamedTuple):
  """This process's place in a multi-process run."""
  coordinator: str    # "host:port" of process 0's coordination service
  num_processes: int  # processes in the run, >= 2
  process_id: int     # this process, in [0, num_processes)


def spec_from(coordinator: str | None = None, num_processes: int | None = None,
              process_id: int | None = None,
              environ: Mapping[str, str] = os.environ) -> ProcessSpec | None:
  """The run's `ProcessSpec` from flags, falling back to the environment.

  Returns None when neither names more than one process (a single-process run). Raises
  UsageError with what to pass when the description is partial or inconsistent.
  """
  def pick(value, env: str, flag: str, parse):
    if value is not None:
      return value
    raw = environ.get(env)
    if raw is None or raw == "":
      return None
    try:
      return parse(raw)
    except ValueError:
      raise UsageError(f"{env}={raw!r} is not valid for {flag}") from None

  coordinator = pick(coordinator, ENV_COORDINATOR, "--coordinator", str)
  num_processes = pick(num_processes, ENV_NUM_PROCESSES, "--num-processes", int)
  process_id = pick(process_id, ENV_PROCESS_ID, "--process-id", int)
  if num_processes is None or num_processes == 1:
    if process_id not in (None, 0):
      raise UsageError(f"--process-id {process_id} needs --num-processes > {process_id}")
    return None
  if num_processes < 1:
    raise UsageError(f"--num-processes must be >= 1, got {num_processes}")
  if coordinator is None or process_id is None:
    raise UsageError(f"--num-processes {num_processes} also needs --coordinator HOST:PORT "
                     f"(process 0's address) and --process-id in 0..{num_processes - 1}, "
                     f"as flags or as {ENV_COORDINATOR} and {ENV_PROCESS_ID}")
  host, _, port = coordinator.rpartition(":")
  if not host or not port.isdigit():
    raise UsageError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
  if not 0 <= process_id < num_processes:
    raise UsageError(f"--process-id must be in 0..{num_processes - 1}, got {process_id}")
  return ProcessSpec(coordinator, num_processes, process_id)


def initialize(spec: ProcessSpec, *, cpu_devices: int | None = None,
               timeout_s: int = 300, heartbeat_s: int = 60) -> None:
  """Joins the run described by `spec`; call before anything touches a JAX backend.

  Args:
    spec: this process's place.
    cpu_devices: fake CPU devices for this process (CPU backend only; None leaves the
      default of one).
    timeout_s: how long to wait for every process to connect; past it JAX aborts the
      process with a message naming the coordinator (a peer that never came).
    heartbeat_s: a peer silent this long is declared dead and the run is torn down.
  """
  import jax  # pylint: disable=import-outside-toplevel
  # gloo: the CPU backend's cross-process collectives (the default "none" has none).
  # GPUs ignore it and use NCCL.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if cpu_devices is not None:
    jax.config.update("jax_num_cpu_devices", cpu_devices)
  print(f"process {spec.process_id}/{spec.num_processes}: joining {spec.coordinator} "
        f"(waiting up to {timeout_s} s for all processes)", file=sys.stderr, flush=True)
  jax.distributed.initialize(spec.coordinator, spec.num_processes, spec.process_id,
                             initialization_timeout=timeout_s,
                             heartbeat_timeout_seconds=heartbeat_s)


def broadcast_text(text: str, max_bytes: int = 1024) -> str:
  """Process 0's `text` on every process (e.g. a run directory named after the time)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  if jax.process_count() == 1:
    return text
  raw = text.encode()
  if len(raw) > max_bytes:
    raise UsageError(f"{text[:60]!r}...: longer than {max_bytes} bytes")
  buf = np.zeros(max_bytes + 1, np.int32)  # int32: what every backend can move
  buf[0], buf[1:len(raw) + 1] = len(raw), np.frombuffer(raw, np.uint8)
  buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
  return bytes(buf[1:buf[0] + 1].astype(np.uint8)).decode()


def failure_message(spec: ProcessSpec, err: BaseException) -> str:
  """One line for a failed process: its error's first line, where a message that each
  layer of dispatch prefixed again ("Error dispatching computation: " once per pending
  step) keeps each prefix once, so that the cause underneath fits."""
  parts = (str(err).strip().splitlines() or [""])[0].split(": ")
  first = ": ".join(p for i, p in enumerate(parts) if i == 0 or p != parts[i - 1])[:400]
  peers = any(s in str(err) for s in ("Gloo", "gloo", "NCCL", "Connection", "coordination"))
  hint = (" (a peer process died or is unreachable; see its own output)" if peers else "")
  return (f"error: process {spec.process_id} of {spec.num_processes} failed{hint}: "
          f"{type(err).__name__}: {first}")


def exit_on_failure(spec: ProcessSpec, err: BaseException) -> None:
  """Reports a failed multi-process run in one line and ends this process now.

  A process whose collective failed cannot leave cleanly: JAX's shutdown waits at a
  barrier for peers that may be dead (then aborts with pages of log). Exit code 1.
  """
  print(failure_message(spec, err), file=sys.stderr, flush=True)
  os._exit(1)  # pylint: disable=protected-access


def free_port(host: str = "127.0.0.1") -> int:
  """A TCP port that was free on `host` a moment ago (the OS picks it)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((host, 0))
    return s.getsockname()[1]


@dataclasses.dataclass
class ProcessResult:
  process_id: int
  returncode: int | None  # None: killed by the launcher; < 0: -signal, as subprocess has it
  stdout: str
  stderr: str
  seconds: float
  killed_because: str | None = None  # why the launcher killed it


def describe_exit(r: ProcessResult) -> str:
  """How a process ended, for a person: its exit code, or the signal that killed it."""
  if r.returncode is None:
    return f"killed by the launcher (SIGKILL) after {r.seconds:.0f} s: {r.killed_because}"
  if r.returncode < 0:
    try:
      name = signal.Signals(-r.returncode).name
    except ValueError:
      name = "signal"
    return f"killed by {name} (signal {-r.returncode}) after {r.seconds:.0f} s"
  return f"exited with code {r.returncode} after {r.seconds:.0f} s"


def exit_code(r: ProcessResult) -> int:
  """The shell's convention: the code itself, 128 + N for signal N, 1 when the launcher
  killed it."""
  if r.returncode is None:
    return 1
  return 128 - r.returncode if r.returncode < 0 else r.returncode


def launch_local(args: Sequence[str], num_processes: int, *, timeout_s: float,
                 env: Mapping[str, str] | None = None, cwd: str | None = None,
                 capture: bool = True, grace_s: float = 30.0, coordinator: str | None = None,
                 prefix: Callable[[int], list[str]] | None = None,
                 on_tick: Callable[[], None] | None = None) -> list[ProcessResult]:
  """Runs `python args...` as `num_processes` processes joined through 127.0.0.1.

  Each process gets JAX_COORDINATOR_ADDRESS (a port free at launch), JAX_NUM_PROCESSES
  and JAX_PROCESS_ID. Every process still running `timeout_s` after the launch, or
  `grace_s` after another one failed, is sent SIGKILL by PID: SIGTERM is not enough
  for a process stuck connecting to a dead peer.

  `coordinator` replaces 127.0.0.1:<free port>, `prefix(i)` is put in front of process
  i's command (e.g. ["ip", "netns", "exec", name]: it execs, so the PID stays python's),
  and `on_tick()` runs every 50 ms while the processes run.

  Returns one result per process (stdout/stderr empty when `capture` is False).
  """
  if num_processes < 1:
    raise ValueError(f"num_processes must be >= 1, got {num_processes}")
  coordinator = coordinator or f"127.0.0.1:{free_port()}"
  base = {**HUGEPAGES_ENV, **os.environ, **(env or {})}  # a user's own setting wins
  procs, files = [], []
  start = time.monotonic()
  with tempfile.TemporaryDirectory(prefix="hggjax-launch-") as tmp:
    for i in range(num_processes):
      penv = {**base, ENV_COORDINATOR: coordinator, ENV_NUM_PROCESSES: str(num_processes),
              ENV_PROCESS_ID: str(i)}
      out = err = None
      if capture:
        out = open(os.path.join(tmp, f"{i}.out"), "w+")  # files: a full pipe would block
        err = open(os.path.join(tmp, f"{i}.err"), "w+")
        files.append((out, err))
      head = prefix(i) if prefix else []
      procs.append(subprocess.Popen([*head, sys.executable, *args], env=penv, cwd=cwd,
                                    stdout=out, stderr=err, start_new_session=True))
    ended = [None] * num_processes
    deadline = start + timeout_s
    why = f"the time limit of {timeout_s:g} s passed"
    try:
      while any(e is None for e in ended):
        now = time.monotonic()
        for i, p in enumerate(procs):
          if ended[i] is None and p.poll() is not None:
            ended[i] = now - start
            if p.returncode != 0 and now + grace_s < deadline:
              deadline = now + grace_s
              why = f"still running {grace_s:g} s after process {i} failed"
        if now >= deadline:
          break
        if on_tick is not None:
          on_tick()
        time.sleep(0.05)
    finally:
      for p in procs:
        if p.poll() is None:
          os.kill(p.pid, signal.SIGKILL)
          p.wait()
    results = []
    for i, p in enumerate(procs):
      stdout = stderr = ""
      if capture:
        out, err = files[i]
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
        out.close()
        err.close()
      killed = ended[i] is None
      results.append(ProcessResult(i, None if killed else p.returncode, stdout, stderr,
                                   time.monotonic() - start if killed else ended[i],
                                   why if killed else None))
  return results


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m train.distributed",
      description="Start N processes of a Python command on this host, joined through "
      "jax.distributed on 127.0.0.1 (e.g. -n 2 -- -m train.cifar --steps 20). Every "
      "process is killed (SIGKILL) at the time limit or shortly after one fails.")
  parser.add_argument("-n", "--num-processes", type=int, required=True)
  parser.add_argument("--timeout", type=float, default=24 * 3600.0,
                      help="seconds before every process is killed (default one day)")
  parser.add_argument("args", nargs=argparse.REMAINDER,
                      help="what follows python, after --")
  ns = parser.parse_args(argv)
  args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
  if not args:
    parser.error("give the command after --, e.g. -- -m train.cifar --steps 20")
  results = launch_local(args, ns.num_processes, timeout_s=ns.timeout, capture=False)
  # The first to fail is usually the cause; the others failed or were killed after it.
  failed = sorted((r for r in results if r.returncode != 0), key=lambda r: r.seconds)
  for n, r in enumerate(failed):
    print(f"process {r.process_id} of {ns.num_processes}: {describe_exit(r)}"
          + (" (the first to fail)" if n == 0 and len(failed) > 1 else ""), file=sys.stderr)
  return exit_code(failed[0]) if failed else 0


if __name__ == "__main__":
  sys.exit(main())
