"""Shared test data and references."""

import numpy as np

# The exact wire: values in the gradient's dtype at int32 positions, so what a device
# sends is its accumulator's entries as they are (the constructors' "auto" default
# rounds them to float8; tests of selection and of exact references ask for this).
EXACT_WIRE = {"value_dtype": None, "index_coding": "int32"}

SHAPES = {
    "scalar": (),
    "vector": (5,),
    "matrix": (3, 4),
    "matrix_t": (4, 3),  # same size as "matrix": selected in one loop with it
    "rank3": (2, 3, 4),
    "conv": (7, 7, 3, 64),
}


def gradients(seed: int, dtype=np.float32, shapes=SHAPES) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {name: rng.standard_normal(shape).astype(dtype) for name, shape in shapes.items()}


def draw(distribution: str, n: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  if distribution == "normal":
    return rng.standard_normal(n).astype(np.float32)
  if distribution == "laplace":
    return rng.laplace(size=n).astype(np.float32)
  if distribution == "t3":
    return rng.standard_t(3, size=n).astype(np.float32)
  raise ValueError(distribution)


def exact_topk_positions(x: np.ndarray, k: int) -> np.ndarray:
  """Positions of the k largest |x| (numpy reference, stable on ties)."""
  return np.argsort(-np.abs(x.ravel()), kind="stable")[:k]


def k_of(density: float, n: int) -> int:
  return max(1, round(density * n))


def assert_error_feedback_exact(grads: dict, old_residual, sent: dict, new_residual) -> None:
  """g + residual_old == sent + residual_new, bit for bit, per leaf (sorted by name, the
  order of the transform's flattened residual tuple)."""
  for i, leaf in enumerate(sorted(grads)):
    acc = np.asarray(grads[leaf], np.float32) + np.asarray(old_residual[i])
    np.testing.assert_array_equal(
        acc, np.asarray(sent[leaf]) + np.asarray(new_residual[i]), err_msg=leaf)
