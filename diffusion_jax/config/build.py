"""From a config to what every driver uses: the network, the schedule, the optimizer, the
diffusion types, the sampler settings and a conditional model's labels (the compiled programs
that run them over a mesh are `programs`).

The one place that reads `config.model`, `config.diffusion`, `config.optim` and `config.sample`
to build objects; below it the model takes plain keyword hyperparameters and the math takes
arrays, a schedule and strings. Imports no TensorFlow, data pipeline or checkpointing, so
benchmarks build exactly what training runs with nothing but the JAX stack installed.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from diffusion_jax.core import diffusion
from diffusion_jax.core import schedules
from diffusion_jax import models
from diffusion_jax import samplers



def make_model(config: ml_collections.ConfigDict):
  """The network the config describes (`models.make`: the architecture `model.architecture`
  with the `model` section's settings), with 2C outputs for a learned variance."""
  channels = config.data.channels
  learned = config.diffusion.var_type in diffusion.LEARNED_VAR_TYPES
  return models.make(config.model, out_ch=2 * channels if learned else channels)


def init_params(config: ml_collections.ConfigDict, model, key: jax.Array):
  """The U-Net's initial parameters (`jax.eval_shape(functools.partial(init_params, config,
  model), key)` gives their shapes without computing anything)."""
  size, channels = config.data.image_size, config.data.channels
  labels = jnp.zeros((1,), jnp.int32) if num_classes(config) else None
  return model.init({"params": key}, jnp.zeros((1, size, size, channels), jnp.float32),
                    jnp.zeros((1,), jnp.int32), train=False, **label_kwargs(labels))["params"]


def num_classes(config: ml_collections.ConfigDict) -> int:
  """The model's classes: > 0 for a class-conditional model (labels 0 .. num_classes - 1); 0 for
  an architecture without labels."""
  return int(config.model.get("num_classes", 0))


def has_null_class(config: ml_collections.ConfigDict) -> bool:
  """Whether the model has classifier-free guidance's null class (label num_classes): trained
  with model.p_uncond > 0."""
  return float(config.model.get("p_uncond", 0.0)) > 0


def check_guidance(model_section, guidance_scale: float) -> None:
  """Raises ValueError, saying what to set, unless the model (`config.model`) can be sampled
  with classifier-free guidance of this scale (0: no guidance, always fine)."""
  if not np.isfinite(guidance_scale) or guidance_scale < 0:
    raise ValueError(f"sample.guidance_scale={guidance_scale!r}: use a number >= 0 "
                     "(0 = no guidance)")
  if not guidance_scale:
    return
  if not model_section.get("num_classes", 0):
    raise ValueError(f"sample.guidance_scale={guidance_scale:g} needs a class-conditional "
                     "model, and this one is unconditional (model.num_classes=0): set "
                     "--config.sample.guidance_scale=0")
  if not model_section.get("p_uncond", 0.0) > 0:
    raise ValueError(f"sample.guidance_scale={guidance_scale:g} needs a model trained with a "
                     "null class (model.p_uncond > 0, e.g. --config.model.p_uncond=0.1); this "
                     "one has none: set --config.sample.guidance_scale=0")


def check_model(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError, saying what to set, unless the config's architecture can be built with
  its settings for the data's images (`models.check`)."""
  models.check(config.model, image_size=config.data.image_size, channels=config.data.channels,
               flag_prefix="--config.")


def model_summary(config: ml_collections.ConfigDict) -> str:
  """The U-Net's parameter table (no compile); ends with `total params: N`."""
  return models.summary(config.model.architecture, make_model(config), config.data.image_size,
                        config.data.channels)


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


def make_optimizer(config: ml_collections.ConfigDict,
                   schedule: optax.Schedule | None = None) -> optax.GradientTransformation:
  """Adam with the learning rate `schedule` (default: the config's, with warmup), after
  clipping the mean gradient's global norm."""
  o = config.optim
  adam = optax.adam(learning_rate_schedule(config) if schedule is None else schedule,
                    b1=o.b1, b2=o.b2, eps=o.eps)
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


def label_kwargs(labels) -> dict[str, Any]:
  """The model's keyword for class labels: {} for none (an unconditional model), else
  {'labels_B': labels}."""
  return {} if labels is None else {"labels_B": labels}
