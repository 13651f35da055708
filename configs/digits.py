"""The CPU demo: scikit-learn's 1,797 handwritten 8x8 digits, upscaled to 16x16.

  python -m diffusion_jax.main --config configs/digits.py --workdir runs/digits

A 0.65M-parameter U-Net (two levels, 16x16 and 8x8) trains on a laptop CPU for at most
`time_limit_s` (7 minutes by default; run the command again to train on from the last
checkpoint) and writes WORKDIR/samples/grid_<step>.png (EMA weights, ancestral sampling) along the
way and at the end. T is 200 instead of 1000 and the EMA is short (0.995): both only to get
there in minutes.
"""
from diffusion_jax import config_lib

default = config_lib.sibling_module(__file__, "default")


def get_config(arg=None):
  args = default.parse_diffusion_arg(arg, var_type="fixedlarge", num_steps=20_000,
                                     time_limit_s=420.0)
  config = default.apply_diffusion_args(default.get_config(), args)
  config.diffusion.num_timesteps = 200
  config.diffusion.beta_end = 0.1   # keeps q(x_T | x_0) close to N(0, I) with T = 200.
  config.data.dataset = "digits"
  config.data.image_size = 16
  config.data.channels = 1
  config.data.random_flip = False
  config.model.ch = 32
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = ()
  config.model.dropout = 0.0
  config.optim.lr = 2e-3
  config.optim.warmup_steps = 100
  config.optim.ema_decay = 0.995
  config.train.batch_size = 32
  config.train.num_steps = args.num_steps
  config.train.time_limit_s = args.time_limit_s
  config.train.log_every = 50
  config.train.checkpoint_every = 500
  config.train.sample_every = 600
  config.sample.num_samples = 64
  config.sample.ddim_steps = 0    # ancestral sampling over all 200 steps.
  config.eval.interp_t = 100      # halfway, as the original's 500 of 1000.
  return config
