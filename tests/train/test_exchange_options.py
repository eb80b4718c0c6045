"""The harness's exchange options: --exchange and a two-level mesh (--hosts), 2 steps."""

import pytest

from train import logs
from train import mesh as mesh_lib
from train.config import Config, check_divisible
from train.errors import UsageError
from train.loop import train_and_evaluate


def test_two_level_mesh_and_its_axes():
  mesh = mesh_lib.make_mesh(8, hosts=2)
  assert dict(mesh.shape) == {"hosts": 2, "local": 4}
  assert mesh_lib.data_axes(mesh) == ("hosts", "local")
  assert mesh_lib.data_axes(mesh_lib.make_mesh(4)) == "data"
  with pytest.raises(UsageError, match="--hosts 3 does not divide"):
    check_divisible(Config(hosts=3), 8)


@pytest.mark.parametrize("overrides", [
    {"exchange": "sparse_allreduce"},
    {"exchange": "sparse_allreduce", "hosts": 2, "devices": 8},
])
def test_two_steps_with_the_exchange_options(overrides, tiny_config, tiny_dataset):
  cfg = tiny_config(**overrides)
  summary = train_and_evaluate(cfg, dataset=tiny_dataset)
  assert summary["step"] == 2 and summary["devices"] == cfg.devices
  train = [r for r in logs.read_metrics(cfg.log_dir) if r["kind"] == "train"]
  # Exact top-k threshold probe agrees with the compressor's (per host with --hosts).
  assert train[0]["threshold_rel_err"] < 1e-3
  assert 0 < train[0]["received_bytes"] and train[0]["sent_bytes"] < train[0]["dense_bytes"]
