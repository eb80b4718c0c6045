"""The network benchmarks' communication-bound model: a wide MLP with cheap compute.

1024 -> 6144 -> 3072 -> 10, 25.2M parameters; 8 examples per process keep forward and
backward small next to a 100 MB dense exchange. Used by `benchmarks.network_worker`
(multi-process, shaped links) and `benchmarks.step_local` (one process, no network).
"""

import jax
import numpy as np
import optax

LAYERS = (1024, 6144, 3072, 10)
PER_PROCESS_BATCH = 8
DESCRIPTION = "MLP " + "-".join(map(str, LAYERS))


def init_params(seed: int = 0) -> dict[str, np.ndarray]:
  """Host copies of the parameters (w{j} scaled normal, b{j} zeros), float32."""
  keys = jax.random.split(jax.random.key(seed), len(LAYERS))
  params = {}
  for j, (a, b) in enumerate(zip(LAYERS[:-1], LAYERS[1:])):
    params[f"w{j}"] = np.asarray(jax.random.normal(keys[j], (a, b)) / np.sqrt(a), np.float32)
    params[f"b{j}"] = np.zeros((b,), np.float32)
  return params


def batch(rng: np.random.Generator, rows: int = PER_PROCESS_BATCH) -> tuple[np.ndarray, np.ndarray]:
  """Random inputs float32[rows, 1024] and labels int32[rows]."""
  return (rng.standard_normal((rows, LAYERS[0]), np.float32),
          rng.integers(0, LAYERS[-1], rows).astype(np.int32))


def loss_fn(p, x, y):
  h = x
  for j in range(len(LAYERS) - 1):
    h = h @ p[f"w{j}"] + p[f"b{j}"]
    if j < len(LAYERS) - 2:
      h = jax.nn.relu(h)
  return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()
