"""--resume continues the same run: config.json decides what the run is, a damaged or
unfinished checkpoint gives way to the one before it, and metrics.jsonl and the
TensorBoard events hold every step once."""

import glob
import json
import os
import shutil
import struct

import jax
import numpy as np
import pytest

from tests.train.conftest import TINY_FLAGS, use_tiny_dataset
from train import checkpoint, cli, resume, steps
from train.mesh import make_mesh

# Seed and batch differ from the defaults: a resume that fell back to them would show.
RUN = TINY_FLAGS + ["--compressor", "topk", "--seed", "3", "--steps", "8", "--log-every", "1",
                    "--no-profile"]
RATES = ("samples_per_s", "steps_per_s", "eta_s", "wall_s")  # wall-clock: differ between runs


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_dataset):
  """One finished run of 8 steps (4 per epoch): checkpoints at steps 4 and 8."""
  log_dir = str(tmp_path_factory.mktemp("resume") / "run")
  with pytest.MonkeyPatch.context() as mp:
    use_tiny_dataset(mp, tiny_dataset)
    assert cli.main([*RUN, "--log-dir", log_dir]) == 0
  assert sorted(os.listdir(os.path.join(log_dir, "checkpoints"))) == ["4", "8"]
  return log_dir


def _copy(log_dir, tmp_path):
  dest = str(tmp_path / "run")
  shutil.copytree(log_dir, dest)
  return dest


def _lines(log_dir):
  with open(os.path.join(log_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _largest_file(step_dir):
  files = [p for p in glob.glob(os.path.join(step_dir, "**"), recursive=True)
           if os.path.isfile(p) and not p.endswith(checkpoint.CHECKSUMS)]
  return max(files, key=os.path.getsize)


def _scribble(step_dir):
  """4 KiB of random bytes in the middle of the largest data file."""
  path = _largest_file(step_dir)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    f.write(np.random.default_rng(0).bytes(4096))


def _truncate(step_dir):
  path = _largest_file(step_dir)
  os.truncate(path, os.path.getsize(path) // 2)


def _zero_length(step_dir):
  for path in glob.glob(os.path.join(step_dir, "**"), recursive=True):
    if os.path.isfile(path) and not path.endswith(checkpoint.CHECKSUMS):
      os.truncate(path, 0)


def _unfinished(step_dir):
  os.remove(os.path.join(step_dir, checkpoint.CHECKSUMS))  # died before the end of save


def _events(log_dir):
  """(step, what, tags) of every TensorBoard event written in `log_dir`, in file order."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  out = []
  for path in sorted(glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    i = 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[i + 12:i + 12 + n])
      out.append((event.step, event.WhichOneof("what"),
                  {v.tag for v in event.summary.value}))
      i += 12 + n + 4
  return out


def test_resume_is_the_same_run(trained, tmp_path, tiny_cli, capsys):
  del tiny_cli  # only its tiny dataset: the flags come from the run's config.json
  log_dir = _copy(trained, tmp_path)
  with open(os.path.join(log_dir, "config.json")) as f:
    config = f.read()
  first = _lines(log_dir)
  _scribble(os.path.join(log_dir, "checkpoints", "8"))
  capsys.readouterr()

  # Flags that contradict the run are refused, one line naming each; config.json stays.
  for flags, named in ((["--batch-size", "64"], "--batch-size 64 contradicts"),
                       (["--seed", "0", "--lr", "0.1"], "--seed 0, --lr 0.1 contradict"),
                       (["--compressor", "hggtopk"], "--compressor hggtopk contradicts")):
    assert cli.main(["--resume", "--log-dir", log_dir, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0] and log_dir in err[0], err
  with open(os.path.join(log_dir, "config.json")) as f:
    assert f.read() == config

  # No other flags: the run's own config (seed 3, batch 16, topk, 8 steps). The damaged
  # step 8 is refused in one line and set aside; training goes on from step 4. A logging
  # flag may change: it is said, and written to config.json.
  assert cli.main(["--resume", "--log-dir", log_dir, "--log-every", "2"]) == 0
  out = capsys.readouterr().out
  refused = [line for line in out.splitlines() if "refused" in line]
  assert len(refused) == 1 and "checkpoint of step 8 refused" in refused[0], out
  assert "does not match its checksum" in refused[0]
  assert "resumed with log_every 1 -> 2" in out and "resumed from step 4" in out
  assert "steps/s" in out and " left" in out  # progress with the rate and time left
  assert os.listdir(os.path.join(log_dir, "checkpoints-damaged")) == ["8"]
  with open(os.path.join(log_dir, "config.json")) as f:
    saved = json.load(f)
  assert saved == {**json.loads(config), "log_every": 2, "log_dir": log_dir}  # a copy

  # Every step once: the lines after the checkpoint were dropped, then logged again.
  after = _lines(log_dir)
  train = [e for e in after if e["kind"] == "train"]
  assert [e["step"] for e in train] == [1, 2, 3, 4, 6, 8]
  assert [e["step"] for e in after if e["kind"] == "eval"] == [4, 8]
  # The same run, bit for bit: steps 6 and 8 log what the uninterrupted run logged.
  before = {e["step"]: e for e in first if e["kind"] == "train"}
  for entry in train:
    same = {k: v for k, v in before[entry["step"]].items() if k not in RATES}
    assert {k: v for k, v in entry.items() if k not in RATES} == same, entry["step"]
  assert all(e["eta_s"] is not None for e in train[1:])
  # One clock for the run: the resumed segment's starts at the kept step 4 line's.
  clock = [e["wall_s"] for e in after]
  assert clock == sorted(clock) and clock[:5] == [e["wall_s"] for e in first[:5]]
  assert after[5]["wall_s"] > after[4]["wall_s"]

  # TensorBoard: events next to metrics.jsonl; the resumed writer hides steps >= 5.
  events = _events(log_dir)
  assert any("train/loss" in tags for _, what, tags in events if what == "summary")
  assert (5, "session_log", set()) in events


def test_a_run_directory_is_not_started_twice(trained, capsys):
  assert cli.main([*RUN, "--log-dir", trained]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "already holds a run: add --resume" in err[0], err


def test_resume_refuses_a_directory_without_config(tmp_path, capsys):
  assert cli.main(["--resume", "--log-dir", str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f"error: --resume: {tmp_path} has no config.json: not a run directory of "
                 "python -m train.cifar"]


@pytest.fixture(scope="module")
def template(trained, tiny_dataset):
  cfg = resume.saved_config(trained)
  state = steps.create_train_state(cfg, tiny_dataset.image_shape, tiny_dataset.num_classes,
                                   make_mesh(cfg.devices), cfg.steps)
  return state.arrays()


@pytest.mark.parametrize("damage, reason", [
    (_scribble, "does not match its checksum"),
    (_truncate, "does not match its checksum"),
    (_zero_length, "does not match its checksum"),
    (_unfinished, "no checksums.json: its save did not finish"),
])
def test_a_damaged_newest_checkpoint_gives_way_to_the_one_before(trained, template, tmp_path,
                                                                 damage, reason):
  log_dir = _copy(trained, tmp_path)
  root = os.path.join(log_dir, "checkpoints")
  damage(os.path.join(root, "8"))
  reports = []
  step, restored = checkpoint.restore_latest(checkpoint.manager(root), template, reports.append)
  assert step == 4
  assert len(reports) == 1 and reports[0].startswith("checkpoint of step 8 refused") and \
      reason in reports[0], reports
  assert sorted(os.listdir(root)) == ["4"] and os.listdir(root + "-damaged") == ["8"]
  expected = checkpoint.restore(checkpoint.manager(os.path.join(trained, "checkpoints")), 4,
                                template)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_an_empty_newer_step_directory_is_refused(trained, template, tmp_path):
  log_dir = _copy(trained, tmp_path)
  root = os.path.join(log_dir, "checkpoints")
  os.makedirs(os.path.join(root, "12"))
  reports = []
  step, _ = checkpoint.restore_latest(checkpoint.manager(root), template, reports.append)
  assert step == 8
  assert len(reports) == 1 and "checkpoint of step 12 refused" in reports[0], reports
