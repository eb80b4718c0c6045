"""`python -m train.compare`: the comparison sweep (train/report/compare.py)."""

import sys

import hggjax
from train.report.compare import main

if __name__ == "__main__":
  hggjax.cpu_host.reuse_freed_memory()  # before XLA's threads take their malloc arenas
  sys.exit(main())
