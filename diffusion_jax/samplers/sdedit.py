"""SDEdit (Meng et al. 2022, arXiv 2108.01073): an image diffused to a chosen timestep t by the
forward process q(x_t | x_0), then denoised from there by any registered sampler that can start
from given x (`SamplerEntry.run_from`), with its steps spread over timesteps 0..t.

The paper's interpolation in x_t (Ho et al. 2020) is the same with a mix of two diffused images;
`mix_and_denoise` runs it with any such sampler. The forward noise of an example comes from its
key folded with T + 1 (and T + 2 for the second image), as `ancestral.interpolate` draws it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.core import diffusion
from diffusion_jax.core.diffusion import ModelFn
from diffusion_jax.core import prng
from diffusion_jax.core.schedules import Schedule
from diffusion_jax.samplers import common
from diffusion_jax.samplers import registry


def forward_noise(keys, sched: Schedule, shape, which: int = 1, dtype=jnp.float32):
  """The noise [B, ...] that diffuses an example's image (`which` 1) or a second one (2) to
  q(x_t | x_0): from its key folded with T + which."""
  return prng.normal_each(prng.fold_in_each(keys, sched.base_num_timesteps + which), shape[1:],
                          dtype)


def diffuse(sched: Schedule, keys, x_start, t: int, which: int = 1) -> jax.Array:
  """x_t ~ q(x_t | x_0 = x_start) at the trained timestep t, with `forward_noise`."""
  t_b = jnp.full((x_start.shape[0],), int(t), dtype=jnp.int32)
  return diffusion.q_sample(sched, x_start, t_b,
                            forward_noise(keys, sched, x_start.shape, which, x_start.dtype))


def sdedit(sched: Schedule, model_fn: ModelFn, keys, x_start, *, t: int, sampler: str,
           mean_type: str, var_type: str, **settings) -> jax.Array:
  """SDEdit: x_start diffused to timestep t, then denoised by `sampler` from t.

  Args:
    sched: the trained schedule.
    model_fn: model_fn(x, t) -> network output.
    keys: one key per example [B]: the forward noise and the sampler's own.
    x_start: the images to edit [B, H, W, C], in [-1, 1].
    t: the timestep to diffuse to, a Python int in [0, T) (its noise level sets how much of
      the input is kept: more of it for a small t).
    sampler: a registered sampler with `run_from`.
    mean_type, var_type: the model's output types.
    **settings: the sampler's settings (`registry.sample_from`): its steps are spread over
      timesteps 0..t.

  Returns:
    the edited images [B, H, W, C].
  """
  common.check_keys(keys, x_start.shape)
  return registry.sample_from(sampler, sched, model_fn, keys, diffuse(sched, keys, x_start, t),
                              start=t, mean_type=mean_type, var_type=var_type, **settings)


def mix_and_denoise(sched: Schedule, model_fn: ModelFn, keys, x1, x2, lam, *, t: int,
                    sampler: str, mean_type: str, var_type: str, **settings) -> jax.Array:
  """Ho et al.'s interpolation with any sampler that starts from given x: x1 and x2 diffused to
  timestep t with independent noise, mixed as (1 - lam) x_t1 + lam x_t2, denoised from t.

  Args:
    sched, model_fn, keys, t, sampler, mean_type, var_type, **settings: as `sdedit`'s.
    x1, x2: images [B, H, W, C] in [-1, 1].
    lam: the mixing weight, a scalar or [B]; 0 gives x1's reconstruction, 1 x2's.

  Returns:
    the interpolations [B, H, W, C].
  """
  diffusion._check_same_shape(x1=x1, x2=x2)  # pylint: disable=protected-access
  common.check_keys(keys, x1.shape)
  lam = _per_example(lam, x1)
  x_mix = ((1.0 - lam) * diffuse(sched, keys, x1, t, which=1)
           + lam * diffuse(sched, keys, x2, t, which=2))
  return registry.sample_from(sampler, sched, model_fn, keys, x_mix, start=t,
                              mean_type=mean_type, var_type=var_type, **settings)


def _per_example(lam, x):
  """lam (a scalar or [B]) shaped to broadcast over x [B, ...]."""
  lam = jnp.asarray(lam, x.dtype)
  if lam.ndim == 1:
    return lam.reshape((x.shape[0],) + (1,) * (x.ndim - 1))
  if lam.ndim != 0:
    raise ValueError(f"lam must be a scalar or [B], got shape {lam.shape}")
  return lam


def slerp(z1, z2, lam):
  """Spherical interpolation of two latents per example: sin((1 - lam) theta) / sin(theta) z1 +
  sin(lam theta) / sin(theta) z2, theta the angle between z1 and z2 (each example flattened);
  linear where they are (nearly) parallel.

  Args:
    z1, z2: [B, ...].
    lam: a scalar or [B] in [0, 1].
  """
  diffusion._check_same_shape(z1=z1, z2=z2)  # pylint: disable=protected-access
  lam = _per_example(lam, z1)
  axes = tuple(range(1, z1.ndim))
  norms = jnp.sqrt(jnp.sum(z1 * z1, axis=axes, keepdims=True) *
                   jnp.sum(z2 * z2, axis=axes, keepdims=True))
  cos = jnp.clip(jnp.sum(z1 * z2, axis=axes, keepdims=True) / jnp.maximum(norms, 1e-30), -1, 1)
  theta = jnp.arccos(cos)
  sin = jnp.sin(theta)
  parallel = sin < 1e-6
  safe = jnp.where(parallel, 1.0, sin)
  w1 = jnp.where(parallel, 1.0 - lam, jnp.sin((1.0 - lam) * theta) / safe)
  w2 = jnp.where(parallel, lam, jnp.sin(lam * theta) / safe)
  return w1 * z1 + w2 * z2
