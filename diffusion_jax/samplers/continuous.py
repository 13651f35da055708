"""The continuous-time view of a discrete schedule: one place where a sampler that steps between
the trained timesteps (DPM-Solver, Karras et al.'s samplers) finds the noise level of any time
and the label the network is given there.

A schedule of T trained steps becomes a VP process on t in (0, 1]: log alpha_t (alpha_t =
sqrt(alpha_bar)) is interpolated linearly between t_n = (n + 1) / N, n = 0 .. N - 1, with N = T,
or N < T when the last steps are dropped (`min_lambda`: DPM-Solver's guard for schedules whose
last alpha_bar are ~0, such as the cosine one). The half log-SNR is lambda_t = log alpha_t -
log sigma_t (sigma_t^2 = 1 - alpha_t^2), and the noise-to-signal ratio sigma_t / alpha_t =
exp(-lambda_t) is the sigma of Karras et al.'s variance-exploding form.

The network is given the label (t - 1/N) T at time t, as LuChengTHU/dpm-solver gives it (its
`(t - 1/N) * 1000` for T = 1000 models): the trained timestep n at t_n when N = T. When steps are
dropped, the labels run from 0 to T (1 - 1/N), not to N - 1: the noise level of trained step n
is labelled n T / N, as in the reference (docs/fast_sampling.md measures what that costs).
`Schedule.model_timesteps` then rescales the labels as for every call.

Everything here is float64 NumPy on the host: the samplers turn it into per-step coefficients
once, before their scan.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from diffusion_jax.core.schedules import Schedule

MEAN_TYPES = ("eps", "xstart", "v")


@dataclasses.dataclass(frozen=True)
class DiscreteVP:
  """A discrete schedule as a continuous-time VP process (float64, host arrays).

  Attributes:
    log_alpha: log sqrt(alpha_bar_n) of the steps kept, [N].
    t: their continuous times (n + 1) / N, [N].
    num_timesteps: T, the number of steps the model was trained on (N <= T).
  """
  log_alpha: np.ndarray
  t: np.ndarray
  num_timesteps: int

  @property
  def num_steps(self) -> int:
    """N, the steps kept."""
    return len(self.t)

  def log_alpha_at(self, t) -> np.ndarray:
    return np.interp(t, self.t, self.log_alpha)

  def sigma_at(self, t) -> np.ndarray:
    return np.sqrt(-np.expm1(2.0 * self.log_alpha_at(t)))

  def lambda_at(self, t) -> np.ndarray:
    log_alpha = self.log_alpha_at(t)
    return log_alpha - 0.5 * np.log(-np.expm1(2.0 * log_alpha))

  def time_of_lambda(self, lam) -> np.ndarray:
    """The inverse of `lambda_at` (within [1/N, 1])."""
    log_alpha = -0.5 * np.logaddexp(0.0, -2.0 * np.asarray(lam, np.float64))
    return np.interp(log_alpha, self.log_alpha[::-1], self.t[::-1])

  def labels(self, t) -> np.ndarray:
    """The timesteps the network is given at times t: (t - 1/N) T (floats)."""
    return (np.asarray(t, np.float64) - 1.0 / self.num_steps) * self.num_timesteps


def discrete_vp(sched: Schedule, *, min_lambda: float | None = None) -> DiscreteVP:
  """The continuous-time view of a (not respaced) schedule.

  Args:
    sched: the trained schedule.
    min_lambda: drop the last steps whose half log-SNR is below this (None: keep all T).
  """
  if sched.timestep_map is not None:
    raise ValueError("the continuous-time view needs the trained schedule, not a respaced one")
  log_alpha = 0.5 * np.cumsum(np.asarray(sched.log_alphas, np.float64))
  keep = len(log_alpha)
  if min_lambda is not None:
    lam = log_alpha - 0.5 * np.log(-np.expm1(2.0 * log_alpha))
    keep -= int(np.sum(lam < min_lambda))
  return DiscreteVP(log_alpha=log_alpha[:keep], t=np.arange(1, keep + 1, dtype=np.float64) / keep,
                    num_timesteps=sched.base_num_timesteps or len(log_alpha))


def check_mean_type(mean_type: str, what: str) -> None:
  """Raises ValueError unless a sampler on the continuous view can read this model's output."""
  if mean_type not in MEAN_TYPES:
    raise ValueError(f"{what} needs a model of the noise, of x_0 or of v (mean_type 'eps', "
                     f"'xstart' or 'v'), got mean_type {mean_type!r}")


def xstart_from_output(out, x, alpha, sigma, *, mean_type: str):
  """x_0 as the network's output `out` at x = alpha x_0 + sigma eps implies it (v = alpha eps -
  sigma x_0, alpha^2 + sigma^2 = 1)."""
  if mean_type == "eps":
    return (x - sigma * out) / alpha
  if mean_type == "xstart":
    return out
  if mean_type == "v":
    return alpha * x - sigma * out
  check_mean_type(mean_type, "this sampler")


def eps_from_output(out, x, alpha, sigma, *, mean_type: str):
  """The noise as the network's output `out` at x = alpha x_0 + sigma eps implies it."""
  if mean_type == "eps":
    return out
  if mean_type == "xstart":
    return (x - alpha * out) / sigma
  if mean_type == "v":
    return sigma * x + alpha * out
  check_mean_type(mean_type, "this sampler")

