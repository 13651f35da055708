"""From a config to what every driver uses: the U-Net, the schedule, the optimizer, the
diffusion types and the sampler.

The one place that reads `config.model`, `config.diffusion`, `config.optim` and `config.sample`
to build objects; below it the model takes plain keyword hyperparameters and the math takes
arrays, a schedule and strings. Imports no TensorFlow, data pipeline or checkpointing, so
benchmarks build exactly what training runs with nothing but the JAX stack installed.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from diffusion_jax.core import diffusion
from diffusion_jax.core import schedules
from diffusion_jax.data import images
from diffusion_jax.models import iddpm_unet
from diffusion_jax.models import unet
from diffusion_jax import parallel
from diffusion_jax import samplers

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# model.architecture: DDPM's U-Net (models/unet.py) or Improved DDPM's (models/iddpm_unet.py).
ARCHITECTURES = ("ddpm", "iddpm")
# model fields only Improved DDPM's U-Net has, with the value that means "as DDPM's".
_IDDPM_ONLY = {"num_heads": 1, "num_head_channels": -1, "num_heads_upsample": -1,
               "scale_shift_norm": False, "num_classes": 0, "p_uncond": 0.0}


def make_model(config: ml_collections.ConfigDict):
  """The U-Net the config describes (2C outputs for a learned variance): `unet.UNet` for
  model.architecture 'ddpm', `iddpm_unet.IDDPMUNet` for 'iddpm'."""
  m = config.model
  channels = config.data.channels
  learned = config.diffusion.var_type in diffusion.LEARNED_VAR_TYPES
  out_ch = 2 * channels if learned else channels
  common = dict(ch=m.ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
                attn_resolutions=tuple(m.attn_resolutions), dropout=m.dropout, out_ch=out_ch,
                dtype=DTYPES[m.dtype], remat=m.remat)
  if m.architecture == "iddpm":
    return iddpm_unet.IDDPMUNet(**common, num_heads=m.num_heads,
                                num_head_channels=m.num_head_channels,
                                num_heads_upsample=m.num_heads_upsample,
                                scale_shift_norm=m.scale_shift_norm, num_classes=m.num_classes,
                                null_class=has_null_class(config))
  return unet.UNet(**common, block_size=m.block_size)


def init_params(config: ml_collections.ConfigDict, model, key: jax.Array):
  """The U-Net's initial parameters (`jax.eval_shape(functools.partial(init_params, config,
  model), key)` gives their shapes without computing anything)."""
  size, channels = config.data.image_size, config.data.channels
  labels = jnp.zeros((1,), jnp.int32) if num_classes(config) else None
  return model.init({"params": key}, jnp.zeros((1, size, size, channels), jnp.float32),
                    jnp.zeros((1,), jnp.int32), train=False, **label_kwargs(labels))["params"]


def num_classes(config: ml_collections.ConfigDict) -> int:
  """The model's classes: > 0 for a class-conditional model (labels 0 .. num_classes - 1)."""
  return int(config.model.get("num_classes", 0))


def has_null_class(config: ml_collections.ConfigDict) -> bool:
  """Whether the model has classifier-free guidance's null class (label num_classes): trained
  with model.p_uncond > 0."""
  return float(config.model.get("p_uncond", 0.0)) > 0


def check_guidance(config: ml_collections.ConfigDict, guidance_scale: float) -> None:
  """Raises ValueError, saying what to set, unless the model can be sampled with classifier-free
  guidance of this scale (0: no guidance, always fine)."""
  if not np.isfinite(guidance_scale) or guidance_scale < 0:
    raise ValueError(f"sample.guidance_scale={guidance_scale!r}: use a number >= 0 "
                     "(0 = no guidance)")
  if not guidance_scale:
    return
  if not num_classes(config):
    raise ValueError(f"sample.guidance_scale={guidance_scale:g} needs a class-conditional "
                     "model, and this one is unconditional (model.num_classes=0): set "
                     "--config.sample.guidance_scale=0")
  if not has_null_class(config):
    raise ValueError(f"sample.guidance_scale={guidance_scale:g} needs a model trained with a "
                     "null class (model.p_uncond > 0, e.g. --config.model.p_uncond=0.1); this "
                     "one has none: set --config.sample.guidance_scale=0")


def check_model(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError unless the config's U-Net fits its image size and dtype, and its
  architecture has every setting given."""
  m = config.model
  if m.dtype not in DTYPES:
    raise ValueError(f"model.dtype {m.dtype!r} is not one of {tuple(DTYPES)}: set "
                     f"--config.model.dtype={' or '.join(DTYPES)}")
  if m.architecture not in ARCHITECTURES:
    raise ValueError(f"model.architecture {m.architecture!r} is not one of {ARCHITECTURES}")
  if m.architecture == "ddpm":
    given = [f"model.{k}={m[k]!r}" for k, plain in _IDDPM_ONLY.items() if m[k] != plain]
    if given:
      raise ValueError(f"{', '.join(given)}: DDPM's U-Net (model.architecture='ddpm') has one "
                       f"attention head, no scale-shift norm and no class labels; set "
                       f"--config.model.architecture=iddpm for Improved DDPM's U-Net")
    unet.check_config(image_size=config.data.image_size, ch_mult=tuple(m.ch_mult),
                      attn_resolutions=tuple(m.attn_resolutions), block_size=m.block_size,
                      ch=m.ch)
    return
  if has_null_class(config) and not m.num_classes:
    raise ValueError(f"model.p_uncond={m.p_uncond!r} trains classifier-free guidance's null "
                     "class, which needs a class-conditional model: set "
                     "--config.model.num_classes to the number of classes, or "
                     "--config.model.p_uncond=0")
  if m.block_size != 1:
    raise ValueError(f"model.block_size={m.block_size}: Improved DDPM's U-Net has no "
                     f"space-to-depth input; set --config.model.block_size=1")
  iddpm_unet.check_config(image_size=config.data.image_size, ch=m.ch, ch_mult=tuple(m.ch_mult),
                          attn_resolutions=tuple(m.attn_resolutions), num_heads=m.num_heads,
                          num_head_channels=m.num_head_channels,
                          num_heads_upsample=m.num_heads_upsample, num_classes=m.num_classes,
                          null_class=has_null_class(config))


def model_summary(config: ml_collections.ConfigDict) -> str:
  """The U-Net's parameter table (no compile); ends with `total params: N`."""
  summary = iddpm_unet.summary if config.model.architecture == "iddpm" else unet.summary
  return summary(make_model(config), config.data.image_size, config.data.channels)


def make_schedule(config: ml_collections.ConfigDict) -> schedules.Schedule:
  d = config.diffusion
  betas = schedules.get_beta_schedule(d.beta_schedule, beta_start=d.beta_start,
                                      beta_end=d.beta_end,
                                      num_diffusion_timesteps=d.num_timesteps)
  return schedules.Schedule.from_betas(betas, rescale_timesteps=d.rescale_timesteps)


def diffusion_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The diffusion types of `diffusion.training_losses`: mean_type, var_type, loss_type,
  rescale_learned_sigmas and min_snr_gamma."""
  d = config.diffusion
  return dict(mean_type=d.mean_type, var_type=d.var_type, loss_type=d.loss_type,
              rescale_learned_sigmas=d.rescale_learned_sigmas,
              min_snr_gamma=float(d.min_snr_gamma))


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
  """The `sample` section as `make_sample_fn`'s settings: the sampler, every sampler setting
  (`samplers.settings()`: num_steps, respacing, clip_denoised and each sampler's own) and
  guidance_scale; `overrides` (e.g. sampler='ddim', num_steps=50) replace single ones."""
  s = config.sample
  out = {"sampler": s.sampler, **{setting.name: s[setting.name] if setting.name in s
                                  else setting.default for setting in samplers.settings()},
         "guidance_scale": s.guidance_scale}
  unknown = set(overrides) - set(out)
  if unknown:
    raise TypeError(f"unknown sampler settings {sorted(unknown)}; allowed: {sorted(out)}")
  out.update(overrides)
  return out


def sampler_tag(config: ml_collections.ConfigDict) -> str:
  """A file-name suffix for the `sample` section's settings, so that results of one checkpoint
  under different samplers sit side by side: the sampler's (`samplers.tag`: '' for ancestral
  sampling over all T steps with clipping, the original's, else e.g. '_ddim50',
  '_ancestral_respaced25', '_ddim_eta1', '_ancestral_noclip', '_dpmsolver++20_order2_logSNR'),
  then classifier-free guidance's ('_guidance3')."""
  tag = samplers.tag(config.sample, config.diffusion.num_timesteps)
  if config.sample.guidance_scale:
    tag += f"_guidance{config.sample.guidance_scale:g}"
  return tag


def make_sample_fn(config: ml_collections.ConfigDict, model, sched, mesh, *, sampler: str,
                   guidance_scale: float = 0.0, **settings) -> Callable:
  """The sampler as one compiled program over the mesh.

  Args:
    config: what to sample (image size, channels, diffusion types, the model's classes).
    model, sched: the U-Net and its schedule.
    mesh: the devices; the keys (and labels, and images) are split over its `data` axis.
    sampler: the sampler's name (`samplers.names()`).
    guidance_scale: classifier-free guidance's w (`denoiser`); 0 = none.
    **settings: the sampler settings (`sampler_kwargs`; missing ones take their defaults).

  Returns:
    f(params, keys [n]) -> images float32 [n, H, W, C] in [-1, 1]; for a class-conditional
    model f(params, keys [n], labels int32 [n]).
  """
  d = config.diffusion
  size, channels = config.data.image_size, config.data.channels
  check_guidance(config, guidance_scale)
  samplers.check(sampler, settings, sched.num_timesteps, mean_type=d.mean_type)

  def sample(params, keys, labels=None):
    model_fn = denoiser(model, params, labels, guidance_scale=guidance_scale,
                        var_type=d.var_type)
    return samplers.sample(sampler, sched, model_fn, keys, (keys.shape[0], size, size, channels),
                           mean_type=d.mean_type, var_type=d.var_type, **settings)

  return parallel.batch_map(sample, mesh, num_batched=2 if num_classes(config) else 1)


def make_bpd_fn(config: ml_collections.ConfigDict, model, sched, mesh, *,
                clip_denoised: bool) -> Callable:
  """The full variational bound over all T steps as one compiled program over the mesh.

  Args:
    config: the diffusion types, the model's classes.
    model, sched: the U-Net and its (full, not respaced) schedule.
    mesh: the devices; images, keys (and labels) are split over its `data` axis.
    clip_denoised: clip the x_0 predictions to [-1, 1] (`eval.bpd_clip_denoised`).

  Returns:
    f(params, images uint8 [n, H, W, C], keys [n]) -> (total, prior, sum of the per-t terms),
    each [n] in bits/dim; for a class-conditional model f(params, images, keys, labels [n]),
    the bound of each image given its label.
  """
  d = config.diffusion

  def bpd(params, images_, keys, labels=None):
    out = diffusion.calc_bpd_loop(sched, denoiser(model, params, labels),
                                  images.to_float(images_), keys, mean_type=d.mean_type,
                                  var_type=d.var_type, clip_denoised=clip_denoised)
    return out.total_bpd, out.prior_bpd, out.terms_bpd.sum(axis=1)

  return parallel.batch_map(bpd, mesh, num_batched=3 if num_classes(config) else 2)


def check_sample_labels(config: ml_collections.ConfigDict, labels) -> np.ndarray:
  """Returns the labels asked of a class-conditional model as int32 [n]; raises ValueError,
  saying what to give, for labels given to an unconditional model or outside its classes."""
  classes = num_classes(config)
  if not classes:
    raise ValueError("labels given, but the model is unconditional (model.num_classes=0); "
                     "sample without labels")
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integers, one per sample; got {labels.dtype} of shape "
                     f"{labels.shape}")
  bad = labels[(labels < 0) | (labels >= classes)]
  if bad.size:
    raise ValueError(f"label {int(bad[0])} is outside the model's classes 0..{classes - 1}")
  return labels.astype(np.int32)


def default_labels(config: ml_collections.ConfigDict, indices) -> np.ndarray | None:
  """Sample i's class when none is asked for: i mod num_classes (None: unconditional)."""
  classes = num_classes(config)
  return np.asarray(indices) % classes if classes else None


def sample_labels(config: ml_collections.ConfigDict, indices: np.ndarray, mesh,
                  labels: np.ndarray | None = None) -> tuple:
  """The labels argument of a class-conditional sampler, for the samples with these global
  indices: `labels` when given, else sample i's class is i mod num_classes (every class in
  turn). Unconditional models take none.

  Returns:
    () for an unconditional model, else (int32 [len(indices)] split over the mesh,).
  """
  indices = np.asarray(indices)
  if labels is None:
    labels = default_labels(config, indices)
    if labels is None:
      return ()
  labels = check_sample_labels(config, labels)
  if labels.shape != indices.shape:
    raise ValueError(f"{len(indices)} samples and {len(labels)} labels: give one per sample")
  return (parallel.shard_rows(labels, mesh),)


def label_kwargs(labels) -> dict[str, Any]:
  """The model's keyword for class labels: {} for none (an unconditional model), else
  {'labels_B': labels}."""
  return {} if labels is None else {"labels_B": labels}


def denoiser(model, params, labels=None, *, guidance_scale: float = 0.0,
             var_type: str = "fixedlarge") -> Callable:
  """model_fn(x_t, t) of the math layer: the U-Net with `params`, in evaluation mode,
  conditioned on `labels` [B] (int) for a class-conditional model.

  With guidance_scale w > 0 (a model with a null class, `check_guidance`), each call runs the
  network once on the batch doubled, [labels; null class], and returns
  `diffusion.guided_output` of the two halves (var_type says which channels are a variance).
  """
  def apply(x_t, t, labels_):
    return model.apply({"params": params}, x_t, t, train=False, **label_kwargs(labels_))

  if not guidance_scale:
    return lambda x_t, t: apply(x_t, t, labels)
  if labels is None or not getattr(model, "null_class", False):
    raise ValueError("classifier-free guidance needs labels and a model with a null class "
                     "(model.p_uncond > 0)")
  null = jnp.full_like(labels, model.num_classes)

  def guided(x_t, t):
    t = jnp.broadcast_to(jnp.asarray(t), x_t.shape[:1])
    both = apply(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]),
                 jnp.concatenate([labels, null]))
    cond, uncond = jnp.split(both, 2)
    return diffusion.guided_output(cond, uncond, guidance_scale, x_t.shape, var_type=var_type)

  return guided
