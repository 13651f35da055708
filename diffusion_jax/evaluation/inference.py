"""A trained model ready to sample: a checkpoint's parameters with its config, and samples by
global example index over every device (the notebook and script API; the evaluation modes
build on it).

  sampler = inference.Sampler.from_workdir("runs/digits")
  images = sampler.sample(16, seed=0)                             # the config's sampler
  images = sampler.sample(16, sampler="ddim", num_steps=50)       # DDIM over 50 timesteps
  images = sampler.sample(16, respacing="50")                     # ancestral over 50 (respaced)
  images = sampler.sample(16, labels=[3] * 16)                    # class-conditional: class 3

A class-conditional model's sample i is of class i mod num_classes unless `labels` says.

Sample i of a seed is drawn from `prng.example_keys(run_key(seed, SAMPLE), [i])`, so the same
seed gives the same samples whatever the number of devices or hosts (to float rounding).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from diffusion_jax.config import build
from diffusion_jax.config import programs
from diffusion_jax.config import config_lib
from diffusion_jax.core import prng
from diffusion_jax.data import images as images_lib
from diffusion_jax import parallel
from diffusion_jax.training import checkpoints
from diffusion_jax.utils import outputs


@dataclasses.dataclass
class Loaded:
  """A config with the (EMA) parameters of one of its checkpoints."""
  config: ml_collections.ConfigDict
  params: Any
  step: int


def saved_config(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
  """The config saved with a checkpoint (default: the latest), in today's layout: a config
  saved by an older version is upgraded (`config_lib.upgrade`), saying so once."""
  ckpt_dir = outputs.resolve(workdir) / "checkpoints"
  step = checkpoints.select_step(ckpt_dir, step)
  config, message = config_lib.upgrade(checkpoints.read_config(ckpt_dir, step))
  if message and jax.process_index() == 0:
    print(message, flush=True)
  return config


def load(workdir: str, config: ml_collections.ConfigDict | None = None, *,
         step: int | None = None, ema: bool = True) -> Loaded:
  """Loads a workdir's (or a converted checkpoint's) parameters.

  Args:
    workdir: the training workdir, or the --out of `convert_tf_checkpoint` (relative to the
      current directory, `~` expanded, or gs://).
    config: the config to build the model with; default: the one saved with the checkpoint.
    step: which checkpoint (default: the newest that reads back intact; a damaged newer one
      is reported and skipped).
    ema: the EMA parameters (default, what the paper samples with) or the raw ones.

  Returns:
    Loaded(config, params as host arrays, step).

  Raises:
    FileNotFoundError: no checkpoint, or no checkpoint at `step` (naming the ones there), or
      (`checkpoints.UnreadableCheckpointError`) none that can be used.
  """
  workdir = outputs.resolve(workdir)
  ckpt_dir = workdir / "checkpoints"
  checkpoints.select_step(ckpt_dir, step)  # none, or none at `step`: says which steps there are
  # Only the parameters are read and verified: a damaged optimizer state does not matter here.
  params, got = checkpoints.restore_params(os.fspath(ckpt_dir), step, ema=ema)
  got = int(got)
  if config is None:
    config = saved_config(workdir, got)
  if jax.process_index() == 0:
    print(f"Using the {'EMA ' if ema else ''}parameters of step {got} from {ckpt_dir}",
          flush=True)
  return Loaded(config, params, got)


def local_rows(array: jax.Array) -> np.ndarray:
  """This process's rows of an array split along its first axis, in row order."""
  shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
  seen, parts = set(), []
  for shard in shards:
    start = shard.index[0].start or 0
    if start not in seen:  # replicated copies of the same rows appear once
      seen.add(start)
      parts.append(np.asarray(shard.data))
  return np.concatenate(parts)


class Sampler:
  """Draws samples from a loaded model over every device.

  The sampler settings default to the config's `sample` section; `sample`, `sample_batch` and
  `sample_fn` take any of them (sampler, num_steps, eta, clip_denoised, guidance_scale, ...) as
  keywords.
  """

  def __init__(self, loaded: Loaded, mesh=None):
    self.config = loaded.config
    self.step = loaded.step
    self.mesh = parallel.make_mesh() if mesh is None else mesh
    self.model = build.make_model(self.config)
    self.sched = build.make_schedule(self.config)
    self.params = parallel.replicate(loaded.params, self.mesh)
    self._fns: dict[tuple, Callable] = {}

  @classmethod
  def from_workdir(cls, workdir: str, config=None, *, step: int | None = None) -> "Sampler":
    return cls(load(workdir, config, step=step))

  def sample_fn(self, **settings) -> Callable:
    """The compiled sampler f(params, keys) for these settings (built once, then reused)."""
    kwargs = build.sampler_kwargs(self.config, **settings)
    key = tuple(sorted(kwargs.items()))
    if key not in self._fns:
      self._fns[key] = programs.make_sample_fn(self.config, self.model, self.sched, self.mesh,
                                            **kwargs)
    return self._fns[key]

  def keys(self, indices: np.ndarray, seed: int) -> jax.Array:
    """The keys of the examples with these global indices, split over the mesh."""
    return parallel.sharded_example_keys(seed, prng.RunStream.SAMPLE, indices, self.mesh)

  @property
  def num_classes(self) -> int:
    """The model's classes (0: unconditional)."""
    return build.num_classes(self.config)

  def labels(self, indices: np.ndarray) -> np.ndarray | None:
    """The default labels of these samples: i mod num_classes (None: unconditional)."""
    return build.default_labels(self.config, indices)

  def sample_global(self, indices: np.ndarray, *, seed: int = 0,
                    labels: np.ndarray | None = None, **settings) -> jax.Array:
    """Samples the examples with these global indices (len divisible by the devices), as one
    global float array [len, H, W, C] in [-1, 1] split over the mesh (not waited for).
    A class-conditional model's samples are of `labels` (default: `self.labels(indices)`)."""
    labels_arg = programs.sample_labels(self.config, indices, self.mesh, labels)
    return self.sample_fn(**settings)(self.params, self.keys(indices, seed), *labels_arg)

  def sample_batch(self, indices: np.ndarray, *, seed: int = 0,
                   labels: np.ndarray | None = None, **settings) -> np.ndarray:
    """This process's rows of `sample_global`, float32 [rows, H, W, C] in [-1, 1]."""
    return local_rows(self.sample_global(indices, seed=seed, labels=labels, **settings))

  def sample(self, num: int, *, seed: int = 0, batch_size: int | None = None,
             labels=None, **settings) -> np.ndarray:
    """`num` samples as uint8 [num, H, W, C] (single-process use: a notebook, a script).

    Args:
      num: how many.
      seed: sample i of a seed is the same whatever `num` and the devices.
      batch_size: samples per compiled call, at most (default 256); never more than `num`,
        rounded up to a multiple of the devices.
      labels: a class-conditional model's classes: one int for all, or `num` of them (default:
        sample i of class i mod num_classes); refused for an unconditional model.
      **settings: sampler settings replacing the config's (`build.sampler_kwargs`).
    """
    if num < 1:
      raise ValueError(f"sample: num={num}; ask for at least one sample")
    if batch_size is not None and batch_size < 1:
      raise ValueError(f"sample: batch_size={batch_size}; give a positive batch size, or None "
                       f"for the default")
    if labels is not None:
      labels = np.asarray(labels)
      labels = build.check_sample_labels(self.config, np.broadcast_to(labels, (num,))
                                         if labels.ndim == 0 else labels)
      if labels.shape != (num,):
        raise ValueError(f"labels: {num} samples asked for, {len(labels)} labels given; give "
                         f"one label, or one per sample")
    batch = parallel.round_up_to_devices(min(batch_size or 256, num), self.mesh)
    out = []
    for start in range(0, num, batch):
      indices = np.arange(start, start + batch)
      batch_labels = None
      if labels is not None:  # the padding rows past num repeat the last label
        batch_labels = labels[np.minimum(indices, num - 1)]
      out.append(self.sample_batch(indices, seed=seed, labels=batch_labels, **settings))
    return images_lib.to_uint8(np.concatenate(out)[:num])
