"""Moved to `diffusion_jax.tools.convert_torch_checkpoint` (`python -m diffusion_jax.tools.convert_torch_checkpoint`); this path is kept for
the 0.2 releases only."""
__deprecated_path__ = True

from diffusion_jax.utils import deprecation  # pylint: disable=g-import-not-at-top

deprecation.moved(__spec__.name, "diffusion_jax.tools.convert_torch_checkpoint", run=__name__ == "__main__")
