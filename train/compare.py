"""`python -m train.compare`: the comparison sweep (train/report/compare.py)."""

import sys

from train.report.compare import main

if __name__ == "__main__":
  sys.exit(main())
