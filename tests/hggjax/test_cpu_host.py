"""hggjax.cpu_host: freed host memory stays in the process, so XLA:CPU's next call does not
fault it in."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

_PROGRAM = textwrap.dedent("""
    import resource, sys
    import hggjax  # JAX imported first, as in a user's script
    import jax
    import jax.numpy as jnp
    if sys.argv[1] == "reuse":
      assert hggjax.cpu_host.reuse_freed_memory()
    def faults():
      return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    n = 64 * 2**20 // 4  # 64 MiB of float32, above glibc's largest mmap threshold
    double = jax.jit(lambda x: 2 * x)
    x = jnp.ones(n)
    for _ in range(10):  # compiled, and the heap grown to what a call needs
      double(x).block_until_ready()
    before = faults()
    for _ in range(10):
      double(x).block_until_ready()  # a fresh output each call, freed after it
    print((faults() - before) / 10 / (n * 4 / 4096))  # page faults per page written
""")


def _faults_per_page(mode: str) -> float:
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out = subprocess.run([sys.executable, "-c", _PROGRAM, mode], capture_output=True,
                       text=True, check=True, cwd=root)
  return float(out.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_buffers_are_reused_without_page_faults():
  if _faults_per_page("system") < 0.9:  # e.g. huge pages: few faults to save
    pytest.skip("fresh memory is not faulted in page by page here")
  # Freed outputs are reused; a few calls still land on fresh pages while earlier
  # outputs wait to be freed (0 to 0.3 of the pages here).
  assert _faults_per_page("reuse") < 0.6
