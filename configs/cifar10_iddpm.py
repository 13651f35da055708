"""Improved DDPM's CIFAR-10 models: 52,546,438 parameters (configs/iddpm.py's recipe, dropout
0.3), 500K steps of batch 128.

  python -m diffusion_jax.main --config configs/cifar10_iddpm.py --workdir runs/cifar10_iddpm
  python -m diffusion_jax.main --config configs/cifar10_iddpm.py:variant=vlb --workdir ...

Config argument `variant`:
  hybrid (default)  L_hybrid: the released cifar10_uncond_50M_500K.
  vlb               L_vlb (loss_type 'rescaled_kl') with importance-sampled timesteps
                    ('loss_second_moment'): the released cifar10_uncond_vlb_50M_500K.

Warmup and clipping: none, as the reference (configs/iddpm.py says why).
"""
from diffusion_jax.config import config_lib

iddpm = config_lib.sibling_module(__file__, "iddpm")


def get_config(arg=None):
  variant = config_lib.parse_variant(arg, ("hybrid", "vlb"))
  config = iddpm.get_config()
  config.model.dropout = 0.3
  if variant == "vlb":
    config.diffusion.loss_type = "rescaled_kl"
    config.diffusion.timestep_sampler = "loss_second_moment"
  config.train.num_steps = 500_000
  return config
