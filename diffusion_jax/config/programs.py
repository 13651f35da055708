"""The compiled programs over a device mesh that sample and evaluate a model: the sampler of a
config (`make_sample_fn`), the variational bound (`make_bpd_fn`), the network as the math's
`model_fn` (`denoiser`, with classifier-free guidance) and a class-conditional model's labels
split over the mesh (`sample_labels`).

Training's sample grids, every evaluation mode, `Sampler` and the benchmark run them; `build`
turns the config into the objects they take (the model, its schedule, the sampler settings).
"""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax.config import build
from diffusion_jax.core import diffusion
from diffusion_jax.data import images
from diffusion_jax import parallel
from diffusion_jax import samplers


def make_sample_fn(config: ml_collections.ConfigDict, model, sched, mesh, *, sampler: str,
                   guidance_scale: float = 0.0, **settings) -> Callable:
  """The sampler as one compiled program over the mesh.

  Args:
    config: what to sample (image size, channels, diffusion types, the model's classes).
    model, sched: the U-Net and its schedule.
    mesh: the devices; the keys (and labels, and images) are split over its `data` axis.
    sampler: the sampler's name (`samplers.names()`).
    guidance_scale: classifier-free guidance's w (`denoiser`); 0 = none.
    **settings: the sampler settings (`build.sampler_kwargs`; missing ones take their defaults).

  Returns:
    f(params, keys [n]) -> images float32 [n, H, W, C] in [-1, 1]; for a class-conditional
    model f(params, keys [n], labels int32 [n]).
  """
  d = config.diffusion
  size, channels = config.data.image_size, config.data.channels
  build.check_guidance(config.model, guidance_scale)
  samplers.check(sampler, settings, sched.num_timesteps, mean_type=d.mean_type)

  def sample(params, keys, labels=None):
    model_fn = denoiser(model, params, labels, guidance_scale=guidance_scale,
                        var_type=d.var_type)
    return samplers.sample(sampler, sched, model_fn, keys, (keys.shape[0], size, size, channels),
                           mean_type=d.mean_type, var_type=d.var_type, **settings)

  return parallel.batch_map(sample, mesh, num_batched=2 if build.num_classes(config) else 1)


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

  return parallel.batch_map(bpd, mesh, num_batched=3 if build.num_classes(config) else 2)


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
    labels = build.default_labels(config, indices)
    if labels is None:
      return ()
  labels = build.check_sample_labels(config, labels)
  if labels.shape != indices.shape:
    raise ValueError(f"{len(indices)} samples and {len(labels)} labels: give one per sample")
  return (parallel.shard_rows(labels, mesh),)


def denoiser(model, params, labels=None, *, guidance_scale: float = 0.0,
             var_type: str = "fixedlarge") -> Callable:
  """model_fn(x_t, t) of the math layer: the network with `params`, in evaluation mode,
  conditioned on `labels` [B] (int) for a class-conditional model.

  With guidance_scale w > 0 (a model with a null class, `build.check_guidance`), each call runs
  the network once on the batch doubled, [labels; null class], and returns
  `diffusion.guided_output` of the two halves (var_type says which channels are a variance).
  """
  def apply(x_t, t, labels_):
    return model.apply({"params": params}, x_t, t, train=False, **build.label_kwargs(labels_))

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
