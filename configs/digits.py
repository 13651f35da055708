"""The CPU demo: scikit-learn's 1,797 handwritten digits at their native 8x8.

  python -m diffusion_jax.main --config configs/digits.py --workdir runs/digits

A 0.65M-parameter U-Net (two levels, 8x8 and 4x4) trains for a fixed budget of `num_steps`
(12,000 steps of batch 32: the same model on every machine, about 10 minutes on a 2-core CPU)
on the train split (the first 1,500 digits) and writes WORKDIR/samples/grid_<step>.png (EMA
weights, ancestral sampling) along the way and at the end. T is 200 instead of 1000 and the
EMA is short (0.995), so that minutes suffice. docs/digits.md has the tuning table behind
these choices and the quality the demo reaches.

Config arguments: as configs/default.py, plus `num_steps=N` and `time_limit_s=S` (also stop,
with a checkpoint, after S seconds; 0 = no limit; run the command again to train on).
"""
from diffusion_jax.config import config_lib

default = config_lib.sibling_module(__file__, "default")


def get_config(arg=None):
  args = config_lib.parse_diffusion_arg(arg, var_type="fixedlarge", num_steps=12_000,
                                        time_limit_s=0.0)
  config = config_lib.apply_diffusion_args(default.get_config(), args)
  config.diffusion.num_timesteps = 200
  config.diffusion.beta_end = 0.1   # keeps q(x_T | x_0) close to N(0, I) with T = 200.
  config.data.dataset = "digits"
  config.data.image_size = 8
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
  config.train.log_every = 500
  config.train.checkpoint_every = 1000
  config.train.sample_every = 3000
  config.sample.sampler = "ancestral"  # over all 200 timesteps.
  config.sample.num_samples = 64  # images in each training grid.
  # --mode sample / eval sized for a CPU: 1,000 samples (eval.num_samples) keep the digits
  # measures' noise near 10% (docs/digits.md); a few minutes each.
  config.eval.num_samples = 1000
  config.eval.batch_size = 500
  config.eval.progressive_freq = 20
  config.eval.interp_t = 100      # halfway, as the original's 500 of 1000.
  config.eval.edit_t = (40, 80, 120, 160)  # SDEdit's t, as default.py's 300 .. 700 of 1000.
  return config
