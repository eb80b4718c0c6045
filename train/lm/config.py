"""Configuration of a language-model run: `LMConfig`, its defaults and validation.

`LMConfig` extends `train.config.Config`, so everything the harness reads from a config
(devices, steps, batch size, compressor, density, min_size, logging, checkpoints) means
the same here; fields whose default differs for text are redefined below, and the
text-specific ones follow. Importing this module starts no JAX.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar

from train.config import Config, check_divisible, validate
from train.errors import UsageError
from train.lm.presets import LM_MODEL_NAMES, lm_spec

# Names here so the CLI can check them without importing numpy/TFDS; a test keeps them
# equal to train.lm.data.LM_DATASETS.
LM_DATASETS = ("stdlib", "tiny_shakespeare", "lm1b")
COMPUTE_DTYPES = ("float32", "bfloat16")
# The default warm-up is a tenth of the run up to this: the 1200-step default run warms up
# over 100 steps, a 20-step try over 2.
MAX_DEFAULT_WARMUP = 100
# Where Adam's moments are computed (docs/lm.md, "Where Adam sits").
ADAM_PLACEMENTS = ("auto", "before_compression", "after_exchange")
# hggjax.adamw's mechanisms (kept here as names so the CLI checks them without JAX;
# a test keeps them equal to hggjax.adamw's).
METHODS = ("adam", "demo")
SECOND_MOMENTS = ("local", "shared")
BASES = ("none", "dct")


def _field(default: Any, doc: str) -> Any:
  """A field with its command-line help, as train.config.Config's."""
  return dataclasses.field(default=default, metadata={"help": doc})


@dataclasses.dataclass
class LMConfig(Config):
  """Everything an LM run depends on. The default is the CPU job of docs/lm.md: the tiny
  transformer on the standard library's source as bytes, hggtopk at 3% of all compressed
  leaves together, 4 devices."""
  PROG: ClassVar[str] = "python -m train.lm"
  # --- Config fields with text defaults ---
  model: str = _field("tiny", "model: one of " + ", ".join(LM_MODEL_NAMES))
  dataset: str = _field("stdlib", "stdlib (this Python's own .py files as text, offline), "
                        "tiny_shakespeare or lm1b (tensorflow-datasets, prepared in "
                        "--data-dir)")
  steps: int | None = _field(1200, "total optimizer steps (None: --epochs over the train "
                             "split); warm-up and cosine decay scale to it")
  batch_size: int = _field(16, "global batch size in windows of --seq-len tokens, split "
                           "over the devices (divisible by their count)")
  lr: float = _field(2e-3, "peak learning rate of AdamW, reached after --warmup-steps, "
                     "then cosine decay to --lr-final x lr")
  momentum: float = _field(0.0, "unused: AdamW's --b1 is its momentum")
  weight_decay: float = _field(0.1, "AdamW's decoupled weight decay, on matrices and "
                               "embeddings only (not biases or LayerNorm scales)")
  density: float = _field(
      0.03, "share of the compressed leaves' elements sent per step, in (0, 1] (of all of "
      "them together with --scope global, of each leaf with --scope leaf); 3%: within 3% "
      "of dense AdamW's validation loss at 58x fewer bytes (docs/lm.md)")
  momentum_correction: bool = _field(
      False, "must stay off: it is DGC's SGD momentum inside the compressor; Adam keeps "
      "its own moments (--adam says where; docs/lm.md)")
  residual_lowpass: float | None = _field(
      None, "ScaleCom's low-pass filter: the residual kept is (1 - b) x the old one + b x "
      "what was not sent, for b this value; default: hggjax.adamw's, 0.5 with Adam before "
      "a compressor that keeps a residual (not with --method demo or --mask-momentum); 1: "
      "plain error feedback")
  scope: str = _field(
      "global", "global: one selection over all compressed leaves together (density x "
      "their total), so the leaves whose Adam steps are largest get more of the budget; "
      "leaf: density x each leaf's size (docs/lm.md compares them)")
  data_dir: str | None = _field(
      None, "stdlib: a directory of .py files to use instead of this Python's library; "
      "tiny_shakespeare, lm1b: a prepared tensorflow-datasets directory (default: TFDS's "
      "~/tensorflow_datasets)")
  eval_every: int = _field(200, "steps between validation evaluations (and always at the end)")
  log_every: int = _field(50, "steps between metrics.jsonl lines and progress lines")
  eval_batch_size: int = _field(64, "validation batch size in windows, divisible by the "
                                "device count")
  # --- text only ---
  seq_len: int = _field(128, "tokens per training window (at most the model's context)")
  bpe_dir: str | None = _field(
      None, "directory with GPT-2's encoder.json and vocab.bpe: tokenize with its BPE "
      "(vocabulary 50257) instead of bytes (vocabulary 256)")
  warmup_steps: int | None = _field(
      None, "linear learning-rate warm-up from 0, in steps below the run's (None: a tenth "
      f"of the run, at most {MAX_DEFAULT_WARMUP})")
  lr_final: float = _field(0.1, "final learning rate as a share of --lr")
  b1: float = _field(0.9, "AdamW's first-moment decay")
  b2: float = _field(0.95, "AdamW's second-moment decay")
  eps: float = _field(1e-8, "AdamW's epsilon")
  adam: str = _field(
      "auto", "where Adam's moments are computed: before_compression (per device, on its "
      "own gradient; the compressor sends Adam's steps, error feedback keeps what it did "
      "not send), after_exchange (standard AdamW on the exchanged mean), or auto: "
      "before_compression with a compressor, after_exchange with none (docs/lm.md)")
  method: str = _field(
      "adam", "with Adam before the compressor (hggjax.adamw): adam (Adam's step per "
      "device, compressed with error feedback) or demo (DeMo: the residual is the "
      "momentum, the step the sign of the exchanged mean)")
  second_moment: str = _field(
      "local", "local (each device's own) or shared (the devices' mean, refreshed by a "
      "dense mean after steps 1, 2, 4, ... up to --refresh-every, then every "
      "--refresh-every steps: 0/1 Adam)")
  refresh_every: int = _field(64, "the longest interval between refreshes of a shared "
                              "second moment")
  freeze_after: int | None = _field(None, "no refresh of a shared second moment from this "
                                    "step on (1-bit Adam's frozen variance; None: never "
                                    "frozen)")
  basis: str = _field("none", "none, or dct: select in chunked DCT-II coefficients (DeMo)")
  density_warmup: str = _field(
      "", "DGC's sparsity warm-up: comma-separated densities the compressor sends at "
      "first, each for --density-warmup-every steps, before --density (e.g. "
      "0.25,0.0625,0.015625; empty: none)")
  density_warmup_every: int = _field(25, "steps per density of --density-warmup")
  mask_momentum: bool = _field(
      False, "DGC's momentum factor masking: each device's Adam first moment restarts "
      "from 0 where its selection sent (hggjax.adamw's mask_momentum)")
  dct_chunk: int = _field(64, "the DCT's largest block length along an axis")
  clip_norm: float = _field(1.0, "clip gradients to this global L2 norm (0: no clipping)")
  clip_after_exchange: bool = _field(
      False, "clip the exchanged mean instead of each device's gradient before the "
      "compressor (docs/lm.md: the default keeps what error feedback stores bounded); "
      "only with Adam after the exchange")
  dropout: float = _field(0.0, "dropout rate on embeddings and residual branches (0: off)")
  eval_windows: int | None = _field(
      256, "validation windows per evaluation, spread evenly over the split (None: all)")
  max_corpus_bytes: int | None = _field(
      None, "read at most about this many bytes per split of a TFDS dataset (None: all)")
  compute_dtype: str = _field("float32", "activations' dtype: float32 or bfloat16 "
                              "(parameters stay float32)")


LM_FIELDS = {f.name for f in dataclasses.fields(LMConfig)}


def warmup_densities(cfg: LMConfig) -> tuple[float, ...]:
  """--density-warmup as numbers (ValueError when one is not a number)."""
  return tuple(float(d) for d in cfg.density_warmup.split(",") if d.strip())


def adam_placement(cfg: LMConfig) -> str:
  """`cfg.adam` with "auto" resolved: Adam before the compressor when there is one to
  correct for, standard AdamW on the mean with `none` (dense data parallelism)."""
  if cfg.adam != "auto":
    return cfg.adam
  return "after_exchange" if cfg.compressor == "none" else "before_compression"


def warmup_steps(cfg: LMConfig, total_steps: int) -> int:
  """The warm-up of a run of `total_steps`: --warmup-steps, or a tenth of the run (at most
  `MAX_DEFAULT_WARMUP`) when it is None; UsageError when an explicit one does not fit
  (with --epochs the length is known only here)."""
  if cfg.warmup_steps is None:
    return min(MAX_DEFAULT_WARMUP, total_steps // 10)
  if cfg.warmup_steps >= total_steps:
    raise UsageError(f"--warmup-steps {cfg.warmup_steps} must be below the run's "
                     f"{total_steps} steps")
  return cfg.warmup_steps


def override(cfg: LMConfig, values: dict[str, Any]) -> LMConfig:
  unknown = set(values) - LM_FIELDS
  if unknown:
    raise UsageError(f"unknown config field(s): {', '.join(sorted(unknown))}")
  return dataclasses.replace(cfg, **values)


def validate_lm(cfg: LMConfig, compressor_names, n_devices: int | None = None) -> None:
  """Checks names, ranges, paths and the sequence length against the model.

  Args:
    cfg: the resolved config.
    compressor_names: the valid --compressor values (`hggjax.compressors`).
    n_devices: when known, the batch sizes must divide over it.
  """
  validate(cfg, compressor_names, LM_MODEL_NAMES, LM_DATASETS)
  if cfg.momentum_correction:
    raise UsageError("--momentum-correction is SGD momentum inside the compressor and does "
                     "not apply to Adam, which keeps its own moments (--adam says where); "
                     "leave it off")
  if cfg.adam not in ADAM_PLACEMENTS:
    raise UsageError(f"--adam must be one of {', '.join(ADAM_PLACEMENTS)}, got {cfg.adam!r}")
  for name, allowed in (("method", METHODS), ("second_moment", SECOND_MOMENTS),
                        ("basis", BASES)):
    if getattr(cfg, name) not in allowed:
      raise UsageError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                       f"got {getattr(cfg, name)!r}")
  chosen = [f"--{flag} {getattr(cfg, name)}" for name, flag, default in (
      ("method", "method", "adam"), ("second_moment", "second-moment", "local"),
      ("basis", "basis", "none")) if getattr(cfg, name) != default]
  chosen += ["--mask-momentum"] if cfg.mask_momentum else []
  chosen += [f"--density-warmup {cfg.density_warmup}"] if cfg.density_warmup else []
  try:
    warmup = warmup_densities(cfg)
  except ValueError:
    warmup = None
  if warmup is None or not all(0 < d <= 1 for d in warmup) or cfg.density_warmup_every < 1:
    raise UsageError("--density-warmup takes comma-separated densities in (0, 1] (e.g. "
                     "0.25,0.0625) and --density-warmup-every a step count >= 1, got "
                     f"{cfg.density_warmup!r} and {cfg.density_warmup_every}")
  if chosen and (adam_placement(cfg) != "before_compression" or cfg.compressor == "none"):
    raise UsageError(f"{' '.join(chosen)} shapes what the compressor sends: it needs a "
                     "compressor and Adam before it (--adam before_compression or auto)")
  if cfg.mask_momentum:
    from hggjax.registry import ERROR_FEEDBACK  # pylint: disable=import-outside-toplevel
    if (cfg.method != "adam" or cfg.basis != "none" or cfg.residual_lowpass not in (None, 1.0)
        or cfg.compressor not in ERROR_FEEDBACK):
      raise UsageError("--mask-momentum resets Adam's first moment where the compressor "
                       "sent: it needs --method adam, --basis none, no --residual-lowpass "
                       "and a compressor with error feedback "
                       f"({', '.join(sorted(ERROR_FEEDBACK))})")
  if cfg.method == "demo" and cfg.second_moment != "local":
    raise UsageError("--method demo keeps no second moment: leave --second-moment local")
  if cfg.method == "demo" and cfg.residual_decay != 1.0:
    raise UsageError("--method demo decays the residual by --b1 (it is DeMo's momentum): "
                     "leave --residual-decay out")
  if cfg.method == "demo" and cfg.b1 == 0:
    raise UsageError("--method demo keeps its momentum in the residual, decayed by --b1: "
                     "--b1 must be above 0")
  if cfg.refresh_every < 1 or cfg.dct_chunk < 1 or cfg.dct_chunk > 4096:
    raise UsageError("--refresh-every must be >= 1 and --dct-chunk in [1, 4096], got "
                     f"{cfg.refresh_every} and {cfg.dct_chunk}")
  if cfg.freeze_after is not None and cfg.freeze_after < 1:
    raise UsageError(f"--freeze-after must be >= 1, got {cfg.freeze_after}")
  if cfg.clip_after_exchange and adam_placement(cfg) == "before_compression":
    raise UsageError("--clip-after-exchange clips the gradient before Adam, which needs "
                     "--adam after_exchange; with Adam before the compressor each device "
                     "clips its own gradient")
  context = lm_spec(cfg.model).context
  if cfg.seq_len < 1:
    raise UsageError(f"--seq-len must be >= 1, got {cfg.seq_len}")
  if context is not None and cfg.seq_len > context:
    raise UsageError(f"--seq-len {cfg.seq_len} exceeds the context of {cfg.model} "
                     f"({context} tokens)")
  if cfg.data_dir is not None and not os.path.isdir(cfg.data_dir):
    raise UsageError(f"--data-dir {cfg.data_dir} does not exist")
  if cfg.bpe_dir is not None:
    missing = [f for f in ("encoder.json", "vocab.bpe")
               if not os.path.isfile(os.path.join(cfg.bpe_dir, f))]
    if missing:
      raise UsageError(f"--bpe-dir {cfg.bpe_dir}: missing {', '.join(missing)}")
  if cfg.warmup_steps is not None and cfg.warmup_steps < 0:
    raise UsageError(f"--warmup-steps must be >= 0, got {cfg.warmup_steps}")
  if cfg.steps is not None and cfg.warmup_steps is not None and cfg.warmup_steps >= cfg.steps:
    raise UsageError(f"--warmup-steps {cfg.warmup_steps} must be below --steps {cfg.steps}")
  for name in ("b1", "b2", "dropout"):
    if not 0.0 <= getattr(cfg, name) < 1.0:
      raise UsageError(f"--{name} must be in [0, 1), got {getattr(cfg, name)}")
  if not 0.0 <= cfg.lr_final <= 1.0:
    raise UsageError(f"--lr-final must be in [0, 1], got {cfg.lr_final}")
  for name in ("eps", "clip_norm", "weight_decay"):
    if getattr(cfg, name) < 0 or (name == "eps" and cfg.eps == 0):
      raise UsageError(f"--{name.replace('_', '-')} must be {'>' if name == 'eps' else '>='}"
                       f" 0, got {getattr(cfg, name)}")
  for name in ("eval_windows", "max_corpus_bytes"):
    if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
      raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
  if cfg.compute_dtype not in COMPUTE_DTYPES:
    raise UsageError(f"--compute-dtype must be one of {', '.join(COMPUTE_DTYPES)}, got "
                     f"{cfg.compute_dtype!r}")
  if n_devices is not None:
    check_divisible(cfg, n_devices)
