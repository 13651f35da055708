"""Karras et al.'s samplers (2022, "Elucidating the Design Space of Diffusion-Based Generative
Models", arXiv 2206.00364; NVlabs/edm): the deterministic Heun (Algorithm 1) and Euler samplers
and the stochastic sampler (Algorithm 2), on the schedule of noise levels

    sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,

i = 0 .. N - 1, then sigma_N = 0, for our discrete VP models.

They step x in the variance-exploding form x = x_vp / alpha (alpha = sqrt(alpha_bar)), whose
noise level is sigma = sigma_vp / alpha = sqrt((1 - alpha_bar) / alpha_bar), along
dx/dsigma = (x - D(x; sigma)) / sigma. The denoiser D(x; sigma) is the network's x_0 prediction
at x_vp = x / sqrt(1 + sigma^2), clipped as every sampler clips it (`diffusion.clip_xstart`).
A sigma meets the discrete model in one of two ways (`SIGMA_LABELS`):

- 'round': the nearest trained level (in sigma), as NVlabs/edm's `iDDPMPrecond.round_sigma`
  does; the grid itself (and the stochastic sampler's raised sigma) is rounded, so every call is
  at a trained timestep and the steps run between trained levels.
- 'interpolate': the float timestep of the continuous-time view (`continuous.discrete_vp`, all
  T steps kept): the time whose interpolated log alpha is -log(1 + sigma^2) / 2, labelled
  (t - 1/T) T, which is the trained timestep n at its own sigma.

The range defaults to the schedule's (sigma at t = 0 and T - 1). `num_steps` counts network
calls: Heun with N noise levels calls the network 2N - 1 times (each step twice, the last one, to
sigma = 0, an Euler step once), so it takes an odd count (35 calls: EDM's 18 steps); Euler calls
it N times.

Every coefficient depends only on the schedule and the settings: they are computed once in
float64 on the host, one row per network call, and one `lax.scan` makes the calls. x_T is every
sampler's draw (`common.initial_noise`) times sigma_max; the stochastic sampler's noise of step i
comes from fold_in(key, i) of each example's key, so the samples do not depend on how many
devices share the batch.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.core import diffusion
from diffusion_jax.core import prng
from diffusion_jax.core.schedules import Schedule
from diffusion_jax.samplers import common
from diffusion_jax.samplers import continuous
from diffusion_jax.samplers import registry

METHODS = ("heun", "euler")
SIGMA_LABELS = ("round", "interpolate")
# Algorithm 2 raises sigma by at most this factor minus 1 (gamma <= sqrt(2) - 1).
MAX_GAMMA = np.sqrt(2.0) - 1.0


@dataclasses.dataclass(frozen=True)
class Plan:
  """What each network call of a run does (float64 host arrays, one row per call [K]).

  Attributes:
    sigmas: the noise levels of the steps, sigma_0 > ... > sigma_{N-1} > sigma_N = 0, [N + 1]
      (rounded to trained levels with 'round').
    step: the step i the call belongs to.
    first: the call starts its step (an Euler prediction from the raised sigma_hat_i); else it
      corrects the step's prediction at sigma_{i+1} (Heun).
    sigma: where the denoiser is called: sigma_hat_i, or sigma_{i+1} for a correction.
    label: the timestep the network is given there (before `Schedule.model_timesteps`).
    step_size: sigma_{i+1} - sigma_hat_i, the step's change of sigma.
    noise_scale: sqrt(sigma_hat_i^2 - sigma_i^2) S_noise, the stochastic sampler's added noise
      (0 where it adds none).
  """
  sigmas: np.ndarray
  step: np.ndarray
  first: np.ndarray
  sigma: np.ndarray
  label: np.ndarray
  step_size: np.ndarray
  noise_scale: np.ndarray

  @property
  def num_calls(self) -> int:
    return len(self.sigma)


def schedule_sigmas(vp: continuous.DiscreteVP) -> np.ndarray:
  """The trained levels sigma_n = sqrt((1 - alpha_bar_n) / alpha_bar_n), n = 0 .. T - 1."""
  return np.sqrt(np.expm1(-2.0 * vp.log_alpha))


def karras_sigmas(num_levels: int, sigma_min: float, sigma_max: float,
                  rho: float) -> np.ndarray:
  """sigma_0 = sigma_max > ... > sigma_{N-1} = sigma_min, evenly spaced in sigma^(1/rho), [N]."""
  if num_levels == 1:
    return np.array([float(sigma_max)])
  ramp = np.arange(num_levels, dtype=np.float64) / (num_levels - 1)
  high, low = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
  return (high + ramp * (low - high)) ** rho


def num_levels(method: str, num_calls: int) -> int:
  """N, the noise levels (steps) of `num_calls` network calls: (calls + 1) / 2 for Heun."""
  return (num_calls + 1) // 2 if method == "heun" else num_calls


def check_settings(method: str, num_calls: int, *, rho: float, sigma_min: float,
                   sigma_max: float, sigma_labels: str, mean_type: str,
                   stochastic: bool = False, s_churn: float = 0.0, s_tmin: float = 0.0,
                   s_tmax: float = float("inf")) -> None:
  """Raises ValueError for settings no schedule can run (the schedule's range: `make_plan`)."""
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
  if sigma_labels not in SIGMA_LABELS:
    raise ValueError(f"unknown sigma labels {sigma_labels!r}; allowed: "
                     f"{', '.join(SIGMA_LABELS)}")
  continuous.check_mean_type(mean_type, "Karras et al.'s samplers")
  if method == "heun" and (num_calls < 3 or num_calls % 2 == 0):
    raise ValueError(f"Heun's sampler makes 2N - 1 network calls for N >= 2 noise levels, an odd "
                     f"count of at least 3; got {num_calls}")
  if method == "euler" and num_calls < 2:
    raise ValueError(f"Euler's sampler needs at least 2 network calls (noise levels), got "
                     f"{num_calls}")
  if not rho > 0:
    raise ValueError(f"rho={rho!r} must be > 0 (Karras et al. use 7)")
  if sigma_min and sigma_max and not sigma_min < sigma_max:
    raise ValueError(f"sigma_min={sigma_min!r} must be below sigma_max={sigma_max!r}")
  if stochastic:
    if not s_churn > 0:
      raise ValueError(f"s_churn={s_churn!r} adds no noise: the stochastic sampler needs "
                       f"s_churn > 0 (without it, it is Heun's)")
    if not s_tmin <= s_tmax:
      raise ValueError(f"s_tmin={s_tmin!r} must not exceed s_tmax={s_tmax!r}")


def make_plan(sched: Schedule, num_calls: int, *, method: str = "heun", rho: float = 7.0,
              sigma_min: float = 0.0, sigma_max: float = 0.0, sigma_labels: str = "round",
              s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
              s_noise: float = 1.0) -> Plan:
  """Every network call's noise level, label and step coefficients (float64, on the host).

  Args:
    sched: the trained (not respaced) schedule.
    num_calls: network calls, K (odd for Heun: 2N - 1).
    method: 'heun' (second order; the last step Euler) or 'euler'.
    rho: the sigma schedule's exponent.
    sigma_min, sigma_max: the range (0: the schedule's, at t = 0 and T - 1).
    sigma_labels: 'round' or 'interpolate' (the module's docstring).
    s_churn, s_tmin, s_tmax, s_noise: Algorithm 2's noise: each step from a sigma_i in [s_tmin,
      s_tmax] first raises it to sigma_hat = (1 + gamma) sigma_i, gamma = min(s_churn / N,
      sqrt(2) - 1), adding noise of variance sigma_hat^2 - sigma_i^2 scaled by s_noise; s_churn 0
      adds none (Algorithm 1). A raised sigma beyond the schedule's largest is held there.

  Raises:
    ValueError: a range outside the schedule's, or churn that no step's sigma reaches.
  """
  vp = continuous.discrete_vp(sched)
  levels = schedule_sigmas(vp)
  low, high = levels[0], levels[-1]
  for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
    if value and not low * (1 - 1e-6) <= value <= high * (1 + 1e-6):
      raise ValueError(f"{name}={value!r} (sample.karras_{name}) lies outside the schedule's "
                       f"sigma range [{low:.6g}, {high:.6g}] (at t = 0 and T - 1): set it within, "
                       f"or to 0 for the schedule's own")
  sigma_min = float(np.clip(sigma_min or low, low, high))
  sigma_max = float(np.clip(sigma_max or high, low, high))

  if sigma_labels == "round":
    def meet(sigma):  # nearest trained level (in sigma) and its timestep
      index = np.abs(levels[None, :] - np.asarray(sigma, np.float64)[:, None]).argmin(axis=1)
      return levels[index], index.astype(np.float64)
  elif sigma_labels == "interpolate":
    def meet(sigma):
      sigma = np.clip(np.asarray(sigma, np.float64), low, high)
      return sigma, vp.labels(vp.time_of_lambda(-np.log(sigma)))
  else:
    raise ValueError(f"unknown sigma labels {sigma_labels!r}; allowed: "
                     f"{', '.join(SIGMA_LABELS)}")

  n = num_levels(method, num_calls)
  sigmas = np.append(meet(karras_sigmas(n, sigma_min, sigma_max, rho))[0], 0.0)
  cur = sigmas[:-1]
  in_window = (s_tmin <= cur) & (cur <= s_tmax)
  gamma = np.where(in_window, min(s_churn / n, MAX_GAMMA), 0.0) if s_churn else np.zeros(n)
  if s_churn and not np.any(gamma > 0):
    raise ValueError(f"no step's sigma ({sigmas[-2]:.4g}..{sigmas[0]:.4g}) lies in [s_tmin, "
                     f"s_tmax] = [{s_tmin:g}, {s_tmax:g}]: the stochastic sampler would add no "
                     f"noise; widen the window (sample.karras_s_tmin, sample.karras_s_tmax)")
  # Rounding or holding at the largest level never lowers a raised sigma below sigma_i (a level).
  hat, hat_labels = meet(cur * (1.0 + gamma))
  noise_scale = np.sqrt(np.maximum(hat**2 - cur**2, 0.0)) * s_noise
  _, next_labels = meet(np.maximum(sigmas[1:], low))
  rows = []
  for i in range(n):
    rows.append((i, 1.0, hat[i], hat_labels[i], sigmas[i + 1] - hat[i], noise_scale[i]))
    if method == "heun" and i < n - 1:
      rows.append((i, 0.0, sigmas[i + 1], next_labels[i], sigmas[i + 1] - hat[i], 0.0))
  step, first, sigma, label, step_size, scale = map(np.asarray, zip(*rows))
  return Plan(sigmas=sigmas, step=step.astype(np.int32), first=first, sigma=sigma, label=label,
              step_size=step_size, noise_scale=scale)


def solve(sched: Schedule, model_fn: Callable, keys, shape, *, num_steps: int,
          method: str = "heun", rho: float = 7.0, sigma_min: float = 0.0, sigma_max: float = 0.0,
          sigma_labels: str = "round", s_churn: float = 0.0, s_tmin: float = 0.0,
          s_tmax: float = float("inf"), s_noise: float = 1.0, mean_type: str = "eps",
          var_type: str = "fixedlarge", clip_denoised: bool = True,
          dynamic_threshold: float = 0.0, noise_fn: Callable | None = None,
          dtype=jnp.float32, x_init=None, start: int | None = None, record_every: int = 0):
  """Samples by Karras et al.'s Heun or Euler sampler, deterministic or (s_churn > 0) stochastic.

  Args:
    sched, model_fn, keys, shape: the trained (not respaced) schedule; the network,
      model_fn(x [B, ...], timesteps [B] float) -> its output; one key per example [B]; the
      samples' shape [B, ...].
    num_steps: network calls (odd for Heun: 2N - 1 for N noise levels).
    method, rho, sigma_min, sigma_max, sigma_labels, s_churn, s_tmin, s_tmax, s_noise: as
      `make_plan`.
    mean_type, var_type: what the network predicts (a learned variance's channels are unused).
    clip_denoised, dynamic_threshold: how each x_0 prediction is clipped
      (`diffusion.clip_xstart`).
    noise_fn: noise_fn(step) -> the standard normal noise [B, ...] the stochastic sampler adds
      at that step; None: from fold_in(key, step) of each example's key. For tests that feed
      another implementation's noise.
    dtype: the arithmetic (float64 for reference runs under jax.enable_x64); x_T is the float32
      draw of every sampler, cast.
    x_init: x [B, ...] (the VP form, sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps) at the
      trained timestep `start`; default: each example's x_T times sigma_max.
    start: the trained timestep of x_init: the run's largest sigma is that step's level (in
      place of sigma_max), and x starts as x_init sqrt(1 + sigma^2) there; None: from x_T.
    record_every: > 0: also keep the x_0 prediction (the denoiser's output) of every
      record_every-th call counted back from the last (`common.prediction_slots`).

  Returns:
    the samples at sigma = 0, [B, ...]; with record_every, (samples, x0_preds [B, N, ...],
    noisiest first).
  """
  if start is not None:
    sigma_max = float(schedule_sigmas(continuous.discrete_vp(sched))[int(start)])
  check_settings(method, num_steps, rho=rho, sigma_min=sigma_min, sigma_max=sigma_max,
                 sigma_labels=sigma_labels, mean_type=mean_type, stochastic=bool(s_churn),
                 s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax)
  plan = make_plan(sched, num_steps, method=method, rho=rho, sigma_min=sigma_min,
                   sigma_max=sigma_max, sigma_labels=sigma_labels, s_churn=s_churn,
                   s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
  shape = common.check_keys(keys, shape)
  batch = shape[0]
  if x_init is None:
    x_init = common.initial_noise(keys, shape, sched).astype(dtype) * plan.sigmas[0]
  else:
    x_init = x_init.astype(dtype) * np.sqrt(1.0 + plan.sigmas[0]**2)
  stochastic = bool(np.any(plan.noise_scale > 0))
  slots = (common.prediction_slots(plan.num_calls, record_every) if record_every
           else np.zeros(plan.num_calls, np.int32))
  if noise_fn is None:
    noise_fn = lambda step: prng.normal_each(prng.fold_in_each(keys, step), shape[1:], dtype)

  def call(carry, xs):
    x, x_hat, slope, preds = carry
    step, first, sigma, label, step_size, noise_scale, slot = xs
    if stochastic:
      x = x + noise_scale * noise_fn(step).astype(dtype)
    alpha = jax.lax.rsqrt(1.0 + sigma * sigma)
    x_vp = alpha * x
    t_model = sched.model_timesteps(jnp.full((batch,), label, dtype))
    out, _ = diffusion.split_model_output(model_fn(x_vp, t_model), x.shape, var_type=var_type)
    x0 = continuous.xstart_from_output(out.astype(dtype), x_vp, alpha, alpha * sigma,
                                       mean_type=mean_type)
    x0 = diffusion.clip_xstart(x0, clip_denoised=clip_denoised,
                               dynamic_threshold=dynamic_threshold)
    if preds is not None:
      preds = common.keep_prediction(preds, slot, x0)
    new_slope = (x - x0) / sigma
    first = first > 0
    x_hat = jnp.where(first, x, x_hat)   # a prediction starts from x, a correction from x_hat
    step_slope = jnp.where(first, new_slope, 0.5 * (slope + new_slope))
    return (x_hat + step_size * step_slope, x_hat, jnp.where(first, new_slope, slope),
            preds), None

  xs = (jnp.asarray(plan.step),) + tuple(jnp.asarray(v, dtype) for v in (
      plan.first, plan.sigma, plan.label, plan.step_size, plan.noise_scale)) + (
          jnp.asarray(slots),)
  zeros = jnp.zeros_like(x_init)
  preds = (common.empty_predictions(x_init, plan.num_calls // record_every) if record_every
           else None)
  (x, _, _, preds), _ = jax.lax.scan(call, (x_init, zeros, zeros, preds), xs)
  return (x, preds) if record_every else x


# --- As samplers by name -----------------------------------------------------------------------

RHO = registry.Setting("karras_rho", 7.0, "float", 0, None,
                       note="Karras et al.'s rho: sigma^(1/rho) evenly spaced; > 0")
SIGMA_MIN = registry.Setting("karras_sigma_min", 0.0, "float", 0, None,
                             note="the smallest sigma; 0 = the schedule's, at t = 0")
SIGMA_MAX = registry.Setting("karras_sigma_max", 0.0, "float", 0, None,
                             note="the largest sigma; 0 = the schedule's, at t = T - 1")
LABELS = registry.Setting("karras_sigma_labels", "round", "str", choices=SIGMA_LABELS,
                          note="a sigma meets the model at the nearest trained timestep, or at "
                          "a float timestep of the continuous-time view")
S_CHURN = registry.Setting("karras_s_churn", 40.0, "float", 0, None,
                           note="Algorithm 2's S_churn: each step raises sigma by min(S_churn / "
                           "N, sqrt(2) - 1) of itself; > 0")
S_TMIN = registry.Setting("karras_s_tmin", 0.05, "float", 0, None,
                          note="Algorithm 2's S_tmin: the smallest sigma it raises")
S_TMAX = registry.Setting("karras_s_tmax", 50.0, "float", 0, None,
                          note="Algorithm 2's S_tmax: the largest sigma it raises")
S_NOISE = registry.Setting("karras_s_noise", 1.003, "float", 0, None,
                           note="Algorithm 2's S_noise: the scale of the noise it adds")
SCHEDULE_SETTINGS = (RHO, SIGMA_MIN, SIGMA_MAX, LABELS)
CHURN_SETTINGS = (S_CHURN, S_TMIN, S_TMAX, S_NOISE)


def _check(method: str, stochastic: bool, settings: tuple) -> Callable[..., None]:
  """The registry's check of one entry: `check_settings`, in the config's words."""

  def check(field, *, count, num_timesteps, mean_type, **values):
    del num_timesteps
    kwargs = {k[len("karras_"):]: v for k, v in values.items() if k != S_NOISE.name}
    try:
      check_settings(method, count, mean_type=mean_type, stochastic=stochastic, **kwargs)
    except ValueError as e:
      names = ", ".join(field(s.name) for s in settings)
      raise ValueError(f"{e}: set {field('num_steps')} or {names}, or another "
                       f"{field('sampler')}") from None

  return check


def _tag(karras_rho, karras_sigma_min, karras_sigma_max, karras_sigma_labels, **churn):
  """The parts of a result's name: e.g. ['rho7_round'] or, with Algorithm 2's settings,
  ['rho7_round_churn40_0.05-50_noise1.003']."""
  parts = [f"rho{karras_rho:g}", karras_sigma_labels]
  if karras_sigma_min or karras_sigma_max:
    parts.append(f"sigma{karras_sigma_min:g}-{karras_sigma_max:g}")
  if churn:
    parts.append(f"churn{churn['karras_s_churn']:g}_{churn['karras_s_tmin']:g}-"
                 f"{churn['karras_s_tmax']:g}_noise{churn['karras_s_noise']:g}")
  return ["_".join(parts)]


def _deterministic_entry(method: str, summary: str) -> registry.SamplerEntry:
  """Heun's or Euler's sampler (no added noise) by the name of its method."""

  def run(sched, model_fn, keys, shape, *, num_steps, clip_denoised, dynamic_threshold,
          mean_type, var_type, karras_rho, karras_sigma_min, karras_sigma_max,
          karras_sigma_labels):
    return run_all(sched, model_fn, keys, shape, num_steps=num_steps, clip_denoised=clip_denoised,
                   dynamic_threshold=dynamic_threshold, mean_type=mean_type, var_type=var_type,
                   karras_rho=karras_rho, karras_sigma_min=karras_sigma_min,
                   karras_sigma_max=karras_sigma_max, karras_sigma_labels=karras_sigma_labels)

  def run_all(sched, model_fn, keys, shape, *, num_steps, clip_denoised, dynamic_threshold,
              mean_type, var_type, karras_rho, karras_sigma_min, karras_sigma_max,
              karras_sigma_labels, **start_and_record):
    return solve(sched, model_fn, keys, shape, num_steps=num_steps, method=method,
                 rho=karras_rho, sigma_min=karras_sigma_min, sigma_max=karras_sigma_max,
                 sigma_labels=karras_sigma_labels, mean_type=mean_type, var_type=var_type,
                 clip_denoised=clip_denoised, dynamic_threshold=dynamic_threshold,
                 **start_and_record)

  return registry.SamplerEntry(
      name=method, run=run, settings=SCHEDULE_SETTINGS, **registry.capabilities(run_all),
      deterministic=lambda **settings: True,
      check=_check(method, False, SCHEDULE_SETTINGS), tag=_tag, summary=summary,
      min_steps=3 if method == "heun" else 2, visits_timesteps=False)


def _stochastic_entry() -> registry.SamplerEntry:
  """Algorithm 2: Heun's steps with noise added before each."""
  settings = SCHEDULE_SETTINGS + CHURN_SETTINGS

  def run(sched, model_fn, keys, shape, *, num_steps, clip_denoised, dynamic_threshold,
          mean_type, var_type, karras_rho, karras_sigma_min, karras_sigma_max,
          karras_sigma_labels, karras_s_churn, karras_s_tmin, karras_s_tmax, karras_s_noise):
    return run_all(sched, model_fn, keys, shape, num_steps=num_steps, clip_denoised=clip_denoised,
                   dynamic_threshold=dynamic_threshold, mean_type=mean_type, var_type=var_type,
                   karras_rho=karras_rho, karras_sigma_min=karras_sigma_min,
                   karras_sigma_max=karras_sigma_max, karras_sigma_labels=karras_sigma_labels,
                   karras_s_churn=karras_s_churn, karras_s_tmin=karras_s_tmin,
                   karras_s_tmax=karras_s_tmax, karras_s_noise=karras_s_noise)

  def run_all(sched, model_fn, keys, shape, *, num_steps, clip_denoised, dynamic_threshold,
              mean_type, var_type, karras_rho, karras_sigma_min, karras_sigma_max,
              karras_sigma_labels, karras_s_churn, karras_s_tmin, karras_s_tmax, karras_s_noise,
              **start_and_record):
    return solve(sched, model_fn, keys, shape, num_steps=num_steps, method="heun",
                 rho=karras_rho, sigma_min=karras_sigma_min, sigma_max=karras_sigma_max,
                 sigma_labels=karras_sigma_labels, s_churn=karras_s_churn, s_tmin=karras_s_tmin,
                 s_tmax=karras_s_tmax, s_noise=karras_s_noise, mean_type=mean_type,
                 var_type=var_type, clip_denoised=clip_denoised,
                 dynamic_threshold=dynamic_threshold, **start_and_record)

  return registry.SamplerEntry(
      name="karras_stochastic", run=run, settings=settings,
      **registry.capabilities(run_all),
      check=_check("heun", True, settings),
      tag=_tag, min_steps=3, visits_timesteps=False,
      summary="Karras et al.'s stochastic sampler (Algorithm 2, Heun with added noise): "
      "num_steps = network calls, odd (2N - 1 for N sigmas)")


ENTRIES = (
    _deterministic_entry("heun", "Karras et al.'s deterministic Heun sampler (Algorithm 1): "
                         "num_steps = network calls, odd (2N - 1 for N sigmas)"),
    _deterministic_entry("euler", "Karras et al.'s deterministic Euler sampler on their sigma "
                         "schedule: num_steps = network calls = sigmas"),
    _stochastic_entry(),
)
