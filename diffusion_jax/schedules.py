"""Moved to `diffusion_jax.core.schedules`; this path is kept for the 0.2 releases only."""
__deprecated_path__ = True

from diffusion_jax.utils import deprecation  # pylint: disable=g-import-not-at-top

deprecation.moved(__spec__.name, "diffusion_jax.core.schedules")
