"""CIFAR-10 / ResNet-18 with hggtopk at 1%, the seed's recipe (for a GPU host; not run here).

  python -m train.cifar --config configs/cifar10_resnet18.py --data-dir DIR
"""


def get_config() -> dict:
  # A plain dict of Config fields works too; unset fields keep the defaults.
  return {"model": "resnet18", "dataset": "cifar10", "epochs": 200, "batch_size": 128,
          "lr": 0.1, "compressor": "hggtopk", "density": 0.01, "log_every": 100}
