"""train.lm resumed on another mesh: Adam's per-device moments and the compressor's state
folded or split by hggjax.reshard_state."""

import dataclasses
import io
import json
import os

import hggjax
import jax
import numpy as np
import pytest

from train import checkpoint, logs, steps
from train.lm.harness import LMTask
from train.loop import train_and_evaluate
from train.mesh import make_mesh


@pytest.mark.slow  # two runs of the nano transformer, 8 devices: ~40 s on 2 cores
def test_four_devices_resume_as_two_hosts_of_four(lm_config, tiny_corpus):
  """4 devices -> 2 hosts x 4: the compressor's axis folds 4 -> 2 (one residual per host),
  Adam's moments are split 4 -> 8 (one per device)."""
  cfg = lm_config(checkpoint=True)
  train_and_evaluate(cfg, dataset=tiny_corpus, stop_after=2, stream=io.StringIO())
  moved = dataclasses.replace(cfg, devices=8, hosts=2)
  out = io.StringIO()
  summary = train_and_evaluate(moved, dataset=tiny_corpus, resume=True, stream=out)
  assert summary["step"] == 4 and np.isfinite(summary["valid_loss"])
  text = out.getvalue()
  assert "resumed with hosts None -> 2, devices 4 -> 8" in text, text
  assert "resharded from a device axis of 4 to 8 devices in 2 hosts" in text, text
  with open(os.path.join(cfg.log_dir, "config.json")) as f:
    assert {k: v for k, v in json.load(f).items() if k in ("devices", "hosts")} == \
        {"devices": 8, "hosts": 2}
  assert [e["step"] for e in logs.read_metrics(cfg.log_dir) if e["kind"] == "train"] == [2, 4]

  mngr = checkpoint.manager(os.path.join(cfg.log_dir, "checkpoints"))
  old = checkpoint.restore(mngr, 2, steps.init_state(
      LMTask(cfg, tiny_corpus), make_mesh(4), cfg.steps).arrays())["opt_state"]
  new = checkpoint.restore(mngr, 2, steps.init_state(
      LMTask(moved, tiny_corpus), make_mesh(8, 2), cfg.steps).arrays(),
      adapt=lambda t: {**t, "opt_state": hggjax.reshard_state(t["opt_state"], (2, 4))})
  new = new["opt_state"]
  is_adam = lambda x: isinstance(x, hggjax.AdamState)  # noqa: E731
  adam_old, adam_new = (next(s for s in jax.tree.leaves(x, is_leaf=is_adam) if is_adam(s))
                        for x in (old, new))
  for a, b in zip(jax.tree.leaves((adam_old.mu, adam_old.nu)),
                  jax.tree.leaves((adam_new.mu, adam_new.nu))):
    np.testing.assert_array_equal(np.asarray(b), np.repeat(np.asarray(a), 2, axis=0))
  res_old = [r for r in hggjax.compression_state(old).residual if r is not None]
  res_new = [r for r in hggjax.compression_state(new).residual if r is not None]
  assert res_new and all(r.shape[0] == 2 for r in res_new)
  for a, b in zip(res_old, res_new):
    a = np.asarray(a)
    np.testing.assert_array_equal(np.asarray(b), a.reshape((2, 2) + a.shape[1:])
                                  .astype(np.float64).mean(1).astype(np.float32))
