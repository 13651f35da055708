"""From a config to what every driver uses: the U-Net, the schedule, the optimizer, the
diffusion types and the sampler.

The one place that reads `config.model`, `config.diffusion`, `config.optim` and `config.sample`
to build objects; below it the model takes plain keyword hyperparameters and the math takes
arrays, a schedule and strings. Imports no TensorFlow, data pipeline or checkpointing, so
benchmarks build exactly what training runs with nothing but the JAX stack installed.
"""
from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
import ml_collections
import optax

from diffusion_jax import diffusion
from diffusion_jax import images
from diffusion_jax import parallel
from diffusion_jax import sampling
from diffusion_jax import schedules
from diffusion_jax.models import unet

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def make_model(config: ml_collections.ConfigDict) -> unet.UNet:
  """The U-Net the config describes (2C outputs for a learned variance)."""
  m = config.model
  channels = config.data.channels
  learned = config.diffusion.var_type in diffusion.LEARNED_VAR_TYPES
  out_ch = 2 * channels if learned else channels
  return unet.UNet(ch=m.ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
                   attn_resolutions=tuple(m.attn_resolutions), dropout=m.dropout,
                   out_ch=out_ch, dtype=DTYPES[m.dtype], remat=m.remat,
                   block_size=m.block_size)


def check_model(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError unless the config's U-Net fits its image size and dtype."""
  if config.model.dtype not in DTYPES:
    raise ValueError(f"model.dtype {config.model.dtype!r} is not one of {tuple(DTYPES)}: set "
                     f"--config.model.dtype={' or '.join(DTYPES)}")
  unet.check_config(image_size=config.data.image_size, ch_mult=tuple(config.model.ch_mult),
                    attn_resolutions=tuple(config.model.attn_resolutions),
                    block_size=config.model.block_size, ch=config.model.ch)


def model_summary(config: ml_collections.ConfigDict) -> str:
  """The U-Net's parameter table (no compile); ends with `total params: N`."""
  return unet.summary(make_model(config), config.data.image_size, config.data.channels)


def make_schedule(config: ml_collections.ConfigDict) -> schedules.Schedule:
  d = config.diffusion
  betas = schedules.get_beta_schedule(d.beta_schedule, beta_start=d.beta_start,
                                      beta_end=d.beta_end,
                                      num_diffusion_timesteps=d.num_timesteps)
  return schedules.Schedule.from_betas(betas, rescale_timesteps=d.rescale_timesteps)


def diffusion_kwargs(config: ml_collections.ConfigDict) -> dict[str, str]:
  """The diffusion types: mean_type, var_type, loss_type."""
  d = config.diffusion
  return dict(mean_type=d.mean_type, var_type=d.var_type, loss_type=d.loss_type)


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 to `optim.lr` over `optim.warmup_steps`, then constant."""
  o = config.optim
  if o.warmup_steps <= 0:
    return optax.constant_schedule(o.lr)
  return optax.linear_schedule(0.0, o.lr, o.warmup_steps)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam with warmup, after clipping the mean gradient's global norm."""
  o = config.optim
  adam = optax.adam(learning_rate_schedule(config), b1=o.b1, b2=o.b2, eps=o.eps)
  if o.grad_clip and o.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(o.grad_clip), adam)
  return adam


def sampler_kwargs(config: ml_collections.ConfigDict, **overrides) -> dict[str, Any]:
  """The `sample` section as `sampling.sample`'s arguments: sampler, num_steps, respacing, eta,
  clip_denoised; `overrides` (e.g. sampler='ddim', num_steps=50) replace single ones."""
  s = config.sample
  out = dict(sampler=s.sampler, num_steps=s.num_steps, respacing=s.respacing, eta=s.eta,
             clip_denoised=s.clip_denoised)
  unknown = set(overrides) - set(out)
  if unknown:
    raise TypeError(f"unknown sampler settings {sorted(unknown)}; allowed: {sorted(out)}")
  out.update(overrides)
  return out


def sampler_tag(config: ml_collections.ConfigDict) -> str:
  """A file-name suffix for the `sample` section's settings, so that results of one checkpoint
  under different samplers sit side by side: '' for ancestral sampling over all T steps with
  clipping (the original's), else e.g. '_ddim50', '_ancestral_respaced25', '_ddim_eta1',
  '_ancestral_noclip'."""
  s = config.sample
  steps = ("_respaced" + s.respacing if s.respacing else
           str(s.num_steps) if s.num_steps not in (0, config.diffusion.num_timesteps) else "")
  parts = [s.sampler + steps] if (s.sampler != "ancestral" or steps) else []
  if s.eta:
    parts.append(f"eta{s.eta:g}")
  if not s.clip_denoised:
    parts.append("noclip")
  return "".join("_" + part for part in parts)


def make_sample_fn(config: ml_collections.ConfigDict, model, sched, mesh, *, sampler: str,
                   num_steps: int, eta: float, clip_denoised: bool,
                   respacing: str = "") -> Callable:
  """The sampler as one compiled program over the mesh.

  Args:
    config: what to sample (image size, channels, diffusion types).
    model, sched: the U-Net and its schedule.
    mesh: the devices; the keys (and images) are split over its `data` axis.
    sampler, num_steps, eta, clip_denoised, respacing: `sampling.sample`'s settings
      (`sampler_kwargs`).

  Returns:
    f(params, keys [n]) -> images float32 [n, H, W, C] in [-1, 1].
  """
  d = config.diffusion
  size, channels = config.data.image_size, config.data.channels

  def sample(params, keys):
    return sampling.sample(sampler, sched, denoiser(model, params), keys,
                           (keys.shape[0], size, size, channels), num_steps=num_steps,
                           respacing=respacing, eta=eta, clip_denoised=clip_denoised,
                           mean_type=d.mean_type, var_type=d.var_type)

  return parallel.batch_map(sample, mesh)


def make_bpd_fn(config: ml_collections.ConfigDict, model, sched, mesh, *,
                clip_denoised: bool) -> Callable:
  """The full variational bound over all T steps as one compiled program over the mesh.

  Args:
    config: the diffusion types.
    model, sched: the U-Net and its (full, not respaced) schedule.
    mesh: the devices; images and keys are split over its `data` axis.
    clip_denoised: clip the x_0 predictions to [-1, 1] (`eval.bpd_clip_denoised`).

  Returns:
    f(params, images uint8 [n, H, W, C], keys [n]) -> (total, prior, sum of the per-t terms),
    each [n] in bits/dim.
  """
  d = config.diffusion

  def bpd(params, images_, keys):
    out = diffusion.calc_bpd_loop(sched, denoiser(model, params), images.to_float(images_), keys,
                                  mean_type=d.mean_type, var_type=d.var_type,
                                  clip_denoised=clip_denoised)
    return out.total_bpd, out.prior_bpd, out.terms_bpd.sum(axis=1)

  return parallel.batch_map(bpd, mesh, num_batched=2)


def denoiser(model, params) -> Callable:
  """model_fn(x_t, t) of the math layer: the U-Net with `params`, in evaluation mode."""
  return lambda x_t, t: model.apply({"params": params}, x_t, t, train=False)
