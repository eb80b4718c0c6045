"""`python -m train.lm --help`: train a language model with hggjax compression."""

import sys

from train import host_memory
from train.cli import LM, main

if __name__ == "__main__":
  host_memory.reuse_freed_memory()  # before JAX's threads take their malloc arenas
  sys.exit(main(program=LM))
