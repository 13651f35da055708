"""Beta schedules and the precomputed coefficients of the diffusion process.

Every coefficient is computed in float64 NumPy, as the original does for accuracy, and stored as
float32 in `Schedule`, an immutable pytree that passes through `jit`, `vmap` and `shard_map` as an
ordinary argument. Timesteps are 0-indexed: t in [0, T).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("quad", "linear", "warmup10", "warmup50", "const", "jsd", "cosine")
POSTERIOR_LOGVAR_RULES = ("repeat_first", "floor")

# Nichol & Dhariwal (2021): offset of the cosine schedule and the cap on each beta.
_COSINE_OFFSET = 0.008
_COSINE_MAX_BETA = 0.999


def _warmup_betas(beta_start, beta_end, num_timesteps, warmup_frac):
  betas = beta_end * np.ones(num_timesteps, dtype=np.float64)
  warmup_time = int(num_timesteps * warmup_frac)
  betas[:warmup_time] = np.linspace(beta_start, beta_end, warmup_time, dtype=np.float64)
  return betas


def _cosine_betas(num_timesteps):
  steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  alphas_cumprod = np.cos((steps + _COSINE_OFFSET) / (1 + _COSINE_OFFSET) * math.pi / 2) ** 2
  betas = 1.0 - alphas_cumprod[1:] / alphas_cumprod[:-1]
  return np.minimum(betas, _COSINE_MAX_BETA)


def get_beta_schedule(kind: str, *, beta_start: float, beta_end: float,
                      num_diffusion_timesteps: int) -> np.ndarray:
  """Returns the betas of a named schedule, in float64.

  Args:
    kind: one of `BETA_SCHEDULES`. `quad`, `linear`, `warmup10`, `warmup50`, `const` and `jsd`
      are the original's; `cosine` (Nichol & Dhariwal 2021, betas capped at 0.999) ignores
      `beta_start` and `beta_end`.
    beta_start: the first beta of the ramped schedules.
    beta_end: the last beta of the ramped schedules (and every beta of `const`).
    num_diffusion_timesteps: T, the number of diffusion steps (at least 2).

  Returns:
    float64 array [T] of betas, each in (0, 1].

  Raises:
    ValueError: for an unknown kind, T < 2, or betas outside (0, 1].
  """
  num_timesteps = num_diffusion_timesteps
  if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)):
    raise ValueError(f"num_diffusion_timesteps must be an int, got {num_timesteps!r}")
  if num_timesteps < 2:
    raise ValueError(f"num_diffusion_timesteps must be at least 2, got {num_timesteps}")
  if kind == "quad":
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2
  elif kind == "linear":
    betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
  elif kind == "warmup10":
    betas = _warmup_betas(beta_start, beta_end, num_timesteps, 0.1)
  elif kind == "warmup50":
    betas = _warmup_betas(beta_start, beta_end, num_timesteps, 0.5)
  elif kind == "const":
    betas = beta_end * np.ones(num_timesteps, dtype=np.float64)
  elif kind == "jsd":  # 1/T, 1/(T-1), ..., 1
    betas = 1.0 / np.linspace(num_timesteps, 1, num_timesteps, dtype=np.float64)
  elif kind == "cosine":
    betas = _cosine_betas(num_timesteps)
  else:
    raise ValueError(f"Unknown beta schedule {kind!r}; choose one of {', '.join(BETA_SCHEDULES)}.")
  _check_betas(betas)
  return betas


def _check_betas(betas):
  if betas.ndim != 1:
    raise ValueError(f"betas must be a 1-D array [T], got shape {betas.shape}")
  if betas.shape[0] < 2:
    raise ValueError(f"betas must hold at least 2 timesteps, got {betas.shape[0]}")
  if not np.all(np.isfinite(betas)) or not (np.all(betas > 0) and np.all(betas <= 1)):
    bad = betas[~((betas > 0) & (betas <= 1))]
    raise ValueError(
        f"every beta must lie in (0, 1]; got values such as {bad[:3].tolist()} "
        "(check beta_start and beta_end)")


def _coefficients(betas: np.ndarray, posterior_logvar: str) -> dict[str, np.ndarray]:
  """All coefficients in float64, named as the fields of `Schedule`."""
  alphas = 1.0 - betas
  alphas_cumprod = np.cumprod(alphas)
  alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
  posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
  if posterior_logvar == "repeat_first":
    # The variance is 0 at t = 0; the second file of the original repeats the t = 1 value.
    posterior_log_variance_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
  else:
    posterior_log_variance_clipped = np.log(np.maximum(posterior_variance, 1e-20))
  posterior_mean_coef1 = betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)
  posterior_mean_coef2 = (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod)
  with np.errstate(divide="ignore"):  # alphas_cumprod[-1] is 0 for the jsd schedule
    sqrt_recip_alphas_cumprod = np.sqrt(1.0 / alphas_cumprod)
    sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / alphas_cumprod - 1.0)
    log_one_minus_alphas_cumprod = np.log(1.0 - alphas_cumprod)
  return dict(
      betas=betas,
      alphas_cumprod=alphas_cumprod,
      alphas_cumprod_prev=alphas_cumprod_prev,
      sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
      log_one_minus_alphas_cumprod=log_one_minus_alphas_cumprod,
      sqrt_recip_alphas_cumprod=sqrt_recip_alphas_cumprod,
      sqrt_recipm1_alphas_cumprod=sqrt_recipm1_alphas_cumprod,
      posterior_variance=posterior_variance,
      posterior_log_variance_clipped=posterior_log_variance_clipped,
      posterior_mean_coef1=posterior_mean_coef1,
      posterior_mean_coef2=posterior_mean_coef2,
      # (xprev - coef2 x_t) / coef1 gives x0 from a predicted posterior mean.
      recip_posterior_mean_coef1=1.0 / posterior_mean_coef1,
      posterior_mean_coef2_over_coef1=posterior_mean_coef2 / posterior_mean_coef1,
      # fixedlarge: variance beta, but the t = 0 log-variance is beta_tilde[1], which gives a
      # better decoder likelihood in the original.
      fixedlarge_log_variance=np.log(np.append(posterior_variance[1], betas[1:])),
  )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Schedule:
  """Precomputed diffusion coefficients, each a float32 array [T].

  Build it with `Schedule.from_betas` or `make_schedule`. Being a pytree of arrays, it is passed
  to jitted and sharded functions as an argument; `num_timesteps` is read from the static shape.
  """
  betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  log_one_minus_alphas_cumprod: jax.Array
  sqrt_recip_alphas_cumprod: jax.Array
  sqrt_recipm1_alphas_cumprod: jax.Array
  posterior_variance: jax.Array
  posterior_log_variance_clipped: jax.Array
  posterior_mean_coef1: jax.Array
  posterior_mean_coef2: jax.Array
  recip_posterior_mean_coef1: jax.Array
  posterior_mean_coef2_over_coef1: jax.Array
  fixedlarge_log_variance: jax.Array

  @property
  def num_timesteps(self) -> int:
    return int(self.betas.shape[0])

  @classmethod
  def from_betas(cls, betas, *, posterior_logvar: str = "repeat_first") -> "Schedule":
    """Precomputes every coefficient from betas.

    Args:
      betas: array [T] with every value in (0, 1], T >= 2.
      posterior_logvar: how the log of the posterior variance, which is 0 at t = 0, is clipped:
        "repeat_first" (the original's second file, `diffusion_utils_2.py`: the t = 0 entry takes
        the t = 1 value; the default) or "floor" (its first file, `diffusion_utils.py`:
        log(max(variance, 1e-20))). It sets `posterior_log_variance_clipped`, which the posterior
        and the `fixedsmall` variance use.

    Returns:
      A `Schedule` of float32 arrays.
    """
    if posterior_logvar not in POSTERIOR_LOGVAR_RULES:
      raise ValueError(f"Unknown posterior_logvar {posterior_logvar!r}; choose one of "
                       f"{', '.join(POSTERIOR_LOGVAR_RULES)}.")
    betas = np.asarray(betas, dtype=np.float64)
    _check_betas(betas)
    coefs = _coefficients(betas, posterior_logvar)
    return cls(**{name: jnp.asarray(value, dtype=jnp.float32) for name, value in coefs.items()})


def make_schedule(kind: str = "linear", *, beta_start: float = 1e-4, beta_end: float = 0.02,
                  num_diffusion_timesteps: int = 1000,
                  posterior_logvar: str = "repeat_first") -> Schedule:
  """`Schedule.from_betas(get_beta_schedule(...))`; the defaults are the paper's schedule."""
  betas = get_beta_schedule(kind, beta_start=beta_start, beta_end=beta_end,
                            num_diffusion_timesteps=num_diffusion_timesteps)
  return Schedule.from_betas(betas, posterior_logvar=posterior_logvar)
