"""A trained model ready to sample: a checkpoint's parameters with its config, and samples by
global example index over every device (the notebook and script API; the evaluation modes
build on it).

  sampler = inference.Sampler.from_workdir("runs/digits")
  images = sampler.sample(16, seed=0)                             # the config's sampler
  images = sampler.sample(16, sampler="ddim", num_steps=50)       # DDIM over 50 timesteps
  images = sampler.sample(16, respacing="50")                     # ancestral over 50 (respaced)
  images = sampler.sample(16, labels=[3] * 16)                    # class-conditional: class 3
  latents = sampler.encode(images, num_steps=50)                  # DDIM inversion: x_T
  again = sampler.decode(latents, num_steps=50)                   # DDIM (eta 0) from them
  edited = sampler.edit(images, t=500)                            # SDEdit from t = 500
  filled = sampler.inpaint(images, masks)                         # RePaint: masks 1 = known
  mixed = sampler.interpolate(images, others, [0.5] * n)          # through latents, or mixed
  x0_preds = sampler.progressive(4, every=50)                     # x_0 predictions of a run

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
from diffusion_jax import samplers
from diffusion_jax.samplers import inversion
from diffusion_jax.samplers import repaint
from diffusion_jax.samplers import sdedit
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


# What DDIM inversion and its decoding take from the `sample` section (each may be given by name).
DDIM_SETTINGS = ("num_steps", "respacing", "clip_denoised", "dynamic_threshold", "guidance_scale")


def make_ddim_fn(config: ml_collections.ConfigDict, model, sched, mesh, direction: str, *,
                 timesteps, clip_denoised: bool, dynamic_threshold: float = 0.0,
                 guidance_scale: float = 0.0) -> Callable:
  """DDIM inversion or deterministic DDIM from given latents, as one compiled program over the
  mesh.

  Args:
    config: the diffusion types, the model's classes.
    model, sched: the U-Net and its (full) schedule.
    mesh: the devices; the images or latents (and labels) are split over its `data` axis.
    direction: 'encode' (images -> latents, `inversion.ddim_reverse_sample_loop`) or 'decode'
      (latents -> images, `samplers.ddim_sample_loop` with eta 0 from them).
    timesteps: the visited timesteps, ascending (the same for both directions).
    clip_denoised, dynamic_threshold: how each x_0 prediction is clipped.
    guidance_scale: classifier-free guidance's w (`programs.denoiser`); 0 = none.

  Returns:
    f(params, x [n, H, W, C]) -> float32 [n, H, W, C], x float in [-1, 1] (uint8 images are
    mapped there) or latents; for a class-conditional model f(params, x, labels int32 [n]).
  """
  if direction not in ("encode", "decode"):
    raise ValueError(f"direction must be 'encode' or 'decode', got {direction!r}")
  d = config.diffusion
  build.check_guidance(config.model, guidance_scale)
  timesteps = np.asarray(timesteps)
  kwargs = dict(timesteps=timesteps, mean_type=d.mean_type, var_type=d.var_type,
                clip_denoised=clip_denoised, dynamic_threshold=dynamic_threshold)

  def run(params, x, labels=None):
    model_fn = programs.denoiser(model, params, labels, guidance_scale=guidance_scale,
                                 var_type=d.var_type)
    x = images_lib.to_float(x) if x.dtype == np.uint8 else x.astype(np.float32)
    if direction == "encode":
      return inversion.ddim_reverse_sample_loop(sched, model_fn, x, **kwargs)
    return samplers.ddim_sample_loop(sched, model_fn, None, x.shape, x_init=x, eta=0.0, **kwargs)

  return parallel.batch_map(run, mesh, num_batched=2 if build.num_classes(config) else 1)


def make_rows_fn(config: ml_collections.ConfigDict, model, mesh, run: Callable, *,
                 num_arrays: int, guidance_scale: float = 0.0) -> Callable:
  """A program over the mesh that runs `run(model_fn, *arrays, keys)` on rows split over the
  mesh (the edits: SDEdit, RePaint, interpolation, progressive runs).

  Args:
    config: the diffusion types, the model's classes.
    model: the U-Net.
    mesh: the devices.
    run: run(model_fn, *arrays, keys) -> an array or a tuple of them, per row.
    num_arrays: how many row arrays come before the keys (uint8 images are mapped to [-1, 1]).
    guidance_scale: classifier-free guidance's w (`programs.denoiser`); 0 = none.

  Returns:
    f(params, *arrays, keys [n]) (and labels int32 [n] for a class-conditional model).
  """
  build.check_guidance(config.model, guidance_scale)
  d = config.diffusion

  def program(params, *args):
    conditional = len(args) > num_arrays + 1
    labels = args[-1] if conditional else None
    arrays = [images_lib.to_float(a) if a.dtype == np.uint8 else a
              for a in args[:num_arrays]]
    model_fn = programs.denoiser(model, params, labels, guidance_scale=guidance_scale,
                                 var_type=d.var_type)
    return run(model_fn, *arrays, args[num_arrays])

  return parallel.batch_map(program, mesh, num_batched=num_arrays + 1 + (
      1 if build.num_classes(config) else 0))


class Sampler:
  """Draws samples from a loaded model over every device.

  The sampler settings default to the config's `sample` section; `sample`, `sample_batch` and
  `sample_fn` take any of them (sampler, num_steps, eta, clip_denoised, guidance_scale, ...) as
  keywords. `encode` and `decode` are DDIM with eta 0 whatever the config's sampler, over the
  timesteps of its num_steps or respacing (or those given).
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

  def ddim_settings(self, **settings) -> dict:
    """The settings `encode` and `decode` use (`DDIM_SETTINGS`): the config's, replaced by those
    given (None: the config's), checked as DDIM's before anything compiles."""
    unknown = set(settings) - set(DDIM_SETTINGS)
    if unknown:
      raise TypeError(f"unknown settings {sorted(unknown)} for DDIM inversion; allowed: "
                      f"{', '.join(DDIM_SETTINGS)}")
    values = {k: v for k, v in self.run_settings(**settings).items() if k in DDIM_SETTINGS}
    samplers.check("ddim", {k: v for k, v in values.items() if k != "guidance_scale"},
                   self.sched.num_timesteps, mean_type=self.config.diffusion.mean_type)
    build.check_guidance(self.config.model, values["guidance_scale"])
    return values

  def ddim_fn(self, direction: str, **settings) -> Callable:
    """The compiled `make_ddim_fn` for `ddim_settings(**settings)` (built once, then reused)."""
    values = self.ddim_settings(**settings)
    key = (direction,) + tuple(sorted(values.items()))
    if key not in self._fns:
      timesteps = samplers.visited_timesteps(self.sched.num_timesteps, values["num_steps"],
                                             values["respacing"])
      self._fns[key] = make_ddim_fn(
          self.config, self.model, self.sched, self.mesh, direction, timesteps=timesteps,
          clip_denoised=values["clip_denoised"], dynamic_threshold=values["dynamic_threshold"],
          guidance_scale=values["guidance_scale"])
    return self._fns[key]

  def _check_rows(self, x: np.ndarray, what: str, labels) -> tuple[np.ndarray, np.ndarray | None]:
    """`x` and the labels as `encode` / `decode` take them, or ValueError saying what to give."""
    size, channels = self.config.data.image_size, self.config.data.channels
    want = (size, size, channels)
    if x.ndim != 4 or x.shape[1:] != want or len(x) < 1:
      raise ValueError(f"{what} of shape {x.shape}: give [n, {size}, {size}, {channels}] (the "
                       f"model's data.image_size and data.channels), n >= 1")
    if what == "images" and x.dtype != np.uint8:
      if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"images of dtype {x.dtype}: give uint8 (0..255) or floats in [-1, 1]")
      if not np.all(np.abs(x) <= 1.0 + 1e-6):
        raise ValueError("images are floats outside [-1, 1]: scale them there (x / 127.5 - 1 "
                         "for 0..255), or give uint8")
    if what == "latents" and not np.issubdtype(x.dtype, np.floating):
      raise ValueError(f"latents of dtype {x.dtype}: give the floats `encode` returned")
    if labels is None:
      if self.num_classes:
        raise ValueError(f"the model is class-conditional ({self.num_classes} classes): give "
                         f"labels, the class of each of the {len(x)} rows")
      return x, None
    labels = np.asarray(labels)
    labels = build.check_sample_labels(
        self.config, np.broadcast_to(labels, (len(x),)) if labels.ndim == 0 else labels)
    if labels.shape != (len(x),):
      raise ValueError(f"{len(x)} {what} and {len(labels)} labels: give one label, or one per "
                       f"row")
    return x, labels

  def _ddim_rows(self, direction: str, x, labels, batch_size: int | None, settings) -> np.ndarray:
    what = "images" if direction == "encode" else "latents"
    x, labels = self._check_rows(np.asarray(x), what, labels)
    if batch_size is not None and batch_size < 1:
      raise ValueError(f"{direction}: batch_size={batch_size}; give a positive batch size, or "
                       f"None for the default")
    fn = self.ddim_fn(direction, **settings)
    num = len(x)
    batch = parallel.round_up_to_devices(min(batch_size or 256, num), self.mesh)
    out = []
    for start in range(0, num, batch):
      rows = np.minimum(np.arange(start, start + batch), num - 1)  # padding repeats the last row
      args = [parallel.shard_rows(x[rows], self.mesh)]
      if labels is not None:
        args.append(parallel.shard_rows(labels[rows].astype(np.int32), self.mesh))
      out.append(parallel.fetch(fn(self.params, *args)))
    return np.concatenate(out)[:num].astype(np.float32)

  def encode(self, images, labels=None, *, num_steps: int | None = None,
             respacing: str | None = None, batch_size: int | None = None,
             **settings) -> np.ndarray:
    """DDIM inversion: the latents x_T of images, which `decode` turns back into them.

    Args:
      images: uint8 [n, H, W, C] (0..255), or floats in [-1, 1], of the model's size and
        channels.
      labels: a class-conditional model's classes of the images: one int for all, or n of them
        (needed by such a model; refused for an unconditional one).
      num_steps, respacing: the visited timesteps, as the `sample` section's fields (None: the
        config's; either one given replaces the config's choice). Decode with the same.
      batch_size: rows per compiled call, at most (default 256), rounded up to the devices.
      **settings: clip_denoised, dynamic_threshold, guidance_scale (default: the config's).

    Returns:
      float32 [n, H, W, C], every process all of them.
    """
    return self._ddim_rows("encode", images, labels, batch_size,
                           dict(settings, num_steps=num_steps, respacing=respacing))

  def decode(self, latents, labels=None, *, num_steps: int | None = None,
             respacing: str | None = None, batch_size: int | None = None,
             **settings) -> np.ndarray:
    """Deterministic DDIM (eta 0) from given latents x_T (e.g. `encode`'s), over the same
    timesteps as `encode` for the same arguments.

    Args:
      latents: floats [n, H, W, C].
      labels, num_steps, respacing, batch_size, **settings: as `encode`'s.

    Returns:
      float32 [n, H, W, C] in [-1, 1] (`images_lib.to_uint8` for 8-bit images).
    """
    return self._ddim_rows("decode", latents, labels, batch_size,
                           dict(settings, num_steps=num_steps, respacing=respacing))

  # --------------------------------------------------------------------------------------------
  # Edits: SDEdit, RePaint, interpolation, progressive runs

  def run_settings(self, **settings) -> dict:
    """The `sample` section's settings (`build.sampler_kwargs`) with those given replacing
    them (None: the config's); one of num_steps and respacing given replaces the config's
    choice of steps made with the other."""
    given = {k: v for k, v in settings.items() if v is not None}
    values = build.sampler_kwargs(self.config, **given)
    if given.get("num_steps") is not None and "respacing" not in given:
      values["respacing"] = ""
    if given.get("respacing") and "num_steps" not in given:
      values["num_steps"] = 0
    return values

  def _checked_run(self, values: dict, capability: str = "", start: int | None = None,
                   start_field: str = "t") -> tuple[str, dict, float]:
    """(sampler, its settings, guidance_scale) of `values`, checked before anything compiles."""
    values = dict(values)
    name, guidance = values.pop("sampler"), values.pop("guidance_scale")
    mean_type = self.config.diffusion.mean_type
    samplers.check(name, values, self.sched.num_timesteps, mean_type=mean_type)
    if capability:
      samplers.registry.require(name, capability)
    if start is not None:
      samplers.registry.check_start(name, values, self.sched.num_timesteps, start,
                                    mean_type=mean_type, start_field=start_field)
    build.check_guidance(self.config.model, guidance)
    return name, values, guidance

  def _rows_fn(self, key: tuple, run: Callable, num_arrays: int, guidance: float) -> Callable:
    if key not in self._fns:
      self._fns[key] = make_rows_fn(self.config, self.model, self.mesh, run,
                                    num_arrays=num_arrays, guidance_scale=guidance)
    return self._fns[key]

  def _map_rows(self, fn: Callable, arrays: list[np.ndarray], labels, *, seed: int,
                stream: prng.RunStream, batch_size: int | None, what: str,
                num: int | None = None, key_indices=None):
    """fn over the rows of `arrays` (`num` rows when there are none; and labels) in batches; row
    i's key is example key_indices[i] (default i) of (seed, stream). Returns what fn returns, as
    host arrays of the rows."""
    if batch_size is not None and batch_size < 1:
      raise ValueError(f"{what}: batch_size={batch_size}; give a positive batch size, or None "
                       f"for the default")
    num = len(arrays[0]) if arrays else num
    batch = parallel.round_up_to_devices(min(batch_size or 256, num), self.mesh)
    out = []
    for start in range(0, num, batch):
      indices = np.arange(start, start + batch)
      rows = np.minimum(indices, num - 1)  # padding repeats the last row
      args = [parallel.shard_rows(a[rows], self.mesh) for a in arrays]
      if key_indices is not None:
        indices = np.where(indices < num, np.asarray(key_indices)[rows], indices)
      args.append(parallel.sharded_example_keys(seed, stream, indices, self.mesh))
      if labels is not None:
        args.append(parallel.shard_rows(labels[rows].astype(np.int32), self.mesh))
      out.append(parallel.fetch(fn(self.params, *args)))
    return jax.tree_util.tree_map(lambda *parts: np.concatenate(parts)[:num], *out)

  def edit(self, images, t: int, labels=None, *, seed: int = 0, batch_size: int | None = None,
           **settings) -> np.ndarray:
    """SDEdit: images diffused to timestep t by q(x_t | x_0), then denoised from t by the
    sampler (`samplers.sdedit`), its steps spread over timesteps 0..t.

    Args:
      images: uint8 [n, H, W, C] or floats in [-1, 1], of the model's size and channels.
      t: the timestep, in 1..T-1 (larger: less of the input kept).
      labels: a class-conditional model's classes (one int, or n); needed by such a model.
      seed: row i's noise comes from example i of (seed, `prng.RunStream.EDIT`).
      batch_size: rows per compiled call, at most (default 256), rounded up to the devices.
      **settings: sampler settings replacing the config's (sampler, num_steps, eta, ...).

    Returns:
      float32 [n, H, W, C] in [-1, 1].
    """
    images, labels = self._check_rows(np.asarray(images), "images", labels)
    name, values, guidance = self._checked_run(self.run_settings(**settings), "run_from",
                                               start=int(t))
    d = self.config.diffusion
    run = lambda model_fn, x, keys: sdedit.sdedit(
        self.sched, model_fn, keys, x, t=int(t), sampler=name, mean_type=d.mean_type,
        var_type=d.var_type, **values)
    fn = self._rows_fn(("edit", int(t), name, guidance, *sorted(values.items())), run, 1,
                       guidance)
    return self._map_rows(fn, [images], labels, seed=seed, stream=prng.RunStream.EDIT,
                          batch_size=batch_size, what="edit").astype(np.float32)

  def check_masks(self, masks, num: int) -> np.ndarray:
    """Masks as `inpaint` takes them (1 = known) for `num` images, float32 [num, H, W, 1 or C],
    or ValueError saying what to give."""
    size, channels = self.config.data.image_size, self.config.data.channels
    masks = np.asarray(masks)
    if masks.ndim == 3:
      masks = masks[..., None]
    if masks.ndim == 4 and len(masks) == 1:
      masks = np.broadcast_to(masks, (num,) + masks.shape[1:])
    if (masks.ndim != 4 or masks.shape[:3] != (num, size, size)
        or masks.shape[3] not in (1, channels)):
      raise ValueError(f"masks of shape {masks.shape} for {num} images of {size}x{size}x"
                       f"{channels}: give [{num} or 1, {size}, {size}] or [.., 1] or [.., "
                       f"{channels}], 1 (or True) where a pixel is known")
    if not np.all((masks == 0) | (masks == 1)):
      raise ValueError("masks hold values other than 0 and 1: give 1 (or True) where a pixel is "
                       "known, 0 where it is to be made")
    return masks.astype(np.float32)

  def inpaint(self, images, masks, labels=None, *, seed: int = 0, jump_length: int = 10,
              jump_n_sample: int = 10, batch_size: int | None = None,
              **settings) -> np.ndarray:
    """RePaint: the pixels of `images` where `masks` is 0 made by the model, those where it is 1
    kept (`samplers.repaint`), over the timesteps of num_steps or respacing.

    Args:
      images: uint8 [n, H, W, C] or floats in [-1, 1], of the model's size and channels.
      masks: [n or 1, H, W] (or [.., 1], or [.., C]) of 0 / 1 (or bool), 1 = known.
      labels: a class-conditional model's classes (one int, or n); needed by such a model.
      seed: row i's noise comes from example i of (seed, `prng.RunStream.INPAINT`).
      jump_length, jump_n_sample: RePaint's resampling (`repaint.jump_schedule`).
      batch_size: rows per compiled call, at most (default 256), rounded up to the devices.
      **settings: num_steps, respacing, clip_denoised, dynamic_threshold, guidance_scale
        (default: the config's); the steps are ancestral, so the sampler must be 'ancestral'.

    Returns:
      float32 [n, H, W, C] in [-1, 1].
    """
    images, labels = self._check_rows(np.asarray(images), "images", labels)
    masks = self.check_masks(masks, len(images))
    for name, value in (("jump_length", jump_length), ("jump_n_sample", jump_n_sample)):
      if not (isinstance(value, (int, np.integer)) and value >= 1):
        raise ValueError(f"{name}={value!r}: give an integer >= 1")
    name, values, guidance = self._checked_run(self.run_settings(**settings))
    if name != "ancestral":
      raise ValueError(f"RePaint takes ancestral steps, not sampler {name!r}: use "
                       f"sampler='ancestral' (its steps: num_steps or respacing)")
    timesteps = samplers.visited_timesteps(self.sched.num_timesteps, values["num_steps"],
                                           values["respacing"])
    d = self.config.diffusion
    run = lambda model_fn, x, m, keys: repaint.repaint(
        self.sched, model_fn, keys, x, m, jump_length=int(jump_length),
        jump_n_sample=int(jump_n_sample), mean_type=d.mean_type, var_type=d.var_type,
        timesteps=timesteps, clip_denoised=values["clip_denoised"],
        dynamic_threshold=values["dynamic_threshold"])
    fn = self._rows_fn(("inpaint", int(jump_length), int(jump_n_sample), guidance,
                        *sorted(values.items())), run, 2, guidance)
    return self._map_rows(fn, [images, masks], labels, seed=seed, stream=prng.RunStream.INPAINT,
                          batch_size=batch_size, what="inpaint").astype(np.float32)

  def interpolate(self, images1, images2, lams, labels=None, *, t: int | None = None,
                  seed: int = 0, batch_size: int | None = None, key_indices=None,
                  **settings) -> np.ndarray:
    """Interpolations between pairs of images: with a deterministic sampler (e.g. 'ddim', eta
    0) through their DDIM latents, interpolated spherically (`inversion.interpolate_latents`);
    with a stochastic one as Ho et al.: both diffused to timestep t, mixed, denoised from t
    (`sdedit.mix_and_denoise`).

    Args:
      images1, images2: uint8 [n, H, W, C] or floats in [-1, 1].
      lams: [n] mixing weights in [0, 1] (0: images1).
      labels: a class-conditional model's classes (one int, or n).
      t: the stochastic samplers' mixing timestep (needed by them; ignored otherwise).
      seed: row i's noise comes from example i of (seed, `prng.RunStream.INTERPOLATE`).
      key_indices: the example whose key each row takes (default: its own row); rows of one
        pair given the same one differ by their lam alone.
      batch_size, **settings: as `edit`'s.

    Returns:
      float32 [n, H, W, C].
    """
    images1, labels = self._check_rows(np.asarray(images1), "images", labels)
    images2, _ = self._check_rows(np.asarray(images2), "images", labels)
    lams = np.asarray(lams, np.float32)
    if lams.shape != (len(images1),) or images2.shape != images1.shape:
      raise ValueError(f"{len(images1)} first images, {len(images2)} second ones and lams of "
                       f"shape {lams.shape}: give as many of each")
    values = self.run_settings(**settings)
    name = values["sampler"]
    d = self.config.diffusion
    kwargs = dict(mean_type=d.mean_type, var_type=d.var_type)
    if samplers.registry.is_deterministic(name, values):
      name, values, guidance = self._checked_run(values, "run_from")
      run = lambda model_fn, x1, x2, lam, keys: inversion.interpolate_latents(
          self.sched, model_fn, keys, x1, x2, lam, sampler=name, **kwargs, **values)
      key = ("interpolate", name, guidance, *sorted(values.items()))
    else:
      if t is None:
        raise ValueError(f"sampler {name!r} draws noise: interpolate mixes at a timestep t; "
                         f"give t, or a deterministic sampler (e.g. sampler='ddim', eta=0)")
      name, values, guidance = self._checked_run(values, "run_from", start=int(t))
      run = lambda model_fn, x1, x2, lam, keys: sdedit.mix_and_denoise(
          self.sched, model_fn, keys, x1, x2, lam, t=int(t), sampler=name, **kwargs, **values)
      key = ("interpolate", int(t), name, guidance, *sorted(values.items()))
    fn = self._rows_fn(key, run, 3, guidance)
    return self._map_rows(fn, [images1, images2, lams], labels, seed=seed,
                          stream=prng.RunStream.INTERPOLATE, batch_size=batch_size,
                          what="interpolate", key_indices=key_indices).astype(np.float32)

  def progressive(self, num: int, every: int, *, seed: int = 0, labels=None,
                  **settings) -> tuple[np.ndarray, np.ndarray]:
    """`num` samples with the x_0 predictions of every `every`-th network call of their run
    (`samplers.registry.progressive`), from the keys of `prng.RunStream.PROGRESSIVE`.

    Returns:
      (samples float32 [num, H, W, C], x0_preds float32 [num, calls // every, H, W, C],
      noisiest first).
    """
    if num < 1:
      raise ValueError(f"progressive: num={num}; ask for at least one sample")
    name, values, guidance = self._checked_run(self.run_settings(**settings), "progressive")
    calls = samplers.registry.num_calls(name, values, self.sched.num_timesteps)
    if not 1 <= every <= calls:
      raise ValueError(f"every={every}: sampler {name!r} makes {calls} network calls with these "
                       f"settings; keep every in 1..{calls}")
    size, channels = self.config.data.image_size, self.config.data.channels
    d = self.config.diffusion
    run = lambda model_fn, keys: samplers.registry.progressive(
        name, self.sched, model_fn, keys, (keys.shape[0], size, size, channels),
        every=int(every), mean_type=d.mean_type, var_type=d.var_type, **values)
    fn = self._rows_fn(("progressive", int(every), name, guidance, *sorted(values.items())),
                       run, 0, guidance)
    if labels is None:
      labels = self.labels(np.arange(num))
    elif labels is not None:
      labels = build.check_sample_labels(self.config, np.broadcast_to(np.asarray(labels), (num,)))
    samples, preds = self._map_rows(fn, [], labels, seed=seed, num=num,
                                    stream=prng.RunStream.PROGRESSIVE, batch_size=None,
                                    what="progressive")
    return samples.astype(np.float32), preds.astype(np.float32)
