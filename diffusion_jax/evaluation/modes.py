"""The evaluation modes. Each reads the EMA parameters of a checkpoint in WORKDIR/checkpoints
(the latest, or `step`), as the original evaluated, and runs over every device of every host:

  sample       `eval.num_samples` samples in global batches sharded over all devices; each
               process writes its share to WORKDIR/samples/<name>/samples_<process>.npz
               (`images` uint8 [n, H, W, C], `index` int64 [n], each image's global example
               index, and for a class-conditional model `labels` int64 [n], sample i's class
               i mod num_classes) and process 0 a PNG grid (one column per class for a
               class-conditional model).
  eval         FID against train- and test-set statistics, Inception Score (10 splits) and
               bits/dim of a split, into WORKDIR/eval/<name>.json and TensorBoard; for one
               step, or for every new checkpoint while training runs (`eval.watch`). For dataset
               'digits', the measures of metrics/digits.py (a small classifier trained here)
               take the place of FID and IS, so no Inception weights are needed.
  progressive  a grid of the x_0 predictions along the sampling chain, WORKDIR/samples/<step>/
               progressive_n<rows>_every<freq>[_seed<seed>][_noclip].png.
  interpolate  a grid of interpolations between pairs of dataset images, WORKDIR/samples/<step>/
               interpolate_<split>_t<t>_<pairs>x<steps>[_seed<seed>][_noclip].png.
  encode       DDIM inversion of a split's images (`eval.bpd_split`, the first
               `eval.encode_max_examples`) into their latents x_T, decoded again to measure the
               reconstruction error: WORKDIR/latents/`encode_name`.npz and .json.

<name> is `run_name`: <step><tag>_n<num_samples>[_seed<seed>], e.g. 400_n1000, 400_ddim50_n100,
400_n1000_seed1, where <tag> names the sampler settings (`build.sampler_tag`: '' for the
original's) and the seed appears unless it is 0. Dumps and results made with other settings
therefore never replace each other, and the same settings again give the same name and the same
numbers (every sample's key depends only on the seed and its index). An evaluation also records
the settings its name leaves out (`result_settings`) and refuses to replace a result of the
same name made with others.

Batches are `eval.batch_size` at most, but never larger than the samples or examples asked for
(rounded up to a multiple of the devices): 100 samples cost 100, not a batch of 500.

Samples come from `inference.Sampler` with the config's `sample` section (sampler, steps, eta,
clipping); every use of randomness has its own `prng.RunStream`.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import time
from typing import Iterator

import jax
import numpy as np
from etils import epath

from diffusion_jax.config import build
from diffusion_jax.config import programs
from diffusion_jax.config import checks as config_checks
from diffusion_jax.core import prng
from diffusion_jax.data import images as images_lib
from diffusion_jax.data import input_pipeline
from diffusion_jax.evaluation import inference
from diffusion_jax import parallel
from diffusion_jax import samplers
from diffusion_jax.training import checkpoints
from diffusion_jax.utils import outputs
from diffusion_jax.utils import progress as progress_lib


def _is_main() -> bool:
  return jax.process_index() == 0


def _seed_suffix(seed: int) -> str:
  return f"_seed{seed}" if seed else ""


def run_name(config, step: int) -> str:
  """The name of `step`'s sample dump and evaluation results under the config's settings:
  <step><tag>_n<eval.num_samples>, then _seed<eval.seed> unless the seed is 0; <tag> is
  `build.sampler_tag` ('' for the original's sampler)."""
  settings = config.eval
  return (f"{step}{build.sampler_tag(config)}_n{settings.num_samples}"
          f"{_seed_suffix(settings.seed)}")


def samples_dir(config, workdir: str, step: int) -> epath.Path:
  """WORKDIR/samples/`run_name`: where `--mode sample` writes `step`'s samples."""
  return outputs.resolve(workdir) / "samples" / run_name(config, step)


def results_path(config, workdir: str, step: int) -> epath.Path:
  """WORKDIR/eval/`run_name`.json: the metrics of `step` under the config's sampler, sample
  count and seed, so evaluations of one checkpoint with other settings are all kept."""
  return outputs.resolve(workdir) / "eval" / f"{run_name(config, step)}.json"


# What else changes an evaluation's numbers: recorded in its results, checked before replacing.
_RESULT_SETTINGS = ("bpd_split", "bpd_max_examples", "bpd_clip_denoised", "fid_splits",
                    "fid_max_real", "fid_stats_train", "fid_stats_test", "inception_size",
                    "is_splits", "digits_confidence")


def result_settings(config) -> dict:
  """The `eval` settings that change an evaluation's numbers but not `run_name`, as stored in
  its results (JSON values)."""
  settings = config.eval
  return json.loads(json.dumps({k: settings.get(k) for k in _RESULT_SETTINGS}))


def _read_results(path: epath.Path) -> dict | None:
  """The results JSON at `path` (which exists); None when it does not hold a JSON object."""
  try:
    written = json.loads(path.read_text())
  except ValueError:
    return None
  return written if isinstance(written, dict) else None


def _has_results(config, workdir: str, step: int) -> bool:
  """Whether `results_path` holds `step`'s results under the config's settings.

  Raises:
    FileExistsError: it holds results made with other settings (or unreadable ones), which an
      evaluation under these settings would replace.
  """
  path = results_path(config, workdir, step)
  if not path.exists():
    return False
  written = _read_results(path)
  recorded = written.get("settings") if written is not None else None
  ours = result_settings(config)
  if recorded != ours:
    differ = (", ".join(f"{k}={recorded.get(k)!r} there, {ours[k]!r} here" for k in ours
                        if recorded.get(k) != ours[k])
              if isinstance(recorded, dict) else "no settings recorded")
    raise FileExistsError(
        f"{path} holds results made with other eval settings ({differ}); evaluate with its "
        f"settings, or move it away to keep it and evaluate with these")
  return True


def _has_unnamed_results(config, workdir: str, step: int) -> bool:
  """Whether `step` was evaluated before results were named by their count and seed: an
  `eval/<step><tag>.json` of as many samples, under the default seed (which `eval.watch` then
  does not evaluate again)."""
  path = outputs.resolve(workdir) / "eval" / f"{step}{build.sampler_tag(config)}.json"
  if config.eval.seed or not path.exists():
    return False
  written = _read_results(path)
  return written is not None and written.get("num_samples") == config.eval.num_samples


def _batch_size(requested: int, num: int, mesh) -> int:
  """The global batch for `num` samples or examples: `requested` (eval.batch_size) at most, but
  no more than `num` needs, rounded up to a multiple of the devices."""
  return parallel.round_up_to_devices(max(1, min(requested, num)), mesh)


def _sample_batches(sampler: inference.Sampler, num: int, batch_size: int, *, seed: int,
                    label: str) -> Iterator[tuple[np.ndarray, jax.Array]]:
  """Yields (indices, global float samples in [-1, 1]) of samples 0 .. num-1 in global batches
  of `_batch_size(batch_size, num)` (the last one runs past num), printing progress as each
  batch is consumed."""
  batch_size = _batch_size(batch_size, num, sampler.mesh)
  progress = progress_lib.Progress(label, num, unit="images")
  for start in range(0, num, batch_size):
    indices = np.arange(start, start + batch_size)
    samples = sampler.sample_global(indices, seed=seed)
    yield indices, samples
    jax.block_until_ready(samples)
    progress.update(start + batch_size)


# ----------------------------------------------------------------------------------------------
# --mode sample

def run_sample(config, workdir: str, *, step: int | None = None) -> epath.Path:
  """`--mode sample`: writes WORKDIR/samples/`run_name`/samples_<process>.npz and grid.png
  (a class-conditional model's grid: one column per class).

  Returns:
    the samples' directory.
  """
  config_checks.check(config, mode="sample")
  workdir = outputs.resolve(workdir)
  sampler = inference.Sampler(inference.load(workdir, config, step=step))
  num = config.eval.num_samples
  batch = _batch_size(config.eval.batch_size, num, sampler.mesh)
  rows = parallel.host_rows(sampler.mesh, batch)
  images, index = [], []
  for indices, samples in _sample_batches(sampler, num, batch, seed=config.eval.seed,
                                          label="sample"):
    mine = indices[rows]
    keep = mine < num
    images.append(images_lib.to_uint8(inference.local_rows(samples))[keep])
    index.append(mine[keep])
  images, index = np.concatenate(images), np.concatenate(index).astype(np.int64)
  arrays = dict(images=images, index=index)
  if sampler.num_classes:
    arrays["labels"] = sampler.labels(index).astype(np.int64)
  out_dir = samples_dir(config, workdir, sampler.step)
  outputs.write_npz(out_dir / f"samples_{jax.process_index()}.npz", **arrays)
  if _is_main():
    labels = arrays.get("labels")
    grid = images_lib.image_grid(images[:64], labels=None if labels is None else labels[:64])
    outputs.write_atomically(out_dir / "grid.png", images_lib.encode_png(
        grid, upscale=images_lib.grid_upscale(config.data.image_size)))
    print(f"wrote {len(images)} samples of step {sampler.step} to {out_dir}", flush=True)
  return out_dir


# ----------------------------------------------------------------------------------------------
# Bits/dim over a split

def split_source(config, split: str):
  data = copy.deepcopy(config.data)
  data.split = split
  return input_pipeline.make_source(data)


def split_batches(config, split: str, mesh, batch_size: int, max_examples: int = 0, *,
                  label: str = "", num_classes: int = 0):
  """Every example of a split (or the first max_examples) once, in global batches of
  `batch_size`, or fewer where the examples are fewer (rounded up to the devices).

  The last batch is padded with copies of example 0, for the caller to drop with `valid`.
  With a `label`, a progress line counts the examples the caller has finished with.

  Yields:
    (indices [batch_size], valid bool [batch_size], uint8 images [batch_size, H, W, C] split
    over the mesh, each host having read only its rows, and with num_classes > 0 their class
    labels int32 [batch_size] split alike, each checked to be below it, else None).
  """
  source = split_source(config, split)
  num = len(source) if max_examples <= 0 else min(max_examples, len(source))
  batch_size = _batch_size(batch_size, num, mesh)
  rows = parallel.host_rows(mesh, batch_size)
  progress = progress_lib.Progress(label, num, unit="images") if label else None
  for start in range(0, num, batch_size):
    indices = np.arange(start, start + batch_size)
    valid = indices < num
    local = input_pipeline.read_examples(source, np.where(valid, indices, 0)[rows],
                                         num_classes=num_classes)
    labels = (parallel.global_batch(local["label"], mesh, batch_size) if "label" in local
              else None)
    yield indices, valid, parallel.global_batch(local["image"], mesh, batch_size), labels
    if progress is not None:
      progress.update(start + batch_size)


def bits_per_dim(config, params, mesh, split: str, *, seed: int, batch_size: int,
                 max_examples: int = 0) -> dict[str, float]:
  """The variational bound averaged exactly over a split (the last batch is padded, then the
  padding is masked out): total, prior term and the sum of the per-t terms, in bits/dim.

  The x_0 predictions are clipped to [-1, 1] unless `eval.bpd_clip_denoised` is false. A
  class-conditional model's bound is of each image given its label.
  """
  fn = programs.make_bpd_fn(config, build.make_model(config), build.make_schedule(config), mesh,
                        clip_denoised=config.eval.bpd_clip_denoised)
  sums = np.zeros(3, np.float64)
  num = 0
  for indices, valid, images, labels in split_batches(
      config, split, mesh, batch_size, max_examples, label=f"bits/dim ({split})",
      num_classes=build.num_classes(config)):
    num += int(valid.sum())
    keys = parallel.sharded_example_keys(seed, prng.RunStream.BPD, indices, mesh)
    total, prior, terms = parallel.fetch(fn(params, images, keys,
                                            *([] if labels is None else [labels])))
    sums += np.array([total[valid].sum(), prior[valid].sum(), terms[valid].sum()], np.float64)
  return dict(bpd=sums[0] / num, prior_bpd=sums[1] / num, terms_bpd=sums[2] / num,
              num_examples=int(num))


# ----------------------------------------------------------------------------------------------
# --mode progressive / interpolate

def _write_rows_grid(rows_NxKxHxWxC, workdir, step, name, config) -> epath.Path:
  path = outputs.resolve(workdir) / "samples" / str(step) / name
  if _is_main():
    outputs.write_atomically(path, images_lib.encode_png(
        images_lib.rows_grid(rows_NxKxHxWxC),
        upscale=images_lib.grid_upscale(config.data.image_size, target=64)))
    print(f"wrote {path}", flush=True)
  return path


def _grid_settings(config, mode: str, capability: str) -> dict:
  """The sampler settings of --mode progressive / interpolate (`build.sampler_kwargs`' keys):
  the `sample` section's, checked for `mode` (a sampler without `capability` refused) before
  anything compiles. `sample.sampler=ancestral` over all T draws the original's chains."""
  values = build.sampler_kwargs(config)
  name = values["sampler"]
  try:
    samplers.check(name, values, config.diffusion.num_timesteps,
                   mean_type=config.diffusion.mean_type, flag_prefix="--config.")
    if capability:
      samplers.registry.require(name, capability, flag_prefix="--config.")
    build.check_guidance(config.model, values["guidance_scale"])
  except ValueError as e:
    raise config_checks.ConfigError(
        f"{e} (--mode {mode}; --config.sample.sampler=ancestral --config.sample.num_steps=0 "
        f"draws the original's chain)") from None
  return values


def _grid_name(config, prefix: str, rest: str) -> str:
  """<prefix>[<sampler tag>]<rest>[_seed<S>]: the `sample` section's tag (`build.sampler_tag`,
  with its _noclip); none for the original's chain, ancestral over all T with clipping, whose
  grids keep the names they had before they followed the sampler."""
  return f"{prefix}{build.sampler_tag(config)}{rest}{_seed_suffix(config.eval.seed)}.png"


def run_progressive(config, workdir: str, *, step: int | None = None) -> epath.Path:
  """A grid: one row per sample, the x_0 predictions of every `progressive_freq`-th network call
  counted back from the last (noisiest first), then the sample, with the `sample` section's
  sampler (`samplers.registry.progressive`): ancestral over all T is the original's chain (the
  predictions at t = T - freq .. 0, every freq).

  Returns:
    its path, WORKDIR/samples/<step>/progressive[<tag>]_n<rows>_every<freq>[_seed<seed>].png.
  """
  config_checks.check(config, mode="progressive")
  settings = config.eval
  values = _grid_settings(config, "progressive", "progressive")
  calls = samplers.registry.num_calls(values["sampler"], values, config.diffusion.num_timesteps)
  if settings.progressive_freq > calls:
    raise config_checks.ConfigError(
        f"eval.progressive_freq={settings.progressive_freq}: sampler {values['sampler']!r} makes "
        f"{calls} network calls here; set --config.eval.progressive_freq to at most {calls}")
  sampler = inference.Sampler(inference.load(workdir, config, step=step))
  samples, preds = sampler.progressive(settings.progressive_num, settings.progressive_freq,
                                       seed=settings.seed, **values)
  rows = np.concatenate([preds, samples[:, None]], axis=1)
  name = _grid_name(config, "progressive",
                    f"_n{settings.progressive_num}_every{settings.progressive_freq}")
  return _write_rows_grid(rows, workdir, sampler.step, name, config)


def run_interpolate(config, workdir: str, *, step: int | None = None) -> epath.Path:
  """A grid: one row per pair of images of eval.bpd_split (2i and 2i + 1), framed by the two, at
  `interp_steps` values of lam from 0 to 1 (a class-conditional model: the label of the pair's
  first image), with the `sample` section's sampler. The original's (ancestral) and any
  stochastic sampler's: both diffused to eval.interp_t, mixed, denoised from there; a
  deterministic sampler's: through their DDIM latents, interpolated spherically.

  Returns:
    its path, WORKDIR/samples/<step>/interpolate[<tag>]_<bpd_split>_t<interp_t>_<pairs>x<steps>
    [_seed<seed>].png; through latents interpolate_latent<tag>_<bpd_split>_<pairs>x
    <steps>[_seed<seed>].png.
  """
  config_checks.check(config, mode="interpolate")
  settings = config.eval
  values = _grid_settings(config, "interpolate", "run_from")
  latent = samplers.registry.is_deterministic(values["sampler"], values)
  if not latent:
    try:
      samplers.registry.check_start(values["sampler"], values, config.diffusion.num_timesteps,
                                    settings.interp_t, mean_type=config.diffusion.mean_type,
                                    flag_prefix="--config.", start_field="--config.eval.interp_t")
    except ValueError as e:
      raise config_checks.ConfigError(str(e)) from None
  source = split_source(config, settings.bpd_split)
  lams = np.linspace(0.0, 1.0, settings.interp_steps)
  pairs = settings.interp_pairs
  first = input_pipeline.read_examples(source, 2 * np.arange(pairs),
                                       num_classes=build.num_classes(config))
  firsts = first["image"]
  seconds = input_pipeline.read_examples(source, 2 * np.arange(pairs) + 1)["image"]
  sampler = inference.Sampler(inference.load(workdir, config, step=step))
  # One row per (pair, lam); every row of a pair shares its keys, so the rows differ by lam only.
  out = sampler.interpolate(
      np.repeat(firsts, len(lams), axis=0), np.repeat(seconds, len(lams), axis=0),
      np.tile(lams, pairs), None if "label" not in first else np.repeat(first["label"], len(lams)),
      t=settings.interp_t, seed=settings.seed, key_indices=np.repeat(np.arange(pairs), len(lams)),
      **values)
  grid_rows = out.reshape(pairs, len(lams), *out.shape[1:])
  # Frame each row with the two originals.
  grid_rows = np.concatenate([images_lib.to_float(firsts)[:, None], grid_rows,
                              images_lib.to_float(seconds)[:, None]], axis=1)
  if latent:
    name = _grid_name(config, "interpolate_latent",
                      f"_{settings.bpd_split}_{pairs}x{settings.interp_steps}")
  else:
    name = _grid_name(config, "interpolate", f"_{settings.bpd_split}_t{settings.interp_t}_"
                      f"{pairs}x{settings.interp_steps}")
  return _write_rows_grid(grid_rows, workdir, sampler.step, name, config)


# ----------------------------------------------------------------------------------------------
# --mode eval: FID, Inception Score and bits/dim for a checkpoint

def inception_metrics(config, workdir: str, sampler: inference.Sampler, batch: int) -> dict:
  """FID against each of `eval.fid_splits` and the Inception Score of the samples, in batches
  of `batch` at most."""
  from diffusion_jax.evaluation.metrics import fid  # pylint: disable=g-import-not-at-top
  from diffusion_jax.evaluation.metrics import inception  # pylint: disable=g-import-not-at-top
  settings, mesh = config.eval, sampler.mesh
  variables = parallel.replicate(inception.load_inception_params(settings.inception_weights),
                                 mesh)
  features = parallel.batch_map(
      functools.partial(inception.inception_apply, size=settings.inception_size), mesh)
  to_levels = jax.jit(images_lib.to_uint8_values)
  pools, logits = [], []
  for _, samples in _sample_batches(sampler, settings.num_samples, batch, seed=settings.seed,
                                    label="eval: samples"):
    pool, logit = parallel.fetch(features(variables, to_levels(samples)))
    pools.append(pool)
    logits.append(logit)
  pools = np.concatenate(pools)[:settings.num_samples]
  logits = np.concatenate(logits)[:settings.num_samples]
  is_mean, is_std = fid.inception_score(logits, num_splits=settings.is_splits)
  metrics = {"inception_score": is_mean, "inception_score_std": is_std}
  mu, sigma = fid.compute_statistics(pools)

  def real_features(split):
    feats = []
    for _, valid, images, _ in split_batches(config, split, mesh, batch, settings.fid_max_real,
                                             label=f"Inception features ({split})"):
      feats.append(parallel.fetch(features(variables, images))[0][valid])
    return np.concatenate(feats)

  stats_dir = epath.Path(settings.fid_stats_dir or epath.Path(workdir) / "eval" / "stats")
  for split in settings.fid_splits:
    given = settings.get(f"fid_stats_{split}", "")
    if given:
      ref_mu, ref_sigma = fid.load_statistics(given)
    else:
      name = fid.statistics_file_name(config.data.dataset, split, config.data.image_size,
                                      settings.inception_size, settings.fid_max_real)
      ref_mu, ref_sigma = fid.cached_statistics(
          stats_dir / name, functools.partial(real_features, split), write=_is_main())
    metrics[f"fid_{split}"] = fid.frechet_distance(mu, sigma, ref_mu, ref_sigma)
  return metrics


def digits_metrics(config, workdir: str, sampler: inference.Sampler, batch: int) -> dict:
  """The digits classifier's measures of the samples (metrics/digits.py), keys `digits_*`
  (with `digits_label_accuracy` for a class-conditional model), sampled in batches of `batch`
  at most; the classifier is trained on first use and cached in `eval.digits_classifier_dir`."""
  from diffusion_jax.evaluation.metrics import digits  # pylint: disable=g-import-not-at-top
  settings = config.eval
  cache_dir = settings.digits_classifier_dir or os.fspath(epath.Path(workdir) / "eval")
  classifier = digits.load_classifier(
      cache_dir, digits.ClassifierSettings(image_size=config.data.image_size))
  images = np.concatenate([
      images_lib.to_uint8(parallel.fetch(samples))
      for _, samples in _sample_batches(sampler, settings.num_samples, batch,
                                        seed=settings.seed, label="eval: samples")
  ])[:settings.num_samples]
  labels = sampler.labels(np.arange(len(images)))  # a conditional model's: i mod 10
  got = digits.quality(images, classifier, confidence=settings.digits_confidence,
                       seed=settings.seed, labels=labels)
  got["class_counts"] = [int(c) for c in got["class_counts"]]
  got.pop("num_images")  # reported as num_samples
  return {f"digits_{k}": v for k, v in got.items()}


def evaluate_step(config, workdir: str, step: int | None = None, *, mesh=None,
                  loaded: inference.Loaded | None = None) -> dict:
  """Sample quality and bits/dim of one checkpoint (`loaded`, when given, is that of `step`).

  Sample quality is FID (train and test statistics) and the Inception Score, or for dataset
  'digits' the `digits_*` measures of `digits_metrics`. Writes `results_path` (atomically, with
  `result_settings` under "settings") and TensorBoard scalars under WORKDIR/eval.

  Returns:
    the metrics dict.

  Raises:
    FileExistsError: `results_path` holds results made with other settings (before anything
      is sampled).
  """
  from diffusion_jax.evaluation.metrics import inception  # pylint: disable=g-import-not-at-top
  settings = config.eval
  workdir = outputs.resolve(workdir)
  is_digits = config.data.dataset == "digits"
  if not is_digits and not settings.inception_weights:
    raise FileNotFoundError(
        "--mode eval needs the FID Inception weights: set --config.eval.inception_weights="
        "PATH.npz. " + inception._missing_weights_message("PATH.npz"))  # pylint: disable=protected-access
  loaded = loaded or inference.load(workdir, config, step=step)
  _has_results(config, workdir, loaded.step)  # refuses to replace other settings' results
  sampler = inference.Sampler(loaded, mesh=mesh)
  mesh = sampler.mesh
  # Each consumer bounds it by its own count (samples; examples of a split).
  batch = parallel.round_up_to_devices(max(1, settings.batch_size), mesh)
  t0 = time.time()
  quality_fn = digits_metrics if is_digits else inception_metrics
  metrics = quality_fn(config, workdir, sampler, batch)
  metrics["num_samples"] = int(settings.num_samples)
  if settings.bpd_split:
    bpd = bits_per_dim(config, sampler.params, mesh, settings.bpd_split, seed=settings.seed,
                       batch_size=batch, max_examples=settings.bpd_max_examples)
    metrics.update({f"{k}_{settings.bpd_split}": v for k, v in bpd.items()})
  metrics["eval_seconds"] = time.time() - t0
  metrics = {k: (float(v) if not isinstance(v, (int, list)) else v) for k, v in metrics.items()}
  if _is_main():
    path = results_path(config, workdir, sampler.step)
    outputs.write_json(path, {"step": sampler.step, **metrics,
                              "settings": result_settings(config)})
    scalars = {k: v for k, v in metrics.items() if not isinstance(v, list)}
    log = outputs.MetricsLog(os.fspath(path.parent), enabled=True)
    log.scalars(sampler.step, {f"eval/{k}": v for k, v in scalars.items()})
    log.close()
    shown = lambda v: str(v).replace(" ", "") if isinstance(v, list) else f"{v:.4g}"
    print(f"eval step {sampler.step}: "
          + ", ".join(f"{k}={shown(v)}" for k, v in metrics.items()), flush=True)
  return metrics


def run_eval(config, workdir: str, *, step: int | None = None) -> dict[int, dict]:
  """`--mode eval`: one checkpoint, or (eval.watch) every new one until training ends.

  Watching polls WORKDIR/checkpoints every `eval.watch_poll_s` seconds, evaluates each step that
  has no results under the current settings yet (`results_path`), and stops after the step
  `train.num_steps` or when no new checkpoint arrived for `eval.watch_timeout_s` seconds.

  Returns:
    {step: metrics} of what was evaluated.
  """
  config_checks.check(config, mode="eval")
  settings = config.eval
  workdir = outputs.resolve(workdir)
  if not settings.watch:
    loaded = inference.load(workdir, config, step=step)  # the newest usable one when None
    return {loaded.step: evaluate_step(config, workdir, loaded.step, loaded=loaded)}
  done: dict[int, dict] = {}
  unusable: set[int] = set()
  last_new = time.time()
  while True:
    steps = checkpoints.complete_steps(workdir / "checkpoints")
    todo = [s for s in steps if s not in done and s not in unusable
            and not _has_results(config, workdir, s)
            and not _has_unnamed_results(config, workdir, s)]
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


# ----------------------------------------------------------------------------------------------
# --mode encode: DDIM inversion of a split, and its reconstruction error

def encode_name(config, step: int) -> str:
  """The name of `step`'s latents under the config's settings: <step><tag>_<split>, then
  _n<eval.encode_max_examples> unless the whole split is encoded; <tag> is `build.sampler_tag`
  (e.g. '_ddim50', '_ddim_respacedddim25', '_ddim_noclip'), naming the visited timesteps."""
  settings = config.eval
  count = f"_n{settings.encode_max_examples}" if settings.encode_max_examples > 0 else ""
  return f"{step}{build.sampler_tag(config)}_{settings.bpd_split}{count}"


def latents_path(config, workdir: str, step: int) -> epath.Path:
  """WORKDIR/latents/`encode_name`.npz: where `--mode encode` writes `step`'s latents (the
  reconstruction error beside it, with the suffix .json)."""
  return outputs.resolve(workdir) / "latents" / f"{encode_name(config, step)}.npz"


def check_encode(config) -> None:
  """Raises ConfigError, saying what to set, unless `--mode encode` can run `config`: it inverts
  DDIM's deterministic sampler, so sample.sampler must be 'ddim' with sample.eta 0 (its
  timesteps come from sample.num_steps or sample.respacing), and eval.bpd_split must name the
  split to encode."""
  problems = []
  sample = config.sample
  if sample.sampler != "ddim" or sample.get("eta", 0.0):
    eta = f" with sample.eta={sample.get('eta')!r}" if sample.sampler == "ddim" else ""
    problems.append(
        f"--mode encode inverts deterministic DDIM, not sample.sampler={sample.sampler!r}{eta}: "
        f"set --config.sample.sampler=ddim --config.sample.eta=0 (the timesteps come from "
        f"--config.sample.num_steps or --config.sample.respacing)")
  if not config.eval.bpd_split:
    problems.append("--mode encode encodes the images of eval.bpd_split='': set "
                    "--config.eval.bpd_split to a split, e.g. test")
  config_checks.raise_if_any(problems)


def run_encode(config, workdir: str, *, step: int | None = None) -> epath.Path:
  """`--mode encode`: the DDIM latents of a split's first `eval.encode_max_examples` images (0:
  all), over the timesteps of sample.num_steps or sample.respacing, with sample.clip_denoised,
  sample.dynamic_threshold and sample.guidance_scale (a class-conditional model: each image's
  label); then DDIM (eta 0) from them back to images, to measure the reconstruction.

  Writes `latents_path`: `images` uint8 [n, H, W, C], `latents` float32 [n, H, W, C], `indices`
  int64 [n] (each image's index in the split), for a class-conditional model `labels` int64
  [n]; and beside it <name>.json: the reconstruction's mean squared error and largest absolute
  error per pixel in [-1, 1] units (`mse`, `max_abs`), with the step, split, example count and
  visited timesteps. Process 0 writes both.

  Returns:
    the .npz's path.
  """
  config_checks.check(config, mode="encode")
  check_encode(config)
  settings = config.eval
  split = settings.bpd_split
  workdir = outputs.resolve(workdir)
  sampler = inference.Sampler(inference.load(workdir, config, step=step))
  mesh = sampler.mesh
  encode_fn = sampler.ddim_fn("encode")
  decode_fn = sampler.ddim_fn("decode")
  ddim = sampler.ddim_settings()
  timesteps = samplers.visited_timesteps(sampler.sched.num_timesteps, ddim["num_steps"],
                                         ddim["respacing"])
  columns = {"images": [], "latents": [], "decoded": [], "indices": [], "labels": []}
  for indices, valid, images, labels in split_batches(
      config, split, mesh, settings.batch_size, settings.encode_max_examples,
      label=f"encode ({split})", num_classes=sampler.num_classes):
    args = [] if labels is None else [labels]
    latents = encode_fn(sampler.params, images, *args)
    decoded = decode_fn(sampler.params, latents, *args)
    got = parallel.fetch(dict(images=images, latents=latents, decoded=decoded,
                              labels=labels if labels is not None else np.zeros(0)))
    for name in ("images", "latents", "decoded"):
      columns[name].append(got[name][valid])
    columns["indices"].append(indices[valid])
    if labels is not None:
      columns["labels"].append(got["labels"][valid])
  arrays = {name: np.concatenate(parts) for name, parts in columns.items() if parts}
  decoded = arrays.pop("decoded").astype(np.float64)
  error = decoded - images_lib.to_float(arrays["images"]).astype(np.float64)
  arrays["latents"] = arrays["latents"].astype(np.float32)
  arrays["indices"] = arrays["indices"].astype(np.int64)
  if "labels" in arrays:
    arrays["labels"] = arrays["labels"].astype(np.int64)
  results = {"step": sampler.step, "split": split, "num_examples": int(len(error)),
             "num_steps": int(len(timesteps)), "mse": float(np.mean(error**2)),
             "max_abs": float(np.abs(error).max()),
             "settings": dict(ddim)}
  path = latents_path(config, workdir, sampler.step)
  if _is_main():
    outputs.write_npz(path, **arrays)
    outputs.write_json(path.with_suffix(".json"), results)
    print(f"encode step {sampler.step}: {results['num_examples']} images of {split} over "
          f"{results['num_steps']} timesteps; reconstruction mse={results['mse']:.4g}, "
          f"max_abs={results['max_abs']:.4g} ([-1, 1] units); wrote {path}", flush=True)
  return path


# ----------------------------------------------------------------------------------------------
# --mode edit / inpaint: SDEdit and RePaint of given images

# Built-in masks of --mode inpaint: (rows, columns) of an image of size s that are known.
BUILTIN_MASKS = {
    "bottom_half": lambda s: (slice(s // 2, s), slice(0, s)),
    "top_half": lambda s: (slice(0, s - s // 2), slice(0, s)),
    "left_half": lambda s: (slice(0, s), slice(0, s - s // 2)),
    "right_half": lambda s: (slice(0, s), slice(s // 2, s)),
}


def _png_files(spec: str, field: str) -> list[epath.Path]:
  """The PNG files a comma-separated list of files and folders names (a folder: its *.png,
  sorted); FileNotFoundError naming a missing one and the field to set."""
  files = []
  for part in (p.strip() for p in spec.split(",")):
    if not part:
      continue
    path = outputs.resolve(part)
    if path.is_dir():
      found = sorted(path.glob("*.png"))
      if not found:
        raise FileNotFoundError(f"{field}: the folder {path} holds no .png file; set "
                                f"--config.{field} to PNG files or folders of them")
      files += found
    elif path.exists():
      files.append(path)
    else:
      raise FileNotFoundError(f"{field}: {path} does not exist; set --config.{field} to PNG "
                              f"files or folders of them, comma-separated")
  return files


def _files_name(files: list[epath.Path]) -> str:
  """A name for inputs read from files in result names: 'files' and a hash of their paths."""
  return "files" + hashlib.sha1("\n".join(os.fspath(f) for f in files).encode()).hexdigest()[:8]


def _read_png(path: epath.Path) -> np.ndarray:
  """A PNG as uint8 [H, W, C] (C = 1 for grey, 3 for colour; alpha dropped)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  image = Image.open(io.BytesIO(path.read_bytes()))
  grey = image.mode in ("1", "L", "LA", "I", "I;16")
  array = np.asarray(image.convert("L" if grey else "RGB"))
  return array[..., None] if grey else array


def edit_inputs(config, num_classes: int = 0):
  """The images of --mode edit / inpaint, checked before anything compiles.

  Returns:
    (uint8 [n, H, W, C], labels int [n] or None, a name for the source: the split, or
    'files' and a hash of the files' paths).

  Raises:
    FileNotFoundError: a named file or folder that does not exist.
    ConfigError: an image of another size or channel count than the model's.
  """
  settings = config.eval
  size, channels = config.data.image_size, config.data.channels
  if not settings.edit_images:
    if not settings.bpd_split:
      raise config_checks.ConfigError(
          "eval.edit_images='' takes the images of eval.bpd_split='': set "
          "--config.eval.edit_images to PNG files, or --config.eval.bpd_split to a split")
    source = split_source(config, settings.bpd_split)
    count = min(settings.edit_num, len(source))
    read = input_pipeline.read_examples(source, np.arange(count), num_classes=num_classes)
    return read["image"], read.get("label"), settings.bpd_split
  files = _png_files(settings.edit_images, "eval.edit_images")
  if not files:
    raise config_checks.ConfigError("eval.edit_images names no file: set "
                                    "--config.eval.edit_images to PNG files or folders")
  images = []
  for path in files:
    image = _read_png(path)
    if image.shape != (size, size, channels):
      raise config_checks.ConfigError(
          f"{path} is {image.shape[1]}x{image.shape[0]} with {image.shape[2]} channel(s); the "
          f"model takes {size}x{size} with {channels} (data.image_size, data.channels): resize "
          f"or convert it, or set --config.eval.edit_images to other files")
    images.append(image)
  labels = build.default_labels(config, np.arange(len(images)))
  return np.stack(images), labels, _files_name(files)


def inpaint_masks(config, num: int) -> tuple[np.ndarray, str]:
  """The masks of --mode inpaint (1 = known) for `num` images, float32 [num, H, W, 1], and a
  name for them (the built-in's, or 'files' and a hash of the paths); checked before anything
  compiles (ConfigError, or FileNotFoundError for a missing file)."""
  spec, size = config.eval.inpaint_mask, config.data.image_size
  if spec in BUILTIN_MASKS or spec == "center":
    mask = np.zeros((size, size), np.float32)
    if spec == "center":
      mask[:] = 1.0
      low, high = size // 4, size - size // 4
      mask[low:high, low:high] = 0.0
    else:
      mask[BUILTIN_MASKS[spec](size)] = 1.0
    return np.broadcast_to(mask[None, :, :, None], (num, size, size, 1)).copy(), spec
  if not spec.strip().lower().endswith(".png") and "," not in spec:
    raise config_checks.ConfigError(
        f"eval.inpaint_mask={spec!r} is neither a built-in mask ("
        f"{', '.join(list(BUILTIN_MASKS) + ['center'])}) nor PNG files: set "
        f"--config.eval.inpaint_mask to one of them")
  files = _png_files(spec, "eval.inpaint_mask")
  if len(files) not in (1, num):
    raise config_checks.ConfigError(
        f"eval.inpaint_mask names {len(files)} PNG files for {num} images: give one for all, or "
        f"one per image (--config.eval.inpaint_mask)")
  masks = []
  for path in files:
    image = _read_png(path)
    if image.shape[:2] != (size, size):
      raise config_checks.ConfigError(
          f"mask {path} is {image.shape[1]}x{image.shape[0]}; the images are {size}x{size} "
          f"(data.image_size): give masks of their size (--config.eval.inpaint_mask)")
    masks.append((image.mean(axis=-1) >= 128).astype(np.float32)[:, :, None])
  masks = np.stack(masks)
  return np.broadcast_to(masks, (num,) + masks.shape[1:]).copy(), _files_name(files)


def check_edit(config) -> None:
  """Raises ConfigError, saying what to set, unless --mode edit can run the `sample` section's
  sampler from each of eval.edit_t (before anything compiles)."""
  name = config.sample.sampler
  values = build.sampler_kwargs(config)
  problems = []
  try:
    samplers.registry.require(name, "run_from", flag_prefix="--config.",
                              purpose="start from given images at a timestep (SDEdit)")
  except ValueError as e:
    config_checks.raise_if_any([str(e)])
  for t in config.eval.edit_t:
    try:
      samplers.registry.check_start(name, values, config.diffusion.num_timesteps, int(t),
                                    mean_type=config.diffusion.mean_type,
                                    flag_prefix="--config.", start_field="--config.eval.edit_t")
    except ValueError as e:
      problems.append(str(e))
  config_checks.raise_if_any(problems)


def run_edit(config, workdir: str, *, step: int | None = None) -> epath.Path:
  """`--mode edit`: SDEdit of eval.edit_images (or the first eval.edit_num images of
  eval.bpd_split) at each timestep of eval.edit_t, with the `sample` section's sampler from
  there (`Sampler.edit`; noise from `prng.RunStream.EDIT` and each image's row).

  Writes WORKDIR/samples/<step>/edit_<source>_t<t1>-<t2>..<tag>_n<n>[_seed<seed>].png (one row
  per image: the input, then its edit at each t) and the .npz beside it (`images` uint8 [n, H,
  W, C], `edits` uint8 [n, len(edit_t), H, W, C], `t`, and a class-conditional model's
  `labels`).

  Returns:
    the grid's path.
  """
  config_checks.check(config, mode="edit")
  check_edit(config)
  images, labels, source = edit_inputs(config, build.num_classes(config))
  sampler = inference.Sampler(inference.load(workdir, config, step=step))
  settings = config.eval
  edits = np.stack([sampler.edit(images, int(t), labels, seed=settings.seed,
                                 batch_size=settings.batch_size)
                    for t in settings.edit_t], axis=1)
  rows = np.concatenate([images_lib.to_float(images)[:, None], edits], axis=1)
  name = (f"edit_{source}_t{'-'.join(str(int(t)) for t in settings.edit_t)}"
          f"{build.sampler_tag(config)}_n{len(images)}{_seed_suffix(settings.seed)}")
  arrays = dict(images=images, edits=images_lib.to_uint8(edits),
                t=np.asarray(settings.edit_t, np.int64))
  return _write_edit(rows, arrays, labels, workdir, sampler.step, name, config)


def _write_edit(rows, arrays: dict, labels, workdir: str, step: int, name: str,
                config) -> epath.Path:
  """The grid `name`.png of an edit mode and the .npz of its arrays beside it (process 0)."""
  path = _write_rows_grid(rows, workdir, step, f"{name}.png", config)
  if labels is not None:
    arrays["labels"] = np.asarray(labels, np.int64)
  if _is_main():
    outputs.write_npz(path.with_suffix(".npz"), **arrays)
  return path


def check_inpaint(config) -> None:
  """Raises ConfigError unless --mode inpaint can run: RePaint takes ancestral steps, so
  sample.sampler must be 'ancestral' (its steps: sample.num_steps or sample.respacing)."""
  if config.sample.sampler != "ancestral":
    config_checks.raise_if_any([
        f"--mode inpaint (RePaint) takes ancestral steps, not sample.sampler="
        f"{config.sample.sampler!r}: set --config.sample.sampler=ancestral (the steps come "
        f"from --config.sample.num_steps or --config.sample.respacing)"])


def run_inpaint(config, workdir: str, *, step: int | None = None) -> epath.Path:
  """`--mode inpaint`: RePaint of eval.edit_images (or the first eval.edit_num images of
  eval.bpd_split) outside eval.inpaint_mask, with eval.inpaint_jump_length and
  eval.inpaint_jump_n_sample, on the ancestral steps of the `sample` section (`Sampler.inpaint`;
  noise from `prng.RunStream.INPAINT` and each image's row).

  Writes WORKDIR/samples/<step>/inpaint_<source>_<mask>_jump<j>x<r><tag>_n<n>[_seed<seed>].png
  (one row per image: the input, the masked input with its unknown pixels grey, the completion)
  and the .npz beside it (`images`, `masks` uint8 1 = known, `completed`, and `labels`); for the
  digits, the .json beside it with the digits classifier's share of confident and correct labels
  (`recognised_*`) of the originals, the masked inputs and the completions.

  Returns:
    the grid's path.
  """
  config_checks.check(config, mode="inpaint")
  check_inpaint(config)
  settings = config.eval
  images, labels, source = edit_inputs(config, build.num_classes(config))
  masks, mask_name = inpaint_masks(config, len(images))
  sampler = inference.Sampler(inference.load(workdir, config, step=step))
  completed = sampler.inpaint(images, masks, labels, seed=settings.seed,
                              jump_length=settings.inpaint_jump_length,
                              jump_n_sample=settings.inpaint_jump_n_sample,
                              batch_size=settings.batch_size)
  originals = images_lib.to_float(images)
  masked = originals * masks  # the unknown pixels at 0, mid grey
  rows = np.stack([originals, masked, completed], axis=1)
  name = (f"inpaint_{source}_{mask_name}_jump{settings.inpaint_jump_length}x"
          f"{settings.inpaint_jump_n_sample}{build.sampler_tag(config)}_n{len(images)}"
          f"{_seed_suffix(settings.seed)}")
  arrays = dict(images=images, masks=masks.astype(np.uint8),
                completed=images_lib.to_uint8(completed))
  path = _write_edit(rows, arrays, labels, workdir, sampler.step, name, config)
  if config.data.dataset == "digits" and not settings.edit_images and _is_main():
    true = input_pipeline.read_examples(split_source(config, settings.bpd_split),
                                        np.arange(len(images)), num_classes=10)["label"]
    results = {"step": sampler.step, "num_images": len(images), **{
        f"recognised_{what}": digits_recognised(config, workdir, x, true)
        for what, x in (("originals", images), ("masked", images_lib.to_uint8(masked)),
                        ("completed", arrays["completed"]))}}
    outputs.write_json(path.with_suffix(".json"), results)
    print("inpaint: the digits classifier recognises (confident and correct) "
          + ", ".join(f"{k[len('recognised_'):]} {v:.3f}" for k, v in results.items()
                      if k.startswith("recognised_")), flush=True)
  return path


def digits_recognised(config, workdir: str, images: np.ndarray, labels: np.ndarray) -> float:
  """The share of uint8 digit images the digits classifier labels as their true label with
  probability >= eval.digits_confidence (metrics/digits.py, cached as `digits_metrics` caches
  it)."""
  from diffusion_jax.evaluation.metrics import digits  # pylint: disable=g-import-not-at-top
  cache_dir = config.eval.digits_classifier_dir or os.fspath(epath.Path(workdir) / "eval")
  classifier = digits.load_classifier(
      cache_dir, digits.ClassifierSettings(image_size=config.data.image_size))
  probs = classifier.probabilities(digits.to_native(images))[:, :digits.NUM_CLASSES]
  return float(np.mean((probs.max(axis=1) >= config.eval.digits_confidence)
                       & (probs.argmax(axis=1) == np.asarray(labels))))
