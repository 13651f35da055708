"""Samplers: each one compiled `lax.scan` loop over the timesteps, never a Python loop.

Randomness is per example. Each sampler takes one PRNG key per example (a key array [B]) and
draws, for that example, x_T from `fold_in(key, T)` and the noise of the step leaving timestep t
from `fold_in(key, t)`, with T and t those of the diffusion the model was trained on (also on a
respaced schedule, so every step count starts from the same x_T). Sharding the batch shards the
keys with it, so the samples do not depend on how many devices share the batch.
`model_fn(x, t)` is any callable returning the network's output ([B, ...], or twice the channels
with a learned variance); it is called with `sched.model_timesteps(t)`.

Samplers are chosen by name: `SAMPLERS` maps each name to one function with one signature,
`f(sched, model_fn, keys, shape, *, timesteps, eta, clip_denoised, mean_type, var_type)`, where
`timesteps` are the steps to visit, and `sample(name, ...)` checks the settings
(`check_sampler`), turns a step count or a respacing spec into those timesteps
(`visited_timesteps`) and calls it. Adding a sampler is one such function, one `SAMPLERS` entry,
and its tests in tests/test_sampling.py (against a NumPy reference, and through `sample`).
`check_sampler`'s general limits (num_steps in 0..T with 0 = all T, a respacing spec that parses,
eta >= 0) then apply to it; only a sampler with narrower limits, as ancestral sampling's, adds
them there.
"""
from __future__ import annotations

import numbers
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion
from diffusion_jax import dpm_solver
from diffusion_jax import prng
from diffusion_jax import schedules
from diffusion_jax.diffusion import ModelFn
from diffusion_jax.schedules import Schedule


def _check_keys(keys, shape):
  shape = tuple(int(d) for d in shape)
  if prng.num_keys(keys) != shape[0]:
    raise ValueError(f"need one key per example: {prng.num_keys(keys)} keys for shape {shape}")
  return shape


def _initial_noise(keys, shape, sched: Schedule):
  return prng.normal_each(prng.fold_in_each(keys, sched.base_num_timesteps), shape[1:])


def _step_noise(keys, sched: Schedule, t, x):
  """The noise of the step leaving entry t (a scalar) of `sched`, keyed by its original step."""
  return prng.normal_each(prng.fold_in_each(keys, sched.original_timesteps(t)), x.shape[1:],
                          x.dtype)


def p_sample(sched: Schedule, model_fn: ModelFn, x, t, noise, *, mean_type: str, var_type: str,
             clip_denoised: bool = True):
  """One step of ancestral sampling, x_{t-1} ~ p(x_{t-1} | x_t); no noise is added at t = 0.

  Args:
    sched: the schedule.
    model_fn: model_fn(x, t) -> network output.
    x: x_t [B, ...].
    t: int [B].
    noise: standard normal noise, shape of x.
    mean_type, var_type: as in `diffusion.p_mean_variance`.
    clip_denoised: clip the x_0 prediction to [-1, 1].

  Returns:
    (x_{t-1} [B, ...], pred_xstart [B, ...]).
  """
  out = diffusion.p_mean_variance(sched, diffusion.call_model(sched, model_fn, x, t), x, t,
                                  mean_type=mean_type, var_type=var_type,
                                  clip_denoised=clip_denoised)
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
    noise = _step_noise(keys, sched, t, x)
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
                  var_type: str, clip_denoised: bool = True) -> jax.Array:
  """Generates samples by ancestral sampling from t = T-1 down to 0.

  Args:
    sched: the schedule; a respaced one (`schedules.respace`) samples in its K steps.
    model_fn: model_fn(x, t) -> network output.
    keys: one PRNG key per example, [B].
    shape: the batch shape (B, H, W, C).
    mean_type, var_type: as in `diffusion.p_mean_variance`.
    clip_denoised: clip the x_0 prediction to [-1, 1] at every step (the original does).

  Returns:
    Samples [B, H, W, C], nominally in [-1, 1].
  """
  shape = _check_keys(keys, shape)
  num_timesteps = sched.num_timesteps
  x_init = _initial_noise(keys, shape, sched)
  kwargs = dict(mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised)
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
  shape = _check_keys(keys, shape)
  num_timesteps = sched.num_timesteps
  freq = int(include_xstartpred_freq)
  if not 1 <= freq <= num_timesteps:
    raise ValueError(f"include_xstartpred_freq must be in [1, T={num_timesteps}], got {freq}")
  num_recorded = num_timesteps // freq
  x_init = _initial_noise(keys, shape, sched)
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
  shape = _check_keys(keys, shape)
  num_timesteps = sched.num_timesteps
  if repeat_noise_steps >= 0:
    if shared_key is None:
      raise ValueError("repeat_noise_steps >= 0 needs shared_key, one key shared by the batch")
    x_init = jnp.broadcast_to(
        jax.random.normal(jax.random.fold_in(shared_key, num_timesteps), shape[1:]), shape)
  else:
    x_init = _initial_noise(keys, shape, sched)
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
  shape = _check_keys(keys, x1.shape)
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


# --- DDIM (Song, Meng and Ermon 2021) ----------------------------------------------------------

def ddim_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """The respaced subset of timesteps DDIM visits, ascending: evenly spaced from 0 to T-1."""
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"num_steps must be in [1, T={num_timesteps}], got {num_steps}")
  if num_steps == 1:
    return np.array([num_timesteps - 1])
  return np.round(np.linspace(0, num_timesteps - 1, num_steps)).astype(np.int32)


def ddim_sample_loop(sched: Schedule, model_fn: ModelFn, keys, shape, *,
                     num_steps: int | None = None, timesteps=None, eta: float = 0.0,
                     mean_type: str, var_type: str, clip_denoised: bool = True) -> jax.Array:
  """DDIM sampling over a subset of the timesteps.

  Each step goes from timestep t to the previous visited timestep s (alpha_bar_s = 1 after the
  last), with sigma = eta sqrt((1 - a_s) / (1 - a_t)) sqrt(1 - a_t / a_s):
  x_s = sqrt(a_s) x0_pred + sqrt(1 - a_s - sigma^2) eps_pred + sigma z. eta = 0 is deterministic;
  eta = 1 with every timestep is ancestral sampling with the posterior variance (fixedsmall).
  A learned variance is ignored; the mean part of the output gives x0_pred, and eps_pred is
  recomputed from the (clipped) x0_pred.

  Args:
    sched, model_fn, keys, shape, mean_type, clip_denoised: as in `p_sample_loop`.
    num_steps: how many timesteps to visit (1..T), spaced by `ddim_timesteps`; or
    timesteps: the timesteps to visit, ascending (e.g. `schedules.space_timesteps(T, 'ddim50')`).
      Give one of the two.
    eta: the amount of noise, 0 <= eta.
    var_type: the network's variance type (only a learned one matters here: its output is split).

  Returns:
    Samples [B, H, W, C].
  """
  diffusion.check_types(mean_type=mean_type, var_type=var_type)
  shape = _check_keys(keys, shape)
  num_timesteps = sched.num_timesteps
  if (num_steps is None) == (timesteps is None):
    raise ValueError("give ddim_sample_loop one of num_steps and timesteps")
  if timesteps is None:
    timesteps = ddim_timesteps(num_timesteps, num_steps)
  visited = schedules.check_timesteps(timesteps, num_timesteps)[::-1]
  previous = np.append(visited[1:], -1)
  x_init = _initial_noise(keys, shape, sched)
  batch = shape[0]

  def body(x, ts):
    t, t_prev = ts
    t_b = jnp.full((batch,), t, dtype=jnp.int32)
    mean_output, _ = diffusion.split_model_output(diffusion.call_model(sched, model_fn, x, t_b),
                                                  x.shape, var_type=var_type)
    pred_xstart = diffusion.pred_xstart_from_output(sched, mean_output, x, t_b,
                                                    mean_type=mean_type)
    if clip_denoised:
      pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
    eps = diffusion.predict_eps_from_xstart(sched, x, t_b, pred_xstart)
    alpha_bar = sched.alphas_cumprod[t]
    alpha_bar_prev = jnp.where(t_prev >= 0, sched.alphas_cumprod[jnp.maximum(t_prev, 0)], 1.0)
    sigma = (eta * jnp.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar))
             * jnp.sqrt(1.0 - alpha_bar / alpha_bar_prev))
    noise = _step_noise(keys, sched, t, x)
    x_prev = (jnp.sqrt(alpha_bar_prev) * pred_xstart
              + jnp.sqrt(jnp.maximum(1.0 - alpha_bar_prev - sigma**2, 0.0)) * eps
              + sigma * noise)
    return x_prev, None

  x0, _ = jax.lax.scan(body, x_init, (jnp.asarray(visited, jnp.int32),
                                      jnp.asarray(previous, jnp.int32)))
  return x0


def visited_timesteps(num_timesteps: int, num_steps: int = 0, respacing: str = "") -> np.ndarray:
  """The timesteps a sampler visits, ascending.

  Args:
    num_timesteps: T.
    num_steps: 0 (all T) or K in 1..T, spaced by `ddim_timesteps` (used when respacing is '').
    respacing: a spec of `schedules.space_timesteps` ('ddim50', '50', '10,20,30'), or ''.

  Returns:
    int array [K].
  """
  if respacing:
    return schedules.space_timesteps(num_timesteps, respacing)
  if num_steps in (0, num_timesteps):
    return np.arange(num_timesteps)
  return ddim_timesteps(num_timesteps, num_steps)


# --- Samplers by name ---------------------------------------------------------------------------

def sample_ancestral(sched: Schedule, model_fn: ModelFn, keys, shape, *, timesteps, eta: float,
                     clip_denoised: bool, mean_type: str, var_type: str, order: int = 2,
                     grid: str = "time_uniform") -> jax.Array:
  """`p_sample_loop` with the `SAMPLERS` signature; fewer steps than T respace the schedule
  (order and grid are DPM-Solver's, unused here).

  Args:
    sched, model_fn, keys, shape, clip_denoised, mean_type, var_type: as in `p_sample_loop`.
    timesteps: the timesteps to visit, ascending; unless that is all T, the chain runs over
      `schedules.respace(sched, timesteps)` (at least 2 of them; `sched` must be concrete).
    eta: must be 0 (ancestral sampling's noise is set by var_type).

  Returns:
    Samples [B, H, W, C].
  """
  timesteps = schedules.check_timesteps(timesteps, sched.num_timesteps)
  if eta != 0:
    raise ValueError(f"eta={eta} is DDIM's; ancestral sampling takes eta=0")
  if timesteps.size != sched.num_timesteps:
    sched = schedules.respace(sched, timesteps)
  return p_sample_loop(sched, model_fn, keys, shape, mean_type=mean_type, var_type=var_type,
                       clip_denoised=clip_denoised)


def sample_ddim(sched: Schedule, model_fn: ModelFn, keys, shape, *, timesteps, eta: float,
                clip_denoised: bool, mean_type: str, var_type: str, order: int = 2,
                grid: str = "time_uniform") -> jax.Array:
  """`ddim_sample_loop` with the `SAMPLERS` signature (order and grid are DPM-Solver's, unused
  here).

  Args:
    sched, model_fn, keys, shape, clip_denoised, mean_type, var_type: as in `ddim_sample_loop`.
    timesteps: the timesteps to visit, ascending.
    eta: the noise scale, >= 0 (0 = deterministic).

  Returns:
    Samples [B, H, W, C].
  """
  return ddim_sample_loop(sched, model_fn, keys, shape, timesteps=timesteps, eta=eta,
                          mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised)


def _dpm_sampler(algorithm: str) -> Callable[..., jax.Array]:
  def sample_dpm(sched: Schedule, model_fn: ModelFn, keys, shape, *, timesteps, eta: float,
                 clip_denoised: bool, mean_type: str, var_type: str, order: int = 2,
                 grid: str = "time_uniform") -> jax.Array:
    if eta != 0:
      raise ValueError(f"eta={eta} is DDIM's; DPM-Solver takes eta=0")
    return dpm_solver.solve(sched, model_fn, keys, shape, num_steps=len(timesteps),
                            order=order, algorithm=algorithm, grid=grid, mean_type=mean_type,
                            var_type=var_type, clip_denoised=clip_denoised)

  sample_dpm.__doc__ = (f"`dpm_solver.solve` ({algorithm}) with the `SAMPLERS` signature: "
                        f"len(timesteps) network calls, of `order` on `grid`.")
  return sample_dpm


SAMPLERS: dict[str, Callable[..., jax.Array]] = {
    "ancestral": sample_ancestral,
    "ddim": sample_ddim,
    # DPM-Solver++ (x_0 predictions) and DPM-Solver (noise predictions), multistep.
    "dpmsolver++": _dpm_sampler("dpmsolver++"),
    "dpmsolver": _dpm_sampler("dpmsolver"),
}
DPM_SAMPLERS = ("dpmsolver++", "dpmsolver")


def check_sampler(sampler: str, num_steps: int, eta: float, num_timesteps: int, *,
                  respacing: str = "", flag_prefix: str = "", order: int = 2,
                  grid: str = "time_uniform", mean_type: str = "eps") -> None:
  """Raises ValueError, saying what to set, unless `sample` can run these settings.

  Args:
    sampler: a name in `SAMPLERS`.
    num_steps: timesteps to visit, a Python int: 0 = all T, else 1..T spaced by
      `ddim_timesteps` (ancestral sampling: 2..T, over the respaced schedule).
    eta: DDIM's noise scale, a Python number >= 0; 0 for ancestral sampling.
    num_timesteps: T, the schedule's length.
    respacing: '' or a `schedules.space_timesteps` spec, which then sets the timesteps instead
      of num_steps (which must be 0).
    flag_prefix: put before the field names in the message ('--config.' for the command line).
    order, grid: DPM-Solver's order (1, 2 or 3) and time grid ('time_uniform' or 'logSNR');
      the other samplers take the defaults.
    mean_type: the model's (DPM-Solver needs eps or xstart).
  """
  field = lambda name: f"{flag_prefix}sample.{name}"
  names = ", ".join(repr(name) for name in SAMPLERS)
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}: set {field('sampler')} to one of {names}")
  if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral):
    raise ValueError(f"sample.num_steps={num_steps!r} must be an integer (0 = all T timesteps): "
                     f"set {field('num_steps')}=N")
  if isinstance(eta, bool) or not isinstance(eta, numbers.Real):
    raise ValueError(f"sample.eta={eta!r} must be a number (0 = deterministic DDIM): "
                     f"set {field('eta')}=0.0")
  if not isinstance(respacing, str):
    raise ValueError(f"sample.respacing={respacing!r} must be a string ('' = none, or e.g. "
                     f"'ddim50', '50', '10,20,30'): set {field('respacing')}=''")
  if sampler == "ancestral" and eta != 0:
    raise ValueError(
        f"sample.eta={eta} is DDIM's noise scale, which ancestral sampling does not use: set "
        f"{field('eta')}=0.0, or {field('sampler')}='ddim'")
  if not 0 <= num_steps <= num_timesteps:
    raise ValueError(
        f"sampler {sampler!r} visits sample.num_steps of the T={num_timesteps} timesteps, got "
        f"{num_steps}: set {field('num_steps')} to one of 1..{num_timesteps} "
        f"(0 = all {num_timesteps})")
  if not eta >= 0:
    raise ValueError(f"sample.eta={eta} must be >= 0 (0 = deterministic DDIM): set "
                     f"{field('eta')}=0.0 or more")
  if respacing:
    if num_steps != 0:
      raise ValueError(
          f"sample.respacing={respacing!r} and sample.num_steps={num_steps} both choose the "
          f"timesteps: set {field('num_steps')}=0 to use the respacing, or "
          f"{field('respacing')}='' to use the step count")
    try:
      count = len(schedules.space_timesteps(num_timesteps, respacing))
    except ValueError as e:
      raise ValueError(f"{e}: set {field('respacing')} to a spec such as 'ddim50', '50' or "
                       f"'10,20,30' (steps of T={num_timesteps}), or '' for none") from None
  else:
    count = num_steps or num_timesteps  # `ddim_timesteps` keeps num_steps distinct steps
  if sampler == "ancestral" and count < 2:
    raise ValueError(
        f"ancestral sampling over a respaced schedule needs at least 2 steps, got {count}: "
        f"set {field('num_steps')} or {field('respacing')} to keep more, or "
        f"{field('sampler')}='ddim'")
  if sampler in DPM_SAMPLERS:
    if respacing:
      raise ValueError(f"sample.respacing={respacing!r}: {sampler} takes its steps from "
                       f"{field('num_steps')} on its own grid ({field('solver_grid')}); set "
                       f"{field('respacing')}=''")
    if eta != 0:
      raise ValueError(f"sample.eta={eta} is DDIM's noise scale, which {sampler} does not use: "
                       f"set {field('eta')}=0.0")
    try:
      dpm_solver.check_solver(sampler, order, grid, count, num_timesteps, mean_type)
    except ValueError as e:
      raise ValueError(f"{e}: set {field('solver_order')}, {field('solver_grid')} or "
                       f"{field('num_steps')}, or another {field('sampler')}") from None
  elif (order, grid) != (2, "time_uniform"):
    raise ValueError(f"sample.solver_order={order!r} and sample.solver_grid={grid!r} are "
                     f"DPM-Solver's, which {sampler} does not use: set {field('sampler')}="
                     f"'dpmsolver++' or leave them at 2 and 'time_uniform'")


def sample(sampler: str, sched: Schedule, model_fn: ModelFn, keys, shape, *, num_steps: int = 0,
           respacing: str = "", eta: float = 0.0, clip_denoised: bool = True, mean_type: str,
           var_type: str, order: int = 2, grid: str = "time_uniform") -> jax.Array:
  """Samples with the sampler named `sampler`, after `check_sampler`.

  Args:
    sampler: a name in `SAMPLERS`: 'ancestral', 'ddim', 'dpmsolver++' or 'dpmsolver'.
    sched, model_fn, keys, shape, mean_type, var_type: as in `p_sample_loop`.
    num_steps: timesteps to visit: 0 = all T, else 1..T spaced by `ddim_timesteps`.
    respacing: '' or a spec of `schedules.space_timesteps` ('ddim50', '50', '10,20,30') that
      chooses the timesteps instead (num_steps 0). Ancestral sampling over fewer than T steps
      runs on the respaced schedule, which needs `sched` concrete (closed over, not traced).
    eta: DDIM's noise scale (0 = deterministic); must be 0 for ancestral sampling.
    clip_denoised: clip the x_0 predictions to [-1, 1] at every step (DPM-Solver: dpmsolver++
      only).
    order, grid: DPM-Solver's order and time grid (num_steps is then its network calls).

  Returns:
    Samples [B, H, W, C], nominally in [-1, 1].

  Raises:
    ValueError: for settings `check_sampler` refuses.
  """
  check_sampler(sampler, num_steps, eta, sched.num_timesteps, respacing=respacing, order=order,
                grid=grid, mean_type=mean_type)
  timesteps = visited_timesteps(sched.num_timesteps, num_steps, respacing)
  return SAMPLERS[sampler](sched, model_fn, keys, shape, timesteps=timesteps, eta=eta,
                           clip_denoised=clip_denoised, mean_type=mean_type, var_type=var_type,
                           order=order, grid=grid)
