"""Denoising networks."""
from diffusion_jax.models.unet import (
    UNet,
    check_config,
    count_params,
    flax_param_path,
    summary,
    tf_variable_name,
)

__all__ = ["UNet", "check_config", "count_params", "flax_param_path", "summary",
           "tf_variable_name"]
