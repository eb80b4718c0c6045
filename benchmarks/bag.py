"""An embedding-heavy model for the network benchmarks: a bag-of-tokens classifier.

A 98304 x 256 token table (25.2M parameters) and a 256 -> 10 linear head; 8 sequences of
512 uniformly drawn tokens per process. The forward pass gathers 4096 rows, squashes
them with tanh and averages them, so compute is nearly free and the step is all
gradient traffic: the table's gradient is dense in shape (100 MB) but non-zero only on
the rows this batch touched (about 4% of them), as in recommendation and language
models' embedding layers. (Without the tanh every token of a sequence would get the
same gradient row: millions of exact ties, unlike any real gradient.)
Same interface as `benchmarks.mlp`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

VOCAB, DIM, CLASSES = 98_304, 256, 10
SEQUENCE = 512
PER_PROCESS_BATCH = 8
DESCRIPTION = f"bag of tokens: {VOCAB} x {DIM} table, {DIM} -> {CLASSES} head"


def init_params(seed: int = 0) -> dict[str, np.ndarray]:
  """Host copies of the parameters (standard normal table, scaled normal head, zero bias), float32."""
  k_table, k_head = jax.random.split(jax.random.key(seed))
  return {"table": np.asarray(jax.random.normal(k_table, (VOCAB, DIM)), np.float32),
          "w": np.asarray(jax.random.normal(k_head, (DIM, CLASSES)) / np.sqrt(DIM), np.float32),
          "b": np.zeros((CLASSES,), np.float32)}


def batch(rng: np.random.Generator, rows: int = PER_PROCESS_BATCH) -> tuple[np.ndarray, np.ndarray]:
  """Token ids int32[rows, SEQUENCE] and labels int32[rows]."""
  return (rng.integers(0, VOCAB, (rows, SEQUENCE)).astype(np.int32),
          rng.integers(0, CLASSES, rows).astype(np.int32))


def loss_fn(p, tokens, y):
  h = jnp.tanh(jnp.take(p["table"], tokens, axis=0)).mean(axis=1)
  logits = h @ p["w"] + p["b"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
