"""Argument checks run at construction, with messages that say what to do."""

import math
import numbers

import jax
import jax.numpy as jnp

from hggjax.exchange import SCHEMES
from hggjax import wire
from hggjax.wire import INDEX_CODINGS, VALUE_DTYPES, WireFormat

_SCOPES = ("leaf", "global")


def _is_real(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def density(value) -> float:
  if not _is_real(value) or not 0.0 < value <= 1.0:
    raise ValueError(
        f"density must be a Python float in (0, 1] (the share of elements sent, "
        f"e.g. 0.01 for 1%), got {value!r}.")
  return float(value)


def in_unit_interval(name: str, value) -> float:
  if not _is_real(value) or not 0.0 < value <= 1.0:
    raise ValueError(f"{name} must be a float in (0, 1], got {value!r}.")
  return float(value)


def positive(name: str, value, high: float = math.inf) -> float:
  if not _is_real(value) or not 0 < value < high:
    limit = "a finite number > 0" if high == math.inf else f"a number in (0, {high:g})"
    raise ValueError(f"{name} must be {limit}, got {value!r}.")
  return float(value)


def int_at_least(name: str, value, low: int, high: int | None = None) -> int:
  """An integer in [low, high]; `high` bounds work that is unrolled at trace time."""
  if (not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low
      or (high is not None and value > high)):
    bound = f">= {low}" if high is None else f"in [{low}, {high}]"
    raise ValueError(f"{name} must be an integer {bound}, got {value!r}.")
  return int(value)


def boolean(name: str, value) -> bool:
  if not isinstance(value, bool):
    raise ValueError(f"{name} must be True or False, got {value!r}.")
  return value


def scope(value) -> str:
  if value not in _SCOPES:
    raise ValueError(
        f"scope must be one of {_SCOPES} ('leaf' selects within each leaf, "
        f"'global' over the whole flattened pytree), got {value!r}.")
  return value


def axis_name(value):
  """None, a name, or a (slow, fast) pair of two distinct names (returned as a tuple)."""
  if isinstance(value, (tuple, list)):
    if (len(value) != 2 or not all(isinstance(v, str) and v for v in value)
        or value[0] == value[1]):
      raise ValueError(
          f"a two-level axis_name must be two distinct non-empty axis names, "
          f"(slow, fast), e.g. ('hosts', 'local'): the dense mean runs over the "
          f"fast one, the compressed exchange over the slow one; got {value!r}.")
    return tuple(value)
  if value is not None and (not isinstance(value, str) or not value):
    raise ValueError(
        f"axis_name must be None (no exchange), the name of the mapped axis "
        f"as a non-empty string, e.g. 'data', or a (slow, fast) pair of names, "
        f"e.g. ('hosts', 'local'), got {value!r}.")
  return value


def exchange(value) -> str:
  if value not in SCHEMES:
    raise ValueError(
        f"exchange must be one of {SCHEMES} ('allgather' gathers every device's "
        f"slots; 'sparse_allreduce' sends each index region to one owner and gathers "
        f"the owners' choices, fewer bytes for many devices; 'leader_mask' sums every "
        f"device's values at one device's positions, in turn; 'union_mask' sums every "
        f"device's values at every device's positions), got {value!r}.")
  return value


def key(value):
  """An integer seed (Python or NumPy) or a JAX PRNG key, returned unchanged."""
  if isinstance(value, numbers.Integral) and not isinstance(value, bool):
    return value
  dtype = getattr(value, "dtype", None)
  if dtype is not None and (jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) or (
      str(dtype) == "uint32" and getattr(value, "shape", None) == (2,))):
    return value
  raise ValueError(
      f"key must be an integer seed or a JAX PRNG key (jax.random.key(0) or "
      f"jax.random.PRNGKey(0)), got {value!r}.")


def _is_auto(value) -> bool:
  return isinstance(value, str) and value == wire.AUTO


def momentum(value) -> float:
  if not _is_real(value) or not 0.0 <= value < 1.0:
    raise ValueError(
        f"momentum must be a number in [0, 1), got {value!r}; 0 turns momentum "
        "correction off (then put momentum in the optimizer).")
  return float(value)


def wire_format(value_dtype, scale_group, index_coding, scheme: str,
                error_feedback: bool = True) -> WireFormat:
  """A `WireFormat` from the constructor's options (dtype objects accepted by name).

  "auto" (each option's default) resolves per compressor: with `scheme` "allgather" or
  "sparse_allreduce", positions travel packed, and values in float8_e4m3fn with a scale
  per 256 when the compressor keeps error feedback (its residual keeps what rounding
  loses; without one, values travel in the gradient's dtype); the mask schemes send
  float32 values at int32 positions.
  """
  coded = scheme in wire.CODED_SCHEMES
  if _is_auto(index_coding):
    index_coding = "packed" if coded else "int32"
  if _is_auto(value_dtype):
    value_dtype = wire.AUTO_VALUE_DTYPE if coded and error_feedback else None
  name = None
  if value_dtype is not None:
    try:
      name = jnp.dtype(value_dtype).name
    except TypeError:
      name = None
    if name not in VALUE_DTYPES:
      raise ValueError(
          f"value_dtype must be None (values travel in the gradient's dtype) or one of "
          f"{VALUE_DTYPES} (as a name or a jnp dtype), or 'auto', got {value_dtype!r}.")
  if _is_auto(scale_group):  # float8 needs scales: its smallest step is 2^-9
    scale_group = wire.AUTO_SCALE_GROUP if name and name.startswith("float8") else None
  if scale_group is not None:
    scale_group = int_at_least("scale_group", scale_group, 1)
    if name is None:
      raise ValueError(
          "scale_group gives each group of slots a float32 scale for a narrow value "
          "dtype: pass value_dtype too (e.g. value_dtype='float8_e4m3fn', scale_group=256).")
  if index_coding not in INDEX_CODINGS:
    raise ValueError(
        f"index_coding must be one of {INDEX_CODINGS} ('int32': 4 bytes a position; "
        f"'packed': an Elias-Fano code, about 2 + log2(1/density) bits) or 'auto', got "
        f"{index_coding!r}.")
  fmt = WireFormat(name, scale_group, index_coding)
  if scheme in ("leader_mask", "union_mask") and fmt != WireFormat():
    raise ValueError(
        f"exchange={scheme!r} sums float32 values at shared int32 positions; "
        "value_dtype, scale_group and index_coding apply to exchange='allgather' and "
        "'sparse_allreduce' (leave them at 'auto').")
  return fmt
