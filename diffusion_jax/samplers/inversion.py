"""DDIM inversion: an image's latent x_T by running DDIM's deterministic (eta = 0) update upwards,
from x_0 to the top of the visited timesteps, as Improved DDPM's `ddim_reverse_sample` steps.

Decoding the latent with DDIM (eta 0) over the same timesteps (`ddim.ddim_sample_loop` with
`x_init`) gives the image back, up to the error of taking each step with the model's output
at the step's start instead of its end: that error falls as the steps grow.
`interpolate_latents` mixes two images through their latents.
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
from diffusion_jax.samplers import registry
from diffusion_jax.samplers import sdedit


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


def interpolate_latents(sched: Schedule, model_fn: ModelFn, keys, x1, x2, lam, *, sampler: str,
                        mean_type: str, var_type: str, **settings) -> jax.Array:
  """Interpolation through DDIM latents: x1 and x2 encoded by `ddim_reverse_sample_loop` over the
  timesteps of `settings` (num_steps or respacing, as DDIM visits them), their latents
  interpolated spherically (`sdedit.slerp`), and the result decoded by the deterministic
  `sampler` from it as its x_T (for 'ddim' with eta 0: the inversion's own inverse).

  Args:
    sched, model_fn, mean_type, var_type: as in `ddim_reverse_sample_loop`.
    keys: one key per example [B] (a deterministic sampler draws nothing from them).
    x1, x2: images [B, H, W, C] in [-1, 1].
    lam: a scalar or [B] in [0, 1]; 0 decodes x1's latent, 1 x2's.
    sampler: a registered sampler, deterministic with these settings and with `run_from`.
    **settings: its settings (num_steps, respacing, clip_denoised, dynamic_threshold, its own).

  Returns:
    the decoded interpolations [B, H, W, C].
  """
  if not registry.is_deterministic(sampler, settings):
    raise ValueError(f"sampler {sampler!r} with {settings} draws noise, so it cannot decode "
                     f"latents: use a deterministic sampler (e.g. 'ddim' with eta 0)")
  resolved = registry.REGISTRY.resolved(settings)
  timesteps = registry.visited_timesteps(sched.num_timesteps, resolved["num_steps"],
                                         resolved["respacing"])
  encode = lambda x: ddim_reverse_sample_loop(
      sched, model_fn, x, timesteps=timesteps, mean_type=mean_type, var_type=var_type,
      clip_denoised=resolved["clip_denoised"], dynamic_threshold=resolved["dynamic_threshold"])
  z = sdedit.slerp(encode(x1), encode(x2), lam)
  return registry.sample_from(sampler, sched, model_fn, keys, z, start=None, mean_type=mean_type,
                              var_type=var_type, **settings)
