"""The CLI: every user error is one line on stderr and exit code 2; --help covers every flag."""

import dataclasses
import os
import subprocess
import sys

import hggjax
import pytest

from train import cli
from train.config import Config
from train.errors import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_cli(*args, timeout=120):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-m", "train.cifar", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.parametrize("args, message", [
    (["--model", "alexnet"], "unknown model 'alexnet'; choose from cnn, mobilenetv2, resnet18"),
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'; choose from fashion_mnist"),
    (["--compressor", "zip"], "unknown compressor 'zip'; choose from dgcsampling"),
    (["--density", "0"], "--density must be in (0, 1], got 0.0"),
    (["--density", "1.5"], "--density must be in (0, 1], got 1.5"),
    (["--epochs", "three"], "argument --epochs: invalid int value: 'three'"),
    (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    (["--resume"], "--resume needs --log-dir"),
    (["--config", "no/such/file.py"], "config file no/such/file.py does not exist"),
])
def test_flag_errors(args, message, capsys):
  """In this process: each error stops the CLI before it touches JAX's configuration."""
  assert cli.main(args) == 2
  captured = capsys.readouterr()
  lines = captured.err.strip().splitlines()
  assert len(lines) == 1, captured.err
  assert lines[0].startswith("error: ") and message in lines[0], lines[0]
  assert not captured.out


def test_use_pipeline_with_another_compressor():
  result = run_cli("--use-pipeline", "--compressor", "topk")
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: --compressor topk: pipeline= is "
                                                 "offered by hggtopk only"), result.stderr


def test_check_builds_the_compressor():
  cli.check(Config(use_pipeline=True))  # hggtopk takes it
  with pytest.raises(UsageError, match="--compressor topk: pipeline= is offered by hggtopk"):
    cli.check(Config(compressor="topk", use_pipeline=True))
  with pytest.raises(UsageError, match="--compressor hggtopk: momentum must be"):
    cli.check(Config(momentum=1.5))


def test_missing_data_says_what_to_do(tmp_path):
  result = run_cli("--data-dir", str(tmp_path), "--devices", "4", "--log-dir",
                   str(tmp_path / "run"))
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert "Fashion-MNIST not found" in lines[0] and "apt-get install -y dataset-fashion-mnist" in lines[0]


def test_missing_cifar_archive(tmp_path):
  result = run_cli("--dataset", "cifar10", "--data-dir", str(tmp_path / "nope"))
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "--data-dir" in lines[0] and "does not exist" in lines[0]


def test_batch_size_not_divisible(tmp_path):
  result = run_cli("--dataset", "synthetic", "--batch-size", "30", "--devices", "4",
                   "--log-dir", str(tmp_path / "run"))
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert lines == ["error: --batch-size 30 is not divisible by the device count 4"]


def test_help_explains_every_flag():
  result = run_cli("--help")
  assert result.returncode == 0
  flags = ["--config", "--resume", "--coordinator", "--num-processes", "--process-id"]
  for field in dataclasses.fields(Config):
    flags.append("--" + field.name.replace("_", "-"))
    if field.type in ("bool", "bool | None"):
      flags.append("--no-" + field.name.replace("_", "-"))
  for flag in flags:
    assert f" {flag}" in result.stdout, flag
  for name in hggjax.compressors:
    assert name in result.stdout, name


# Flags and the Config fields they set; together they cover every field.
FLAG_CASES = [
    (["--no-checkpoint", "--no-profile", "--batch-size", "32", "--min-size", "0",
      "--keep-checkpoints", "3", "--on-nonfinite", "skip"],
     {"checkpoint": False, "profile": False, "batch_size": 32, "min_size": 0,
      "keep_checkpoints": 3, "on_nonfinite": "skip"}),
    (["--checkpoint", "--profile", "--augment", "--use-pipeline"],
     {"checkpoint": True, "profile": True, "augment": True, "use_pipeline": True}),
    (["--no-augment", "--no-momentum-correction", "--momentum", "0.5", "--weight-decay", "0"],
     {"augment": False, "momentum_correction": False, "momentum": 0.5, "weight_decay": 0.0}),
    (["--steps", "5", "--devices", "2", "--eval-batch-size", "8", "--profile-reps", "3",
      "--synthetic-size", "32", "--lr", "0.1", "--seed", "4"],
     {"steps": 5, "devices": 2, "eval_batch_size": 8, "profile_reps": 3,
      "synthetic_size": 32, "lr": 0.1, "seed": 4}),
    (["--log-dir", "d", "--data-dir", "e", "--eval-every", "2", "--log-every", "3",
      "--model", "vgg11", "--dataset", "cifar10", "--epochs", "9", "--compressor", "topk",
      "--density", "0.5"],
     {"log_dir": "d", "data_dir": "e", "eval_every": 2, "log_every": 3, "model": "vgg11",
      "dataset": "cifar10", "epochs": 9, "compressor": "topk", "density": 0.5}),
    (["--exchange", "sparse_allreduce", "--hosts", "2"],
     {"exchange": "sparse_allreduce", "hosts": 2}),
    (["--scope", "global", "--residual-decay", "0.99"],
     {"scope": "global", "residual_decay": 0.99}),
    (["--residual-lowpass", "0.5"], {"residual_lowpass": 0.5}),
    (["--value-dtype", "float8_e4m3fn", "--scale-group", "256", "--index-coding", "packed"],
     {"value_dtype": "float8_e4m3fn", "scale_group": 256, "index_coding": "packed"}),
    (["--value-dtype", "none", "--scale-group", "None", "--index-coding", "int32"],
     {"value_dtype": None, "scale_group": None, "index_coding": "int32"}),
    (["--value-dtype", "bfloat16", "--scale-group", "auto"],
     {"value_dtype": "bfloat16", "scale_group": "auto"}),
]


@pytest.mark.parametrize("args, fields", FLAG_CASES)
def test_every_config_field_is_a_flag(args, fields):
  cfg, resume = cli.resolve(cli.build_parser().parse_args(args))
  assert not resume
  assert cfg == dataclasses.replace(Config(), **fields)


def test_flag_cases_cover_every_config_field():
  covered = {name for _, fields in FLAG_CASES for name in fields}
  assert covered == {f.name for f in dataclasses.fields(Config)}


def test_smoke_config_runs_end_to_end(tmp_path):
  """The CLI itself, with a config file and a flag overriding it."""
  log_dir = tmp_path / "run"
  result = run_cli("--config", "configs/smoke.py", "--compressor", "none", "--log-dir",
                   str(log_dir), timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "final test accuracy" in result.stdout
  assert "synthetic cnn none on 4 cpu devices" in result.stdout  # none: no density
  assert (log_dir / "metrics.jsonl").exists()


def _config_file(tmp_path, body):
  path = tmp_path / "cfg.py"
  path.write_text(body)
  return str(path)


def _file(tmp_path):
  (tmp_path / "file").write_text("x")
  return str(tmp_path / "file")


@pytest.mark.parametrize("make_args, message", [
    (lambda t: ["--log-dir", _file(t)], "is a file, not a directory"),
    (lambda t: ["--log-dir", os.path.join(_file(t), "run")], "file is a file, not a directory"),
    (lambda t: ["--log-dir", ""], "--log-dir must not be empty"),
    (lambda t: ["--seed", "-1"], "--seed must be in 0..4294967295, got -1"),
    (lambda t: ["--seed", "1" * 23], "--seed must be in 0..4294967295, got 1111"),
    (lambda t: ["--compressor", "none", "--density", "0.5"],
     "--density 0.5 has no effect with --compressor none"),
    (lambda t: ["--on-nonfinite", "ignore"], "--on-nonfinite must be one of stop, skip"),
    (lambda t: ["--keep-checkpoints", "0"], "--keep-checkpoints must be >= 1"),
    (lambda t: ["--scope", "tensor"], "--scope must be one of leaf, global"),
    (lambda t: ["--residual-decay", "0"], "--residual-decay must be in (0, 1]"),
    (lambda t: ["--config", _config_file(t, "def get_config():\n  return {'epochs': 'three'}\n")],
     "field epochs must be int, got str 'three'"),
    (lambda t: ["--config", _config_file(
        t, "from train.config import Config\n"
        "def get_config():\n  return Config(lr='0.1')\n")], "field lr must be float, got str"),
    (lambda t: ["--config", _config_file(t, "def get_config():\n  raise KeyError('data')\n")],
     "get_config() raised KeyError: 'data'"),
])
def test_more_user_errors_are_one_line(make_args, message, tmp_path, capsys):
  """Each stops before anything is created (the run directory included) or JAX starts."""
  args = make_args(tmp_path)
  if "--log-dir" not in args:
    args += ["--log-dir", str(tmp_path / "run")]
  assert cli.main(args) == 2
  captured = capsys.readouterr()
  lines = captured.err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
  assert not os.path.exists(tmp_path / "run")


def test_read_only_log_dir(tmp_path, monkeypatch, capsys):
  """As root every directory is writable, so the read-only filesystem is simulated the way
  the kernel reports it: access() refuses and statvfs() says read-only."""
  ro = str(tmp_path)
  real_access, real_statvfs = os.access, os.statvfs
  monkeypatch.setattr(os, "access", lambda p, m: False if p == ro else real_access(p, m))

  class _ReadOnly:
    f_flag = os.ST_RDONLY

  monkeypatch.setattr(os, "statvfs", lambda p: _ReadOnly() if p == ro else real_statvfs(p))
  assert cli.main(["--log-dir", os.path.join(ro, "run")]) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert lines == [f"error: --log-dir {ro}/run: {ro} is not writable (read-only filesystem)"]


def test_a_full_disk_is_one_line(tmp_path):
  """RLIMIT_FSIZE refuses writes past a size as a full disk refuses all of them."""
  import resource  # pylint: disable=import-outside-toplevel
  import signal  # pylint: disable=import-outside-toplevel
  from train import logs  # pylint: disable=import-outside-toplevel
  log = logs.RunLog(str(tmp_path / "run"))
  old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (64, old_limit[1]))
  try:
    with pytest.raises(UsageError, match=r"cannot write .*summary.json: File too large"):
      log.write_json("summary.json", {"x": "y" * 1000})
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
    signal.signal(signal.SIGXFSZ, old_handler)
  assert not os.listdir(tmp_path / "run")  # no half-written file left


def test_dense_runs_are_named_without_density():
  from train import logs  # pylint: disable=import-outside-toplevel
  name = os.path.basename(logs.default_run_dir(Config(compressor="none", seed=2)))
  assert name.startswith("fashion_mnist-cnn-none-s2-")
  assert "-d0.01-" in logs.default_run_dir(Config())
  cli.check_flags(Config(compressor="none"), {"density": 1.0})  # compare's dense run


def test_cpu_collectives_wait_longer_unless_the_user_chose(monkeypatch):
  flag = "--xla_cpu_collective_call_terminate_timeout_seconds"
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  cli.patient_cpu_collectives()
  assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {flag}=600"
  monkeypatch.setenv("XLA_FLAGS", f"{flag}=5")
  cli.patient_cpu_collectives()
  assert os.environ["XLA_FLAGS"] == f"{flag}=5"
