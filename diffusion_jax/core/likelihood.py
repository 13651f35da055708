"""Gaussian building blocks of the variational bound: KL, the discretized decoder, means.

All functions are elementwise (or reduce over non-batch axes) and broadcast like NumPy.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# The decoder's bins are +-1/255 around each of the 256 data values scaled to [-1, 1]; values
# beyond +-0.999 are the outermost values, whose bins extend to infinity.
_BIN_HALF_WIDTH = 1.0 / 255.0
_EDGE = 0.999
_LOG_PROB_FLOOR = 1e-12


def mean_flat(x: jax.Array) -> jax.Array:
  """Mean over every axis but the first: [B, ...] -> [B]."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> jax.Array:
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats.

  Args:
    mean1, logvar1: mean and log-variance of the first Gaussian.
    mean2, logvar2: mean and log-variance of the second Gaussian (scalars broadcast).

  Returns:
    The KL divergence per element, in the broadcast shape of the arguments.
  """
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
  """The original's tanh approximation of the standard normal CDF."""
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: jax.Array, *, means: jax.Array,
                                        log_scales: jax.Array) -> jax.Array:
  """Log-probability of 8-bit data under a Gaussian discretized to the data's bins.

  Args:
    x: data [B, ...] that was uint8 in [0, 255], rescaled to [-1, 1].
    means: Gaussian means, same shape as x.
    log_scales: Gaussian log standard deviations, same shape as x.

  Returns:
    Log-probabilities in nats, same shape as x.
  """
  if not (x.shape == means.shape == log_scales.shape):
    raise ValueError(f"x, means and log_scales must share one shape; got {x.shape}, "
                     f"{means.shape}, {log_scales.shape}")
  centered_x = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + _BIN_HALF_WIDTH))
  cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - _BIN_HALF_WIDTH))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, _LOG_PROB_FLOOR))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, _LOG_PROB_FLOOR))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, _LOG_PROB_FLOOR))
  return jnp.where(x < -_EDGE, log_cdf_plus,
                   jnp.where(x > _EDGE, log_one_minus_cdf_min, log_cdf_delta))
