"""`hggjax.dct`: the chunked DCT-II around a compressor."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hggjax
from hggjax import chunked_dct as dct_lib
from tests.hggjax import helpers


def _dct_ii(x: np.ndarray) -> np.ndarray:
  """Orthonormal DCT-II of a 1-D block, straight from its definition (float64)."""
  c = x.size
  n = np.arange(c)
  out = np.array([np.sum(x * np.cos(np.pi * (n + 0.5) * j / c)) for j in range(c)])
  out *= np.sqrt(2.0 / c)
  out[0] /= np.sqrt(2.0)
  return out


def test_blocks_of_a_vector_match_the_definition():
  x = np.random.default_rng(0).standard_normal(24).astype(np.float32)
  got = np.asarray(hggjax.block_dct({"v": x}, chunk=8)["v"])
  want = np.concatenate([_dct_ii(x[i:i + 8].astype(np.float64)) for i in range(0, 24, 8)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_matrix_is_transformed_along_both_axes():
  x = np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)
  got = np.asarray(hggjax.block_dct({"m": x}, chunk=8)["m"])  # blocks of 4 and 6
  rows = np.stack([_dct_ii(r.astype(np.float64)) for r in x])
  want = np.stack([_dct_ii(col) for col in rows.T]).T
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape, chunk", [((64, 48), 16), ((256,), 64), ((7, 13), 4),
                                          ((2, 3, 10), 5), ((), 64)])
def test_inverse_undoes_it_and_norms_are_kept(shape, chunk):
  x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
  coeffs = hggjax.block_dct({"x": x}, chunk)["x"]
  back = hggjax.block_dct({"x": coeffs}, chunk, inverse=True)["x"]
  np.testing.assert_allclose(back, x, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(coeffs), np.linalg.norm(x), rtol=1e-5)


def test_block_sizes():
  assert dct_lib.block_size(256, 64) == 64
  assert dct_lib.block_size(768, 64) == 64
  assert dct_lib.block_size(50257, 64) == 29   # 50257 = 29 * 1733
  assert dct_lib.block_size(13, 4) == 1        # prime above the chunk: left alone
  assert dct_lib.block_size(1, 64) == 1


def test_integer_leaves_pass_through_and_dtype_is_kept():
  tree = {"i": jnp.arange(4), "h": jnp.ones(8, jnp.bfloat16)}
  out = hggjax.block_dct(tree, 4)
  np.testing.assert_array_equal(out["i"], tree["i"])
  assert out["h"].dtype == jnp.bfloat16


def test_chained_around_a_dense_compressor_it_is_the_identity():
  tx = optax.chain(hggjax.dct(8), hggjax.topk(1.0, **helpers.EXACT_WIRE),
                   hggjax.inverse_dct(8))
  g = {"w": np.random.default_rng(3).standard_normal((16, 8)).astype(np.float32)}
  u, _ = tx.update(g, tx.init(g))
  np.testing.assert_allclose(u["w"], g["w"], rtol=1e-5, atol=1e-5)


def test_a_bad_chunk_is_refused():
  with pytest.raises(ValueError, match="chunk"):
    hggjax.dct(0)
