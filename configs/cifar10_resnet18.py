"""CIFAR-10 / ResNet-18 with hggtopk at 1%, for a GPU host (not run here).

  python -m train.cifar --config configs/cifar10_resnet18.py --data-dir DIR
"""

from train.config import Config


def get_config() -> Config:
  cfg = Config()  # the main job's optimizer and compressor, on CIFAR-10 with ResNet-18
  cfg.model = "resnet18"
  cfg.dataset = "cifar10"
  cfg.epochs = 200
  cfg.batch_size = 128
  cfg.lr = 0.1
  cfg.log_every = 100
  return cfg
