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
    log_alphas = np.log1p(-betas)  # -inf where beta is 1 (the jsd schedule's last step)
  return dict(
      betas=betas,
      log_betas=np.log(betas),
      # log(1 - beta) keeps each step's alpha to float32's relative precision even where beta is
      # tiny or near 1, so `respace` recovers alpha_bar of any stretch of steps in float64.
      log_alphas=log_alphas,
      alphas_cumprod=alphas_cumprod,
      alphas_cumprod_prev=alphas_cumprod_prev,
      sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
      # 1 - alpha_bar from float64: formed from float32 alpha_bar it cancels near t = 0 (5e-4
      # relative at t = 0 on the cosine schedule).
      one_minus_alphas_cumprod=1.0 - alphas_cumprod,
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

  Build it with `Schedule.from_betas`, `make_schedule` or `respace`. Being a pytree of arrays, it
  is passed to jitted and sharded functions as an argument; `num_timesteps` is read from the
  static shape.

  How the network sees a timestep is part of the schedule: `model_timesteps(t)` is what every
  function of the math layer passes to the model. A respaced schedule (`respace`) keeps K of the
  T steps of the diffusion the model was trained on; its entry t is the original timestep
  `timestep_map[t]`, and the model is called with that. With `rescale_timesteps` the model sees
  the original timestep times 1000 / T, as a float (Improved DDPM's option).
  """
  betas: jax.Array
  log_betas: jax.Array
  log_alphas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  one_minus_alphas_cumprod: jax.Array
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
  # The original timestep of each entry [K] (int32); None: the entries are the original steps.
  timestep_map: jax.Array | None = None
  # The number of steps of the diffusion the model was trained on (T); static.
  base_num_timesteps: int = dataclasses.field(default=0, metadata=dict(static=True))
  rescale_timesteps: bool = dataclasses.field(default=False, metadata=dict(static=True))
  posterior_logvar: str = dataclasses.field(default="repeat_first", metadata=dict(static=True))

  @property
  def num_timesteps(self) -> int:
    return int(self.betas.shape[0])

  def original_timesteps(self, t: jax.Array) -> jax.Array:
    """The timesteps [B] of the trained diffusion that entries t [B] of this schedule are."""
    if self.timestep_map is None:
      return t
    return jnp.take(self.timestep_map, t)

  def model_timesteps(self, t: jax.Array) -> jax.Array:
    """What the network is given for entries t [B]: the original timesteps as they are, or
    times 1000 / T (in at least float32) with `rescale_timesteps`. Continuous times (DPM-Solver's,
    float) pass through alike."""
    t = self.original_timesteps(t)
    if self.rescale_timesteps:
      t = t.astype(jnp.promote_types(t.dtype, jnp.float32))
      return t * (1000.0 / self.base_num_timesteps)
    return t

  @classmethod
  def from_betas(cls, betas, *, posterior_logvar: str = "repeat_first",
                 rescale_timesteps: bool = False) -> "Schedule":
    """Precomputes every coefficient from betas.

    Args:
      betas: array [T] with every value in (0, 1], T >= 2.
      posterior_logvar: how the log of the posterior variance, which is 0 at t = 0, is clipped:
        "repeat_first" (the original's second file, `diffusion_utils_2.py`: the t = 0 entry takes
        the t = 1 value; the default) or "floor" (its first file, `diffusion_utils.py`:
        log(max(variance, 1e-20))). It sets `posterior_log_variance_clipped`, which the posterior
        and the `fixedsmall` variance use.
      rescale_timesteps: give the model t * 1000 / T (a float) instead of t.

    Returns:
      A `Schedule` of float32 arrays.
    """
    if posterior_logvar not in POSTERIOR_LOGVAR_RULES:
      raise ValueError(f"Unknown posterior_logvar {posterior_logvar!r}; choose one of "
                       f"{', '.join(POSTERIOR_LOGVAR_RULES)}.")
    betas = np.asarray(betas, dtype=np.float64)
    return cls._from_coefficients(betas, posterior_logvar, timestep_map=None,
                                  base_num_timesteps=betas.shape[0],
                                  rescale_timesteps=bool(rescale_timesteps))

  @classmethod
  def _from_coefficients(cls, betas, posterior_logvar, **fields) -> "Schedule":
    _check_betas(betas)
    coefs = _coefficients(betas, posterior_logvar)
    arrays = {name: jnp.asarray(value, dtype=jnp.float32) for name, value in coefs.items()}
    return cls(**arrays, posterior_logvar=posterior_logvar, **fields)


def make_schedule(kind: str = "linear", *, beta_start: float = 1e-4, beta_end: float = 0.02,
                  num_diffusion_timesteps: int = 1000, posterior_logvar: str = "repeat_first",
                  rescale_timesteps: bool = False) -> Schedule:
  """`Schedule.from_betas(get_beta_schedule(...))`; the defaults are the paper's schedule."""
  betas = get_beta_schedule(kind, beta_start=beta_start, beta_end=beta_end,
                            num_diffusion_timesteps=num_diffusion_timesteps)
  return Schedule.from_betas(betas, posterior_logvar=posterior_logvar,
                             rescale_timesteps=rescale_timesteps)


# --- Respacing (Nichol & Dhariwal 2021) ---------------------------------------------------------

def space_timesteps(num_timesteps: int, spec: str) -> np.ndarray:
  """The timesteps a respacing spec keeps, as Improved DDPM's reference interprets the spec.

  Args:
    num_timesteps: T of the diffusion to respace.
    spec: `'ddimN'`: every stride-th step from 0, for the integer stride giving exactly N steps
      (ddim50 of 1000 keeps 0, 20, ..., 980); `'N'` or `'N1,N2,...'`: T is split into as many
      equal sections as counts (the first T % sections one step longer), and section i keeps Ni
      evenly spaced steps from its first to its last, each rounded half to even.

  Returns:
    int64 array [K] of the kept timesteps, ascending and distinct.

  Raises:
    ValueError: for a spec that does not parse, keeps no step, or asks a section (or T) for more
      steps than it has.
  """
  T = int(num_timesteps)
  text = spec.strip() if isinstance(spec, str) else spec
  if not isinstance(text, str) or not text:
    raise ValueError(f"respacing spec must be a non-empty string such as 'ddim50', '50' or "
                     f"'10,20,30', got {spec!r}")
  if text.startswith("ddim"):
    count = _spec_int(text[len("ddim"):], spec)
    if not 1 <= count <= T:
      raise ValueError(f"respacing {spec!r} asks for {count} steps; T={T} has 1..{T}")
    for stride in range(1, T + 1):
      if len(range(0, T, stride)) == count:
        return np.arange(0, T, stride)
    raise ValueError(f"respacing {spec!r}: no integer stride keeps exactly {count} of T={T} "
                     f"steps; use a count such as '{count}' (evenly spaced, rounded) instead")
  counts = [_spec_int(part, spec) for part in text.split(",")]
  if any(c < 0 for c in counts) or sum(counts) < 1:
    raise ValueError(f"respacing {spec!r} must give every section a count >= 0 and keep at "
                     f"least one step")
  if sum(counts) > T:
    raise ValueError(f"respacing {spec!r} keeps {sum(counts)} steps, more than T={T}")
  size, longer = divmod(T, len(counts))
  kept, start = [], 0
  for i, count in enumerate(counts):
    length = size + (1 if i < longer else 0)
    if count > length:
      raise ValueError(f"respacing {spec!r}: section {i} has {length} steps of T={T}, fewer "
                       f"than the {count} asked of it")
    # Steps accumulate in floating point and are rounded half to even, as the reference does.
    stride = (length - 1) / (count - 1) if count > 1 else 1
    position = 0.0
    for _ in range(count):
      kept.append(start + round(position))
      position += stride
    start += length
  return np.unique(np.asarray(kept, dtype=np.int64))


def _spec_int(text: str, spec) -> int:
  try:
    return int(text.strip())
  except ValueError:
    raise ValueError(f"respacing {spec!r} does not parse: use 'ddimN', 'N' or counts per "
                     f"section such as '10,20,30'") from None


def check_timesteps(timesteps, num_timesteps: int) -> np.ndarray:
  """`timesteps` as an integer array, or ValueError unless they are ascending, distinct steps
  in [0, num_timesteps) (at least one)."""
  kept = np.asarray(timesteps)
  if (kept.ndim != 1 or kept.size < 1 or not np.issubdtype(kept.dtype, np.integer)
      or kept[0] < 0 or kept[-1] >= num_timesteps or np.any(np.diff(kept) <= 0)):
    raise ValueError(f"timesteps must be ascending, distinct integers in [0, {num_timesteps}), "
                     f"got {timesteps!r}")
  return kept


def respace(sched: Schedule, timesteps) -> Schedule:
  """The diffusion over a subset of the steps of `sched`: a schedule of K = len(timesteps)
  steps whose alpha_bar at step i is `sched`'s at timesteps[i].

  Its betas are 1 - alpha_bar(kept_i) / alpha_bar(kept_{i-1}), computed in float64 from `sched`'s
  log(1 - beta) (good to float32's relative precision for every beta); every other coefficient
  follows from them as in `Schedule.from_betas` (with `sched`'s posterior_logvar rule).
  The model is still called with the original timesteps (`Schedule.model_timesteps`).

  Args:
    sched: a concrete schedule (not traced); itself possibly respaced.
    timesteps: ascending, distinct entries of `sched` to keep, e.g. `space_timesteps(T, 'ddim50')`.

  Returns:
    The respaced `Schedule`.
  """
  kept = check_timesteps(timesteps, sched.num_timesteps)
  if isinstance(sched.betas, jax.core.Tracer):
    raise ValueError("respace needs a concrete schedule: respace it outside jit and pass the "
                     "respaced schedule in")
  log_alphas_cumprod = np.cumsum(np.asarray(sched.log_alphas, dtype=np.float64))[kept]
  betas = -np.expm1(log_alphas_cumprod - np.append(0.0, log_alphas_cumprod[:-1]))
  if sched.timestep_map is not None:
    kept = np.asarray(sched.timestep_map)[kept]
  return Schedule._from_coefficients(
      betas, sched.posterior_logvar, timestep_map=jnp.asarray(kept, jnp.int32),
      base_num_timesteps=sched.base_num_timesteps, rescale_timesteps=sched.rescale_timesteps)
