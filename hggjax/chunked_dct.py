"""A chunked DCT around a compressor: select in the DCT domain, step in parameter space.

DeMo (Peng et al., "Decoupled Momentum Optimization") compresses each device's momentum
after a DCT-II of fixed-size chunks: the slowly varying part of an update is then a
few large coefficients per chunk, and the inverse transform of a sparse mean of
coefficients moves every coordinate of the chunks it touches, not only k of them.

`dct(chunk)` and `inverse_dct(chunk)` are optax transformations to chain around a
compressor::

    optax.chain(hggjax.dct(64), hggjax.topk(0.01, axis_name="data"),
                hggjax.inverse_dct(64), optax.sgd(lr))

Every floating leaf is cut, along each axis of size > 1, into blocks of c elements,
c the largest divisor of that axis's size not above `chunk` (an axis of prime size
above `chunk` is left untransformed), and each block gets the orthonormal DCT-II along
that axis: a separable block transform, as JPEG's. It is orthonormal, so the inverse
is its transpose, norms are kept (clipping and thresholds mean the same), and the
compressor's error feedback (`acc == sent + residual'`) holds exactly in the
coefficient domain. Matrix products run at float32 precision (``Precision.HIGHEST``:
no TF32 on GPUs), so the round trip is exact to float32 rounding.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hggjax import validate


@functools.lru_cache(maxsize=None)
def dct_matrix(c: int) -> np.ndarray:
  """float32[c, c]: the orthonormal DCT-II, row j the j-th basis vector."""
  n = np.arange(c)
  m = np.cos(np.pi * (n[None, :] + 0.5) * n[:, None] / c) * np.sqrt(2.0 / c)
  m[0] /= np.sqrt(2.0)
  return m.astype(np.float32)


def block_size(size: int, chunk: int) -> int:
  """The block length along an axis of `size`: its largest divisor <= `chunk` (1: none)."""
  if size <= 1:
    return 1
  return max(d for d in range(1, min(size, chunk) + 1) if size % d == 0)


def _transform(x: jax.Array, chunk: int, inverse: bool) -> jax.Array:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return x
  out = x.astype(jnp.float32)
  for axis, size in enumerate(x.shape):
    c = block_size(size, chunk)
    if c == 1:
      continue
    basis = jnp.asarray(dct_matrix(c).T if inverse else dct_matrix(c))
    moved = jnp.moveaxis(out, axis, -1)
    blocks = moved.reshape(*moved.shape[:-1], size // c, c)
    blocks = jnp.einsum("...c,jc->...j", blocks, basis,
                        precision=jax.lax.Precision.HIGHEST)
    out = jnp.moveaxis(blocks.reshape(moved.shape), -1, axis)
  return out.astype(x.dtype)


def block_dct(tree, chunk: int = 64, *, inverse: bool = False):
  """Every floating leaf of `tree` in (or, `inverse`, back from) chunked DCT coefficients."""
  return jax.tree.map(lambda x: _transform(x, chunk, inverse), tree)


def dct(chunk: int = 64) -> optax.GradientTransformation:
  """Updates into chunked DCT-II coefficients (module docstring); chain a compressor
  after it and `inverse_dct` with the same `chunk` after that.

  Args:
    chunk: the largest block length along an axis (DeMo uses 64).
  """
  chunk = validate.int_at_least("chunk", chunk, 1, 4096)
  return optax.stateless(lambda u, params=None: block_dct(u, chunk))


def inverse_dct(chunk: int = 64) -> optax.GradientTransformation:
  """Chunked DCT-II coefficients back to updates: the inverse of `dct(chunk)`."""
  chunk = validate.int_at_least("chunk", chunk, 1, 4096)
  return optax.stateless(lambda u, params=None: block_dct(u, chunk, inverse=True))

