"""An independent float64 NumPy version of the paper's formulas, for checking the JAX code.

Written from the equations of Ho et al. (2020) and the conventions of the original code, not
from diffusion_jax: coefficient arrays are plain dicts, timesteps are 0-indexed.
"""
import math

import numpy as np
from scipy import special


def beta_schedule(kind, beta_start, beta_end, T):
  i = np.arange(T, dtype=np.float64)
  if kind == "linear":
    return beta_start + (beta_end - beta_start) * i / (T - 1)
  if kind == "quad":
    a, b = math.sqrt(beta_start), math.sqrt(beta_end)
    return (a + (b - a) * i / (T - 1)) ** 2
  if kind in ("warmup10", "warmup50"):
    n = int(T * (0.1 if kind == "warmup10" else 0.5))
    out = np.full(T, beta_end, dtype=np.float64)
    for k in range(n):
      out[k] = beta_start + (beta_end - beta_start) * k / (n - 1) if n > 1 else beta_start
    return out
  if kind == "const":
    return np.full(T, beta_end, dtype=np.float64)
  if kind == "jsd":
    return 1.0 / (T - i)
  if kind == "cosine":
    f = lambda u: math.cos((u / T + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - f(k + 1) / f(k), 0.999) for k in range(T)])
  raise KeyError(kind)


def coefficients(betas, logvar_rule="repeat_first"):
  betas = np.asarray(betas, np.float64)
  T = len(betas)
  abar = np.array([np.prod(1 - betas[:k + 1]) for k in range(T)])
  abar_prev = np.concatenate([[1.0], abar[:-1]])
  # The paper's beta_tilde, in its form 1 / (1 / (1 - abar_prev) + alpha / beta) for t > 0;
  # it is 0 at t = 0.
  with np.errstate(divide="ignore"):
    post_var = np.where(abar_prev < 1, 1 / (1 / (1 - abar_prev) + (1 - betas) / betas), 0.0)
  if logvar_rule == "repeat_first":
    post_logvar = np.log(np.concatenate([[post_var[1]], post_var[1:]]))
  else:
    post_logvar = np.log(np.maximum(post_var, 1e-20))
  return dict(
      betas=betas, abar=abar, abar_prev=abar_prev, post_var=post_var, post_logvar=post_logvar,
      coef1=np.sqrt(abar_prev) * betas / (1 - abar),
      coef2=np.sqrt(1 - betas) * (1 - abar_prev) / (1 - abar),
      fixedlarge_logvar=np.log(np.concatenate([[post_var[1]], betas[1:]])),
  )


def bcast(v, t, ndim):
  return np.asarray(v)[t].reshape((-1,) + (1,) * (ndim - 1))


def q_sample(c, x0, t, noise):
  ab = bcast(c["abar"], t, x0.ndim)
  return np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise


def q_posterior(c, x0, xt, t):
  mean = bcast(c["coef1"], t, x0.ndim) * x0 + bcast(c["coef2"], t, x0.ndim) * xt
  return mean, bcast(c["post_var"], t, x0.ndim), bcast(c["post_logvar"], t, x0.ndim)


def x0_from_eps(c, xt, t, eps):
  ab = bcast(c["abar"], t, xt.ndim)
  return (xt - np.sqrt(1 - ab) * eps) / np.sqrt(ab)


def x0_from_v(c, xt, t, v):
  # v = sqrt(abar) eps - sqrt(1 - abar) x0 and xt = sqrt(abar) x0 + sqrt(1 - abar) eps: solve
  # the 2x2 system (determinant abar + (1 - abar) = 1) for x0.
  ab = bcast(c["abar"], t, xt.ndim)
  return np.sqrt(ab) * xt - np.sqrt(1 - ab) * v


def v_of(c, x0, t, noise):
  ab = bcast(c["abar"], t, x0.ndim)
  return np.sqrt(ab) * noise - np.sqrt(1 - ab) * x0


def min_snr_weight(c, t, gamma, mean_type):
  """Hang et al. 2023: min(SNR, gamma) / SNR (eps), min(SNR, gamma) (x0), / (SNR + 1) (v)."""
  snr = c["abar"][t] / (1 - c["abar"][t])
  return np.minimum(snr, gamma) / {"eps": snr, "xstart": 1.0, "v": snr + 1}[mean_type]


def x0_from_xprev(c, xt, t, xprev):
  return (xprev - bcast(c["coef2"], t, xt.ndim) * xt) / bcast(c["coef1"], t, xt.ndim)


def dynamic_threshold(x0, p):
  """Imagen's dynamic thresholding of x_0 predictions [B, ...]: s = max(1, the p-th percentile
  of each example's |x_0|), then clip to [-s, s] and divide by s."""
  s = np.maximum(np.percentile(np.abs(x0.reshape(len(x0), -1)), p, axis=1), 1.0)
  s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
  return np.clip(x0, -s, s) / s


def p_mean_variance(c, out, xt, t, mean_type, var_type, clip, threshold=0.0):
  if var_type == "learned":
    out, logvar = np.split(out, 2, axis=-1)
  elif var_type == "learned_range":
    # Improved DDPM: v in the extra channels moves the log-variance from log beta_tilde (v = -1)
    # to log beta (v = 1), linearly, without clipping v.
    out, v = np.split(out, 2, axis=-1)
    low = bcast(c["post_logvar"], t, xt.ndim)
    high = bcast(np.log(c["betas"]), t, xt.ndim)
    logvar = low + (v + 1) / 2 * (high - low)
  elif var_type == "fixedlarge":
    logvar = np.broadcast_to(bcast(c["fixedlarge_logvar"], t, xt.ndim), xt.shape)
  else:
    logvar = np.broadcast_to(bcast(c["post_logvar"], t, xt.ndim), xt.shape)
  if mean_type == "eps":
    x0 = x0_from_eps(c, xt, t, out)
  elif mean_type == "xstart":
    x0 = out
  elif mean_type == "v":
    x0 = x0_from_v(c, xt, t, out)
  else:
    x0 = x0_from_xprev(c, xt, t, out)
  if clip:
    x0 = dynamic_threshold(x0, threshold) if threshold else np.clip(x0, -1, 1)
  mean = out if mean_type == "xprev" else q_posterior(c, x0, xt, t)[0]
  return mean, logvar, x0


def normal_kl(m1, lv1, m2, lv2):
  return 0.5 * (lv2 - lv1 + (np.exp(lv1) + (m1 - m2) ** 2) / np.exp(lv2) - 1)


def approx_cdf(x):
  return 0.5 * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def discretized_ll(x, mean, log_scale):
  sd = np.exp(log_scale)
  upper = approx_cdf((x - mean + 1 / 255) / sd)
  lower = approx_cdf((x - mean - 1 / 255) / sd)
  out = np.log(np.maximum(upper - lower, 1e-12))
  out = np.where(x > 0.999, np.log(np.maximum(1 - lower, 1e-12)), out)
  return np.where(x < -0.999, np.log(np.maximum(upper, 1e-12)), out)


def flat_mean(x):
  return x.reshape(x.shape[0], -1).mean(axis=1)


def vb_term(c, out, x0, xt, t, mean_type, var_type, clip):
  true_mean, _, true_logvar = q_posterior(c, x0, xt, t)
  mean, logvar, x0_pred = p_mean_variance(c, out, xt, t, mean_type, var_type, clip)
  kl = flat_mean(normal_kl(true_mean, true_logvar, mean, logvar)) / math.log(2)
  nll = -flat_mean(discretized_ll(x0, mean, 0.5 * logvar)) / math.log(2)
  return np.where(t == 0, nll, kl), x0_pred


def training_loss(c, out, x0, xt, t, noise, mean_type, var_type, loss_type, min_snr_gamma=0.0):
  """Improved DDPM's losses: the bound's term (kl; times T for rescaled_kl) or the squared error
  of the mean part (mse, weighted by min_snr_weight when min_snr_gamma > 0; plus the bound's term
  times T / 1000 for hybrid). Returns a dict."""
  T = len(c["betas"])
  vb, _ = vb_term(c, out, x0, xt, t, mean_type, var_type, False)
  if loss_type == "kl":
    return dict(loss=vb, vb=vb)
  if loss_type == "rescaled_kl":
    return dict(loss=vb * T, vb=vb * T)
  mean_part = np.split(out, 2, axis=-1)[0] if var_type.startswith("learned") else out
  target = {"eps": noise, "xstart": x0, "xprev": q_posterior(c, x0, xt, t)[0],
            "v": v_of(c, x0, t, noise)}[mean_type]
  mse = flat_mean((target - mean_part) ** 2)
  if min_snr_gamma:
    mse = mse * min_snr_weight(c, t, min_snr_gamma, mean_type)
  if loss_type == "mse":
    return dict(loss=mse, mse=mse)
  return dict(loss=mse + vb * T / 1000, mse=mse, vb=vb * T / 1000)


def respaced_betas(betas, kept):
  """The betas of the diffusion over the kept steps: alpha_bar(kept_i) = original's."""
  abar = np.cumprod(1 - np.asarray(betas, np.float64))
  kept_abar = abar[np.asarray(kept)]
  return 1 - kept_abar / np.concatenate([[1.0], kept_abar[:-1]])


def prior_bpd(c, x0):
  ab = c["abar"][-1]
  kl = normal_kl(math.sqrt(ab) * x0, math.log(1 - ab), 0.0, 0.0)
  return flat_mean(kl) / math.log(2)


def gaussian_data_eps(c, m, s, xt, t):
  """E[eps | x_t] when x_0 ~ N(m, s^2) per dimension: the exact noise prediction."""
  ab = bcast(c["abar"], t, xt.ndim)
  return np.sqrt(1 - ab) * (xt - np.sqrt(ab) * m) / (ab * s**2 + 1 - ab)


def discretized_gaussian_entropy_bits(m, s):
  """Entropy in bits per dimension of N(m, s^2) rounded to 256 levels in [-1, 1]."""
  levels = np.arange(256) / 127.5 - 1.0
  upper = np.where(levels > 0.999, np.inf, levels + 1 / 255)
  lower = np.where(levels < -0.999, -np.inf, levels - 1 / 255)
  p = special.ndtr((upper - m) / s) - special.ndtr((lower - m) / s)
  p = p[p > 0]
  return float(-(p * np.log2(p)).sum())
