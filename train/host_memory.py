"""Keep freed host memory in the process for XLA:CPU's next call.

XLA:CPU allocates each call's output and temporary buffers with malloc and frees them
when the call ends. glibc serves blocks above its mmap threshold (at most 32 MiB) with a
fresh mmap and unmaps them on free, and each of its per-thread arenas trims freed memory
back to the kernel, so every step of a large model page-faults its buffers in again: on
this project's CPU machine that was more than one float32 buffer of the gradient's size
per compressor update at n = 1e7 and 2.5e7, and the update took 16.4 ms at 1e7 instead of
9.7 ms with freed memory reused (docs/benchmarks.md, "Host memory"). Accelerators are unaffected: their runtimes pool
device memory themselves.

`python -m train.cifar`, `python -m train.lm` and `python -m train.compare` call
`reuse_freed_memory` first thing; `python -m benchmarks.update` unless `--malloc system`.
It changes the whole process's allocator, so library code and tests do not call it.
"""

from __future__ import annotations

import ctypes
import platform

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def reuse_freed_memory() -> bool:
  """Make glibc keep freed memory for reuse instead of returning it to the kernel.

  One arena (buffers freed by one thread are reused by the next call's), no mmap for
  large blocks, and no trimming: the process keeps its peak heap, as a training process
  would reach it every step anyway. Call it before JAX starts its threads (arenas already
  handed to a thread stay). Returns False, changing nothing, where the C library is not
  glibc.
  """
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  try:
    libc = ctypes.CDLL(None)
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  return all(mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))
