"""DDIM inversion: an image's latent x_T by running DDIM's deterministic (eta = 0) update upwards,
from x_0 to the top of the visited timesteps, as Improved DDPM's `ddim_reverse_sample` steps.

Decoding the latent with DDIM (eta 0) over the same timesteps (`ddim.ddim_sample_loop` with
`x_init`) gives the image back, up to the error of taking each step with the model's output
at the step's start instead of its end: that error falls as the steps grow.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.core import diffusion
from diffusion_jax.core.diffusion import ModelFn
from diffusion_jax.core import schedules
from diffusion_jax.core.schedules import Schedule
from diffusion_jax.samplers import ddim


def ddim_reverse_step(sched: Schedule, model_fn: ModelFn, x, t, t_next, *, mean_type: str,
                      var_type: str, clip_denoised: bool = True,
                      dynamic_threshold: float = 0.0) -> jax.Array:
  """One deterministic DDIM step up, from entry t of `sched` to entry t_next.

  x0_pred is the model's at (x, t), clipped as DDIM's step down clips it; eps is recomputed from
  x0_pred at t; the step returns sqrt(a) x0_pred + sqrt(1 - a) eps with a = alpha_bar of t_next,
  and a = 0 for t_next >= T (past the last entry: the step returns eps).

  Args:
    sched, model_fn, mean_type, clip_denoised, dynamic_threshold: as in `ddim_sample_loop`.
    x: x at entry t [B, H, W, C] (x_0 where t is the first visited timestep).
    t, t_next: scalar entries of `sched` (ints, or traced int32), t < t_next.
    var_type: the network's variance type (a learned variance's channels are ignored).

  Returns:
    x at entry t_next, the shape of x.
  """
  num_timesteps = sched.num_timesteps
  pred_xstart, eps = ddim.predict_xstart_and_eps(
      sched, model_fn, x, jnp.full((x.shape[0],), t, dtype=jnp.int32), mean_type=mean_type,
      var_type=var_type, clip_denoised=clip_denoised, dynamic_threshold=dynamic_threshold)
  inside = t_next < num_timesteps
  at = jnp.minimum(t_next, num_timesteps - 1)
  # alpha_bar and 1 - alpha_bar of the next step as the schedule holds them (from float64).
  alpha_bar_next = jnp.where(inside, sched.alphas_cumprod[at], 0.0)
  one_minus_next = jnp.where(inside, sched.one_minus_alphas_cumprod[at], 1.0)
  return jnp.sqrt(alpha_bar_next) * pred_xstart + jnp.sqrt(one_minus_next) * eps


def ddim_reverse_sample_loop(sched: Schedule, model_fn: ModelFn, x_start, *,
                             num_steps: int | None = None, timesteps=None, mean_type: str,
                             var_type: str, clip_denoised: bool = True,
                             dynamic_threshold: float = 0.0) -> jax.Array:
  """Encodes images into DDIM latents: `ddim_reverse_step` over the visited timesteps, upwards.

  With visited timesteps k_0 < ... < k_{K-1}, step i takes the model at k_i and goes to
  alpha_bar(k_{i+1}); the first step starts from x_0 itself (taken as x at k_0), and the last one
  goes to alpha_bar = 0. These are Improved DDPM's `ddim_reverse_sample` steps run over every
  entry of its (respaced) diffusion in order, which is how its inversions are run; a
  deterministic DDIM run (`ddim_sample_loop` with eta 0 and `x_init`) over the same timesteps
  decodes the result.

  Args:
    sched, model_fn, mean_type, var_type, clip_denoised, dynamic_threshold: as in
      `ddim_sample_loop`.
    x_start: the images x_0 [B, H, W, C] in [-1, 1].
    num_steps: how many timesteps to visit (1..T), spaced by `ddim_timesteps`; or
    timesteps: the timesteps to visit, ascending (e.g. `schedules.space_timesteps(T, 'ddim50')`).
      Give one of the two; decode with the same.

  Returns:
    The latents x_T [B, H, W, C], in the dtype of x_start.
  """
  diffusion.check_types(mean_type=mean_type, var_type=var_type)
  num_timesteps = sched.num_timesteps
  if (num_steps is None) == (timesteps is None):
    raise ValueError("give ddim_reverse_sample_loop one of num_steps and timesteps")
  if timesteps is None:
    timesteps = ddim.ddim_timesteps(num_timesteps, num_steps)
  visited = schedules.check_timesteps(timesteps, num_timesteps)
  following = np.append(visited[1:], num_timesteps)

  def body(x, ts):
    t, t_next = ts
    return ddim_reverse_step(sched, model_fn, x, t, t_next, mean_type=mean_type,
                             var_type=var_type, clip_denoised=clip_denoised,
                             dynamic_threshold=dynamic_threshold).astype(x.dtype), None

  x_T, _ = jax.lax.scan(body, jnp.asarray(x_start), (jnp.asarray(visited, jnp.int32),
                                                     jnp.asarray(following, jnp.int32)))
  return x_T
