"""CIFAR-10 32x32 (`scripts/run_cifar.py`): 35.7M-parameter U-Net, batch 128, lr 2e-4.

  python -m diffusion_jax.main --config configs/cifar10.py --workdir runs/cifar10
  python -m diffusion_jax.main --config configs/cifar10.py:var_type=fixedsmall --workdir ...
  python -m diffusion_jax.main --config configs/cifar10.py:var_type=learned --workdir ...  # kl
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
  return _default().get_config(arg)
