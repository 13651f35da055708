"""A tiny config for tests: CIFAR-10 (mocked) at 8x8, a 2-level ch-32 U-Net, T = 100."""
from diffusion_jax.config import config_lib

default = config_lib.sibling_module(__file__, "default")


def get_config(arg=None):
  args = config_lib.parse_diffusion_arg(arg, var_type="fixedlarge")
  config = config_lib.apply_diffusion_args(default.get_config(), args)
  config.diffusion.num_timesteps = 100
  config.data.image_size = 8
  config.data.num_workers = 2
  config.model.ch = 32
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (4,)
  config.model.dropout = 0.1
  config.optim.lr = 1e-3
  config.optim.warmup_steps = 2
  config.train.batch_size = 8
  config.train.num_steps = 6
  config.train.log_every = 2
  config.train.checkpoint_every = 3
  config.train.keep_checkpoints = 2
  config.train.sample_every = 0
  config.train.compile_cache_dir = ""
  config.sample.sampler = "ddim"
  config.sample.num_steps = 5
  config.sample.num_samples = 8   # images in each training grid.
  config.eval.interp_t = 50
  config.eval.edit_t = (30, 50, 70)
  return config
