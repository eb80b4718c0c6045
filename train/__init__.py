"""Training harness for hggjax: models, data, train loop, checkpoints, logs.

Kept import-light: importing `train` pulls in neither flax, orbax nor tensorflow; import
the submodules (`train.steps`, `train.models`, ...) for those.
"""
