"""Language models for the harness: models, text data, tokenizers, loss and optimizer.

Importing `train.lm` or `train.lm.config` stays light (no JAX, no Flax), like `train`.
"""
