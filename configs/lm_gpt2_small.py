"""GPT-2 small (124M) with GPT-2's BPE on lm1b, hggtopk at 3%, for a GPU host (not run here).

  python -m train.lm --config configs/lm_gpt2_small.py --bpe-dir DIR --data-dir DIR

--bpe-dir holds GPT-2's encoder.json and vocab.bpe (without it the text is bytes, and
the same network has 86M parameters); --data-dir is a prepared tensorflow-datasets
directory (docs/lm.md, Data).
"""

from train.lm.config import LMConfig


def get_config() -> LMConfig:
  cfg = LMConfig()  # the CPU job's optimizer and compressor, at GPT-2 small's size
  cfg.model = "gpt2-small"
  cfg.dataset = "lm1b"
  cfg.max_corpus_bytes = 100_000_000  # ~25M BPE tokens; the whole of lm1b is 4 GB of text
  cfg.seq_len = 1024  # GPT-2's context
  cfg.batch_size = 32  # global: 32k tokens per step
  cfg.steps = 20_000
  cfg.warmup_steps = 1000
  cfg.lr = 6e-4  # GPT-2 small's peak rate in most reproductions
  cfg.compute_dtype = "bfloat16"
  cfg.eval_every = 1000
  cfg.log_every = 100
  cfg.eval_batch_size = 32
  return cfg
