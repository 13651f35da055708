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
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
