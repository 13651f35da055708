"""Denoising networks by name (`registry`): DDPM's U-Net (`unet`, with its TF names in
`tf_names`), Improved DDPM's (`iddpm_unet`, with its PyTorch names in `torch_names`), and what they
share (`layers`).

Each architecture is one module with its `registry.Architecture` entry (its settings, checks,
parameter table and name maps) and one `register` call below; from another package, `register`
or the entry-point group `diffusion_jax.models`.
"""
from diffusion_jax.models import iddpm_unet
from diffusion_jax.models import registry
from diffusion_jax.models import unet
from diffusion_jax.models.registry import Architecture
from diffusion_jax.models.registry import check
from diffusion_jax.models.registry import default_settings
from diffusion_jax.models.registry import get
from diffusion_jax.models.registry import make
from diffusion_jax.models.registry import name_map
from diffusion_jax.models.registry import names
from diffusion_jax.models.registry import register
from diffusion_jax.models.registry import settings
from diffusion_jax.models.registry import summary
from diffusion_jax.models.registry import unregister

# The package's architectures, in the order help texts list them.
register(unet.ARCHITECTURE)
register(iddpm_unet.ARCHITECTURE)

__all__ = [
    "Architecture", "check", "default_settings", "get", "iddpm_unet", "make", "name_map", "names",
    "register", "registry", "settings", "summary", "unet", "unregister",
]
