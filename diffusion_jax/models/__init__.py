"""Denoising networks: DDPM's U-Net (`unet`, with its TF names in `tf_names`), Improved DDPM's
(`iddpm_unet`, with its PyTorch names in `torch_names`), and what they share (`layers`)."""
