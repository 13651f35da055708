"""RePaint (Lugmayr et al. 2022, arXiv 2201.09865): inpainting with an unconditional (or class-
conditional) DDPM. Every reverse step takes the known pixels from the forward process of the
input, q(x_t | x_0), and the unknown ones from the model's ancestral step; resampling jumps go
back up by the forward process, q(x_{t+1} | x_t) = N(sqrt(1 - beta_{t+1}) x_t, beta_{t+1} I), and
redo the steps, so the two regions agree.

The time schedule (`jump_schedule`) is the reference's (andreas128/RePaint, `get_schedule_jump`
with n_sample 1 and no second or third level of jumps, as its configs run it): from K - 1 down
to -1, and at every t that is a multiple of jump_length below K - jump_length, jump_n_sample - 1
times up jump_length steps and down again. As in the reference, the known pixels are merged in
before each reverse step but the first (x at level t gets mask * q_sample(x_0, t) + (1 - mask)
* x), a jump noises the whole image, and the output's known pixels are the input's (the paper's
last merge, at x_0).

Randomness per example: x_T from fold_in(key, T) as every sampler; transition i of the schedule
draws from fold_in(fold_in(key, T + 1), i), folded with 0 (the reverse step's noise), 1 (the
known pixels' forward noise) or 2 (a jump's noise).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.core import diffusion
from diffusion_jax.core.diffusion import ModelFn
from diffusion_jax.core import prng
from diffusion_jax.core import schedules
from diffusion_jax.core.schedules import Schedule
from diffusion_jax.samplers import ancestral
from diffusion_jax.samplers import common

REVERSE_NOISE, KNOWN_NOISE, JUMP_NOISE = 0, 1, 2


def jump_schedule(num_steps: int, jump_length: int, jump_n_sample: int) -> np.ndarray:
  """The levels RePaint's x passes through, from num_steps - 1 down to -1 (x_0), with its
  resampling jumps; consecutive entries differ by 1 (down: a reverse step, up: a forward one).

  Args:
    num_steps: K, the steps of the (possibly respaced) schedule.
    jump_length: j, how far each jump goes up.
    jump_n_sample: r, how many times the steps below a jump point are run (1: no jumps).

  Returns:
    int [L] levels.
  """
  if num_steps < 1 or jump_length < 1 or jump_n_sample < 1:
    raise ValueError(f"RePaint needs num_steps, jump_length and jump_n_sample >= 1, got "
                     f"{num_steps}, {jump_length}, {jump_n_sample}")
  levels = []
  for t in range(num_steps - 1, -1, -1):
    levels.append(t)
    if t % jump_length == 0 and t < num_steps - jump_length:
      up_and_down = list(range(t + 1, t + jump_length + 1)) + list(range(t + jump_length - 1,
                                                                         t - 1, -1))
      levels.extend(up_and_down * (jump_n_sample - 1))
  levels.append(-1)
  return np.asarray(levels, np.int64)


def repaint(sched: Schedule, model_fn: ModelFn, keys, x_known, mask, *, jump_length: int,
            jump_n_sample: int, mean_type: str, var_type: str, timesteps=None,
            clip_denoised: bool = True, dynamic_threshold: float = 0.0) -> jax.Array:
  """Inpaints the unknown pixels of x_known (mask 0) by RePaint.

  Args:
    sched: the trained schedule.
    model_fn: model_fn(x, t) -> network output.
    keys: one key per example [B].
    x_known: the images [B, H, W, C] in [-1, 1] (their unknown pixels are ignored).
    mask: 1 where a pixel is known, 0 where it is to be made; [B, H, W, C] or [B, H, W, 1].
    jump_length, jump_n_sample: the resampling jumps (`jump_schedule`; RePaint: 10 and 10).
    mean_type, var_type, clip_denoised, dynamic_threshold: as in `ancestral.p_sample`.
    timesteps: the trained timesteps to run over, ascending (its steps: the schedule respaced
      to them); None: all T.

  Returns:
    the completed images [B, H, W, C]: the known pixels of x_known, the model's elsewhere.
  """
  shape = common.check_keys(keys, x_known.shape)
  mask = jnp.asarray(mask, x_known.dtype)
  if mask.ndim != x_known.ndim or mask.shape[:-1] != x_known.shape[:-1] or mask.shape[-1] not in (
      1, x_known.shape[-1]):
    raise ValueError(f"mask of shape {mask.shape} for images {x_known.shape}: give [B, H, W, 1] "
                     f"or the images' shape")
  num_timesteps = sched.num_timesteps
  if timesteps is not None:
    timesteps = schedules.check_timesteps(timesteps, num_timesteps)
    if timesteps.size != num_timesteps:
      sched = schedules.respace(sched, timesteps)
  levels = jump_schedule(sched.num_timesteps, jump_length, jump_n_sample)
  kwargs = dict(mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised,
                dynamic_threshold=dynamic_threshold)
  step_keys = prng.fold_in_each(keys, sched.base_num_timesteps + 1)
  batch = shape[0]

  def noise(i, which, x):
    return prng.normal_each(prng.fold_in_each(prng.fold_in_each(step_keys, i), which),
                            shape[1:], x.dtype)

  def reverse(x, i, t):
    t_b = jnp.full((batch,), t, dtype=jnp.int32)
    known = diffusion.q_sample(sched, x_known, t_b, noise(i, KNOWN_NOISE, x))
    x = jnp.where(i > 0, mask * known + (1.0 - mask) * x, x)
    x_prev, _ = ancestral.p_sample(sched, model_fn, x, t_b, noise(i, REVERSE_NOISE, x), **kwargs)
    return x_prev

  def jump(x, i, t):
    beta = sched.betas[t + 1].astype(x.dtype)
    return jnp.sqrt(1.0 - beta) * x + jnp.sqrt(beta) * noise(i, JUMP_NOISE, x)

  def body(x, xs):
    i, t, up = xs
    return jax.lax.cond(up, jump, reverse, x, i, t), None

  x_init = common.initial_noise(keys, shape, sched).astype(x_known.dtype)
  steps = (jnp.arange(len(levels) - 1, dtype=jnp.int32), jnp.asarray(levels[:-1], jnp.int32),
           jnp.asarray(levels[1:] > levels[:-1]))
  x0, _ = jax.lax.scan(body, prng.varying_like_keys(x_init, keys), steps)
  return mask * x_known + (1.0 - mask) * x0
