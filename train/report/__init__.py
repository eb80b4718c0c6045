"""Reporting on finished runs: the comparison sweep, its summary, and the charts.

`python -m train.compare` and `python -m train.plot` are their entry points.
"""
