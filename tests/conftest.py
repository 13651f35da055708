"""Test-wide JAX settings: 8 simulated CPU devices, strict rank promotion, shared compile cache.

These must run before any JAX backend is initialised, which is why they live here.
"""
import os
import pathlib

_CACHE_DIR = os.environ.get(
    "DIFFUSION_JAX_TEST_CACHE",
    str(pathlib.Path(__file__).resolve().parent.parent / ".cache" / "jax_tests"),
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")
# One cache for every pytest-xdist worker and every subprocess the tests start. JAX writes each
# entry once, straight into its final file (a process that finds the file skips it); a process that
# reads an entry another is still writing gets a truncated one, which JAX reports as a warning and
# compiles again. Two writers so cost at worst a compile, never a wrong result.
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_configure(config):
  config.addinivalue_line(
      "markers",
      "slow: compiles whole training/sampling programs, runs the command line in a subprocess, "
      "or builds data sets; deselect with -m 'not slow' for the fast tier.",
  )
