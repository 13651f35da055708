"""Evaluation: samples at scale, bits/dim on a split, progressive and interpolation grids.

Every mode reads the EMA parameters of a checkpoint in WORKDIR/checkpoints (the latest, or
`step`), as the original evaluated, and runs over every device of every host:

  sample       N samples in global batches sharded over all devices; each process writes its
               share to WORKDIR/samples/<step>/samples_<process>.npz (`images` uint8 [n, H, W, C],
               `index` int64 [n], each image's global example index) and process 0 a PNG grid.
  eval         FID against train- and test-set statistics, Inception Score (10 splits) and
               bits/dim of a split, into WORKDIR/eval/<step>.json and TensorBoard; for one step,
               or for every new checkpoint while training runs (`eval.watch`). For dataset
               'digits', the measures of metrics/digits.py (a small classifier trained here)
               take the place of FID and IS, so no Inception weights are needed.
  progressive  a grid of the x_0 predictions along the sampling chain.
  interpolate  a grid of interpolations between pairs of dataset images.

Sample i of a run is drawn from `fold_in(fold_in(key(seed), stream), i)`, so the same seed gives
the same samples whatever the number of devices or hosts (to float rounding).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import PartitionSpec as P

from diffusion_jax import checkpoints
from diffusion_jax import config_checks
from diffusion_jax import config_lib
from diffusion_jax import diffusion
from diffusion_jax import input_pipeline
from diffusion_jax import parallel
from diffusion_jax import progress as progress_lib
from diffusion_jax import sampling
from diffusion_jax import train

# Streams folded into the seed, one per use, so no two uses share random numbers.
_SAMPLE_STREAM, _BPD_STREAM, _PROGRESSIVE_STREAM, _INTERP_STREAM = 11, 12, 13, 14


def eval_settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.eval` over `config_lib.eval_defaults()` (a saved or older config may lack fields)."""
  out = config_lib.eval_defaults()
  if "eval" in config:
    for key, value in config.eval.items():
      out[key] = value
  return out


# ----------------------------------------------------------------------------------------------
# Loading a model for sampling (also the notebook API).

@dataclasses.dataclass
class Loaded:
  """A config with the EMA parameters of one of its checkpoints."""
  config: ml_collections.ConfigDict
  params: Any
  step: int


def load(workdir: str, config: ml_collections.ConfigDict | None = None, *,
         step: int | None = None, ema: bool = True) -> Loaded:
  """Loads a workdir's (or a converted checkpoint's) parameters.

  Args:
    workdir: the training workdir, or the --out of `convert_tf_checkpoint`.
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
  ckpt_dir = epath.Path(workdir) / "checkpoints"
  load_step(workdir, step)  # no checkpoint, or none at `step`: says which steps there are
  # Only the parameters are read and verified: a damaged optimizer state does not matter here.
  params, got = checkpoints.restore_params(os.fspath(ckpt_dir), step, ema=ema)
  got = int(got)
  if config is None:
    saved = checkpoints.Checkpointer(os.fspath(ckpt_dir), async_save=False)
    try:
      config = ml_collections.ConfigDict(saved.restore_config(got))
    finally:
      saved.close()
  if jax.process_index() == 0:
    print(f"Using the {'EMA ' if ema else ''}parameters of step {got} from {ckpt_dir}",
          flush=True)
  return Loaded(config, params, got)


class Sampler:
  """Draws samples from a loaded model over every local device (for notebooks and scripts).

  Example:
    sampler = evaluate.Sampler.from_workdir("runs/digits")
    images = sampler.sample(16, seed=0)          # uint8 [16, H, W, C]
    images = sampler.sample(16, ddim_steps=50)   # DDIM over 50 timesteps
  """

  def __init__(self, loaded: Loaded, mesh=None):
    self.config = loaded.config
    self.step = loaded.step
    self.mesh = parallel.make_mesh() if mesh is None else mesh
    self.model = train.make_model(self.config)
    self.sched = train.make_schedule(self.config)
    self.params = parallel.replicate(loaded.params, self.mesh)
    self._fns: dict[tuple, Callable] = {}

  @classmethod
  def from_workdir(cls, workdir: str, config=None, *, step: int | None = None) -> "Sampler":
    return cls(load(workdir, config, step=step))

  def sample_fn(self, ddim_steps: int, eta: float):
    """The compiled sampler f(params, keys) for these settings (built once, then reused)."""
    key = (ddim_steps, eta)
    if key not in self._fns:
      self._fns[key] = train.make_sample_fn(self.config, self.model, self.sched, self.mesh,
                                            ddim_steps=ddim_steps, eta=eta)
    return self._fns[key]

  def sample_batch(self, indices: np.ndarray, *, seed: int = 0, ddim_steps: int = 0,
                   eta: float = 0.0) -> np.ndarray:
    """Samples the examples with the given global indices (len divisible by the devices).

    Returns:
      this process's rows of the batch as float32 [rows, H, W, C] in [-1, 1].
    """
    fn = self.sample_fn(ddim_steps, eta)
    keys = parallel.sharded_index_keys(seed, _SAMPLE_STREAM, indices, self.mesh)
    return local_rows(fn(self.params, keys))

  def sample(self, num: int, *, seed: int = 0, ddim_steps: int = 0, eta: float = 0.0,
             batch_size: int | None = None) -> np.ndarray:
    """`num` samples as uint8 [num, H, W, C] (single-process use: a notebook, a script)."""
    devices = self.mesh.devices.size
    batch = round_up(batch_size or min(num, 256), devices)
    out = []
    for start in range(0, num, batch):
      out.append(self.sample_batch(np.arange(start, start + batch), seed=seed,
                                   ddim_steps=ddim_steps, eta=eta))
    return train.to_uint8(np.concatenate(out)[:num])


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of the complete checkpoints in WORKDIR/checkpoints, ascending."""
  ckpt_dir = epath.Path(workdir) / "checkpoints"
  if not ckpt_dir.exists():
    return []
  saver = checkpoints.Checkpointer(os.fspath(ckpt_dir), async_save=False)
  try:
    return saver.all_steps()
  finally:
    saver.close()


def load_step(workdir: str, step: int | None = None) -> int:
  """The checkpoint step `load` would read (the latest when step is None)."""
  steps = checkpoint_steps(workdir)
  ckpt_dir = epath.Path(workdir) / "checkpoints"
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {ckpt_dir}: train first (--mode train), or "
                            "convert the authors' checkpoint with "
                            "`python -m diffusion_jax.convert_tf_checkpoint`")
  if step is not None and step not in steps:
    raise FileNotFoundError(f"no checkpoint for step {step} in {ckpt_dir}; steps there: {steps}")
  return steps[-1] if step is None else step


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


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


def _batch_size(settings, mesh) -> int:
  return round_up(max(1, settings.batch_size), mesh.devices.size)


def _atomic_savez(path: epath.Path, **arrays) -> None:
  """Writes an .npz under a temporary name, then renames: no partial file looks complete."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / (path.name + ".tmp")
  with tmp.open("wb") as f:
    np.savez(f, **arrays)
  tmp.replace(path)


# ----------------------------------------------------------------------------------------------
# --mode sample

def generate(sampler: Sampler, num_samples: int, batch_size: int, *, seed: int,
             ddim_steps: int, eta: float, on_batch: Callable | None = None):
  """Samples examples 0 .. num_samples-1 in global batches; returns this process's share.

  Returns:
    (images uint8 [n, H, W, C], index int64 [n]) for the rows this process holds.
  """
  rows = parallel.host_rows(sampler.mesh, batch_size)
  images, index = [], []
  for start in range(0, num_samples, batch_size):
    indices = np.arange(start, start + batch_size)
    batch = train.to_uint8(sampler.sample_batch(indices, seed=seed, ddim_steps=ddim_steps,
                                                eta=eta))
    mine = indices[rows]
    keep = mine < num_samples
    images.append(batch[keep])
    index.append(mine[keep])
    if on_batch is not None:
      on_batch(start + batch_size)
  return np.concatenate(images), np.concatenate(index).astype(np.int64)


def run_sample(config, workdir: str, *, step: int | None = None) -> epath.Path:
  """`--mode sample`: writes WORKDIR/samples/<step>/samples_<process>.npz and grid.png."""
  config_checks.check(config, mode="sample")
  settings = eval_settings(config)
  sampler = Sampler(load(workdir, config, step=step))
  batch = _batch_size(settings, sampler.mesh)
  out_dir = epath.Path(workdir) / "samples" / str(sampler.step)
  progress = progress_lib.Progress("sample", settings.num_samples, unit="images")
  images, index = generate(sampler, settings.num_samples, batch, seed=settings.seed,
                           ddim_steps=settings.ddim_steps, eta=settings.ddim_eta,
                           on_batch=progress.update)
  _atomic_savez(out_dir / f"samples_{jax.process_index()}.npz", images=images, index=index)
  if jax.process_index() == 0:
    grid = train.image_grid(images[:64])
    train.save_png(grid, out_dir / "grid.png", upscale=max(1, 128 // config.data.image_size))
    print(f"wrote {len(images)} samples of step {sampler.step} to {out_dir}", flush=True)
  return out_dir


# ----------------------------------------------------------------------------------------------
# Bits/dim over a split

def make_bpd_fn(config, model, sched, mesh):
  """Jitted f(params, images uint8 [n, H, W, C], keys [n]) -> (total, prior, terms sum) [n]."""
  d = config.diffusion

  def bpd(params, images, keys):
    x = images.astype(jnp.float32) / 127.5 - 1.0
    model_fn = lambda x_, t: model.apply({"params": params}, x_, t, train=False)
    out = diffusion.calc_bpd_loop(sched, model_fn, x, keys, mean_type=d.mean_type,
                                  var_type=d.var_type, clip_denoised=True)
    return out.total_bpd, out.prior_bpd, jnp.sum(out.terms_bpd, axis=1)

  spec = P(parallel.DATA_AXIS)
  return jax.jit(jax.shard_map(bpd, mesh=mesh, in_specs=(P(), spec, spec),
                               out_specs=(spec, spec, spec)))


def split_source(config, split: str):
  data = copy.deepcopy(config.data)
  data.split = split
  return input_pipeline.make_source(data)


def split_batches(config, split: str, mesh, batch_size: int, max_examples: int = 0, *,
                  label: str = ""):
  """Every example of a split (or the first max_examples) once, in global batches.

  The last batch is padded with copies of example 0, for the caller to drop with `valid`.
  With a `label`, a progress line counts the examples the caller has finished with.

  Yields:
    (indices [batch_size], valid bool [batch_size], uint8 images [batch_size, H, W, C] split
    over the mesh, each host having read only its rows).
  """
  source = split_source(config, split)
  num = len(source) if max_examples <= 0 else min(max_examples, len(source))
  rows = parallel.host_rows(mesh, batch_size)
  progress = progress_lib.Progress(label, num, unit="images") if label else None
  for start in range(0, num, batch_size):
    indices = np.arange(start, start + batch_size)
    valid = indices < num
    local = np.stack([source[int(i)] for i in np.where(valid, indices, 0)[rows]])
    yield indices, valid, parallel.global_batch(local, mesh, batch_size)
    if progress is not None:
      progress.update(start + batch_size)


def bits_per_dim(config, params, mesh, split: str, *, seed: int, batch_size: int,
                 max_examples: int = 0) -> dict[str, float]:
  """The variational bound averaged exactly over a split (the last batch is padded, then the
  padding is masked out): total, prior term and the sum of the per-t terms, in bits/dim."""
  fn = make_bpd_fn(config, train.make_model(config), train.make_schedule(config), mesh)
  sums = np.zeros(3, np.float64)
  num = 0
  for indices, valid, images in split_batches(config, split, mesh, batch_size, max_examples,
                                              label=f"bits/dim ({split})"):
    num += int(valid.sum())
    keys = parallel.sharded_index_keys(seed, _BPD_STREAM, indices, mesh)
    total, prior, terms = parallel.fetch(fn(params, images, keys))
    sums += np.array([total[valid].sum(), prior[valid].sum(), terms[valid].sum()], np.float64)
  return dict(bpd=sums[0] / num, prior_bpd=sums[1] / num, terms_bpd=sums[2] / num,
              num_examples=int(num))


# ----------------------------------------------------------------------------------------------
# --mode progressive / interpolate

def run_progressive(config, workdir: str, *, step: int | None = None) -> epath.Path:
  """A grid: one row per sample, its x_0 predictions every `progressive_freq` steps (from
  t = T - freq down to 0), then the sample."""
  config_checks.check(config, mode="progressive")
  settings = eval_settings(config)
  loaded = load(workdir, config, step=step)
  mesh = parallel.make_mesh()
  model, sched = train.make_model(config), train.make_schedule(config)
  d = config.diffusion
  size, channels = config.data.image_size, config.data.channels
  num = round_up(settings.progressive_num, mesh.devices.size)

  def fn(params, keys):
    model_fn = lambda x, t: model.apply({"params": params}, x, t, train=False)
    return sampling.p_sample_loop_progressive(
        sched, model_fn, keys, (keys.shape[0], size, size, channels), mean_type=d.mean_type,
        var_type=d.var_type, include_xstartpred_freq=settings.progressive_freq)

  spec = P(parallel.DATA_AXIS)
  mapped = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(), spec), out_specs=(spec, spec)))
  keys = parallel.sharded_index_keys(settings.seed, _PROGRESSIVE_STREAM, np.arange(num), mesh)
  samples, preds = parallel.fetch(mapped(parallel.replicate(loaded.params, mesh), keys))
  # preds[:, i] was predicted at t = i * freq: show them from noisy to clean.
  rows = np.concatenate([preds[:, ::-1], samples[:, None]], axis=1)[:settings.progressive_num]
  return _write_rows_grid(rows, workdir, loaded.step, "progressive.png", config)


def run_interpolate(config, workdir: str, *, step: int | None = None) -> epath.Path:
  """A grid: one row per pair of test images, interpolated at `interp_steps` values of lam."""
  config_checks.check(config, mode="interpolate")
  settings = eval_settings(config)
  loaded = load(workdir, config, step=step)
  mesh = parallel.make_mesh()
  model, sched = train.make_model(config), train.make_schedule(config)
  d = config.diffusion
  source = split_source(config, settings.bpd_split)
  lams = np.linspace(0.0, 1.0, settings.interp_steps)
  pairs = settings.interp_pairs
  t_mix = settings.interp_t
  firsts = np.stack([source[2 * i] for i in range(pairs)])
  seconds = np.stack([source[2 * i + 1] for i in range(pairs)])
  # One row per (pair, lam); every row of a pair shares its keys, so the rows differ by lam only.
  x1 = np.repeat(firsts, len(lams), axis=0)
  x2 = np.repeat(seconds, len(lams), axis=0)
  lam = np.tile(lams, pairs).astype(np.float32)
  pair_index = np.repeat(np.arange(pairs), len(lams))
  n = len(lam)
  batch = round_up(n, mesh.devices.size)
  pad = batch - n
  x1, x2 = (np.concatenate([a, a[:pad]]) if pad else a for a in (x1, x2))
  lam = np.concatenate([lam, lam[:pad]]) if pad else lam
  pair_index = np.concatenate([pair_index, pair_index[:pad]]) if pad else pair_index

  def fn(params, a, b, lam_, keys):
    model_fn = lambda x, t: model.apply({"params": params}, x, t, train=False)
    to_float = lambda u: u.astype(jnp.float32) / 127.5 - 1.0
    return sampling.interpolate(sched, model_fn, to_float(a), to_float(b), lam_, t_mix, keys,
                                mean_type=d.mean_type, var_type=d.var_type)

  spec = P(parallel.DATA_AXIS)
  mapped = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(), spec, spec, spec, spec),
                                 out_specs=spec))
  rows = parallel.host_rows(mesh, batch)
  put = lambda a: parallel.global_batch(a[rows], mesh, batch)
  keys = parallel.sharded_index_keys(settings.seed, _INTERP_STREAM, pair_index, mesh)
  out = parallel.fetch(mapped(parallel.replicate(loaded.params, mesh), put(x1), put(x2),
                              put(lam), keys))[:n]
  grid_rows = out.reshape(pairs, len(lams), *out.shape[1:])
  # Frame each row with the two originals.
  originals = lambda a: (a.astype(np.float32) / 127.5 - 1.0)[:, None]
  grid_rows = np.concatenate([originals(firsts), grid_rows, originals(seconds)], axis=1)
  return _write_rows_grid(grid_rows, workdir, loaded.step, "interpolate.png", config)


def _write_rows_grid(rows_NxKxHxWxC, workdir, step, name, config) -> epath.Path:
  images = train.to_uint8(rows_NxKxHxWxC)
  n, k = images.shape[:2]
  grid = train.image_grid(images.reshape((n * k,) + images.shape[2:]), cols=k)
  path = epath.Path(workdir) / "samples" / str(step) / name
  if jax.process_index() == 0:
    train.save_png(grid, path, upscale=max(1, 64 // config.data.image_size))
    print(f"wrote {path}", flush=True)
  return path


# ----------------------------------------------------------------------------------------------
# --mode eval: FID, Inception Score and bits/dim for a checkpoint

def make_inception_fn(mesh, size: int):
  """Jitted f(variables, images uint8-valued [n, H, W, 3]) -> (pool [n, 2048], logits [n, K]),
  split over the mesh; inputs are resized to size x size as pytorch-fid does."""
  from diffusion_jax.metrics import inception  # pylint: disable=g-import-not-at-top
  model = inception.InceptionV3()

  def features(variables, images):
    x = inception.preprocess_images(images, size=size, precision=model.precision)
    return model.apply(variables, x)

  spec = P(parallel.DATA_AXIS)
  return jax.jit(jax.shard_map(features, mesh=mesh, in_specs=(P(), spec),
                               out_specs=(spec, spec)))


def _to_rgb(images):
  """Grayscale images are repeated to 3 channels for the Inception network."""
  return jnp.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def _sample_batches(sampler: Sampler, settings, batch_size: int):
  """Yields the global batches of samples 0 .. num_samples-1 (float in [-1, 1], on device),
  printing progress; the last batch runs past num_samples."""
  fn = sampler.sample_fn(settings.ddim_steps, settings.ddim_eta)
  progress = progress_lib.Progress("eval: samples", settings.num_samples, unit="images")
  for start in range(0, settings.num_samples, batch_size):
    indices = np.arange(start, start + batch_size)
    keys = parallel.sharded_index_keys(settings.seed, _SAMPLE_STREAM, indices, sampler.mesh)
    samples = fn(sampler.params, keys)
    yield samples
    jax.block_until_ready(samples)
    progress.update(start + batch_size)


def sample_features(sampler: Sampler, inception_fn, variables, settings, batch_size: int):
  """Inception (pool, logits) of samples 0 .. num_samples-1, the same on every process."""
  to_images = jax.jit(lambda x: _to_rgb(jnp.clip(jnp.round((x + 1.0) * 127.5), 0.0, 255.0)))
  pools, logits = [], []
  for samples in _sample_batches(sampler, settings, batch_size):
    pool, logit = parallel.fetch(inception_fn(variables, to_images(samples)))
    pools.append(pool)
    logits.append(logit)
  n = settings.num_samples
  return np.concatenate(pools)[:n], np.concatenate(logits)[:n]


def sample_images(sampler: Sampler, settings, batch_size: int) -> np.ndarray:
  """Samples 0 .. num_samples-1 as uint8 [num_samples, H, W, C], the same on every process."""
  images = [train.to_uint8(parallel.fetch(samples))
            for samples in _sample_batches(sampler, settings, batch_size)]
  return np.concatenate(images)[:settings.num_samples]


def real_features(config, split: str, inception_fn, variables, mesh, batch_size: int,
                  max_examples: int = 0) -> np.ndarray:
  """Inception pool features of a dataset split (every example, or the first max_examples)."""
  pools = []
  for _, valid, images in split_batches(config, split, mesh, batch_size, max_examples,
                                        label=f"Inception features ({split})"):
    pool, _ = parallel.fetch(inception_fn(variables, _to_rgb(images)))
    pools.append(pool[valid])
  return np.concatenate(pools)


def reference_statistics(config, settings, split: str, workdir: str, inception_fn, variables,
                         mesh, batch_size: int):
  """(mu, sigma) of a split: from a given TTUR .npz, a cached file, or computed and cached."""
  from diffusion_jax.metrics import fid  # pylint: disable=g-import-not-at-top
  given = settings.get(f"fid_stats_{split}", "")
  if given:
    return fid.load_statistics(given)
  stats_dir = epath.Path(settings.fid_stats_dir or epath.Path(workdir) / "eval" / "stats")
  name = (f"{config.data.dataset.replace('/', '_')}_{split}_{config.data.image_size}px_"
          f"inception{settings.inception_size}"
          f"{'_first%d' % settings.fid_max_real if settings.fid_max_real > 0 else ''}.npz")
  path = stats_dir / name
  if path.exists():
    return fid.load_statistics(os.fspath(path))
  feats = real_features(config, split, inception_fn, variables, mesh, batch_size,
                        settings.fid_max_real)
  mu, sigma = fid.compute_statistics(feats)
  if jax.process_index() == 0:
    stats_dir.mkdir(parents=True, exist_ok=True)
    tmp = stats_dir / (name + ".tmp")
    with tmp.open("wb") as f:
      np.savez(f, mu=mu, sigma=sigma)
    tmp.replace(path)
  return mu, sigma


def inception_metrics(config, settings, workdir: str, sampler: Sampler, batch: int) -> dict:
  """FID against each of `eval.fid_splits` and the Inception Score of the samples."""
  from diffusion_jax.metrics import fid  # pylint: disable=g-import-not-at-top
  from diffusion_jax.metrics import inception  # pylint: disable=g-import-not-at-top
  variables = parallel.replicate(inception.load_inception_params(settings.inception_weights),
                                 sampler.mesh)
  inception_fn = make_inception_fn(sampler.mesh, settings.inception_size)
  pools, logits = sample_features(sampler, inception_fn, variables, settings, batch)
  is_mean, is_std = fid.inception_score(logits, num_splits=settings.is_splits)
  metrics = {"inception_score": is_mean, "inception_score_std": is_std}
  mu, sigma = fid.compute_statistics(pools)
  for split in settings.fid_splits:
    ref_mu, ref_sigma = reference_statistics(config, settings, split, workdir, inception_fn,
                                             variables, sampler.mesh, batch)
    metrics[f"fid_{split}"] = fid.frechet_distance(mu, sigma, ref_mu, ref_sigma)
  return metrics


def digits_metrics(config, settings, workdir: str, sampler: Sampler, batch: int) -> dict:
  """The digits classifier's measures of the samples (metrics/digits.py), keys `digits_*`;
  the classifier is trained on first use and cached in `eval.digits_classifier_dir`."""
  from diffusion_jax.metrics import digits  # pylint: disable=g-import-not-at-top
  cache_dir = settings.digits_classifier_dir or os.fspath(epath.Path(workdir) / "eval")
  classifier = digits.load_classifier(
      cache_dir, digits.ClassifierSettings(image_size=config.data.image_size))
  images = sample_images(sampler, settings, batch)
  got = digits.quality(images, classifier, confidence=settings.digits_confidence,
                       seed=settings.seed)
  got["class_counts"] = [int(c) for c in got["class_counts"]]
  got.pop("num_images")  # reported as num_samples
  return {f"digits_{k}": v for k, v in got.items()}


def evaluate_step(config, workdir: str, step: int | None = None, *, mesh=None,
                  loaded: Loaded | None = None) -> dict:
  """Sample quality and bits/dim of one checkpoint (`loaded`, when given, is that of `step`).

  Sample quality is FID (train and test statistics) and the Inception Score, or for dataset
  'digits' the `digits_*` measures of `digits_metrics`. Writes WORKDIR/eval/<step>.json
  (atomically) and TensorBoard scalars under WORKDIR/eval.

  Returns:
    the metrics dict.
  """
  from diffusion_jax.metrics import inception  # pylint: disable=g-import-not-at-top
  settings = eval_settings(config)
  is_digits = config.data.dataset == "digits"
  if not is_digits and not settings.inception_weights:
    raise FileNotFoundError(
        "--mode eval needs the FID Inception weights: set --config.eval.inception_weights="
        "PATH.npz. " + inception._missing_weights_message("PATH.npz"))  # pylint: disable=protected-access
  sampler = Sampler(loaded or load(workdir, config, step=step), mesh=mesh)
  mesh = sampler.mesh
  batch = _batch_size(settings, mesh)
  t0 = time.time()
  quality_fn = digits_metrics if is_digits else inception_metrics
  metrics = quality_fn(config, settings, workdir, sampler, batch)
  metrics["num_samples"] = int(settings.num_samples)
  if settings.bpd_split:
    bpd = bits_per_dim(config, sampler.params, mesh, settings.bpd_split, seed=settings.seed,
                       batch_size=batch, max_examples=settings.bpd_max_examples)
    metrics.update({f"{k}_{settings.bpd_split}": v for k, v in bpd.items()})
  metrics["eval_seconds"] = time.time() - t0
  metrics = {k: (float(v) if not isinstance(v, (int, list)) else v) for k, v in metrics.items()}
  if jax.process_index() == 0:
    eval_dir = epath.Path(workdir) / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    tmp = eval_dir / f"{sampler.step}.json.tmp"
    tmp.write_text(json.dumps({"step": sampler.step, **metrics}, indent=2, sort_keys=True))
    tmp.replace(eval_dir / f"{sampler.step}.json")
    scalars = {k: v for k, v in metrics.items() if not isinstance(v, list)}
    log = train.MetricsLog(os.fspath(eval_dir), enabled=True)
    log.scalars(sampler.step, {f"eval/{k}": v for k, v in scalars.items()})
    log.close()
    shown = lambda v: str(v).replace(" ", "") if isinstance(v, list) else f"{v:.4g}"
    print(f"eval step {sampler.step}: "
          + ", ".join(f"{k}={shown(v)}" for k, v in metrics.items()), flush=True)
  return metrics


def run_eval(config, workdir: str, *, step: int | None = None) -> dict[int, dict]:
  """`--mode eval`: one checkpoint, or (eval.watch) every new one until training ends.

  Watching polls WORKDIR/checkpoints every `eval.watch_poll_s` seconds, evaluates each step that
  has no WORKDIR/eval/<step>.json yet, and stops after the step `train.num_steps` or when no new
  checkpoint arrived for `eval.watch_timeout_s` seconds.

  Returns:
    {step: metrics} of what was evaluated.
  """
  config_checks.check(config, mode="eval")
  settings = eval_settings(config)
  if not settings.watch:
    loaded = load(workdir, config, step=step)  # the newest usable one when step is None
    return {loaded.step: evaluate_step(config, workdir, loaded.step, loaded=loaded)}
  done: dict[int, dict] = {}
  unusable: set[int] = set()
  last_new = time.time()
  while True:
    steps = checkpoint_steps(workdir)
    todo = [s for s in steps if s not in done and s not in unusable
            and not (epath.Path(workdir) / "eval" / f"{s}.json").exists()]
    for s in todo:
      try:
        done[s] = evaluate_step(config, workdir, s)
      except checkpoints.UnreadableCheckpointError as e:  # damaged, or deleted meanwhile
        unusable.add(s)
        print(f"skipping step {s}: {e}", flush=True)
      last_new = time.time()
    finished = steps and max(steps) >= config.train.num_steps
    if finished or time.time() - last_new > settings.watch_timeout_s:
      return done
    time.sleep(settings.watch_poll_s)
