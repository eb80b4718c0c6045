"""`python -m train.cifar --help`: train an image classifier with hggjax compression."""

import sys

from train import host_memory
from train.cli import main

if __name__ == "__main__":
  host_memory.reuse_freed_memory()  # before JAX's threads take their malloc arenas
  sys.exit(main())
