"""Checkpoints: 2 steps + resume for 2 more == 4 uninterrupted steps, bit for bit; saves the
filesystem refuses; how many are kept. (Damaged checkpoints: test_resume.py.)"""

import dataclasses
import io
import os
import resource
import signal

import hggjax
import jax
import numpy as np
import pytest

from train import checkpoint, steps
from train.errors import UsageError
from train.loop import train_and_evaluate
from train.mesh import make_mesh


def _final_state(cfg, dataset):
  mesh = make_mesh(cfg.devices)
  template = steps.create_train_state(cfg, dataset.image_shape, dataset.num_classes, mesh,
                                      cfg.steps)
  mngr = checkpoint.manager(os.path.join(cfg.log_dir, "checkpoints"))
  return mngr.latest_step(), checkpoint.restore(mngr, mngr.latest_step(), template.arrays())


def test_resume_is_bit_identical(tiny_config, tiny_dataset, tmp_path):
  # 16 examples per step, 64 per epoch: step 4 also crosses an epoch (its checkpoint)
  # and the LR drops at steps 2 and 3 of 4.
  base = tiny_config(steps=4, checkpoint=True, log_every=1, compressor="hggtopk")
  straight = dataclasses.replace(base, log_dir=str(tmp_path / "straight"))
  split = dataclasses.replace(base, log_dir=str(tmp_path / "split"))

  reference = train_and_evaluate(straight, dataset=tiny_dataset, stream=io.StringIO())
  first = train_and_evaluate(split, dataset=tiny_dataset, stop_after=2, stream=io.StringIO())
  assert first["step"] == 2
  out = io.StringIO()
  second = train_and_evaluate(split, dataset=tiny_dataset, resume=True, stream=out)
  assert second["step"] == 4 and "resumed from step 2" in out.getvalue()

  step_a, a = _final_state(straight, tiny_dataset)
  step_b, b = _final_state(split, tiny_dataset)
  assert step_a == step_b == 4
  flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
  flat_b = jax.tree.leaves(b)
  assert len(flat_a) == len(flat_b)
  for (path, x), y in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=jax.tree_util.keystr(path))
  # The compressor state (residuals, history, RNG key) is part of what matched above;
  # make sure it is really there and non-trivial.
  cs = hggjax.compression_state(b["opt_state"])
  assert any(np.any(np.asarray(r) != 0) for r in jax.tree.leaves(cs.residual))
  assert np.asarray(cs.count).tolist() == [4] * 4
  np.testing.assert_array_equal(np.asarray(cs.rng_key),
                                np.asarray(hggjax.compression_state(a["opt_state"]).rng_key))
  assert second["test_loss"] == reference["test_loss"]


def test_resume_without_a_run_is_a_usage_error(tiny_config, tiny_dataset):
  cfg = tiny_config(checkpoint=True)
  with pytest.raises(UsageError, match="--resume: .* does not exist"):
    train_and_evaluate(cfg, dataset=tiny_dataset, resume=True, stream=io.StringIO())


def test_a_save_the_disk_refuses_is_one_line_and_leaves_no_temporary(tmp_path):
  """RLIMIT_FSIZE refuses the data file as a full disk would (EFBIG instead of ENOSPC)."""
  tree = {"w": jax.numpy.arange(100_000, dtype=jax.numpy.float32)}  # ~400 KB of data
  mngr = checkpoint.manager(str(tmp_path / "ckpt"), keep=2)
  checkpoint.save(mngr, 1, tree)
  old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, old_limit[1]))
  try:
    with pytest.raises(UsageError, match=r"could not save the checkpoint of step 2 in .*ckpt: "
                       "File too large$"):
      checkpoint.save(mngr, 2, tree)
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
    signal.signal(signal.SIGXFSZ, old_handler)
  assert os.listdir(tmp_path / "ckpt") == ["1"]  # no temporary, the good one intact
  assert checkpoint.verify(str(tmp_path / "ckpt" / "1")) is None
  checkpoint.save(mngr, 2, tree)  # the step can be saved once there is room
  checkpoint.save(mngr, 3, tree)
  assert sorted(os.listdir(tmp_path / "ckpt")) == ["2", "3"]  # keep=2
