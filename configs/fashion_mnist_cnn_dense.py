"""The main job's dense baseline: same run with `--compressor none`.

  python -m train.cifar --config configs/fashion_mnist_cnn_dense.py
"""

from train.config import Config


def get_config() -> Config:
  cfg = Config()  # the main job (configs/fashion_mnist_cnn.py) ...
  cfg.devices = 4
  cfg.compressor = "none"  # ... with a dense mean instead of compression
  return cfg
