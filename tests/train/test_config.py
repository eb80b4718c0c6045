"""get_config() files and flag precedence."""

import dataclasses
import glob
import os

import pytest

from train import cli, data, models
from train.config import MODEL_NAMES, Config, load_config_file, validate
from train.errors import UsageError
from train.lm.config import LMConfig, validate_lm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_cli_model_names_match_the_registry():
  assert sorted(MODEL_NAMES) == sorted(models.MODELS)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))))
def test_shipped_configs_load_and_validate(path):
  """Language-model configs (lm_*.py) are train.lm's; the others train.cifar's."""
  import hggjax  # pylint: disable=import-outside-toplevel
  if os.path.basename(path).startswith("lm_"):
    cfg = load_config_file(path, LMConfig)
    assert type(cfg) is LMConfig  # pylint: disable=unidiomatic-typecheck
    validate_lm(cfg, hggjax.compressors)
    return
  cfg = load_config_file(path)
  assert type(cfg) is Config  # pylint: disable=unidiomatic-typecheck
  validate(cfg, hggjax.compressors, models.MODELS, data.DATASETS)


def test_a_config_file_of_the_other_command_is_refused():
  with pytest.raises(UsageError, match="must return train.config.Config or a dict"):
    load_config_file(os.path.join(ROOT, "configs", "lm_tiny.py"))
  with pytest.raises(UsageError, match="must return train.lm.config.LMConfig or a dict"):
    load_config_file(os.path.join(ROOT, "configs", "fashion_mnist_cnn.py"), LMConfig)


def test_main_job_config_is_the_embedded_default():
  cfg = load_config_file(os.path.join(ROOT, "configs", "fashion_mnist_cnn.py"))
  default = Config()
  for field in ("model", "dataset", "epochs", "batch_size", "lr", "compressor", "density",
                "momentum", "weight_decay"):
    assert getattr(cfg, field) == getattr(default, field), field


def test_dense_baseline_is_the_main_job_with_compressor_none():
  main = load_config_file(os.path.join(ROOT, "configs", "fashion_mnist_cnn.py"))
  dense = load_config_file(os.path.join(ROOT, "configs", "fashion_mnist_cnn_dense.py"))
  assert dense == dataclasses.replace(main, compressor="none")


def test_flags_override_config_file(tmp_path):
  path = tmp_path / "mine.py"
  path.write_text("def get_config():\n  return {'model': 'vgg11', 'lr': 0.2, 'epochs': 7}\n")
  args = cli.build_parser().parse_args(["--config", str(path), "--lr", "0.01"])
  cfg, resume = cli.resolve(args)
  assert (cfg.model, cfg.lr, cfg.epochs, resume) == ("vgg11", 0.01, 7, False)
  assert cfg.batch_size == Config().batch_size


def test_config_file_errors(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("def get_config():\n  return {'modle': 'cnn'}\n")
  with pytest.raises(UsageError, match="unknown config field.*modle"):
    load_config_file(str(bad))
  empty = tmp_path / "empty.py"
  empty.write_text("x = 1\n")
  with pytest.raises(UsageError, match="no get_config"):
    load_config_file(str(empty))
