"""NumPy references of the exchange schemes, written from their definitions (loops, not
the library's vectorised steps), for bit-for-bit comparison."""

import math

import numpy as np

CAPACITY = 1.5  # hggjax.regions.CAPACITY and SHARE, restated: a test keeps them equal
SHARE = 1.5


def mean_of(vals: np.ndarray, idx: np.ndarray, n: int) -> np.ndarray:
  """float32[m, n]: every device's slots scattered into zeros in device order, the
  mean taken as `densify_mean` takes it (a power-of-two P scales each value first,
  which is exact; any other P scales the sum)."""
  p, m, _ = vals.shape
  power_of_two = p & (p - 1) == 0
  total = np.zeros((m, n + 1), np.float32)
  for d in range(p):
    for r in range(m):
      v = vals[d, r].astype(np.float32)
      if power_of_two and p > 1:
        v = v * np.float32(1.0 / p)
      np.add.at(total[r], np.minimum(idx[d, r], n), v)
  total = total[:, :n]
  return total if power_of_two else total * np.float32(1.0 / p)


def allgather(vals, idx, n):
  """(mean, delivered bool[P, m, C]): every used slot arrives."""
  return mean_of(vals, idx, n), idx < n


def sparse_allreduce(vals, idx, n):
  """(mean float32[m, n], delivered bool[P, m, C], final positions per row).

  Region r holds the positions i with i mod P = r; each device sends, per region, its
  first ceil(1.5k/P) (at most k) slots in index order; the owner averages what arrived
  and keeps the ceil(1.5k/P) largest |mean| (ties: the lower position), never an
  exact 0.
  """
  p, m, c = vals.shape
  cap = max(1, min(c, math.ceil(CAPACITY * c / p)))
  share = max(1, math.ceil(SHARE * c / p))
  fits = np.zeros((p, m, c), bool)
  for d in range(p):
    for r in range(m):
      count = [0] * p
      for j in np.argsort(idx[d, r], kind="stable"):
        if idx[d, r, j] < n:
          region = idx[d, r, j] % p
          fits[d, r, j] = count[region] < cap
          count[region] += 1
  full = mean_of(np.where(fits, vals, 0), np.where(fits, idx, n), n)
  mean = np.zeros((m, n), np.float32)
  finals = []
  for r in range(m):
    final = set()
    for owner in range(p):
      received = sorted({int(i) for i in idx[:, r][fits[:, r]] if i % p == owner})
      keys = np.array([abs(full[r, i]) for i in received], np.float32)
      best = np.argsort(-keys, kind="stable")[:share]
      final |= {received[j] for j in best if keys[j] > 0}
    for i in final:
      mean[r, i] = full[r, i]
    finals.append(final)
  delivered = np.zeros((p, m, c), bool)
  for d in range(p):
    for r in range(m):
      delivered[d, r] = fits[d, r] & np.isin(idx[d, r], list(finals[r]))
  return mean, delivered, finals


def received_slots(scheme: str, p: int, k: int) -> int:
  """Slots of other devices' data arriving per device and row (float32 values)."""
  if scheme == "allgather":
    return (p - 1) * k
  return (p - 1) * (min(k, math.ceil(CAPACITY * k / p)) + math.ceil(SHARE * k / p))
