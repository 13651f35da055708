"""LSUN cat 256x256 (`scripts/run_lsun.py`): 114M-parameter U-Net, batch 64, lr 2e-5.

Trained with eps prediction and the mse loss; the original samples with the posterior
variance beta_tilde, hence var_type=fixedsmall by default. Config arguments as in cifar10.py.
"""
from diffusion_jax import config_lib

default = config_lib.sibling_module(__file__, "default")


def get_config(arg=None):
  return default.large_256(arg, dataset="lsun/cat", random_flip=True, num_steps=1_800_000)
