"""A seconds-long run on synthetic data (no files, no network): checks the wiring."""

from train.config import Config


def get_config() -> Config:
  return Config(model="cnn", dataset="synthetic", steps=2, batch_size=16, eval_batch_size=16,
                compressor="hggtopk", density=0.1, devices=4, log_every=1, profile=False,
                checkpoint=False)
