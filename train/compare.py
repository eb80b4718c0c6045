"""`python -m train.compare`: the comparison sweep (train/report/compare.py)."""

import sys

from train import host_memory
from train.report.compare import main

if __name__ == "__main__":
  host_memory.reuse_freed_memory()  # before JAX's threads take their malloc arenas
  sys.exit(main())
