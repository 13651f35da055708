"""Deterministic DDIM on a grid uniform in continuous time: the sampler of progressively
distilled models (Salimans & Ho 2022), and the teacher's two steps that make their targets.

N steps visit the times u_i = i / N, i = N .. 1, of the continuous-time view of the trained
schedule (`continuous.discrete_vp`: u = (n + 1) / T is trained step n, and the network is given
the float label u T - 1 there), and land at u_0 = 0, where alpha = 1 and sigma = 0: the last
step returns the x_0 prediction. A step from u to s < u moves x_u = alpha_u x_0 + sigma_u eps to

    x_s = alpha_s x_0' + sigma_s eps',

with x_0' and eps' what the network's output at (x_u, u) implies (its x_0 prediction clipped as
`sample.clip_denoised` / `dynamic_threshold` say, the noise recomputed from the clipped x_0).

Why uniform in t: every grid of N steps is nested in that of 2N (u_i = 2i / 2N), down to one
step, as halving needs; the last step lands on the clean image exactly, with no extra network
call; it is the reference's grid (google-research diffusion_distillation: u = (i + 1) / N); and
with N = T it is DDIM over all T trained steps (labels 0 .. T - 1). A grid uniform in log-SNR
nests as well, but its end at u = 0 is at infinite SNR, so its last interval needs a choice of
its own. Integer DDIM grids (`ddim.ddim_timesteps`) do not nest: N = 4 of T = 200 is 0, 66, 133,
199.

Everything about the grid is float64 NumPy on the host; the steps run in the samples' dtype (at
least float32).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.core import diffusion
from diffusion_jax.core.schedules import Schedule
from diffusion_jax.samplers import common
from diffusion_jax.samplers import continuous
from diffusion_jax.samplers import registry

NAME = "ddim_continuous"


def times(num_steps: int) -> np.ndarray:
  """The grid of `num_steps` steps: u_i = i / N, i = 0 .. N (ascending, float64)."""
  if num_steps < 1:
    raise ValueError(f"a grid needs at least one step, got {num_steps}")
  return np.arange(num_steps + 1, dtype=np.float64) / num_steps


def check_num_steps(num_steps: int, num_timesteps: int) -> None:
  """Raises ValueError unless a grid of `num_steps` steps lies within the T trained steps (its
  finest time 1/N no finer than trained step 0's, 1/T)."""
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"a grid of {num_steps} steps uniform in time needs 1 to T = "
                     f"{num_timesteps} steps (its finest step, 1/{num_steps}, must not be finer "
                     f"than the trained steps' 1/{num_timesteps})")


def levels(vp: continuous.DiscreteVP, u) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(alpha, sigma, the network's label) at times u in [0, 1] (float64): alpha 1, sigma 0 and
  label -1 (never given to the network) at u = 0; u in (0, 1/T) is not part of the view."""
  u = np.asarray(u, np.float64)
  inside = u > 0
  if np.any(inside & (u < vp.t[0] - 1e-12)):
    raise ValueError(f"times in (0, {vp.t[0]}) lie below the trained steps")
  alpha = np.where(inside, np.exp(vp.log_alpha_at(u)), 1.0)
  sigma = np.where(inside, vp.sigma_at(np.where(inside, u, 1.0)), 0.0)
  return alpha, sigma, vp.labels(u)


def predict(model_fn: Callable, sched: Schedule, x, label, alpha, sigma, *, mean_type: str,
            var_type: str, clip_denoised: bool = False, dynamic_threshold: float = 0.0):
  """(x_0, eps): what the network's output at x = alpha x_0 + sigma eps implies, in x's dtype.

  Args:
    model_fn: model_fn(x [B, ...], labels [B] float) -> the network's output.
    sched: the schedule (rescales the labels as for every call).
    x: [B, ...].
    label, alpha, sigma: scalars or [B] (per example), sigma > 0.
    mean_type, var_type: the network's output types (a learned variance's channels unused).
    clip_denoised, dynamic_threshold: how the x_0 prediction is clipped
      (`diffusion.clip_xstart`); when it is, eps is recomputed from the clipped x_0.
  """
  batch = x.shape[0]
  per_example = lambda v: jnp.broadcast_to(jnp.asarray(v, x.dtype), (batch,)).reshape(
      (batch,) + (1,) * (x.ndim - 1))
  alpha, sigma = per_example(alpha), per_example(sigma)
  labels = jnp.broadcast_to(jnp.asarray(label, jnp.promote_types(x.dtype, jnp.float32)),
                            (batch,))
  out, _ = diffusion.split_model_output(model_fn(x, sched.model_timesteps(labels)), x.shape,
                                        var_type=var_type)
  out = out.astype(x.dtype)
  x0 = continuous.xstart_from_output(out, x, alpha, sigma, mean_type=mean_type)
  if not clip_denoised:
    return x0, continuous.eps_from_output(out, x, alpha, sigma, mean_type=mean_type)
  x0 = diffusion.clip_xstart(x0, clip_denoised=True, dynamic_threshold=dynamic_threshold)
  return x0, (x - alpha * x0) / sigma


def step(x0, eps, alpha_s, sigma_s):
  """DDIM's deterministic move to time s: alpha_s x_0 + sigma_s eps (x_0 itself at s = 0)."""
  return alpha_s * x0 + sigma_s * eps


def sample(sched: Schedule, model_fn: Callable, keys, shape, *, num_steps: int,
           mean_type: str = "eps", var_type: str = "fixedlarge", clip_denoised: bool = True,
           dynamic_threshold: float = 0.0, x_init=None, start: int | None = None,
           record_every: int = 0, dtype=jnp.float32):
  """Samples from x_T (drawn per example as every sampler does, or `x_init`) in `num_steps`
  network calls on the uniform grid.

  Args:
    sched: the trained (not respaced) schedule.
    model_fn: model_fn(x, labels [B] float) -> the network's output.
    keys: one key per example, [B].
    shape: the samples' shape [B, ...].
    num_steps: N, 1 .. T.
    mean_type: 'eps', 'xstart' or 'v'.
    var_type: the model's variance type (a learned variance's channels are unused).
    clip_denoised, dynamic_threshold: how each x_0 prediction is clipped.
    x_init: start from these x [B, ...] instead of the keys' draw of x_T.
    start: x_init is x at the trained timestep `start` (time u_s = (start + 1) / T): the grid is
      then u_s i / N (N = T meaning start + 1: the trained steps 0 .. start); None: from u = 1.
    record_every: > 0: also keep the x_0 prediction of every record_every-th call counted back
      from the last (`common.prediction_slots`).
    dtype: the arithmetic (float64 for reference runs under jax.enable_x64).

  Returns:
    the samples, [B, ...]; with record_every, (samples, x0_preds [B, N // record_every, ...],
    noisiest first).
  """
  continuous.check_mean_type(mean_type, f"sampler {NAME!r}")
  check_num_steps(num_steps, sched.num_timesteps)
  vp = continuous.discrete_vp(sched)
  u_top = 1.0
  if start is not None:
    u_top = float(vp.t[int(start)])
    if num_steps == sched.num_timesteps:
      num_steps = int(start) + 1
    if num_steps > int(start) + 1:
      raise ValueError(f"{num_steps} steps of {NAME!r} below timestep {start} would be finer "
                       f"than the trained steps: take at most {int(start) + 1}")
  alpha, sigma, labels = levels(vp, u_top * times(num_steps))
  if x_init is None:
    common.check_keys(keys, shape)
    x_init = common.initial_noise(keys, shape, sched)
  x_init = jnp.asarray(x_init).astype(dtype)
  slots = (common.prediction_slots(num_steps, record_every) if record_every
           else np.full(num_steps, -1, np.int32))
  # From the top down: the step from u_i to u_{i-1}.
  xs = tuple(jnp.asarray(v[::-1], dtype) for v in (labels[1:], alpha[1:], sigma[1:],
                                                    alpha[:-1], sigma[:-1]))
  xs += (jnp.asarray(slots),)

  def body(carry, coefficients):
    x, preds = carry
    label, alpha_t, sigma_t, alpha_s, sigma_s, slot = coefficients
    x0, eps = predict(model_fn, sched, x, label, alpha_t, sigma_t, mean_type=mean_type,
                      var_type=var_type, clip_denoised=clip_denoised,
                      dynamic_threshold=dynamic_threshold)
    if preds is not None:
      preds = common.keep_prediction(preds, slot, x0)
    return (step(x0, eps, alpha_s, sigma_s), preds), None

  preds = (common.empty_predictions(x_init, num_steps // record_every) if record_every
           else None)
  (x, preds), _ = jax.lax.scan(body, (x_init, preds), xs)
  return (x, preds) if record_every else x


def _check(field, *, count, num_timesteps, mean_type):
  try:
    continuous.check_mean_type(mean_type, f"sampler {NAME!r}")
    check_num_steps(count, num_timesteps)
  except ValueError as e:
    raise ValueError(f"{e}: set {field('num_steps')}, or another {field('sampler')}") from None


def _run(sched, model_fn, keys, shape, *, num_steps, clip_denoised, dynamic_threshold,
         mean_type, var_type):
  return sample(sched, model_fn, keys, shape, num_steps=num_steps, mean_type=mean_type,
                var_type=var_type, clip_denoised=clip_denoised,
                dynamic_threshold=dynamic_threshold)


ENTRY = registry.SamplerEntry(
    name=NAME, run=_run, check=_check, visits_timesteps=False,
    deterministic=lambda: True, **registry.capabilities(sample),
    summary="deterministic DDIM on a grid uniform in continuous time (float labels; what a "
    "progressively distilled model samples with)")
