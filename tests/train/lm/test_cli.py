"""`python -m train.lm`: bad input is one line on stderr and exit code 2; --help has a flag
for every LMConfig field."""

import dataclasses
import os
import subprocess
import sys

import jax
import pytest

from train import cli
from train.lm.config import LMConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))


def run_lm(*args, timeout=120):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-m", "train.lm", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.parametrize("args, message", [
    (["--dataset", "wikitext103"], "unknown dataset 'wikitext103'; choose from stdlib, "
     "tiny_shakespeare, lm1b"),
    (["--data-dir", "/no/such/dir"], "--data-dir /no/such/dir does not exist"),
    (["--seq-len", "512"], "--seq-len 512 exceeds the context of tiny (256 tokens)"),
    (["--batch-size", "18", "--devices", "4"], "--batch-size 18 is not divisible by the "
     "device count 4"),
    (["--model", "gpt5"], "unknown model 'gpt5'"),
    (["--adam", "sometimes"], "--adam must be one of auto, before_compression"),
    (["--compressor", "none", "--density", "0.1"], "--density 0.1 has no effect with "
     "--compressor none"),
])
def test_bad_input_is_one_line_and_exit_code_2(args, message, capsys, tmp_path):
  """In this process: each is refused before JAX's configuration is touched."""
  assert cli.main([*args, "--log-dir", str(tmp_path / "run")], program=cli.LM) == 2
  captured = capsys.readouterr()
  lines = captured.err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
  assert not captured.out and not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("args, message", [
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--batch-size", "30", "--devices", "4"], "--batch-size 30 is not divisible by the "
     "device count 4"),
])
def test_the_command_exits_2_with_one_line(args, message, tmp_path):
  result = run_lm(*args, "--log-dir", str(tmp_path / "run"))
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], result.stderr


def test_absent_tfds_data_without_network(lm_cli, tmp_path, capsys):
  """A prepared directory that lacks the dataset: one line naming how to prepare it
  (TensorFlow is not installed here, so nothing tries the network)."""
  pytest.importorskip("tensorflow_datasets")
  assert cli.main([*lm_cli, "--dataset", "tiny_shakespeare", "--data-dir", str(tmp_path),
                   "--log-dir", str(tmp_path / "run")], program=cli.LM) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1, lines
  assert lines[0].startswith("error: tiny_shakespeare not available") and \
      "tfds build tiny_shakespeare" in lines[0]
  assert not os.path.exists(tmp_path / "run")


def test_batch_not_divisible_by_the_devices_jax_counted(lm_cli, tmp_path, capsys):
  """Without --devices the count is known only once JAX runs: still one line, exit 2."""
  counted = jax.device_count()  # starts the backend with tests/conftest.py's 8 devices
  i = lm_cli.index("--devices")
  flags = lm_cli[:i] + lm_cli[i + 2:]
  assert cli.main([*flags, "--batch-size", "6", "--log-dir", str(tmp_path / "run")],
                  program=cli.LM) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert lines == [f"error: --batch-size 6 is not divisible by the device count {counted}"]


def test_help_has_every_field():
  text = cli.build_parser(cli.LM).format_help()
  assert text.startswith("usage: python -m train.lm")
  for field in dataclasses.fields(LMConfig):
    assert "--" + field.name.replace("_", "-") in text, field.name
