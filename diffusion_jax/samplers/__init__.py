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
(`visited_timesteps`) and calls it. Each family is a module: `ancestral` (with the progressive
and interpolation chains), `ddim`, `dpm_solver`; `common` holds the keys and noise they share.
Adding a sampler is one module (or one function in its family's), one `SAMPLERS` entry, and its
tests under tests/samplers/ (against a NumPy reference, and through `sample`).
`check_sampler`'s general limits (num_steps in 0..T with 0 = all T, a respacing spec that parses,
eta >= 0) then apply to it; only a sampler with narrower limits, as ancestral sampling's, adds
them there.
"""
from __future__ import annotations

import numbers
from typing import Callable

import jax
import numpy as np

from diffusion_jax.core import schedules
from diffusion_jax.core.diffusion import ModelFn
from diffusion_jax.core.schedules import Schedule
from diffusion_jax.samplers import dpm_solver
from diffusion_jax.samplers.ancestral import interpolate
from diffusion_jax.samplers.ancestral import p_sample
from diffusion_jax.samplers.ancestral import p_sample_loop
from diffusion_jax.samplers.ancestral import p_sample_loop_progressive
from diffusion_jax.samplers.ancestral import p_sample_loop_trajectory
from diffusion_jax.samplers.ancestral import sample_ancestral
from diffusion_jax.samplers.ddim import ddim_sample_loop
from diffusion_jax.samplers.ddim import ddim_timesteps
from diffusion_jax.samplers.ddim import sample_ddim


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


__all__ = [
    "DPM_SAMPLERS", "SAMPLERS", "check_sampler", "ddim_sample_loop", "ddim_timesteps",
    "interpolate", "p_sample", "p_sample_loop", "p_sample_loop_progressive",
    "p_sample_loop_trajectory", "sample", "sample_ancestral", "sample_ddim", "visited_timesteps",
]
