"""Multi-process training: 2 processes on 127.0.0.1 (jax.distributed, gloo) vs one process.

The module is also the worker the tests launch (`python -m tests.train.test_distributed
worker ...`): each process joins through `train.distributed`, builds the harness's state
on the global mesh, feeds only its own rows of every batch and saves its parameters.
Every launch runs under a hard time limit; leftovers are killed with SIGKILL by PID.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from train import distributed
from train.config import Config
from train.errors import UsageError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMPRESSORS = ("none", "hggtopk")
STEPS = 3
BATCH = 16


def _config(compressor: str) -> Config:
  # The tiny CNN of tests/train/conftest.py; min_size=5000 compresses only its largest leaf
  # (16384 weights): one selection to compile per process keeps the test short.
  return Config(model="cnn", dataset="synthetic", steps=STEPS, batch_size=BATCH,
                compressor=compressor, density=0.1, min_size=5000, profile=False,
                checkpoint=False, seed=3)


def run_steps(cfg: Config, mesh, steps: int | None = None) -> dict[str, np.ndarray]:
  """`steps` (default `cfg.steps`) harness steps on `mesh`; this process feeds only its
  rows of each batch. Returns the parameters on the host, by path."""
  import jax  # pylint: disable=import-outside-toplevel
  from train import data
  from train import steps as steps_lib
  from train.mesh import process_rows, shard_batch
  ds = data.synthetic_dataset(64, (8, 8, 1))
  state = steps_lib.create_train_state(cfg, ds.image_shape, ds.num_classes, mesh, cfg.steps)
  step_fn = steps_lib.make_train_step(state)
  rows = process_rows(mesh, cfg.batch_size)
  for step in range(cfg.steps if steps is None else steps):
    images, labels = data.train_batch(ds, step, cfg.batch_size, cfg.seed, False, rows=rows)
    batch = shard_batch(mesh, cfg.batch_size, images, labels)
    state, _ = steps_lib.train_step(state, step_fn, *batch)
  flat, _ = jax.tree_util.tree_flatten_with_path(state.params)
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


def _launch(mode: str, out_dir: str, timeout_s: float = 150.0):
  return distributed.launch_local(
      ["-m", "tests.train.test_distributed", "worker", mode, out_dir], 2,
      timeout_s=timeout_s, cwd=REPO, env={"JAX_PLATFORMS": "cpu"})


def _describe(results) -> str:
  return "\n".join(f"--- process {r.process_id}: rc={r.returncode} after {r.seconds:.0f} s\n"
                   f"{r.stdout[-1500:]}\n{r.stderr[-3000:]}" for r in results)


def test_two_processes_train_like_one_process_with_two_devices(tmp_path):
  from train.mesh import make_mesh
  mesh = make_mesh(2)  # one process, 2 of the 8 fake devices
  # The reference compiles here while the 2 workers start and compile (mostly 1 thread each).
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    launched = pool.submit(_launch, "train", str(tmp_path))
    reference = {name: run_steps(_config(name), mesh) for name in COMPRESSORS}
    results = launched.result()
  assert [r.returncode for r in results] == [0, 0], _describe(results)

  for name in COMPRESSORS:
    expected = reference[name]
    for pid in range(2):
      with np.load(tmp_path / f"{name}-{pid}.npz") as got:
        assert sorted(got.files) == sorted(expected), name
        for leaf, value in expected.items():
          np.testing.assert_array_equal(got[leaf], value, err_msg=f"{name} process {pid} {leaf}")
    initial = run_steps(_config(name), mesh, steps=0)
    assert all(not np.array_equal(initial[leaf], expected[leaf]) for leaf in expected), name


def test_a_dead_peer_is_a_clear_error_not_a_hang(tmp_path):
  results = _launch("die", str(tmp_path), timeout_s=90.0)
  survivor, dead = results
  assert dead.returncode == 3, _describe(results)
  assert survivor.returncode == 1, _describe(results)  # not None: it was not killed
  assert "error: process 0 of 2 failed (a peer process died" in survivor.stderr, _describe(results)
  assert survivor.seconds < 60, _describe(results)


def test_launcher_kills_a_stuck_process_by_pid():
  results = distributed.launch_local(["-c", "import time; time.sleep(120)"], 2, timeout_s=1.0)
  assert [r.returncode for r in results] == [None, None]
  assert all(r.seconds < 30 for r in results)


def test_spec_from_flags_and_environment():
  env = {distributed.ENV_COORDINATOR: "10.0.0.1:1234", distributed.ENV_NUM_PROCESSES: "4",
         distributed.ENV_PROCESS_ID: "2"}
  assert distributed.spec_from(environ=env) == distributed.ProcessSpec("10.0.0.1:1234", 4, 2)
  assert distributed.spec_from(process_id=3, environ=env).process_id == 3  # flags win
  assert distributed.spec_from(environ={}) is None
  assert distributed.spec_from(num_processes=1, environ={}) is None
  for bad, match in [(dict(num_processes=2), "--coordinator HOST:PORT"),
                     (dict(num_processes=2, coordinator="h", process_id=0), "HOST:PORT"),
                     (dict(num_processes=2, coordinator="h:1", process_id=2), "0..1"),
                     (dict(process_id=1), "--num-processes")]:
    with pytest.raises(UsageError, match=match):
      distributed.spec_from(environ={}, **bad)
  with pytest.raises(UsageError, match="JAX_NUM_PROCESSES"):
    distributed.spec_from(environ={distributed.ENV_NUM_PROCESSES: "two"})


def test_two_processes_checkpoint_and_resume_bit_identically(tmp_path):
  """2 steps, checkpoint, resume for 2 more == 4 straight steps, on both processes, with
  one checkpoint directory shared by the 2 processes (each writes its own shards)."""
  results = _launch("resume", str(tmp_path), timeout_s=240.0)
  assert [r.returncode for r in results] == [0, 0], _describe(results)
  for pid in range(2):
    assert "resumed from step 2" in (tmp_path / f"split-log-{pid}.txt").read_text()
    with np.load(tmp_path / f"straight-{pid}.npz") as a, np.load(tmp_path / f"split-{pid}.npz") as b:
      assert sorted(a.files) == sorted(b.files) and len(a.files) > 10
      for leaf in a.files:
        np.testing.assert_array_equal(a[leaf], b[leaf], err_msg=f"process {pid} leaf {leaf}")
    with np.load(tmp_path / f"split-{pid}.npz") as b, np.load(tmp_path / "split-0.npz") as b0:
      for leaf in b.files:  # every process restored the same (global) state
        np.testing.assert_array_equal(b[leaf], b0[leaf])
  # The residuals are part of what matched: the restored compressor state is not trivial.
  assert json.loads((tmp_path / "split-state-0.json").read_text())["residual_nonzero"]


@pytest.mark.slow
def test_cli_two_processes_end_to_end(tmp_path):
  """`python -m train.distributed -n 2 -- -m train.cifar ...`: both processes agree and
  checkpoint into one directory."""
  log_dir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "train.distributed", "-n", "2", "--timeout", "600", "--", "-m",
       "train.cifar", "--dataset", "synthetic", "--steps", "3", "--batch-size", "16",
       "--min-size", "1000", "--density", "0.1", "--log-every", "1",
       "--log-dir", str(log_dir)],
      cwd=REPO, capture_output=True, text=True, timeout=660, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summaries = [json.loads((d / "summary.json").read_text())
               for d in (log_dir, log_dir / "process-1")]
  assert summaries[0]["devices"] == 2 and summaries[0]["step"] == 3
  for key in ("test_loss", "test_accuracy", "sent_bytes", "dense_bytes", "selected"):
    assert summaries[0][key] == summaries[1][key], key
  # One checkpoint directory for both processes, in process 0's run directory.
  assert (log_dir / "checkpoints" / "3").is_dir()
  assert not (log_dir / "process-1" / "checkpoints").exists()


# The CLI flags of the run below: 16 steps per epoch, so each segment checkpoints at its end.
SEGMENT_FLAGS = ["--dataset", "synthetic", "--batch-size", "16", "--min-size", "1000",
                 "--density", "0.1", "--log-every", "1", "--no-profile", "--seed", "3"]
WALL_CLOCK = ("samples_per_s", "steps_per_s", "eta_s", "wall_s")


def _cli(args, processes: int, timeout_s: float = 300.0):
  """`python -m train.cifar args` (through the launcher for processes > 1); its output."""
  cmd = [sys.executable, "-m", "train.cifar", *args]
  if processes > 1:
    cmd = [sys.executable, "-m", "train.distributed", "-n", str(processes), "--timeout",
           str(timeout_s), "--", "-m", "train.cifar", *args]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s + 60,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=False)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  return proc.stdout


@pytest.mark.slow  # five runs of 2, 1 and 2 processes: ~3 min on 2 cores
def test_resume_on_another_process_count_is_the_one_process_run(tmp_path, capsys):
  """2 processes -> 1 process of 4 devices -> 2 processes again, 4 steps each, against the
  same three segments in one process (2, 4, 2 devices): every logged number is the same,
  bit for bit (gloo's collectives sum as XLA's do), so the checkpoints the processes wrote
  were resharded as the one-process run resharded its own, and read back whole."""
  from train import cli  # pylint: disable=import-outside-toplevel
  reference = str(tmp_path / "one-process")
  segments = [([], 2, 4), (["--resume"], 4, 8), (["--resume"], 2, 12)]
  for flags, devices, steps in segments:
    assert cli.main([*SEGMENT_FLAGS, *flags, "--devices", str(devices), "--steps", str(steps),
                     "--log-dir", reference]) == 0
  capsys.readouterr()

  run = str(tmp_path / "processes")
  out = [_cli([*SEGMENT_FLAGS, "--steps", "4", "--log-dir", run], 2),
         _cli([*SEGMENT_FLAGS, "--resume", "--devices", "4", "--steps", "8", "--log-dir", run], 1),
         _cli([*SEGMENT_FLAGS, "--resume", "--devices", "2", "--steps", "12", "--log-dir", run],
              2)]
  assert "resharded from a device axis of 2 to 4 devices" in out[1], out[1]
  assert "resharded from a device axis of 4 to 2 devices" in out[2], out[2]
  assert "resumed from step 8" in out[2]

  def lines(log_dir):
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
      return [{k: v for k, v in json.loads(t).items() if k not in WALL_CLOCK} for t in f]
  got, expected = lines(run), lines(reference)
  assert [(e["kind"], e["step"]) for e in got] == \
      [("train", s) for s in range(1, 5)] + [("eval", 4)] + \
      [("train", s) for s in range(5, 9)] + [("eval", 8)] + \
      [("train", s) for s in range(9, 13)] + [("eval", 12)]
  # What the exchange decides is the same (every count, every byte); losses and the
  # threshold's error agree to float32 rounding: a process's matmuls split their sums over
  # threads as its own thread pool decides, unlike the devices of one process.
  for a, b in zip(got, expected):
    rounded = ("loss", "test_loss", "threshold_rel_err")
    assert {k: v for k, v in a.items() if k not in rounded} == \
        {k: v for k, v in b.items() if k not in rounded}
    for key in rounded:
      if key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-6), (a["step"], key)
  assert all(e["selected"] > 0 and e["sent_bytes"] < e["dense_bytes"]
             for e in got if e["kind"] == "train")

  # The last checkpoint, written by 2 processes, read on 4 devices of this one: the
  # library's rule applied to the state as saved, bit for bit.
  import hggjax  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from train import checkpoint, resume, steps  # pylint: disable=import-outside-toplevel
  from train.mesh import make_mesh  # pylint: disable=import-outside-toplevel
  cfg = resume.saved_config(run)
  def template(devices):
    return steps.create_train_state(dataclasses.replace(cfg, devices=devices), (28, 28, 1),
                                    10, make_mesh(devices), cfg.steps).arrays()
  saved = checkpoint.manager(os.path.join(run, "checkpoints"))
  as_saved = checkpoint.restore(saved, 12, template(2))
  on_4 = checkpoint.restore(saved, 12, template(4), adapt=lambda t: {
      **t, "opt_state": hggjax.reshard_state(t["opt_state"], 4)})
  want = hggjax.reshard_state(jax.device_get(as_saved["opt_state"]), 4)
  for a, b in zip(jax.tree.leaves(on_4["opt_state"]), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  residual = hggjax.compression_state(on_4["opt_state"]).residual
  assert any(r is not None and r.shape[0] == 4 and np.any(np.asarray(r) != 0)
             for r in jax.tree.leaves(residual))


def _resume_worker(pid: int, mesh, out_dir: str) -> None:
  """Runs "straight" (4 steps) and "split" (2, then --resume to 4), each with its own
  shared checkpoint directory; saves each run's final checkpoint as this process sees it."""
  import io  # pylint: disable=import-outside-toplevel
  import hggjax  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from train import checkpoint, data, steps  # pylint: disable=import-outside-toplevel
  from train.loop import train_and_evaluate  # pylint: disable=import-outside-toplevel
  from train.mesh import host_value  # pylint: disable=import-outside-toplevel
  ds = data.synthetic_dataset(64, (8, 8, 1))  # 4 steps per epoch: step 4 checkpoints too
  for run, calls in (("straight", [dict()]), ("split", [dict(stop_after=2), dict(resume=True)])):
    cfg = dataclasses.replace(_config("hggtopk"), steps=4, checkpoint=True, log_every=1, devices=2,
                              log_dir=os.path.join(out_dir, run, f"process-{pid}"))
    ckpt = os.path.join(out_dir, run, "checkpoints")
    log = io.StringIO()
    for kwargs in calls:
      train_and_evaluate(cfg, dataset=ds, stream=log, checkpoint_dir=ckpt, **kwargs)
    with open(os.path.join(out_dir, f"{run}-log-{pid}.txt"), "w") as f:
      f.write(log.getvalue())
    template = steps.create_train_state(cfg, ds.image_shape, ds.num_classes, mesh, 4)
    mngr = checkpoint.manager(ckpt)
    restored = checkpoint.restore(mngr, mngr.latest_step(), template.arrays())
    leaves = [host_value(x) for x in jax.tree.leaves(restored)
              if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]
    np.savez(os.path.join(out_dir, f"{run}-{pid}.npz"), **{f"{i:03d}": x for i, x in enumerate(leaves)})
    residual = hggjax.compression_state(restored["opt_state"]).residual
    nonzero = any(np.any(host_value(r) != 0) for r in jax.tree.leaves(residual))
    with open(os.path.join(out_dir, f"{run}-state-{pid}.json"), "w") as f:
      json.dump({"step": mngr.latest_step(), "residual_nonzero": bool(nonzero)}, f)


def _worker(mode: str, out_dir: str) -> None:
  spec = distributed.spec_from()
  distributed.initialize(spec, cpu_devices=1, timeout_s=60, heartbeat_s=10)
  import jax  # pylint: disable=import-outside-toplevel
  from train.mesh import make_mesh, shard_batch
  mesh = make_mesh(jax.device_count())
  try:
    if mode == "train":
      for name in COMPRESSORS:
        params = run_steps(_config(name), mesh)
        np.savez(os.path.join(out_dir, f"{name}-{spec.process_id}.npz"), **params)
    elif mode == "resume":
      _resume_worker(spec.process_id, mesh, out_dir)
    elif mode == "die":
      from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel
      total = jax.jit(jax.shard_map(lambda x: jax.lax.psum(x, "data"), mesh=mesh,
                                    in_specs=P("data"), out_specs=P()))
      x = shard_batch(mesh, 2, np.ones((1, 4), np.float32))[0]
      jax.block_until_ready(total(x))
      if spec.process_id == 1:
        os._exit(3)  # pylint: disable=protected-access
      for _ in range(600):  # ~60 s: the test wants an error well before that
        jax.block_until_ready(total(x))
        time.sleep(0.1)
  except Exception as err:  # noqa: BLE001 - what the harness's CLI does, too
    distributed.exit_on_failure(spec, err)


if __name__ == "__main__":
  assert sys.argv[1] == "worker", sys.argv
  _worker(sys.argv[2], sys.argv[3])


def test_the_launcher_names_the_process_that_died_and_how():
  code = ("import os, signal, sys, time\n"
          "if os.environ['JAX_PROCESS_ID'] == '0':\n"
          "  os.kill(os.getpid(), signal.SIGKILL)\n"
          "time.sleep(1.0)\n"
          "sys.exit(1)\n")
  proc = subprocess.run([sys.executable, "-m", "train.distributed", "-n", "2", "--", "-c", code],
                        cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
  assert proc.returncode == 128 + 9, proc.stderr  # the shell's code for SIGKILL, not 247
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 2, proc.stderr
  assert re.fullmatch(r"process 0 of 2: killed by SIGKILL \(signal 9\) after \d+ s "
                      r"\(the first to fail\)", lines[0]), lines
  assert re.fullmatch(r"process 1 of 2: exited with code 1 after \d+ s", lines[1]), lines


def test_a_process_the_launcher_killed_says_why():
  results = distributed.launch_local(["-c", "import time; time.sleep(60)"], 1, timeout_s=0.5)
  assert results[0].returncode is None
  assert distributed.describe_exit(results[0]).startswith(
      "killed by the launcher (SIGKILL) after 1 s: the time limit of 0.5 s passed")
  assert distributed.exit_code(results[0]) == 1


def test_a_peer_failure_is_one_short_line():
  spec = distributed.ProcessSpec("h:1", 2, 1)
  err = RuntimeError("INTERNAL: " + "Error dispatching computation: " * 8 +
                     "Gloo AllGather failed: Read error: Connection reset by peer\nmore")
  assert distributed.failure_message(spec, err) == (
      "error: process 1 of 2 failed (a peer process died or is unreachable; see its own "
      "output): RuntimeError: INTERNAL: Error dispatching computation: Gloo AllGather failed: "
      "Read error: Connection reset by peer")
