"""LSUN bedroom 256x256 (`scripts/run_lsun.py`; no flip, as in the paper): 114M-parameter U-Net, batch 64, lr 2e-5.

Trained with eps prediction and the mse loss; the original samples with the posterior
variance beta_tilde, hence var_type=fixedsmall by default. Config arguments as in cifar10.py.
"""
import importlib.util
import pathlib


def _default():
  path = pathlib.Path(__file__).with_name("default.py")
  spec = importlib.util.spec_from_file_location("diffusion_jax_config_default", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  default = _default()
  args = default.parse_diffusion_arg(arg, var_type="fixedsmall", block_size=1)
  config = default.get_config()
  config.diffusion.mean_type = args.mean_type
  config.diffusion.var_type = args.var_type
  config.diffusion.loss_type = args.loss_type
  config.data.dataset = "lsun/bedroom"
  config.data.image_size = 256
  config.data.random_flip = False
  config.model.ch_mult = (1, 1, 2, 2, 4, 4)
  config.model.dropout = 0.0
  config.model.block_size = args.block_size
  config.optim.lr = 2e-5
  config.train.batch_size = 64
  config.train.num_steps = 2_400_000
  config.train.sample_every = 10_000
  config.sample.num_samples = 16
  return config
