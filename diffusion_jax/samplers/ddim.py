"""DDIM (Song, Meng and Ermon 2021): deterministic (eta = 0) or noisy sampling over a subset of
the timesteps."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.core import diffusion
from diffusion_jax.core.diffusion import ModelFn
from diffusion_jax.core import schedules
from diffusion_jax.core.schedules import Schedule
from diffusion_jax.samplers import common
from diffusion_jax.samplers import registry


# The K of T timesteps DDIM visits, ascending: evenly spaced from 0 to T-1 (the rule every
# sampler's num_steps follows).
ddim_timesteps = registry.evenly_spaced


def ddim_sample_loop(sched: Schedule, model_fn: ModelFn, keys, shape, *,
                     num_steps: int | None = None, timesteps=None, eta: float = 0.0,
                     mean_type: str, var_type: str, clip_denoised: bool = True,
                     dynamic_threshold: float = 0.0, x_init=None, record_every: int = 0):
  """DDIM sampling over a subset of the timesteps.

  Each step goes from timestep t to the previous visited timestep s (alpha_bar_s = 1 after the
  last), with sigma = eta sqrt((1 - a_s) / (1 - a_t)) sqrt(1 - a_t / a_s):
  x_s = sqrt(a_s) x0_pred + sqrt(1 - a_s - sigma^2) eps_pred + sigma z. eta = 0 is deterministic;
  eta = 1 with every timestep is ancestral sampling with the posterior variance (fixedsmall).
  A learned variance is ignored; the mean part of the output gives x0_pred, and eps_pred is
  recomputed from the (clipped) x0_pred.

  Args:
    sched, model_fn, keys, shape, mean_type, clip_denoised, dynamic_threshold: as in
      `p_sample_loop`.
    num_steps: how many timesteps to visit (1..T), spaced by `ddim_timesteps`; or
    timesteps: the timesteps to visit, ascending (e.g. `schedules.space_timesteps(T, 'ddim50')`).
      Give one of the two.
    eta: the amount of noise, 0 <= eta.
    var_type: the network's variance type (only a learned one matters here: its output is split).
    x_init: x at the last visited timestep [B, H, W, C] to start from, e.g. latents from
      `inversion.ddim_reverse_sample_loop`; default: each example's x_T drawn from its key.
      With x_init and eta = 0, keys may be None (nothing is drawn).
    record_every: > 0: also keep the x_0 prediction of every record_every-th step counted back
      from the last (`common.prediction_slots`).

  Returns:
    Samples [B, H, W, C]; with record_every, (samples, x0_preds [B, N, H, W, C], noisiest first).
  """
  diffusion.check_types(mean_type=mean_type, var_type=var_type)
  if keys is None and x_init is not None:
    if eta:
      raise ValueError(f"ddim_sample_loop with eta={eta} draws noise: give one key per example")
    shape = tuple(int(d) for d in shape)
  else:
    shape = common.check_keys(keys, shape)
  num_timesteps = sched.num_timesteps
  if (num_steps is None) == (timesteps is None):
    raise ValueError("give ddim_sample_loop one of num_steps and timesteps")
  if timesteps is None:
    timesteps = ddim_timesteps(num_timesteps, num_steps)
  visited = schedules.check_timesteps(timesteps, num_timesteps)[::-1]
  previous = np.append(visited[1:], -1)
  if x_init is None:
    x_init = common.initial_noise(keys, shape, sched)
  elif tuple(x_init.shape) != shape:
    raise ValueError(f"x_init has shape {tuple(x_init.shape)}; give it the samples' shape {shape}")
  batch = shape[0]
  slots = (common.prediction_slots(len(visited), record_every) if record_every
           else np.zeros(len(visited), np.int32))
  preds = common.empty_predictions(x_init, len(visited) // record_every) if record_every else None

  def body(carry, ts):
    x, preds = carry
    t, t_prev, slot = ts
    pred_xstart, eps = predict_xstart_and_eps(
        sched, model_fn, x, jnp.full((batch,), t, dtype=jnp.int32), mean_type=mean_type,
        var_type=var_type, clip_denoised=clip_denoised, dynamic_threshold=dynamic_threshold)
    alpha_bar = sched.alphas_cumprod[t]
    alpha_bar_prev = jnp.where(t_prev >= 0, sched.alphas_cumprod[jnp.maximum(t_prev, 0)], 1.0)
    # 1 - alpha_bar of both steps as the schedule holds it (from float64), 0 after the last.
    one_minus_prev = jnp.where(t_prev >= 0,
                               sched.one_minus_alphas_cumprod[jnp.maximum(t_prev, 0)], 0.0)
    sigma = (eta * jnp.sqrt(one_minus_prev / sched.one_minus_alphas_cumprod[t])
             * jnp.sqrt(1.0 - alpha_bar / alpha_bar_prev))
    noise = common.step_noise(keys, sched, t, x) if keys is not None else 0.0
    x_prev = (jnp.sqrt(alpha_bar_prev) * pred_xstart
              + jnp.sqrt(jnp.maximum(one_minus_prev - sigma**2, 0.0)) * eps
              + sigma * noise)
    if preds is not None:
      preds = common.keep_prediction(preds, slot, pred_xstart)
    return (x_prev, preds), None

  (x0, preds), _ = jax.lax.scan(body, (x_init, preds), (
      jnp.asarray(visited, jnp.int32), jnp.asarray(previous, jnp.int32), jnp.asarray(slots)))
  return (x0, preds) if record_every else x0


def predict_xstart_and_eps(sched: Schedule, model_fn: ModelFn, x, t_b, *, mean_type: str,
                           var_type: str, clip_denoised: bool,
                           dynamic_threshold: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """What a DDIM step takes from the network at (x, t): its x_0 prediction, clipped
  (`diffusion.clip_xstart`), and the noise that x_0 implies at t (a learned variance is ignored).

  Args:
    sched, model_fn, mean_type, var_type, clip_denoised, dynamic_threshold: as in
      `ddim_sample_loop`.
    x: x at entries t_b of `sched` [B, H, W, C].
    t_b: int32 [B].

  Returns:
    (x0_pred, eps), each the shape of x.
  """
  mean_output, _ = diffusion.split_model_output(diffusion.call_model(sched, model_fn, x, t_b),
                                                x.shape, var_type=var_type)
  pred_xstart = diffusion.clip_xstart(
      diffusion.pred_xstart_from_output(sched, mean_output, x, t_b, mean_type=mean_type),
      clip_denoised=clip_denoised, dynamic_threshold=dynamic_threshold)
  return pred_xstart, diffusion.predict_eps_from_xstart(sched, x, t_b, pred_xstart)


def sample_ddim(sched: Schedule, model_fn: ModelFn, keys, shape, *, timesteps, eta: float,
                clip_denoised: bool, mean_type: str, var_type: str,
                dynamic_threshold: float = 0.0) -> jax.Array:
  """`ddim_sample_loop` as a registry entry runs it (`ddim_run`)."""
  return ddim_run(sched, model_fn, keys, shape, timesteps=timesteps, eta=eta,
                  clip_denoised=clip_denoised, mean_type=mean_type, var_type=var_type,
                  dynamic_threshold=dynamic_threshold)


def ddim_run(sched: Schedule, model_fn: ModelFn, keys, shape, *, timesteps, eta: float,
             clip_denoised: bool, mean_type: str, var_type: str, dynamic_threshold: float = 0.0,
             x_init=None, start: int | None = None, record_every: int = 0):
  """`ddim_sample_loop` from x_T or from given x at a timestep, optionally keeping x_0
  predictions.

  Args:
    sched, model_fn, keys, shape, clip_denoised, mean_type, var_type, dynamic_threshold, x_init,
      record_every: as in `ddim_sample_loop`.
    timesteps: the timesteps to visit, ascending (with a start, the last one is it).
    eta: the noise scale, >= 0 (0 = deterministic).
    start: the trained timestep x_init is at; None: from x_T.

  Returns:
    Samples [B, H, W, C] (with record_every, and the x_0 predictions).
  """
  if start is not None and np.asarray(timesteps)[-1] != start:
    raise ValueError(f"the visited timesteps end at {np.asarray(timesteps)[-1]}, not at the "
                     f"start {start}")
  return ddim_sample_loop(sched, model_fn, keys, shape, timesteps=timesteps, eta=eta,
                          mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised,
                          dynamic_threshold=dynamic_threshold, x_init=x_init,
                          record_every=record_every)


# 1 gives DDPM's posterior variance on the visited steps.
ETA = registry.Setting("eta", 0.0, "float", low=0, note="DDIM's noise scale, 0 = deterministic")

ENTRY = registry.SamplerEntry(
    name="ddim", run=sample_ddim, settings=(ETA,), **registry.capabilities(ddim_run),
    deterministic=lambda eta: eta == 0,
    tag=lambda eta: [f"eta{eta:g}"] if eta else [],
    summary="Song et al.'s DDIM over any subset of the timesteps; eta = 0 is deterministic")
