"""Denoising networks: DDPM's U-Net (`unet`) and Improved DDPM's (`iddpm_unet`)."""
from diffusion_jax.models.iddpm_unet import IDDPMUNet
from diffusion_jax.models.unet import (
    UNet,
    check_config,
    count_params,
    flax_param_path,
    summary,
    tf_variable_name,
)

__all__ = ["IDDPMUNet", "UNet", "check_config", "count_params", "flax_param_path", "summary",
           "tf_variable_name"]
