"""CelebA-HQ 256x256 (`scripts/run_celebahq.py`): 114M-parameter U-Net, batch 64, lr 2e-5.

Trained with eps prediction and the mse loss; the original samples with the posterior
variance beta_tilde, hence var_type=fixedsmall by default. Config arguments as in large_256.py.
"""
from diffusion_jax.config import config_lib

large_256 = config_lib.sibling_module(__file__, "large_256")


def get_config(arg=None):
  config = large_256.get_config(arg)
  config.data.dataset = "celeb_a_hq/256"
  config.data.random_flip = True
  config.train.num_steps = 500_000
  return config
