"""Ancestral sampling (Ho et al. 2020, Algorithm 2), over all T steps or a respaced schedule, with
its progressive and trajectory variants and the paper's interpolation in x_t."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.core import diffusion
from diffusion_jax.core.diffusion import ModelFn
from diffusion_jax.core import prng
from diffusion_jax.core import schedules
from diffusion_jax.core.schedules import Schedule
from diffusion_jax.samplers import common
from diffusion_jax.samplers import registry


def p_sample(sched: Schedule, model_fn: ModelFn, x, t, noise, *, mean_type: str, var_type: str,
             clip_denoised: bool = True, dynamic_threshold: float = 0.0):
  """One step of ancestral sampling, x_{t-1} ~ p(x_{t-1} | x_t); no noise is added at t = 0.

  Args:
    sched: the schedule.
    model_fn: model_fn(x, t) -> network output.
    x: x_t [B, ...].
    t: int [B].
    noise: standard normal noise, shape of x.
    mean_type, var_type: as in `diffusion.p_mean_variance`.
    clip_denoised: clip the x_0 prediction to [-1, 1].
    dynamic_threshold: or clip it by dynamic thresholding at this percentile
      (`diffusion.clip_xstart`); 0 = to [-1, 1].

  Returns:
    (x_{t-1} [B, ...], pred_xstart [B, ...]).
  """
  out = diffusion.p_mean_variance(sched, diffusion.call_model(sched, model_fn, x, t), x, t,
                                  mean_type=mean_type, var_type=var_type,
                                  clip_denoised=clip_denoised,
                                  dynamic_threshold=dynamic_threshold)
  nonzero = (t != 0).astype(x.dtype).reshape((x.shape[0],) + (1,) * (x.ndim - 1))
  return out.mean + nonzero * jnp.exp(0.5 * out.log_variance) * noise, out.pred_xstart


def _ancestral_scan(sched, model_fn, keys, x_init, timesteps, sampler_kwargs, *, record=None,
                    extra=None, update_extra=None, shared_noise_key=None, shared_steps=0):
  """Runs p_sample from each of `timesteps` (descending).

  record(x_next) -> an array the scan stacks over steps, or None. `extra` is carried along and
  updated as update_extra(extra, t, pred_xstart). For the first `shared_steps` steps the noise is
  drawn from `shared_noise_key` and shared by the whole batch.

  Returns:
    ((final x, final extra), stacked records).
  """
  batch = x_init.shape[0]

  def body(carry, step_and_t):
    x, extra_ = carry
    step, t = step_and_t
    t_b = jnp.full((batch,), t, dtype=jnp.int32)
    noise = common.step_noise(keys, sched, t, x)
    if shared_noise_key is not None:
      shared = jax.random.normal(jax.random.fold_in(shared_noise_key, t), x.shape[1:], x.dtype)
      noise = jnp.where(step < shared_steps, jnp.broadcast_to(shared, x.shape), noise)
    x_next, pred_xstart = p_sample(sched, model_fn, x, t_b, noise, **sampler_kwargs)
    if update_extra is not None:
      extra_ = update_extra(extra_, t, pred_xstart)
    return (x_next, extra_), (record(x_next) if record is not None else None)

  timesteps = jnp.asarray(timesteps, dtype=jnp.int32)
  steps = jnp.arange(timesteps.shape[0], dtype=jnp.int32)
  return jax.lax.scan(body, prng.varying_like_keys((x_init, extra), keys), (steps, timesteps))


def p_sample_loop(sched: Schedule, model_fn: ModelFn, keys, shape, *, mean_type: str,
                  var_type: str, clip_denoised: bool = True,
                  dynamic_threshold: float = 0.0) -> jax.Array:
  """Generates samples by ancestral sampling from t = T-1 down to 0.

  Args:
    sched: the schedule; a respaced one (`schedules.respace`) samples in its K steps.
    model_fn: model_fn(x, t) -> network output.
    keys: one PRNG key per example, [B].
    shape: the batch shape (B, H, W, C).
    mean_type, var_type: as in `diffusion.p_mean_variance`.
    clip_denoised: clip the x_0 prediction to [-1, 1] at every step (the original does).
    dynamic_threshold: or clip it by dynamic thresholding at this percentile
      (`diffusion.clip_xstart`); 0 = to [-1, 1].

  Returns:
    Samples [B, H, W, C], nominally in [-1, 1].
  """
  shape = common.check_keys(keys, shape)
  num_timesteps = sched.num_timesteps
  x_init = common.initial_noise(keys, shape, sched)
  kwargs = dict(mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised,
                dynamic_threshold=dynamic_threshold)
  (x0, _), _ = _ancestral_scan(sched, model_fn, keys, x_init, np.arange(num_timesteps)[::-1],
                               kwargs)
  return x0


def p_sample_loop_progressive(sched: Schedule, model_fn: ModelFn, keys, shape, *,
                              mean_type: str, var_type: str, clip_denoised: bool = True,
                              include_xstartpred_freq: int = 50):
  """Ancestral sampling that also keeps the model's x_0 predictions every k steps.

  Returns:
    (samples [B, ...], xstart_preds [B, N, ...]) with N = T // include_xstartpred_freq, where
    xstart_preds[:, i] is the x_0 prediction made at t = i * include_xstartpred_freq.
  """
  shape = common.check_keys(keys, shape)
  num_timesteps = sched.num_timesteps
  freq = int(include_xstartpred_freq)
  if not 1 <= freq <= num_timesteps:
    raise ValueError(f"include_xstartpred_freq must be in [1, T={num_timesteps}], got {freq}")
  num_recorded = num_timesteps // freq
  x_init = common.initial_noise(keys, shape, sched)
  kwargs = dict(mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised)

  def keep_prediction(preds, t, pred_xstart):
    # Slot i holds the prediction made at t = i * freq, the last t with t // freq == i.
    slot = t // freq
    write = (t % freq == 0) & (slot < num_recorded)
    slot = jnp.minimum(slot, num_recorded - 1)
    updated = jax.lax.dynamic_update_index_in_dim(preds, pred_xstart, slot, axis=1)
    return jnp.where(write, updated, preds)

  preds_init = jnp.zeros((shape[0], num_recorded) + shape[1:], x_init.dtype)
  (x0, preds), _ = _ancestral_scan(sched, model_fn, keys, x_init, np.arange(num_timesteps)[::-1],
                                   kwargs, extra=preds_init, update_extra=keep_prediction)
  return x0, preds


def p_sample_loop_trajectory(sched: Schedule, model_fn: ModelFn, keys, shape, *,
                             mean_type: str, var_type: str, clip_denoised: bool = True,
                             repeat_noise_steps: int = -1, shared_key=None):
  """Ancestral sampling that returns every intermediate image.

  With repeat_noise_steps = k >= 0, x_T and the noise of the first k steps are the same for every
  example of the batch (drawn from `shared_key`), so the batch starts as one trajectory and then
  branches; this shows which features are decided early.

  Args:
    sched, model_fn, keys, shape, mean_type, var_type, clip_denoised: as in `p_sample_loop`.
    repeat_noise_steps: number of initial denoising steps whose noise is shared across the batch;
      -1 (the default) shares nothing.
    shared_key: one PRNG key for the shared noise; required when repeat_noise_steps >= 0. Pass the
      same key to every device so that a sharded batch shares one trajectory.

  Returns:
    (times [T + 1], images [T + 1, B, ...]): times is T-1, T-2, ..., 0, -1 and images[i] is the
    input of the step from times[i]: images[0] is x_T, images[-1] (times -1) the final samples.
  """
  shape = common.check_keys(keys, shape)
  num_timesteps = sched.num_timesteps
  if repeat_noise_steps >= 0:
    if shared_key is None:
      raise ValueError("repeat_noise_steps >= 0 needs shared_key, one key shared by the batch")
    x_init = jnp.broadcast_to(
        jax.random.normal(jax.random.fold_in(shared_key, num_timesteps), shape[1:]), shape)
  else:
    x_init = common.initial_noise(keys, shape, sched)
  kwargs = dict(mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised)
  _, images = _ancestral_scan(
      sched, model_fn, keys, x_init, np.arange(num_timesteps)[::-1], kwargs,
      record=lambda x_next: x_next,
      shared_noise_key=shared_key if repeat_noise_steps >= 0 else None,
      shared_steps=max(repeat_noise_steps, 0))
  times = jnp.arange(num_timesteps - 1, -2, -1, dtype=jnp.int32)
  return times, jnp.concatenate([x_init[None], images], axis=0)


def interpolate(sched: Schedule, model_fn: ModelFn, x1, x2, lam, t: int, keys, *,
                mean_type: str, var_type: str, clip_denoised: bool = True) -> jax.Array:
  """Diffuses two batches of images to timestep t, mixes them, and denoises back to x_0.

  x1 and x2 are diffused with independent noise (from `fold_in(key, T + 1)` and
  `fold_in(key, T + 2)`), mixed as (1 - lam) x_t1 + lam x_t2, then denoised from t to 0.

  Args:
    sched, model_fn, mean_type, var_type, clip_denoised: as in `p_sample_loop`.
    x1, x2: images [B, ...] in [-1, 1].
    lam: mixing weight, a scalar or [B]; 0 gives x1's reconstruction, 1 gives x2's.
    t: the timestep to diffuse to, a Python int in [0, T) (it sets the loop length).
    keys: one PRNG key per example, [B].

  Returns:
    Interpolated samples [B, ...].
  """
  diffusion._check_same_shape(x1=x1, x2=x2)
  shape = common.check_keys(keys, x1.shape)
  num_timesteps = sched.num_timesteps
  t = int(t)
  if not 0 <= t < num_timesteps:
    raise ValueError(f"t must be in [0, {num_timesteps}), got {t}")
  t_b = jnp.full((shape[0],), t, dtype=jnp.int32)
  noise1 = prng.normal_each(prng.fold_in_each(keys, num_timesteps + 1), shape[1:], x1.dtype)
  noise2 = prng.normal_each(prng.fold_in_each(keys, num_timesteps + 2), shape[1:], x1.dtype)
  xt1 = diffusion.q_sample(sched, x1, t_b, noise1)
  xt2 = diffusion.q_sample(sched, x2, t_b, noise2)
  lam = jnp.asarray(lam, x1.dtype)
  if lam.ndim == 1:
    lam = lam.reshape((shape[0],) + (1,) * (len(shape) - 1))
  elif lam.ndim != 0:
    raise ValueError(f"lam must be a scalar or [B], got shape {lam.shape}")
  x_mix = (1.0 - lam) * xt1 + lam * xt2
  kwargs = dict(mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised)
  (x0, _), _ = _ancestral_scan(sched, model_fn, keys, x_mix, np.arange(t + 1)[::-1], kwargs)
  return x0


def sample_ancestral(sched: Schedule, model_fn: ModelFn, keys, shape, *, timesteps,
                     clip_denoised: bool, mean_type: str, var_type: str,
                     dynamic_threshold: float = 0.0) -> jax.Array:
  """Ancestral sampling as a registry entry runs it: over all T steps, or over the schedule
  respaced to `timesteps` (`ancestral_run`)."""
  return ancestral_run(sched, model_fn, keys, shape, timesteps=timesteps,
                       clip_denoised=clip_denoised, mean_type=mean_type, var_type=var_type,
                       dynamic_threshold=dynamic_threshold)


def ancestral_run(sched: Schedule, model_fn: ModelFn, keys, shape, *, timesteps,
                  clip_denoised: bool, mean_type: str, var_type: str,
                  dynamic_threshold: float = 0.0, x_init=None, start: int | None = None,
                  record_every: int = 0):
  """Ancestral sampling over all T steps or the schedule respaced to `timesteps`, from each
  example's x_T or from given x at a timestep, optionally keeping x_0 predictions.

  Args:
    sched, model_fn, keys, shape, clip_denoised, mean_type, var_type, dynamic_threshold: as in
      `p_sample_loop`.
    timesteps: the timesteps to visit, ascending; unless that is every one of 0..top (top:
      T - 1, or `start`), the chain runs over `schedules.respace(sched, timesteps)` (`sched`
      must be concrete).
    x_init: x at the last of `timesteps` [B, H, W, C]; default: each example's x_T.
    start: the trained timestep x_init is at (the last of `timesteps`); None: x_init is x at
      the last of `timesteps` over all T.
    record_every: > 0: also keep the x_0 prediction of every record_every-th step counted back
      from the last (`common.prediction_slots`).

  Returns:
    Samples [B, H, W, C]; with record_every, (samples, x0_preds [B, N, H, W, C], noisiest first).
  """
  top = sched.num_timesteps if start is None else int(start) + 1
  timesteps = schedules.check_timesteps(timesteps, top)
  if start is not None and timesteps[-1] != start:
    raise ValueError(f"the visited timesteps end at {timesteps[-1]}, not at the start {top - 1}")
  if timesteps.size != top:
    sched = schedules.respace(sched, timesteps)
  shape = common.check_keys(keys, shape)
  if x_init is None:
    x_init = common.initial_noise(keys, shape, sched)
  entries = np.arange(timesteps.size)[::-1]
  kwargs = dict(mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised,
                dynamic_threshold=dynamic_threshold)
  if not record_every:
    (x0, _), _ = _ancestral_scan(sched, model_fn, keys, x_init, entries, kwargs)
    return x0
  # Entry t is call size - 1 - t.
  slots = jnp.asarray(common.prediction_slots(timesteps.size, record_every)[::-1])
  keep = lambda preds, t, pred_xstart: common.keep_prediction(preds, slots[t], pred_xstart)
  preds = common.empty_predictions(x_init, timesteps.size // record_every)
  (x0, preds), _ = _ancestral_scan(sched, model_fn, keys, x_init, entries, kwargs, extra=preds,
                                   update_extra=keep)
  return x0, preds


# Its noise is set by the variance type, so it has no settings of its own. Over fewer than T
# steps it runs on the respaced schedule, which needs two steps at least.
ENTRY = registry.SamplerEntry(
    name="ancestral", run=sample_ancestral, min_steps=2,
    **registry.capabilities(ancestral_run),
    summary="Ho et al.'s Algorithm 2: x_{t-1} ~ p(x_{t-1} | x_t), over all T steps or a "
            "respaced schedule")
