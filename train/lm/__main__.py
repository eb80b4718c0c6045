"""`python -m train.lm --help`: train a language model with hggjax compression."""

import sys

import hggjax
from train.cli import LM, main

if __name__ == "__main__":
  hggjax.cpu_host.reuse_freed_memory()  # before XLA's threads take their malloc arenas
  sys.exit(main(program=LM))
