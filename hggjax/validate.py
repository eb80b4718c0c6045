"""Argument checks run at construction, with messages that say what to do."""

import numbers

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


def positive(name: str, value) -> float:
  if not _is_real(value) or not value > 0:
    raise ValueError(f"{name} must be a number > 0, got {value!r}.")
  return float(value)


def int_at_least(name: str, value, low: int) -> int:
  if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
    raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
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
  if value is not None and not isinstance(value, str):
    raise ValueError(
        f"axis_name must be None (no exchange) or the name of the mapped axis "
        f"as a string, e.g. 'data', got {value!r}.")
  return value


def momentum(value) -> float:
  if not _is_real(value) or not 0.0 <= value < 1.0:
    raise ValueError(
        f"momentum must be a number in [0, 1), got {value!r}; 0 turns momentum "
        "correction off (then put momentum in the optimizer).")
  return float(value)
