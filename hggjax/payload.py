"""The two types every compressor shares: what a selector returns, what travels."""

from typing import NamedTuple

import jax


class Selection(NamedTuple):
  """What a selector found in one flat vector of n elements (capacity C = k).

  Selectors only choose positions; the transform reads the values, keeps the
  residual and builds the payload, so no selector ever touches a collective.
  """
  indices: jax.Array      # int32[C]: chosen positions; n marks an unused slot
  passed: jax.Array       # int32[]: elements that met the threshold, before trimming to C
  threshold: jax.Array    # float32[]: the |value| cut used (0 for random selection)
  history_hit: jax.Array  # bool[]: the previous step's threshold was accepted (hggtopk)


class Payload(NamedTuple):
  """What one device puts on the wire for one selection group, for every compressor."""
  values: jax.Array   # wire dtype (the gradient's floating dtype) [C]; 0 in unused slots
  indices: jax.Array  # int32[C]: flat positions; n in unused slots (dropped on scatter)
