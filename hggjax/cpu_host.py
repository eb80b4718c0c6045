"""For training on CPU hosts: keep freed host memory in the process for XLA:CPU's next call.

XLA:CPU allocates each call's output and temporary buffers with malloc and frees them
when the call ends. glibc serves blocks above its mmap threshold (at most 32 MiB) with a
fresh mmap and unmaps them on free, and each of its per-thread arenas trims freed memory
back to the kernel, so every step of a large model page-faults its buffers in again:
more than one float32 buffer of the gradient's size per compressor update at n = 1e7 and
2.5e7 (docs/benchmarks.md, "What a plain loop gets"). Accelerators are unaffected: their
runtimes pool device memory themselves.

    import hggjax
    hggjax.cpu_host.reuse_freed_memory()  # first thing, before the first JAX computation

It changes the whole process's allocator, so the library never calls it on its own; the
training harness's entry points (`python -m train.cifar`, `train.lm`, `train.compare`)
and `python -m benchmarks.update` (unless `--malloc system`) do.
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
  reaches it every step anyway. Call it before the first JAX computation starts XLA's
  threads (arenas already handed to a thread stay); importing JAX starts none.

  Returns:
    True when glibc took every setting; False, changing nothing, where the C library is
    not glibc (macOS, musl).
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
