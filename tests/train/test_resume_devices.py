"""--resume on another number of devices or hosts: the per-device optimizer state is
folded or split by hggjax.reshard_state, config.json records the change, every step is
logged once."""

import dataclasses
import io
import json
import os

import hggjax
import jax
import numpy as np
import pytest

from tests.train.conftest import use_tiny_dataset
from train import checkpoint, cli, resume, steps
from train.loop import train_and_evaluate
from train.mesh import make_mesh


def _lines(log_dir):
  with open(os.path.join(log_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _template(cfg, dataset, devices, hosts=None):
  cfg = dataclasses.replace(cfg, devices=devices, hosts=hosts)
  return steps.create_train_state(cfg, dataset.image_shape, dataset.num_classes,
                                  make_mesh(devices, hosts), cfg.steps).arrays()


def test_resume_on_half_the_devices_reshards_and_logs_each_step_once(
    tiny_config, tiny_dataset, monkeypatch, capsys):
  # hggtopk with momentum correction: residual, velocity and selector carry per device.
  cfg = tiny_config(steps=8, checkpoint=True, log_every=1, eval_every=1)
  train_and_evaluate(cfg, dataset=tiny_dataset, stop_after=4, stream=io.StringIO())
  saved = checkpoint.manager(os.path.join(cfg.log_dir, "checkpoints"))
  assert saved.all_steps() == [4]

  use_tiny_dataset(monkeypatch, tiny_dataset)
  capsys.readouterr()
  assert cli.main(["--resume", "--log-dir", cfg.log_dir, "--devices", "2"]) == 0
  out = capsys.readouterr().out
  assert "resumed with devices 4 -> 2" in out, out
  assert "resharded from a device axis of 4 to 2 devices" in out, out
  with open(os.path.join(cfg.log_dir, "config.json")) as f:
    assert json.load(f)["devices"] == 2
  lines = _lines(cfg.log_dir)
  assert [e["step"] for e in lines if e["kind"] == "train"] == list(range(1, 9))
  assert [e["step"] for e in lines if e["kind"] == "eval"] == [4, 8]
  assert all(np.isfinite(e["loss"]) for e in lines if e["kind"] == "train")

  # The restored state is hggjax.reshard_state of the saved one, bit for bit: the owed
  # mean of the residuals is what the library's rule keeps (tests/hggjax/test_reshard.py).
  at_4 = checkpoint.restore(saved, 4, _template(cfg, tiny_dataset, 4))
  on_2 = checkpoint.restore(saved, 4, _template(cfg, tiny_dataset, 2),
                            adapt=lambda t: {**t, "opt_state": hggjax.reshard_state(
                                t["opt_state"], 2)})
  expected = hggjax.reshard_state(jax.device_get(at_4["opt_state"]), 2)
  residual = hggjax.compression_state(on_2["opt_state"]).residual
  assert any(r is not None and r.shape[0] == 2 for r in residual)
  for a, b in zip(jax.tree.leaves(on_2["opt_state"]), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Replicated leaves come back as saved.
  for a, b in zip(jax.tree.leaves(on_2["params"]), jax.tree.leaves(at_4["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # Another model or compressor is still another run: one line, exit 2, whatever the devices.
  for flags in (["--devices", "4", "--model", "vgg11"], ["--hosts", "2", "--compressor", "topk"]):
    assert cli.main(["--resume", "--log-dir", cfg.log_dir, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "contradicts the run" in err[0], err
    refused = err[0].split(" contradicts")[0]  # "error: --resume: <the refused flags>"
    assert "--devices" not in refused and "--hosts" not in refused, err


@pytest.mark.slow
def test_four_to_two_to_two_hosts_of_four_and_back_to_eight(tiny_config, tiny_dataset):
  """4 -> 2 -> 2 hosts x 4 -> 8 devices (one level), an epoch each; every step once. (2
  devices -> 2 hosts keeps the compressor's axis at 2: nothing to reshard there.)"""
  cfg = tiny_config(steps=16, checkpoint=True, log_every=1, keep_checkpoints=4)
  train_and_evaluate(cfg, dataset=tiny_dataset, stop_after=4, stream=io.StringIO())
  for stop, devices, hosts, line in ((8, 2, None, "devices 4 -> 2"),
                                     (12, 8, 2, "hosts None -> 2, devices 2 -> 8"),
                                     (16, 8, None, "hosts 2 -> None")):
    cfg = dataclasses.replace(resume.saved_config(cfg.log_dir), devices=devices, hosts=hosts)
    out = io.StringIO()
    summary = train_and_evaluate(cfg, dataset=tiny_dataset, resume=True, stop_after=stop,
                                 stream=out)
    assert summary["step"] == stop and f"resumed with {line}" in out.getvalue(), out.getvalue()
  train = [e["step"] for e in _lines(cfg.log_dir) if e["kind"] == "train"]
  assert train == list(range(1, 17))
  assert summary["devices"] == 8 and np.isfinite(summary["test_loss"])
