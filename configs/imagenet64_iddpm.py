"""Improved DDPM's ImageNet 64x64 models, on tfds `imagenet_resized/64x64` (configs/iddpm.py's
recipe with ch_mult (1, 2, 3, 4)).

  python -m diffusion_jax.main --config configs/imagenet64_iddpm.py --workdir runs/in64
  python -m diffusion_jax.main --config configs/imagenet64_iddpm.py:variant=cond --workdir ...

Config argument `variant`:
  hybrid (default)  unconditional, 128 channels, L_hybrid, lr 1e-4, batch 128, 1.5M steps: the
                    released imagenet64_uncond_100M_1500K.
  vlb               the same with L_vlb (loss_type 'rescaled_kl') and importance-sampled
                    timesteps: imagenet64_uncond_vlb_100M_1500K.
  cond              class-conditional (1,000 classes), 192 channels (273,049,350 parameters),
                    lr 3e-4, batch 2048, 250K steps, the bound's term added unscaled
                    (diffusion.rescale_learned_sigmas False) and plain timesteps
                    (rescale_timesteps False), as the reference's flags for
                    imagenet64_cond_270M_250K.

Warmup and clipping: none, as the reference (configs/iddpm.py says why); at batch 2048 and lr
3e-4 a short warmup (--config.optim.warmup_steps=1000) is the usual safety margin.
Prepare the data once with `tfds build imagenet_resized/64x64 --file_format=array_record` (tfds
downloads the downsampled ImageNet of image-net.org; 1.28M training images with their labels).
"""
from diffusion_jax.config import config_lib

iddpm = config_lib.sibling_module(__file__, "iddpm")


def get_config(arg=None):
  variant = config_lib.parse_variant(arg, ("hybrid", "vlb", "cond"))
  config = iddpm.get_config()
  config.data.dataset = "imagenet_resized/64x64"
  config.data.image_size = 64
  config.model.ch_mult = (1, 2, 3, 4)
  config.train.num_steps = 1_500_000
  config.eval.fid_splits = ("train", "validation")
  config.eval.bpd_split = "validation"
  if variant == "vlb":
    config.diffusion.loss_type = "rescaled_kl"
    config.diffusion.timestep_sampler = "loss_second_moment"
  elif variant == "cond":
    config.model.ch = 192
    config.model.num_classes = 1000
    config.diffusion.rescale_learned_sigmas = False
    config.diffusion.rescale_timesteps = False
    config.optim.lr = 3e-4
    config.train.batch_size = 2048
    config.train.num_steps = 250_000
  return config
