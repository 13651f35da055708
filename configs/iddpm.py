"""Improved DDPM's recipe (Nichol and Dhariwal 2021), as the openai/improved-diffusion README
gives it: the base of configs/cifar10_iddpm.py, imagenet64_iddpm.py and lsun_bedroom_iddpm.py,
which set the data and what differs per released model.

Model: Improved DDPM's U-Net (model.architecture 'iddpm'), 128 channels, 3 residual blocks per
level, attention at 16x16 and 8x8 with 4 heads, scale-shift norm, 2C outputs for the
learned-range variance. Diffusion: T = 4000, cosine schedule, eps prediction, L_hybrid
(loss_type 'hybrid'); the network sees t * 1000 / T (rescale_timesteps, the reference's default).

Optimizer: Adam at lr 1e-4, batch 128, EMA 0.9999. The reference has no learning-rate warmup and
no gradient clipping, and neither have these configs (optim.warmup_steps 0, optim.grad_clip 0),
so that a run follows its recipe; DDPM's configs warm up over 5,000 steps and clip the gradient
norm at 1 (--config.optim.warmup_steps=5000 --config.optim.grad_clip=1 trains with that safety
margin). The reference's loader does not flip images, nor do these configs.
"""
from diffusion_jax.config import config_lib

default = config_lib.sibling_module(__file__, "default")


def get_config(arg=None):
  if arg:
    raise ValueError(f"configs/iddpm.py takes no config argument, got {arg!r}; it is the base "
                     f"of configs/*_iddpm.py")
  config = default.get_config()
  config.model.architecture = "iddpm"
  config.model.ch = 128
  config.model.ch_mult = (1, 2, 2, 2)
  config.model.num_res_blocks = 3
  config.model.attn_resolutions = (16, 8)
  config.model.num_heads = 4
  config.model.scale_shift_norm = True
  config.model.dropout = 0.0
  config.diffusion.beta_schedule = "cosine"
  config.diffusion.num_timesteps = 4000
  config.diffusion.mean_type = "eps"
  config.diffusion.var_type = "learned_range"
  config.diffusion.loss_type = "hybrid"
  config.diffusion.rescale_timesteps = True
  config.data.random_flip = False
  config.optim.lr = 1e-4
  config.optim.warmup_steps = 0
  config.optim.grad_clip = 0.0
  config.optim.ema_decay = 0.9999
  config.train.batch_size = 128
  return config
