"""`python -m train.cifar --help`: train an image classifier with hggjax compression."""

import sys

import hggjax
from train.cli import main

if __name__ == "__main__":
  hggjax.cpu_host.reuse_freed_memory()  # before XLA's threads take their malloc arenas
  sys.exit(main())
