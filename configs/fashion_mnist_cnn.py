"""The README's main job: Fashion-MNIST, small CNN, 4 CPU devices, hggtopk at 1%.

  python -m train.cifar --config configs/fashion_mnist_cnn.py
"""

from train.config import Config


def get_config() -> Config:
  cfg = Config()  # the embedded default is the main job
  cfg.devices = 4  # 4 devices on any host, not only as the CPU default
  return cfg
