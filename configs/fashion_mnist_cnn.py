"""The README's main job: Fashion-MNIST, small CNN, 4 CPU devices, hggtopk at 1%.

  python -m train.cifar --config configs/fashion_mnist_cnn.py
"""

from train.config import Config


def get_config() -> Config:
  return Config(model="cnn", dataset="fashion_mnist", epochs=3, batch_size=64, lr=0.05,
                compressor="hggtopk", density=0.01, devices=4, seed=0)
