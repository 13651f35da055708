"""The configs shipped with diffusion_jax, installed as the package `diffusion_jax.configs`.

Each file is loaded by its path (`--config configs/cifar10.py` in a checkout) or by its name
(`--config cifar10`, anywhere); nothing imports them as modules. This file makes the folder a
package, so that an installed copy, or a checkout installed with `pip install -e .`, can be
found with the import system.
"""
