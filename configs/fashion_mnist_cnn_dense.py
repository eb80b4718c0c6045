"""The main job's dense baseline: same run with `--compressor none`."""

import dataclasses

from train.config import Config


def get_config() -> Config:
  return dataclasses.replace(
      Config(model="cnn", dataset="fashion_mnist", epochs=3, batch_size=64, lr=0.05,
             density=0.01, devices=4, seed=0),
      compressor="none")
