"""A seconds-long run on synthetic data (no files, no network): checks the wiring.

  python -m train.cifar --config configs/smoke.py
"""

from train.config import Config


def get_config() -> Config:
  cfg = Config()  # the main job's model and compressor, shrunk to 2 steps of 16 examples
  cfg.dataset = "synthetic"
  cfg.steps = 2
  cfg.batch_size = 16
  cfg.eval_batch_size = 16
  cfg.density = 0.1
  cfg.devices = 4
  cfg.log_every = 1
  cfg.profile = False
  cfg.checkpoint = False
  return cfg
