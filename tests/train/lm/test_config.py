"""LMConfig: defaults that validate, one UsageError per bad input, a light import."""

import dataclasses
import subprocess
import sys

import hggjax
import pytest

from train.config import Config
from train.errors import UsageError
from train.lm.config import LM_FIELDS, LMConfig, override, validate_lm, warmup_steps


def test_default_is_valid_on_four_devices():
  validate_lm(LMConfig(), hggjax.compressors, n_devices=4)


def test_extends_the_harness_config():
  assert {f.name for f in dataclasses.fields(Config)} < LM_FIELDS
  assert isinstance(LMConfig(), Config)
  assert all("help" in f.metadata for f in dataclasses.fields(LMConfig))


@pytest.mark.parametrize("changes, message", [
    ({"dataset": "wikitext103"}, "unknown dataset 'wikitext103'"),
    ({"model": "gpt3"}, "unknown model 'gpt3'"),
    ({"data_dir": "/nonexistent/text"}, "--data-dir /nonexistent/text does not exist"),
    ({"seq_len": 257}, "--seq-len 257 exceeds the context of tiny"),
    ({"model": "gpt2-small", "seq_len": 2048}, "exceeds the context of gpt2-small"),
    ({"batch_size": 18}, "--batch-size 18 is not divisible by the device count 4"),
    ({"eval_batch_size": 6}, "not divisible by the device count 4"),
    ({"momentum_correction": True}, "does not apply to Adam"),
    ({"adam": "inside"}, "--adam must be one of auto, before_compression, after_exchange"),
    ({"clip_after_exchange": True}, "--clip-after-exchange clips the gradient before Adam"),
    ({"bpe_dir": "/nonexistent/bpe"}, "missing encoder.json, vocab.bpe"),
    ({"warmup_steps": 1200}, "--warmup-steps 1200 must be below --steps 1200"),
    ({"b2": 1.0}, "--b2 must be in"),
    ({"clip_norm": -1.0}, "--clip-norm must be >= 0"),
    ({"eps": 0.0}, "--eps must be > 0"),
    ({"eval_windows": 0}, "--eval-windows must be >= 1"),
    ({"compute_dtype": "float16"}, "--compute-dtype must be one of"),
    ({"compressor": "zip"}, "unknown compressor"),
])
def test_bad_input_is_one_usage_error(changes, message):
  with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
    validate_lm(dataclasses.replace(LMConfig(), **changes), hggjax.compressors, n_devices=4)


@pytest.mark.parametrize("steps, expected", [(1, 0), (20, 2), (999, 99), (1200, 100),
                                             (10**5, 100)])
def test_default_warmup_scales_with_the_run(steps, expected):
  cfg = LMConfig(steps=steps)
  validate_lm(cfg, hggjax.compressors, n_devices=4)  # a short run is valid
  assert warmup_steps(cfg, steps) == expected


def test_explicit_warmup_is_kept_or_refused():
  assert warmup_steps(LMConfig(warmup_steps=7), 20) == 7
  assert warmup_steps(LMConfig(warmup_steps=0), 1) == 0
  # With --epochs the length is known only once the corpus is: refused there, not cut.
  with pytest.raises(UsageError, match="--warmup-steps 20 must be below the run's 20 steps"):
    warmup_steps(LMConfig(steps=None, warmup_steps=20), 20)


def test_lstm_takes_any_sequence_length():
  validate_lm(LMConfig(model="lstm", seq_len=4096), hggjax.compressors)


def test_override_rejects_unknown_fields():
  assert override(LMConfig(), {"seq_len": 64}).seq_len == 64
  with pytest.raises(UsageError, match="unknown config field"):
    override(LMConfig(), {"sequence_length": 64})


def test_config_import_is_light():
  code = "import train.lm, train.lm.config, train.lm.presets\nimport sys\nprint(' '.join(sys.modules))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       timeout=120)
  assert not {"jax", "flax", "numpy", "tensorflow_datasets"} & set(out.stdout.split())


@pytest.mark.parametrize("changes, message", [
    ({"method": "lion"}, "--method"),
    ({"second_moment": "global"}, "--second-moment"),
    ({"basis": "fft"}, "--basis"),
    ({"method": "demo", "second_moment": "shared"}, "keeps no second moment"),
    ({"method": "demo", "b1": 0.0}, "--b1"),
    ({"method": "demo", "residual_decay": 0.9}, "leave --residual-decay out"),
    ({"basis": "dct", "compressor": "none"}, "needs a compressor"),
    ({"second_moment": "shared", "adam": "after_exchange"}, "needs a compressor"),
    ({"refresh_every": 0}, "--refresh-every"),
    ({"freeze_after": 0}, "--freeze-after"),
    ({"mask_momentum": True, "compressor": "none"}, "needs a compressor"),
    ({"mask_momentum": True, "method": "demo"}, "--mask-momentum resets"),
    ({"mask_momentum": True, "compressor": "topk2"}, "--mask-momentum resets"),
    ({"mask_momentum": True, "residual_lowpass": 0.5}, "--mask-momentum resets"),
    ({"residual_lowpass": 0.0}, "--residual-lowpass"),
    ({"density_warmup": "0.25,x"}, "--density-warmup takes"),
    ({"density_warmup": "0.25,2"}, "--density-warmup takes"),
    ({"density_warmup": "0.25", "density_warmup_every": 0}, "--density-warmup takes"),
    ({"density_warmup": "0.25", "compressor": "none"}, "needs a compressor"),
])
def test_bad_compressed_adam_options_are_one_usage_error(changes, message):
  with pytest.raises(UsageError, match=message):
    validate_lm(dataclasses.replace(LMConfig(), **changes), hggjax.compressors, 4)


def test_compressed_adam_names_match_the_library():
  from hggjax import compressed_adam  # pylint: disable=import-outside-toplevel
  from train.lm import config  # pylint: disable=import-outside-toplevel
  assert config.METHODS == compressed_adam.METHODS
  assert config.SECOND_MOMENTS == compressed_adam.SECOND_MOMENTS
  assert config.BASES == ("none",) + compressed_adam.BASES[1:]
