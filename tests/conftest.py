"""Test setup shared by every test: 8 fake CPU devices, set before JAX starts."""

import os

# Must happen before the first JAX backend is created; conftest is imported
# before any test module.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# Start the backend now: a test that runs the CLI in this process would otherwise set
# its own device count first (train.cli does, before a backend exists).
assert jax.device_count() == 8

NUM_DEVICES = 4  # what multi-device tests use out of the 8


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drop JAX's compiled programs after each test module: the whole suite runs in one
  process, and the executables of hundreds of fake-device programs otherwise pile up
  (one run of the full suite died in XLA's compiler three quarters of the way in)."""
  yield
  jax.clear_caches()
