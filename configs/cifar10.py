"""CIFAR-10 32x32 (`scripts/run_cifar.py`): 35.7M-parameter U-Net, batch 128, lr 2e-4.

  python -m diffusion_jax.main --config configs/cifar10.py --workdir runs/cifar10
  python -m diffusion_jax.main --config configs/cifar10.py:var_type=fixedsmall --workdir ...
  python -m diffusion_jax.main --config configs/cifar10.py:var_type=learned,loss_type=kl ...
"""
from diffusion_jax.config import config_lib

default = config_lib.sibling_module(__file__, "default")


def get_config(arg=None):
  return default.get_config(arg)
