"""Inputs shared by the math tests: the linear schedule with its float64 NumPy coefficients,
seeded images, timesteps and noise, a smooth stand-in for a network, and the exact network of
Gaussian data (whose probability-flow ODE has a closed form).

A plain module (not a test module), so that no test module imports another.
"""
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.core import schedules
from tests import reference

T = 1000
B = 6
SHAPE = (B, 4, 4, 3)

# Gaussian data x_0 ~ N(MU, S^2) per dimension, sampled in batches of GAUSSIAN_SHAPE.
MU, S = 0.3, 0.5
GAUSSIAN_SHAPE = (4, 2, 2, 1)


def linear_schedule():
  """The original's linear schedule over T steps."""
  return schedules.make_schedule("linear", num_diffusion_timesteps=T)


def linear_coefficients():
  """The float64 NumPy coefficients of `linear_schedule` (tests/reference.py)."""
  return reference.coefficients(np.linspace(1e-4, 0.02, T))


def close(ours, theirs, rtol=1e-5, scale=None):
  """Relative tolerance rtol, and absolute rtol * scale (default: the largest |value|)."""
  theirs = np.asarray(theirs, np.float64)
  if scale is None:
    scale = max(1.0, float(np.abs(theirs).max()))
  np.testing.assert_allclose(np.asarray(ours, np.float64), theirs, rtol=rtol, atol=rtol * scale)


def data(seed=0, shape=SHAPE):
  """8-bit images scaled to [-1, 1], including both edge values."""
  x = np.random.default_rng(seed).integers(0, 256, size=shape).astype(np.float64)
  x.flat[0], x.flat[1] = 0, 255
  return x / 127.5 - 1.0


def timesteps(seed=0):
  t = np.random.default_rng(seed).integers(0, T, size=B)
  t[0], t[1] = 0, T - 1
  return t


def normal(seed, shape=SHAPE):
  return np.random.default_rng(seed + 100).standard_normal(shape)


def model_output(x, t, var_type):
  """A smooth stand-in for a network, written for both NumPy and JAX inputs."""
  xp = jnp if isinstance(x, jax.Array) else np
  tt = xp.reshape(t / T, (-1, 1, 1, 1))
  mean_part = 0.7 * x - 0.3 * tt + 0.1 * xp.sin(3 * x)
  if var_type == "learned":
    return xp.concatenate([mean_part, -4.0 + 0.5 * xp.tanh(x) - 2.0 * tt], axis=-1)
  if var_type == "learned_range":  # v spans about [-1.3, 1.3]: beyond the range at both ends
    return xp.concatenate([mean_part, 1.3 * xp.tanh(2 * x) * (1 - tt) + 0.2 * tt], axis=-1)
  return mean_part


def f32(a):
  return jnp.asarray(a, jnp.float32)


def gaussian_model(vp, num_timesteps_seen, *, mean_type="eps"):
  """The exact network for the Gaussian data, given the label the solver passes: (t - 1/N) N."""
  t_grid = jnp.asarray(vp.t)
  log_alpha_grid = jnp.asarray(vp.log_alpha)

  def model_fn(x, label):
    t = label / num_timesteps_seen + 1.0 / num_timesteps_seen
    log_alpha = jnp.interp(t, t_grid, log_alpha_grid)[:, None, None, None]
    alpha = jnp.exp(log_alpha)
    sigma = jnp.sqrt(-jnp.expm1(2 * log_alpha))
    x0 = MU + alpha * S**2 / (alpha**2 * S**2 + sigma**2) * (x - alpha * MU)
    eps = (x - alpha * x0) / sigma
    return {"xstart": x0, "eps": eps, "v": alpha * eps - sigma * x0}[mean_type]

  return model_fn
