"""`python -m train.lm --help`: train a language model with hggjax compression."""

import sys

from train.cli import LM, main

if __name__ == "__main__":
  sys.exit(main(program=LM))
