"""Improved DDPM's LSUN bedroom 256x256 models (configs/iddpm.py's recipe changed as the
reference's flags for them say): DDPM's U-Net layout at 256 (ch_mult (1, 1, 2, 2, 4, 4), 2
residual blocks, attention at 16x16 with one head, no scale-shift norm) with the learned-range
variance and L_hybrid over T = 1000 linear steps, plain timesteps.

  python -m diffusion_jax.main --config configs/lsun_bedroom_iddpm.py --workdir runs/bedroom

Config argument `variant`:
  lr1e-4 (default)  lr 1e-4, batch 128, 1.2M steps: the released lsun_uncond_100M_1200K_bs128.
  lr2e-5            lr 2e-5, batch 64, 2.4M steps: lsun_uncond_100M_2400K_bs64 (the README's
                    flags say batch 128; the released file's name says 64).

Warmup and clipping: none, as the reference (configs/iddpm.py says why).
"""
from diffusion_jax.config import config_lib

iddpm = config_lib.sibling_module(__file__, "iddpm")


def get_config(arg=None):
  variant = config_lib.parse_variant(arg, ("lr1e-4", "lr2e-5"))
  config = iddpm.get_config()
  config.data.dataset = "lsun/bedroom"
  config.data.image_size = 256
  config.model.ch_mult = (1, 1, 2, 2, 4, 4)
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = (16,)
  config.model.num_heads = 1
  config.model.scale_shift_norm = False
  config.diffusion.beta_schedule = "linear"
  config.diffusion.num_timesteps = 1000
  config.diffusion.rescale_learned_sigmas = False  # T / 1000 = 1 here: the same either way
  config.diffusion.rescale_timesteps = False
  config.train.num_steps = 1_200_000
  config.train.sample_every = 10_000
  config.sample.num_samples = 16   # images in each training grid.
  config.eval.fid_splits = ("train", "validation")  # LSUN has no test split
  config.eval.bpd_split = ""       # the bound over 1000 steps at 256x256: set a split to run it
  if variant == "lr2e-5":
    config.optim.lr = 2e-5
    config.train.batch_size = 64
    config.train.num_steps = 2_400_000
  return config
