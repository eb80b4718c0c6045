"""`python -m train.cifar --help`: train an image classifier with hggjax compression."""

import sys

from train.cli import main

if __name__ == "__main__":
  sys.exit(main())
