"""The original's 256x256 recipe (`scripts/run_celebahq.py`, `run_lsun.py`), shared by
celebahq256.py and lsun_*.py, which set the dataset, the flip and the training length.

A 114M-parameter U-Net (ch_mult 1,1,2,2,4,4), batch 64, lr 2e-5, no dropout; trained with eps
prediction and the mse loss, and sampled with the posterior variance beta_tilde, hence
var_type=fixedsmall by default. On its own it is CelebA-HQ's recipe. Config arguments: as
configs/default.py, plus `block_size=N` (the original's optional space-to-depth).
"""
from diffusion_jax.config import config_lib

default = config_lib.sibling_module(__file__, "default")


def get_config(arg=None):
  args = config_lib.parse_diffusion_arg(arg, var_type="fixedsmall", block_size=1)
  config = config_lib.apply_diffusion_args(default.get_config(), args)
  config.data.dataset = "celeb_a_hq/256"
  config.data.image_size = 256
  config.data.random_flip = True
  config.model.ch_mult = (1, 1, 2, 2, 4, 4)
  config.model.dropout = 0.0
  config.model.block_size = args.block_size
  config.optim.lr = 2e-5
  config.train.batch_size = 64
  config.train.num_steps = 500_000
  config.train.sample_every = 10_000
  config.sample.num_samples = 16   # images in each training grid.
  return config
