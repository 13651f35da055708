"""What every sampler shares: one key per example, and the noise each step draws from it."""
from __future__ import annotations

from diffusion_jax.core import prng
from diffusion_jax.core.schedules import Schedule


def check_keys(keys, shape):
  """`shape` as ints, after checking there is one key per example."""
  shape = tuple(int(d) for d in shape)
  if prng.num_keys(keys) != shape[0]:
    raise ValueError(f"need one key per example: {prng.num_keys(keys)} keys for shape {shape}")
  return shape


def initial_noise(keys, shape, sched: Schedule):
  """x_T of each example, keyed by T."""
  return prng.normal_each(prng.fold_in_each(keys, sched.base_num_timesteps), shape[1:])


def step_noise(keys, sched: Schedule, t, x):
  """The noise of the step leaving entry t (a scalar) of `sched`, keyed by its original step."""
  return prng.normal_each(prng.fold_in_each(keys, sched.original_timesteps(t)), x.shape[1:],
                          x.dtype)
