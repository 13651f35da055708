"""The forward process, the model's reverse process, the training losses and the bound.

Pure functions of a `Schedule` and arrays: randomness comes in as noise arrays or keys, never
drawn unseen. Images are [B, H, W, C] (any [B, ...] works), timesteps t are int [B] in [0, T).
The network is called as model_fn(x_t, sched.model_timesteps(t)): a respaced schedule maps its
entries to the timesteps the model was trained on.

Mean types (what the network predicts): `eps` (the noise), `xstart` (x_0), `xprev` (the mean of
x_{t-1}). Variance types: `fixedlarge` (beta_t), `fixedsmall` (the posterior variance
beta_tilde_t), `learned` (the network outputs 2C channels, the second half being the
log-variance), `learned_range` (2C channels, the second half v interpolating the log-variance
between log beta_tilde_t and log beta_t: Improved DDPM). Loss types: `mse` (unweighted mean
squared error against the mean type's target; not with a learned variance), `kl` (the bound's
term for t, in bits/dim), `rescaled_kl` (that times T), `hybrid` (mse plus the bound's term times
T / 1000 with the predicted mean held fixed, so the bound trains only the variance: Improved
DDPM's L_hybrid; a learned variance only).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from diffusion_jax.core import likelihood
from diffusion_jax.core import prng
from diffusion_jax.core.schedules import Schedule

MEAN_TYPES = ("eps", "xstart", "xprev", "v")
VAR_TYPES = ("fixedlarge", "fixedsmall", "learned", "learned_range")
LEARNED_VAR_TYPES = ("learned", "learned_range")  # the network outputs 2C channels
LOSS_TYPES = ("mse", "kl", "rescaled_kl", "hybrid")
# The terms `training_losses` returns beside 'loss', for each loss type.
LOSS_TERMS = {"mse": ("mse",), "kl": ("vb",), "rescaled_kl": ("vb",), "hybrid": ("mse", "vb")}

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def type_problems(*, mean_type: str | None = None, var_type: str | None = None,
                  loss_type: str | None = None, min_snr_gamma: float = 0.0,
                  field: Callable[[str], str] = str, flag: Callable[[str], str] = str,
                  also: Callable[[str, str], str] = lambda name, values: "") -> list[str]:
  """What is wrong with these diffusion types (None: not given), one message per problem, each
  saying what to set: an unknown type; a loss that cannot train the variance (mse with a learned
  one, which only the bound's term trains; hybrid with a fixed one, leaving its bound term
  nothing to train); min-SNR weighting (gamma > 0) of a mean type or a loss it does not weight.

  Args:
    mean_type, var_type, loss_type, min_snr_gamma: the types (see the module's docstring) and
      the min-SNR gamma (0 = no weighting).
    field: a type's name in a message, e.g. `lambda n: f"diffusion.{n}"`.
    flag: how to set a type, e.g. `lambda n: f"--config.diffusion.{n}"`.
    also: another way to set one type to one of these values ('|'-separated), appended to the
      message of an unknown type, e.g. a config argument; '' = none.

  Returns:
    the messages (empty: the types work together).
  """
  out, known = [], {}
  for name, value, allowed in (("mean_type", mean_type, MEAN_TYPES),
                               ("var_type", var_type, VAR_TYPES),
                               ("loss_type", loss_type, LOSS_TYPES)):
    if value is None:
      continue
    if value not in allowed:
      choices = "|".join(allowed)
      out.append(f"{field(name)}={value!r} must be one of {', '.join(allowed)}: set "
                 f"{flag(name)}={choices}{also(name, choices)}")
    else:
      known[name] = value
  var_type, loss_type = known.get("var_type"), known.get("loss_type")
  if var_type and loss_type:
    learned = var_type in LEARNED_VAR_TYPES
    if (loss_type == "mse" and learned) or (loss_type == "hybrid" and not learned):
      # The losses that can train this variance, and the variances this loss can train.
      losses = [l for l in LOSS_TYPES if l != loss_type and (l != "mse" if learned else
                                                             l != "hybrid")]
      var_types = [v for v in VAR_TYPES if (v in LEARNED_VAR_TYPES) != learned]
      out.append(f"{field('loss_type')}={loss_type!r} cannot train {field('var_type')}="
                 f"{var_type!r} ({'a learned' if learned else 'a fixed'} variance): set "
                 f"{flag('loss_type')}={'|'.join(losses)}, or keep loss_type={loss_type} with "
                 f"{flag('var_type')}={'|'.join(var_types)}")
  if not (isinstance(min_snr_gamma, (int, float)) and math.isfinite(min_snr_gamma)
          and min_snr_gamma >= 0):
    out.append(f"{field('min_snr_gamma')}={min_snr_gamma!r} must be a number >= 0 (0 = no "
               f"weighting): set {flag('min_snr_gamma')}=0 or a positive gamma, e.g. 5")
  elif min_snr_gamma and known.get("mean_type") and loss_type and (
      known["mean_type"] not in MIN_SNR_MEAN_TYPES or loss_type not in MIN_SNR_LOSS_TYPES):
    out.append(
        f"{field('min_snr_gamma')}={min_snr_gamma!r} weights the mse term of mean types "
        f"{', '.join(MIN_SNR_MEAN_TYPES)} (losses {', '.join(MIN_SNR_LOSS_TYPES)}), not "
        f"mean_type {known['mean_type']!r} with loss_type {loss_type!r}: set "
        f"{flag('min_snr_gamma')}=0, or {flag('mean_type')}={'|'.join(MIN_SNR_MEAN_TYPES)} with "
        f"{flag('loss_type')}={'|'.join(MIN_SNR_LOSS_TYPES)}")
  return out


def check_types(*, mean_type: str | None = None, var_type: str | None = None,
                loss_type: str | None = None) -> None:
  """Raises ValueError, saying what to use, for what `type_problems` refuses in these types."""
  problems = type_problems(mean_type=mean_type, var_type=var_type, loss_type=loss_type)
  if problems:
    raise ValueError(problems[0])


def extract(coef: jax.Array, t: jax.Array, x_shape) -> jax.Array:
  """Gathers coef[t] and reshapes it to [B, 1, ..., 1] to broadcast against an array of x_shape."""
  t = jnp.asarray(t)
  if t.ndim != 1 or t.shape[0] != x_shape[0]:
    raise ValueError(f"t must have shape [B] = ({x_shape[0]},) to match x of shape "
                     f"{tuple(x_shape)}; got {t.shape}")
  out = jnp.take(jnp.asarray(coef), t)
  return out.reshape((x_shape[0],) + (1,) * (len(x_shape) - 1))


def call_model(sched: Schedule, model_fn: ModelFn, x_t, t) -> jax.Array:
  """The network at (x_t, t) for entries t [B] of `sched`:
  model_fn(x_t, sched.model_timesteps(t))."""
  return model_fn(x_t, sched.model_timesteps(t))


def _check_same_shape(**arrays):
  shapes = {name: tuple(a.shape) for name, a in arrays.items()}
  if len(set(shapes.values())) != 1:
    raise ValueError("shape mismatch: " + ", ".join(f"{n} {s}" for n, s in shapes.items()))


# --- The forward process q ---------------------------------------------------------------------

def q_mean_variance(sched: Schedule, x_start, t):
  """Mean, variance and log-variance of q(x_t | x_0).

  Returns:
    (mean [B, ...], variance [B, 1, ...], log_variance [B, 1, ...]).
  """
  mean = extract(sched.sqrt_alphas_cumprod, t, x_start.shape) * x_start
  variance = extract(sched.one_minus_alphas_cumprod, t, x_start.shape)
  log_variance = extract(sched.log_one_minus_alphas_cumprod, t, x_start.shape)
  return mean, variance, log_variance


def q_sample(sched: Schedule, x_start, t, noise) -> jax.Array:
  """Samples q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) with the given noise.

  Args:
    sched: the schedule.
    x_start: x_0 [B, ...].
    t: int [B]; t = 0 means one step of diffusion.
    noise: standard normal noise, shape of x_start.

  Returns:
    x_t, shape of x_start.
  """
  _check_same_shape(x_start=x_start, noise=noise)
  return (extract(sched.sqrt_alphas_cumprod, t, x_start.shape) * x_start
          + extract(sched.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)


def q_posterior_mean_variance(sched: Schedule, x_start, x_t, t):
  """Mean, variance and clipped log-variance of the posterior q(x_{t-1} | x_t, x_0).

  Returns:
    (mean [B, ...], variance [B, 1, ...], log_variance_clipped [B, 1, ...]); the clipping rule
    of the log-variance at t = 0 is the schedule's (`Schedule.from_betas(posterior_logvar=...)`).
  """
  _check_same_shape(x_start=x_start, x_t=x_t)
  mean = (extract(sched.posterior_mean_coef1, t, x_t.shape) * x_start
          + extract(sched.posterior_mean_coef2, t, x_t.shape) * x_t)
  variance = extract(sched.posterior_variance, t, x_t.shape)
  log_variance = extract(sched.posterior_log_variance_clipped, t, x_t.shape)
  return mean, variance, log_variance


def predict_xstart_from_eps(sched: Schedule, x_t, t, eps) -> jax.Array:
  """x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
  _check_same_shape(x_t=x_t, eps=eps)
  return (extract(sched.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
          - extract(sched.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps)


def predict_xstart_from_xprev(sched: Schedule, x_t, t, xprev) -> jax.Array:
  """x_0 = (xprev - coef2_t x_t) / coef1_t, inverting the posterior mean."""
  _check_same_shape(x_t=x_t, xprev=xprev)
  return (extract(sched.recip_posterior_mean_coef1, t, x_t.shape) * xprev
          - extract(sched.posterior_mean_coef2_over_coef1, t, x_t.shape) * x_t)


def predict_xstart_from_v(sched: Schedule, x_t, t, v) -> jax.Array:
  """x_0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v (Salimans & Ho, arXiv 2202.00512)."""
  _check_same_shape(x_t=x_t, v=v)
  return (extract(sched.sqrt_alphas_cumprod, t, x_t.shape) * x_t
          - extract(sched.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v)


def predict_eps_from_v(sched: Schedule, x_t, t, v) -> jax.Array:
  """eps = sqrt(1 - alpha_bar_t) x_t + sqrt(alpha_bar_t) v."""
  _check_same_shape(x_t=x_t, v=v)
  return (extract(sched.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * x_t
          + extract(sched.sqrt_alphas_cumprod, t, x_t.shape) * v)


def v_target(sched: Schedule, x_start, t, noise) -> jax.Array:
  """The velocity v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 that diffuses x_0 with
  `noise` (eps) to x_t = q_sample(x_0, t, noise); what a mean_type 'v' network predicts."""
  _check_same_shape(x_start=x_start, noise=noise)
  return (extract(sched.sqrt_alphas_cumprod, t, x_start.shape) * noise
          - extract(sched.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * x_start)


def predict_eps_from_xstart(sched: Schedule, x_t, t, x_start) -> jax.Array:
  """eps = (x_t / sqrt(alpha_bar_t) - x_0) / sqrt(1 / alpha_bar_t - 1)."""
  _check_same_shape(x_t=x_t, x_start=x_start)
  return ((extract(sched.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - x_start)
          / extract(sched.sqrt_recipm1_alphas_cumprod, t, x_t.shape))


# --- The reverse process p ---------------------------------------------------------------------

class MeanVar(NamedTuple):
  """The model's p(x_{t-1} | x_t): every field has the shape of x_t."""
  mean: jax.Array
  variance: jax.Array
  log_variance: jax.Array
  pred_xstart: jax.Array


def split_model_output(model_output, x_shape, *, var_type: str):
  """Splits a network's output into (mean part, raw log-variance or None), checking its shape."""
  x_shape = tuple(x_shape)
  if var_type in LEARNED_VAR_TYPES:
    expected = x_shape[:-1] + (2 * x_shape[-1],)
    if tuple(model_output.shape) != expected:
      raise ValueError(f"with var_type {var_type!r} the model must output {expected} (twice the "
                       f"channels of x), got {tuple(model_output.shape)}")
    mean_part, log_variance = jnp.split(model_output, 2, axis=-1)
    return mean_part, log_variance
  if tuple(model_output.shape) != x_shape:
    raise ValueError(f"with var_type {var_type!r} the model must output the shape of x, "
                     f"{x_shape}, got {tuple(model_output.shape)}")
  return model_output, None


def pred_xstart_from_output(sched: Schedule, mean_output, x_t, t, *, mean_type: str):
  """x_0 as the mean part of a network's output implies it, for each mean type."""
  if mean_type == "eps":
    return predict_xstart_from_eps(sched, x_t, t, mean_output)
  if mean_type == "xstart":
    return mean_output
  if mean_type == "xprev":
    return predict_xstart_from_xprev(sched, x_t, t, mean_output)
  if mean_type == "v":
    return predict_xstart_from_v(sched, x_t, t, mean_output)
  check_types(mean_type=mean_type)
  raise AssertionError(f"mean_type {mean_type!r} is known but has no x_0")


def clip_xstart(pred_xstart, *, clip_denoised: bool, dynamic_threshold: float = 0.0):
  """An x_0 prediction [B, ...] as a sampler uses it: as it is (clip_denoised False), clipped to
  [-1, 1], or with dynamic thresholding (Saharia et al. 2022, Imagen; dynamic_threshold = p in
  (0, 100]): each example's s = max(1, the p-th percentile of its |x_0|), and x_0 clipped to
  [-s, s] and divided by s, so a prediction beyond [-1, 1] is pulled back whole rather than
  saturated pixel by pixel. The percentile interpolates linearly (NumPy's default).

  Raises:
    ValueError: dynamic_threshold outside [0, 100], or > 0 without clip_denoised.
  """
  if not 0 <= dynamic_threshold <= 100:
    raise ValueError(f"dynamic_threshold={dynamic_threshold!r} must be a percentile in (0, 100], "
                     f"or 0 for none")
  if dynamic_threshold and not clip_denoised:
    raise ValueError(f"dynamic_threshold={dynamic_threshold!r} is a way to clip the x_0 "
                     f"predictions: it needs clip_denoised=True")
  if not clip_denoised:
    return pred_xstart
  if not dynamic_threshold:
    return jnp.clip(pred_xstart, -1.0, 1.0)
  flat = jnp.abs(pred_xstart.reshape(pred_xstart.shape[0], -1)).astype(jnp.float32)
  s = jnp.maximum(jnp.percentile(flat, dynamic_threshold, axis=1), 1.0)
  s = s.reshape((-1,) + (1,) * (pred_xstart.ndim - 1)).astype(pred_xstart.dtype)
  return jnp.clip(pred_xstart, -s, s) / s


def p_mean_variance(sched: Schedule, model_output, x_t, t, *, mean_type: str, var_type: str,
                    clip_denoised: bool, dynamic_threshold: float = 0.0) -> MeanVar:
  """The model's Gaussian p(x_{t-1} | x_t) from the network's output.

  Args:
    sched: the schedule.
    model_output: the network's output at (x_t, t): shape of x_t, or twice its channels when
      var_type is 'learned' or 'learned_range'.
    x_t: [B, ...].
    t: int [B].
    mean_type: 'eps', 'xstart', 'xprev' or 'v' (sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0).
    var_type: 'fixedlarge', 'fixedsmall', 'learned' (the extra channels are the log-variance) or
      'learned_range' (they are v, and the log-variance is frac log beta_t + (1 - frac)
      log beta_tilde_t with frac = (v + 1) / 2, v unclipped, beta_tilde_t's log clipped as the
      schedule's posterior).
    clip_denoised: clip the x_0 prediction to [-1, 1] (the posterior mean is computed from the
      clipped value, except for 'xprev', whose mean is the output itself).
    dynamic_threshold: with clip_denoised, clip by dynamic thresholding at this percentile
      instead (`clip_xstart`); 0 = to [-1, 1].

  Returns:
    MeanVar(mean, variance, log_variance, pred_xstart), each of x_t's shape.
  """
  check_types(mean_type=mean_type, var_type=var_type)
  mean_output, learned_log_variance = split_model_output(model_output, x_t.shape,
                                                         var_type=var_type)
  if var_type == "learned":
    log_variance = learned_log_variance
    variance = jnp.exp(log_variance)
  elif var_type == "learned_range":
    frac = (learned_log_variance + 1.0) / 2.0
    log_variance = (frac * extract(sched.log_betas, t, x_t.shape)
                    + (1.0 - frac) * extract(sched.posterior_log_variance_clipped, t, x_t.shape))
    variance = jnp.exp(log_variance)
  else:
    if var_type == "fixedlarge":
      variance_coef, log_variance_coef = sched.betas, sched.fixedlarge_log_variance
    else:
      variance_coef, log_variance_coef = sched.posterior_variance, sched.posterior_log_variance_clipped
    variance = jnp.broadcast_to(extract(variance_coef, t, x_t.shape), x_t.shape)
    log_variance = jnp.broadcast_to(extract(log_variance_coef, t, x_t.shape), x_t.shape)

  pred_xstart = clip_xstart(
      pred_xstart_from_output(sched, mean_output, x_t, t, mean_type=mean_type),
      clip_denoised=clip_denoised, dynamic_threshold=dynamic_threshold)
  if mean_type == "xprev":
    mean = mean_output
  else:
    mean, _, _ = q_posterior_mean_variance(sched, pred_xstart, x_t, t)
  return MeanVar(mean, variance, log_variance, pred_xstart)


def guided_output(cond_output, uncond_output, guidance_scale, x_shape, *, var_type: str):
  """Classifier-free guidance (Ho & Salimans, arXiv 2207.12598) of one network output.

  The mean parts combine as (1 + w) cond - w uncond. For eps this is the paper's guided noise;
  x_0, v and x_{t-1} outputs are each an affine function of eps at a given x_t (eps's weights
  sum to one here), so combining them directly equals converting both to eps, combining and
  converting back. A learned variance comes from the conditional output.

  Args:
    cond_output, uncond_output: the network's outputs at the same (x_t, t) with the labels and
      with the null class.
    guidance_scale: w >= 0 (0 gives cond_output).
    x_shape: x_t's shape.
    var_type: as in `p_mean_variance` (learned types: the extra channels are the variance).

  Returns:
    the guided output, cond_output's shape.
  """
  cond_mean, cond_var = split_model_output(cond_output, x_shape, var_type=var_type)
  uncond_mean, _ = split_model_output(uncond_output, x_shape, var_type=var_type)
  mean = (1.0 + guidance_scale) * cond_mean - guidance_scale * uncond_mean
  return mean if cond_var is None else jnp.concatenate([mean, cond_var], axis=-1)


# --- The variational bound ---------------------------------------------------------------------

def vb_terms_bpd(sched: Schedule, model_output, x_start, x_t, t, *, mean_type: str,
                 var_type: str, clip_denoised: bool):
  """The bound's term for each example's t, in bits/dim.

  KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, and the discretized decoder's negative
  log-likelihood -log p(x_0 | x_1) at t = 0.

  Returns:
    (terms [B] in bits/dim, pred_xstart [B, ...]).
  """
  true_mean, _, true_log_variance = q_posterior_mean_variance(sched, x_start, x_t, t)
  out = p_mean_variance(sched, model_output, x_t, t, mean_type=mean_type, var_type=var_type,
                        clip_denoised=clip_denoised)
  kl = likelihood.normal_kl(true_mean, true_log_variance, out.mean, out.log_variance)
  kl = likelihood.mean_flat(kl) / math.log(2.0)
  decoder_nll = -likelihood.discretized_gaussian_log_likelihood(
      x_start, means=out.mean, log_scales=0.5 * out.log_variance)
  decoder_nll = likelihood.mean_flat(decoder_nll) / math.log(2.0)
  return jnp.where(t == 0, decoder_nll, kl), out.pred_xstart


def prior_bpd(sched: Schedule, x_start) -> jax.Array:
  """KL(q(x_T | x_0) || N(0, I)) in bits/dim, per example [B]; independent of the model."""
  t_last = jnp.full((x_start.shape[0],), sched.num_timesteps - 1, dtype=jnp.int32)
  mean, _, log_variance = q_mean_variance(sched, x_start, t_last)
  kl = likelihood.normal_kl(mean, jnp.broadcast_to(log_variance, x_start.shape), 0.0, 0.0)
  return likelihood.mean_flat(kl) / math.log(2.0)


class BpdResult(NamedTuple):
  """The full bound of `calc_bpd_loop`, in bits/dim."""
  total_bpd: jax.Array   # [B]: sum of terms_bpd over t, plus prior_bpd
  terms_bpd: jax.Array   # [B, T]: terms_bpd[:, t] is the bound's term for t
  prior_bpd: jax.Array   # [B]: KL(q(x_T | x_0) || N(0, I))
  mse: jax.Array         # [B, T]: mean squared error of the x_0 prediction at each t


def calc_bpd_loop(sched: Schedule, model_fn: ModelFn, x_start, keys, *, mean_type: str,
                  var_type: str, clip_denoised: bool = True) -> BpdResult:
  """Every term of the variational bound, one compiled `lax.scan` over t = T-1 .. 0.

  Args:
    sched: the schedule.
    model_fn: model_fn(x_t [B, ...], t [B]) -> network output.
    x_start: data [B, ...] in [-1, 1] (8-bit values, rescaled).
    keys: one PRNG key per example [B]; the noise of x_t for timestep t is
      `normal(fold_in(key, t))`, so the result does not depend on how the batch is sharded.
    mean_type, var_type: as in `p_mean_variance`.
    clip_denoised: clip the x_0 prediction to [-1, 1].

  Returns:
    BpdResult(total_bpd [B], terms_bpd [B, T], prior_bpd [B], mse [B, T]).
  """
  check_types(mean_type=mean_type, var_type=var_type)
  batch = prng.num_keys(keys)
  if batch != x_start.shape[0]:
    raise ValueError(f"need one key per example: {batch} keys for a batch of {x_start.shape[0]}")

  def body(_, t):
    t_b = jnp.full((batch,), t, dtype=jnp.int32)
    noise = prng.normal_each(prng.fold_in_each(keys, t), x_start.shape[1:], x_start.dtype)
    x_t = q_sample(sched, x_start, t_b, noise)
    terms, pred_xstart = vb_terms_bpd(sched, call_model(sched, model_fn, x_t, t_b), x_start,
                                      x_t, t_b, mean_type=mean_type, var_type=var_type,
                                      clip_denoised=clip_denoised)
    return None, (terms, likelihood.mean_flat(jnp.square(pred_xstart - x_start)))

  timesteps = jnp.arange(sched.num_timesteps - 1, -1, -1, dtype=jnp.int32)
  _, (terms_tb, mse_tb) = jax.lax.scan(body, None, timesteps)
  # The scan ran t = T-1 .. 0; put t on the second axis in increasing order.
  terms_bpd = terms_tb[::-1].T
  mse = mse_tb[::-1].T
  prior = prior_bpd(sched, x_start)
  return BpdResult(jnp.sum(terms_bpd, axis=1) + prior, terms_bpd, prior, mse)


# --- Training ----------------------------------------------------------------------------------

# The losses and mean types min-SNR weighting applies to (the mse term of these losses).
MIN_SNR_LOSS_TYPES = ("mse", "hybrid")
MIN_SNR_MEAN_TYPES = ("eps", "xstart", "v")


def check_min_snr(min_snr_gamma: float, *, mean_type: str, loss_type: str) -> None:
  """Raises ValueError, saying what to change, unless min-SNR weighting with this gamma (0: none)
  can weight this loss (`type_problems`)."""
  problems = type_problems(mean_type=mean_type, loss_type=loss_type, min_snr_gamma=min_snr_gamma)
  if problems:
    raise ValueError(problems[0])


def min_snr_weight(sched: Schedule, t, min_snr_gamma: float, *, mean_type: str) -> jax.Array:
  """Min-SNR-gamma loss weights (Hang et al., arXiv 2303.09556) of timesteps t [B].

  With SNR_t = alpha_bar_t / (1 - alpha_bar_t): min(SNR_t, gamma) / SNR_t for eps,
  min(SNR_t, gamma) for xstart and min(SNR_t, gamma) / (SNR_t + 1) for v: each weight times its
  mse is min(SNR_t, gamma) times the squared error of the x_0 the output implies.

  Returns:
    float [B].
  """
  abar = sched.alphas_cumprod[t]
  # 1 - alpha_bar_t computed in float64: in float32 it would lose most of its digits near t = 0,
  # where alpha_bar_t ~ 1.
  one_minus_abar = sched.one_minus_alphas_cumprod[t]
  snr = abar / one_minus_abar
  clipped = jnp.minimum(snr, min_snr_gamma)
  if mean_type == "eps":
    # min(1, gamma / SNR_t): 1, not 0 / 0, where a schedule ends with alpha_bar_T = 0.
    return jnp.minimum(1.0, min_snr_gamma * one_minus_abar / abar)
  if mean_type == "xstart":
    return clipped
  if mean_type == "v":
    return clipped * one_minus_abar  # 1 / (SNR_t + 1) = 1 - alpha_bar_t
  raise ValueError(f"min-SNR weights exist for mean_type {', '.join(MIN_SNR_MEAN_TYPES)}, not "
                   f"{mean_type!r}")


def training_losses(sched: Schedule, model_fn: ModelFn, x_start, t, noise, *, mean_type: str,
                    var_type: str, loss_type: str, rescale_learned_sigmas: bool = True,
                    min_snr_gamma: float = 0.0) -> dict[str, jax.Array]:
  """Per-example training losses and the terms they are made of.

  Args:
    sched: the schedule.
    model_fn: model_fn(x_t [B, ...], model timesteps [B]) -> network output.
    x_start: data [B, ...] in [-1, 1].
    t: int [B] timesteps.
    noise: standard normal noise of x_start's shape, which diffuses x_start to x_t.
    mean_type, var_type: as in `p_mean_variance`.
    loss_type: 'mse' (mean over dimensions of the squared error against the noise, x_0 or the
      posterior mean, as mean_type says), 'kl' (the bound's term for t, in bits/dim),
      'rescaled_kl' (that times T) or 'hybrid' (mse plus the bound's term times T / 1000,
      computed with the mean part of the output held fixed by a stop-gradient, so that it
      trains only the variance).
    rescale_learned_sigmas: hybrid only: the bound's term times T / 1000 (True, Improved
      DDPM's L_hybrid, lambda = 0.001 per step), or as it is (False: what the reference
      calls rescale_learned_sigmas=False, used for its class-conditional ImageNet-64 model).
    min_snr_gamma: > 0 weights the mse term of each example by `min_snr_weight` (mse and hybrid
      losses, mean types eps, xstart and v); 0 (default) leaves it unweighted.

  Returns:
    dict of [B] arrays: 'loss' (what to minimize), with 'mse' (as it enters the loss: weighted
    with min_snr_gamma) for mse and hybrid and 'vb' (the bound's term as it enters the loss,
    rescaled for rescaled_kl and hybrid) for kl, rescaled_kl and hybrid.
  """
  check_types(mean_type=mean_type, var_type=var_type, loss_type=loss_type)
  check_min_snr(min_snr_gamma, mean_type=mean_type, loss_type=loss_type)
  x_t = q_sample(sched, x_start, t, noise)
  model_output = call_model(sched, model_fn, x_t, t)
  num_timesteps = sched.num_timesteps
  if loss_type in ("kl", "rescaled_kl"):
    vb, _ = vb_terms_bpd(sched, model_output, x_start, x_t, t, mean_type=mean_type,
                         var_type=var_type, clip_denoised=False)
    if loss_type == "rescaled_kl":
      vb = vb * num_timesteps
    return dict(loss=vb, vb=vb)
  mean_output, variance_output = split_model_output(model_output, x_start.shape,
                                                    var_type=var_type)
  if mean_type == "eps":
    target = noise
  elif mean_type == "xstart":
    target = x_start
  elif mean_type == "v":
    target = v_target(sched, x_start, t, noise)
  else:
    target, _, _ = q_posterior_mean_variance(sched, x_start, x_t, t)
  mse = likelihood.mean_flat(jnp.square(target - mean_output))
  if min_snr_gamma:
    mse = mse * min_snr_weight(sched, t, min_snr_gamma, mean_type=mean_type).astype(mse.dtype)
  if loss_type == "mse":
    return dict(loss=mse, mse=mse)
  # hybrid: the bound's gradient reaches only the variance channels.
  frozen_output = jnp.concatenate([jax.lax.stop_gradient(mean_output), variance_output], axis=-1)
  vb, _ = vb_terms_bpd(sched, frozen_output, x_start, x_t, t, mean_type=mean_type,
                       var_type=var_type, clip_denoised=False)
  if rescale_learned_sigmas:
    vb = vb * (num_timesteps / 1000.0)
  return dict(loss=mse + vb, mse=mse, vb=vb)
