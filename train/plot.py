"""`python -m train.plot`: the charts of a comparison (train/report/plot.py)."""

import sys

from train.report.plot import main

if __name__ == "__main__":
  sys.exit(main())
