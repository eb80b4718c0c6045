"""The language-model CPU job: the tiny transformer on the Python standard library's own
source as bytes, 4 CPU devices, hggtopk at 3% with Adam before the compressor.

  python -m train.lm --config configs/lm_tiny.py
"""

from train.lm.config import LMConfig


def get_config() -> LMConfig:
  cfg = LMConfig()  # the embedded default of python -m train.lm is this job
  cfg.devices = 4  # 4 devices on any host, not only as the CPU default
  return cfg
