"""Converts DDPM weights between Hugging Face diffusers' format and diffusion_jax checkpoints.

  python -m diffusion_jax.tools.convert_diffusers --from_diffusers ddpm-cifar10-32 \
      --out runs/cifar10_diffusers
  python -m diffusion_jax.main --workdir runs/cifar10_diffusers --mode sample

  python -m diffusion_jax.tools.convert_diffusers --to_diffusers --workdir runs/cifar10 \
      --out hf/ddpm-cifar10-jax [--params raw] [--step N]

**From diffusers** (`--from_diffusers DIR`): DIR is a model folder (`config.json` and
`diffusion_pytorch_model.safetensors` or the older `.bin`, with `scheduler_config.json` beside
them where there is one: the layout of google/ddpm-*), or a pipeline folder (`model_index.json`,
`unet/`, `scheduler/`), as `save_pretrained` writes them or a Hugging Face cache snapshot holds
them. Nothing is downloaded. The `UNet2DModel` must be DDPM's U-Net (`models.diffusers_names`
says which settings those are, and a config that computes anything else is refused naming each
field); the `DDPMScheduler` config becomes the config's diffusion (`diffusion_settings`: each
field mapped or refused by name). The weights become both params and ema_params of
`OUT/checkpoints/<step>/` (`--step`, default 0), written as `convert_torch_checkpoint` writes
them, for every `--mode` of `diffusion_jax.main` with `--workdir OUT`.

The config: the U-Net's and the scheduler's settings (what the weights compute) on top of a base
config that supplies the rest (data set, optimizer, evaluation). The base is `--config` when
given; else, for the authors' models as diffusers publishes them (a folder or cache snapshot
named google/ddpm-cifar10-32, ddpm-[ema-]celebahq-256, ddpm-[ema-]church-256,
ddpm-[ema-]bedroom-256 or ddpm-[ema-]cat-256), the shipped config of their data set, so that
`--mode eval` measures FID against the right images; else `configs/default.py` (CIFAR-10's
recipe). Every field the folder changes in the base is printed. The dropout (a training setting)
is config.json's when it has one, else the base config's: google/ddpm-*'s config.json has none,
and the paper trained CIFAR-10 with 0.1.

**To diffusers** (`--to_diffusers --workdir W`): a checkpoint of DDPM's U-Net (its EMA
parameters, or `--params raw`) as a pipeline folder that `diffusers.DDPMPipeline.from_pretrained`
loads: `model_index.json`, `unet/config.json` and `unet/diffusion_pytorch_model.safetensors`
(written with safetensors' NumPy API: no PyTorch needed), `scheduler/scheduler_config.json`, and
a `README.md` model card. Refused, with what to change: Improved DDPM's U-Net, space-to-depth
(`model.block_size` > 1), and what `DDPMScheduler` cannot express (`scheduler_config`).

A mistake (a flag, a missing file, a config either side cannot express, an output that exists)
ends the command with one `error:` line, exit status 2. `.safetensors` files are read and
written with safetensors (`pip install -e ".[diffusers]"`); reading an older `.bin` needs
PyTorch too (`pip install -e ".[torch]"`). Neither direction needs diffusers itself.
"""
from __future__ import annotations

import functools
import json
import math
import os
import pathlib
import re
import shutil
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from diffusion_jax import cli
from diffusion_jax.config import build
from diffusion_jax.config import checks
from diffusion_jax.config import config_lib
from diffusion_jax.core import diffusion
from diffusion_jax.core import schedules
from diffusion_jax.evaluation import inference
from diffusion_jax import models
from diffusion_jax.models import diffusers_names
from diffusion_jax.tools import convert_torch_checkpoint
from diffusion_jax.training import checkpoints

PIPELINE_CLASS = "DDPMPipeline"
SCHEDULER_CLASS = "DDPMScheduler"
WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_BIN = "diffusion_pytorch_model.bin"
# The lowest diffusers version the written folders are meant for (setup.cfg's test extra).
DIFFUSERS_VERSION = "0.30.0"

# The authors' models as diffusers publishes them (google/<name>) -> the config of their data.
RELEASES = {
    "ddpm-cifar10-32": "configs/cifar10.py",
    "ddpm-celebahq-256": "configs/celebahq256.py",
    "ddpm-ema-celebahq-256": "configs/celebahq256.py",
    "ddpm-church-256": "configs/lsun_church.py",
    "ddpm-ema-church-256": "configs/lsun_church.py",
    "ddpm-bedroom-256": "configs/lsun_bedroom.py",
    "ddpm-ema-bedroom-256": "configs/lsun_bedroom.py",
    "ddpm-cat-256": "configs/lsun_cat.py",
    "ddpm-ema-cat-256": "configs/lsun_cat.py",
}

# `DDPMScheduler.__init__`'s defaults: what diffusers uses for a field the config leaves out.
SCHEDULER_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "variance_type": "fixed_small",
    "clip_sample": True,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "clip_sample_range": 1.0,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}

# diffusers' names -> ours.
_SCHEDULES = {"linear": "linear", "scaled_linear": "quad", "squaredcos_cap_v2": "cosine"}
# fixed_small_log draws with the same standard deviation as fixed_small (it keeps the square
# root where fixed_small takes it later).
_VARIANCES = {"fixed_small": "fixedsmall", "fixed_small_log": "fixedsmall",
              "fixed_large": "fixedlarge", "learned_range": "learned_range"}
_PREDICTIONS = {"epsilon": "eps", "sample": "xstart", "v_prediction": "v"}
_SPACINGS = ("linspace", "leading", "trailing")
# How close trained_betas must be to one of our schedules to be it: float32 storage rounds to
# 6e-8, and different schedules differ by far more.
_TRAINED_BETAS_RTOL = 1e-5


class ConversionError(ValueError):
  """The weights or settings cannot be expressed in the other format (the message says what)."""


def safetensors_numpy():
  """safetensors' NumPy API (`load_file`, `save_file`), imported when a file is read or written."""
  try:
    from safetensors import numpy as safetensors_np  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('reading and writing .safetensors files needs safetensors: pip install '
                      '-e ".[diffusers]" (or pip install safetensors)') from e
  return safetensors_np


# --- diffusers -> ours: the scheduler ---------------------------------------------------------


def _match_trained_betas(betas: np.ndarray) -> tuple[str, float, float] | None:
  """(our schedule, beta_start, beta_end) giving `betas` (float32 rounding aside), or None."""
  t = len(betas)
  if t < 2 or not np.all(np.isfinite(betas)):
    return None
  ends = (float(betas[0]), float(betas[-1]))
  candidates = [(kind, *ends) for kind in ("linear", "quad", "warmup10", "warmup50", "const")]
  candidates.append(("cosine", 1e-4, 0.02))  # its betas do not depend on start and end
  for kind, start, end in candidates:
    if start <= 0:
      continue
    ours = schedules.get_beta_schedule(kind, beta_start=start, beta_end=end,
                                       num_diffusion_timesteps=t)
    if np.allclose(betas, ours, rtol=_TRAINED_BETAS_RTOL, atol=0):
      return kind, start, end
  return None


def diffusion_settings(scheduler_config: Mapping[str, Any] | None) -> dict[str, Any]:
  """Our config's fields from a `DDPMScheduler` config (scheduler_config.json; absent fields
  take diffusers' defaults, None: every default).

  Mapped: num_train_timesteps -> diffusion.num_timesteps; beta_schedule linear -> linear,
  scaled_linear -> quad (both linspace(sqrt(start), sqrt(end))^2), squaredcos_cap_v2 -> cosine
  (the same alpha_bar and 0.999 cap); trained_betas -> the schedule of ours they are (linear,
  quad, warmup10, warmup50, const or cosine: what `scheduler_config` writes comes back);
  variance_type fixed_small / fixed_small_log -> fixedsmall, fixed_large -> fixedlarge,
  learned_range -> learned_range; prediction_type epsilon -> eps, sample -> xstart,
  v_prediction -> v; clip_sample -> sample.clip_denoised. timestep_spacing and steps_offset only
  choose the steps diffusers visits when it samples in fewer steps than T (our
  sample.num_steps / respacing choose that), so they are read and checked but carry nothing.

  Returns:
    {dotted config field: value}.

  Raises:
    ConversionError: naming every field whose value we do not have, with what would be.
  """
  scheduler_config = dict(scheduler_config or {})
  cls = scheduler_config.get("_class_name", SCHEDULER_CLASS)
  if cls != SCHEDULER_CLASS:
    raise ConversionError(f"the scheduler is a {cls}; only a {SCHEDULER_CLASS} config converts "
                          f"(its schedule and variance are what the model was trained with)")
  get = lambda key: scheduler_config.get(key, SCHEDULER_DEFAULTS[key])  # noqa: E731
  problems = []
  fields: dict[str, Any] = {}
  steps = get("num_train_timesteps")
  fields["diffusion.num_timesteps"] = int(steps)
  trained = get("trained_betas")
  kind = get("beta_schedule")
  if trained is not None:
    found = _match_trained_betas(np.asarray(trained, np.float64))
    if found is None:
      problems.append("trained_betas: none of our schedules (linear, quad, warmup10, warmup50, "
                      "const, cosine) gives these betas; train with a named one")
    else:
      kind, start, end = found
      fields.update({"diffusion.beta_schedule": kind, "diffusion.beta_start": start,
                     "diffusion.beta_end": end})
      if len(trained) != steps:
        problems.append(f"trained_betas has {len(trained)} betas but num_train_timesteps="
                        f"{steps}")
  elif kind in _SCHEDULES:
    fields.update({"diffusion.beta_schedule": _SCHEDULES[kind],
                   "diffusion.beta_start": float(get("beta_start")),
                   "diffusion.beta_end": float(get("beta_end"))})
  else:
    problems.append(f"beta_schedule={kind!r}: we have {', '.join(_SCHEDULES)} (as "
                    f"{', '.join(_SCHEDULES.values())}), or trained_betas of one of them")
  if get("rescale_betas_zero_snr"):
    problems.append("rescale_betas_zero_snr=True: our schedules keep their betas as defined "
                    "(no zero-terminal-SNR rescaling)")
  variance = get("variance_type")
  if variance in _VARIANCES:
    fields["diffusion.var_type"] = _VARIANCES[variance]
  elif variance == "learned":
    problems.append("variance_type='learned': diffusers reads the extra channels as the "
                    "variance itself, DDPM's learned variance as its log; no var_type of ours "
                    "computes what this model was trained for")
  else:
    problems.append(f"variance_type={variance!r}: we have {', '.join(_VARIANCES)}")
  prediction = get("prediction_type")
  if prediction in _PREDICTIONS:
    fields["diffusion.mean_type"] = _PREDICTIONS[prediction]
  else:
    problems.append(f"prediction_type={prediction!r}: we have {', '.join(_PREDICTIONS)}")
  if get("thresholding"):
    problems.append("thresholding=True: dynamic thresholding of the x_0 prediction is not one "
                    "of our samplers' settings; set it False (then clip_sample clips to [-1, 1])")
  clip = bool(get("clip_sample"))
  if clip and not math.isclose(float(get("clip_sample_range")), 1.0):
    problems.append(f"clip_sample_range={get('clip_sample_range')!r}: we clip x_0 predictions "
                    f"to [-1, 1] only (clip_sample_range 1.0)")
  fields["sample.clip_denoised"] = clip
  if get("timestep_spacing") not in _SPACINGS:
    problems.append(f"timestep_spacing={get('timestep_spacing')!r}: diffusers has "
                    f"{', '.join(_SPACINGS)}")
  offset = get("steps_offset")
  if not isinstance(offset, int) or offset < 0:
    problems.append(f"steps_offset={offset!r}: a whole number >= 0")
  if problems:
    raise ConversionError("the DDPMScheduler config has settings we do not have: "
                          + "; ".join(problems))
  return fields


# --- diffusers -> ours: the files ------------------------------------------------------------


def _read_json(path: pathlib.Path) -> dict[str, Any]:
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ConversionError(f"{path} is not valid JSON: {e}") from e


def locate(folder: str) -> tuple[pathlib.Path, pathlib.Path | None]:
  """(the U-Net's folder, its scheduler config or None) in a diffusers model or pipeline folder.

  A pipeline's `unet/` and `scheduler/` come before a model's `config.json` and
  `scheduler_config.json` at the top.

  Raises:
    FileNotFoundError: no folder, or no U-Net in it.
  """
  root = pathlib.Path(folder).expanduser()
  if not root.is_dir():
    raise FileNotFoundError(f"no diffusers folder at {folder}")
  index = root / "model_index.json"
  if index.is_file():
    pipeline = _read_json(index).get("_class_name")
    if pipeline not in (None, PIPELINE_CLASS):
      print(f"note: {index} names a {pipeline}; reading its unet and scheduler as "
            f"{PIPELINE_CLASS}'s")
  unet = root / "unet" if (root / "unet" / "config.json").is_file() else root
  if not (unet / "config.json").is_file():
    raise FileNotFoundError(
        f"no UNet2DModel in {root}: expected config.json and {WEIGHTS} (or {WEIGHTS_BIN}) "
        f"there, or a pipeline's unet/ folder with them")
  scheduler = None
  for candidate in (root / "scheduler" / "scheduler_config.json",
                    root / "scheduler_config.json"):
    if candidate.is_file():
      scheduler = candidate
      break
  return unet, scheduler


def read_weights(unet_dir: pathlib.Path) -> dict[str, np.ndarray]:
  """The U-Net's state dict from its folder: `diffusion_pytorch_model.safetensors` (or its
  shards, per their index), else the `.bin` (PyTorch reads it, weights only)."""
  single = unet_dir / WEIGHTS
  index = unet_dir / (WEIGHTS + ".index.json")
  if single.is_file() or index.is_file():
    files = [single] if single.is_file() else sorted(
        {unet_dir / name for name in _read_json(index)["weight_map"].values()})
    state = {}
    for path in files:
      state.update(safetensors_numpy().load_file(str(path)))
    return {name: np.asarray(value, np.float32) for name, value in state.items()}
  if (unet_dir / WEIGHTS_BIN).is_file():
    return convert_torch_checkpoint.read_state_dict(str(unet_dir / WEIGHTS_BIN))
  raise FileNotFoundError(f"no weights in {unet_dir}: expected {WEIGHTS} or {WEIGHTS_BIN}")


def release_name(folder: str) -> str | None:
  """The google/ddpm-* model a folder holds, by its name or its Hugging Face cache path
  (`models--google--ddpm-cifar10-32/snapshots/<revision>`); None if it is none of them."""
  parts = pathlib.Path(folder).expanduser().absolute().parts
  for part in reversed(parts):
    name = re.sub(r"^models--google--", "", part)
    if name in RELEASES:
      return name
  return None


def _flat_fields(config) -> dict[str, Any]:
  flat = {}
  for section, values in config.items():
    if hasattr(values, "items"):
      flat.update({f"{section}.{k}": v for k, v in values.items()})
  return flat


def build_config(base, unet_config: Mapping[str, Any],
                 scheduler_config: Mapping[str, Any] | None):
  """A copy of `base` with the U-Net's and the scheduler's settings, checked as `--mode sample`
  checks a config.

  Returns:
    (the config, one line per field the folder changed in `base`: `field old -> new`).

  Raises:
    ConversionError: a U-Net or scheduler setting we do not have (naming each).
    checks.ConfigError: a field of the result out of its range.
  """
  try:
    unet = diffusers_names.unet_settings(unet_config)
  except ValueError as e:
    raise ConversionError(str(e)) from e
  fields = diffusion_settings(scheduler_config)
  learned = fields["diffusion.var_type"] == "learned_range"
  want_out = unet["in_channels"] * (2 if learned else 1)
  if unet["out_channels"] != want_out:
    raise ConversionError(
        f"config.json's out_channels={unet['out_channels']} with the scheduler's variance_type "
        f"{'learned_range' if learned else 'fixed'}: the U-Net must output {want_out} channels")
  fields.update({
      "model.architecture": "ddpm", "model.block_size": 1, "model.ch": unet["ch"],
      "model.ch_mult": unet["ch_mult"], "model.num_res_blocks": unet["num_res_blocks"],
      "model.attn_resolutions": unet["attn_resolutions"],
      "data.image_size": unet["image_size"], "data.channels": unet["in_channels"],
      "diffusion.rescale_timesteps": False,
  })
  if unet["dropout"] is not None:
    fields["model.dropout"] = unet["dropout"]
  if learned and base.diffusion.loss_type == "mse":
    fields["diffusion.loss_type"] = "hybrid"  # a learned variance trains with the bound's term
  config = base.copy_and_resolve_references()
  before = _flat_fields(config)
  config = config_lib.apply_overrides(config, fields)
  changed = [f"{key} {before.get(key)!r} -> {value!r}" for key, value in fields.items()
             if key in before and _differs(before[key], value)]
  checks.check(config, "sample")
  return config, changed


def _differs(a, b) -> bool:
  if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
    return tuple(a) != tuple(b)
  return a != b


def from_diffusers(folder: str, out: str, *, base=None, step: int = 0) -> pathlib.Path:
  """Converts a diffusers folder into `out/checkpoints/<step>`; returns the checkpoints folder.

  Args:
    folder: a diffusers model or pipeline folder.
    out: the new workdir.
    base: the config supplying what the folder does not say (None: the release's data set
      config for google/ddpm-*, else configs/default.py).
    step: the step to record.
  """
  checkpoints.check_new_workdir(out)
  unet_dir, scheduler_path = locate(folder)
  unet_config = _read_json(unet_dir / "config.json")
  scheduler_config = _read_json(scheduler_path) if scheduler_path else None
  release = release_name(folder)
  if base is None:
    base = config_lib.load_config(RELEASES[release] if release else "configs/default.py")
    print(f"base config: {RELEASES[release] if release else 'configs/default.py'}"
          f"{f' (the data set of google/{release})' if release else ''}")
  if scheduler_config is None:
    print(f"note: no scheduler_config.json in {folder}: using {SCHEDULER_CLASS}'s defaults "
          f"(linear 1e-4..0.02, 1000 steps, fixed_small, epsilon, clip_sample)")
  config, changed = build_config(base, unet_config, scheduler_config)
  if changed:
    print("the folder sets " + "; ".join(changed))
  model = build.make_model(config)
  abstract = jax.eval_shape(functools.partial(build.init_params, config, model),
                            jax.random.key(0))
  state_dict = read_weights(unet_dir)
  try:
    params = diffusers_names.params_from_state_dict(state_dict, abstract)
  except ValueError as e:
    raise ConversionError(f"the weights in {unet_dir} do not match its config.json: {e}") from e
  out_dir = checkpoints.save_converted(out, step, params, params, config)
  print(f"converted {unet_dir} (step {step}, {len(state_dict)} tensors) -> {out_dir}")
  return out_dir


# --- ours -> diffusers ---------------------------------------------------------------------


_SCHEDULES_BACK = {v: k for k, v in _SCHEDULES.items()}
_VARIANCES_BACK = {"fixedsmall": "fixed_small", "fixedlarge": "fixed_large",
                   "learned_range": "learned_range"}
_PREDICTIONS_BACK = {v: k for k, v in _PREDICTIONS.items()}


def scheduler_config(config) -> dict[str, Any]:
  """The `DDPMScheduler` config (scheduler_config.json) of our config's diffusion.

  Schedules diffusers names are written by name (linear, quad as scaled_linear, cosine as
  squaredcos_cap_v2); warmup10, warmup50 and const as trained_betas. timestep_spacing
  'linspace' makes `num_inference_steps=K` visit the steps our `sample.num_steps=K` does.

  Raises:
    ConversionError: naming each setting `DDPMScheduler` cannot express.
  """
  d = config.diffusion
  problems = []
  out: dict[str, Any] = {"_class_name": SCHEDULER_CLASS, "_diffusers_version": DIFFUSERS_VERSION,
                         "num_train_timesteps": int(d.num_timesteps),
                         "beta_start": float(d.beta_start), "beta_end": float(d.beta_end),
                         "beta_schedule": "linear", "trained_betas": None}
  if d.beta_schedule in _SCHEDULES_BACK:
    out["beta_schedule"] = _SCHEDULES_BACK[d.beta_schedule]
  elif d.beta_schedule in ("warmup10", "warmup50", "const"):
    out["trained_betas"] = schedules.get_beta_schedule(
        d.beta_schedule, beta_start=d.beta_start, beta_end=d.beta_end,
        num_diffusion_timesteps=d.num_timesteps).tolist()
  else:
    problems.append(f"diffusion.beta_schedule={d.beta_schedule!r}: its last beta is 1 (alpha_bar "
                    f"0), which DDPMScheduler's step divides by")
  if d.var_type in _VARIANCES_BACK:
    out["variance_type"] = _VARIANCES_BACK[d.var_type]
  else:
    problems.append(f"diffusion.var_type={d.var_type!r}: DDPMScheduler's 'learned' reads the "
                    f"extra channels as the variance, ours as its log (use fixedsmall, "
                    f"fixedlarge or learned_range)")
  if d.mean_type in _PREDICTIONS_BACK:
    out["prediction_type"] = _PREDICTIONS_BACK[d.mean_type]
  else:
    problems.append(f"diffusion.mean_type={d.mean_type!r}: DDPMScheduler predicts epsilon, "
                    f"sample (x_0) or v_prediction (our eps, xstart, v)")
  if d.get("rescale_timesteps", False):
    problems.append("diffusion.rescale_timesteps=True: DDPMPipeline gives the U-Net the "
                    "timestep itself, not t * 1000 / T")
  if problems:
    raise ConversionError("DDPMScheduler cannot express " + "; ".join(problems))
  out.update({"clip_sample": bool(config.sample.clip_denoised), "clip_sample_range": 1.0,
              "thresholding": False, "timestep_spacing": "linspace", "steps_offset": 0,
              "rescale_betas_zero_snr": False})
  return out


def unet_config_of(config) -> dict[str, Any]:
  """The `UNet2DModel` config (config.json) of our config's U-Net.

  Raises:
    ConversionError: for a U-Net `UNet2DModel` cannot be.
  """
  m = config.model
  problems = []
  entry = models.get(m.get("architecture", models.registry.REFERENCE))
  if "diffusers" not in entry.name_maps:
    problems.append(f"model.architecture={entry.name!r}: {entry.title} is not a UNet2DModel "
                    f"with DDPM's settings; export its weights with diffusion_jax.tools."
                    f"export_safetensors --names {'|'.join(entry.name_maps) or '...'}")
  if m.get("block_size", 1) != 1:
    problems.append(f"model.block_size={m.block_size}: UNet2DModel has no space-to-depth")
  if problems:
    raise ConversionError("UNet2DModel cannot express " + "; ".join(problems))
  channels = config.data.channels
  learned = config.diffusion.var_type in diffusion.LEARNED_VAR_TYPES
  return diffusers_names.unet_config(
      image_size=config.data.image_size, in_channels=channels,
      out_channels=2 * channels if learned else channels, ch=m.ch, ch_mult=tuple(m.ch_mult),
      num_res_blocks=m.num_res_blocks, attn_resolutions=tuple(m.attn_resolutions),
      dropout=m.dropout)


def model_card(config, step: int, which: str, workdir: str) -> str:
  """The README.md of an exported pipeline: what the model is, what it was trained on, and how
  to load it."""
  d, data = config.diffusion, config.data
  dataset = data.dataset if data.dataset != "folder" else f"a folder of images ({data.image_dir})"
  config_json = json.dumps(config.to_dict(), indent=1, sort_keys=True, default=str)
  return f"""---
library_name: diffusers
tags:
- diffusers
- unconditional-image-generation
- ddpm
- diffusion_jax
pipeline_tag: unconditional-image-generation
---

# DDPM U-Net trained with diffusion_jax

A denoising diffusion model (Ho, Jain and Abbeel 2020, arXiv 2006.11239) trained with
diffusion_jax (JAX/Flax), converted to diffusers' `DDPMPipeline`.

- Data: {dataset}, {data.image_size}x{data.image_size}, {data.channels} channels, scaled to [-1, 1].
- Training: {step:,} steps (checkpoint `{workdir}`, step {step}); these are the
  {which} weights.
- Model: DDPM's U-Net, ch {config.model.ch}, ch_mult {tuple(config.model.ch_mult)},
  {config.model.num_res_blocks} res blocks per level, attention at
  {tuple(config.model.attn_resolutions)}, dropout {config.model.dropout}.
- Diffusion: {d.beta_schedule} betas {d.beta_start:g}..{d.beta_end:g} over T = {d.num_timesteps},
  mean type {d.mean_type}, variance {d.var_type}, loss {d.loss_type}.

```python
from diffusers import DDPMPipeline

pipeline = DDPMPipeline.from_pretrained("path/to/this/folder")
image = pipeline(batch_size=1, num_inference_steps={d.num_timesteps}).images[0]
```

The scheduler's `timestep_spacing` is `linspace`, so `num_inference_steps=K` visits the steps
diffusion_jax's `--config.sample.num_steps=K` does. Back to diffusion_jax:
`python -m diffusion_jax.tools.convert_diffusers --from_diffusers path/to/this/folder --out runs/x`.

## The training config

```json
{config_json}
```
"""


def local_output(out: str) -> pathlib.Path:
  """`out` as an absolute local path (`~` expanded); a gs:// path is refused (safetensors writes
  local files: write locally, then copy)."""
  if "://" in out:
    raise FileNotFoundError(f"{out}: write to a local path, then copy it (gsutil cp -r)")
  return pathlib.Path(out).expanduser().absolute()


def _check_new_folder(out: str) -> pathlib.Path:
  path = local_output(out)
  if path.exists() and (not path.is_dir() or any(path.iterdir())):
    raise FileExistsError(f"{path} exists and is not an empty folder; choose a new --out")
  return path


def to_diffusers(workdir: str, out: str, *, step: int | None = None,
                 ema: bool = True) -> pathlib.Path:
  """Writes a checkpoint of `workdir` as a diffusers pipeline folder `out`; returns its path.

  Args:
    workdir: a diffusion_jax workdir (training run or converted checkpoint).
    out: the new folder (absent or empty).
    step: which checkpoint (default: the newest).
    ema: the EMA parameters (default) or the raw ones.
  """
  path = _check_new_folder(out)
  config = inference.saved_config(workdir, step)
  unet_json = unet_config_of(config)
  scheduler_json = scheduler_config(config)
  loaded = inference.load(workdir, config, step=step, ema=ema)
  state_dict = diffusers_names.state_dict_from_params(loaded.params)
  save_file = safetensors_numpy().save_file
  # Written next to `out` and renamed into place: an interrupted export leaves no half folder.
  partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
  shutil.rmtree(partial, ignore_errors=True)
  try:
    (partial / "unet").mkdir(parents=True)
    (partial / "scheduler").mkdir()
    (partial / "model_index.json").write_text(json.dumps(
        {"_class_name": PIPELINE_CLASS, "_diffusers_version": DIFFUSERS_VERSION,
         "scheduler": ["diffusers", SCHEDULER_CLASS],
         "unet": ["diffusers", diffusers_names.UNET_CLASS]}, indent=2) + "\n")
    unet_json["_diffusers_version"] = DIFFUSERS_VERSION
    (partial / "unet" / "config.json").write_text(json.dumps(unet_json, indent=2) + "\n")
    save_file(state_dict, str(partial / "unet" / WEIGHTS),
                                metadata={"format": "pt"})
    (partial / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(scheduler_json, indent=2) + "\n")
    (partial / "README.md").write_text(model_card(
        config, loaded.step, "EMA" if ema else "raw (not averaged)", workdir))
    if path.exists():
      path.rmdir()  # empty, checked above
    partial.rename(path)
  finally:
    shutil.rmtree(partial, ignore_errors=True)
  print(f"wrote {len(state_dict)} tensors of step {loaded.step} ({'EMA' if ema else 'raw'} "
        f"parameters) as a DDPMPipeline -> {path}")
  return path


# --- The command line ----------------------------------------------------------------------

_PROG = "python -m diffusion_jax.tools.convert_diffusers"


def _define_flags(values: flags.FlagValues, argv: list[str]) -> None:
  """The converter's flags, into `values` (`argv`: the command line, for the config flag)."""
  config_flags.DEFINE_config_file(
      "config", None, "--from_diffusers: the base config supplying what the folder does not say "
      "(data set, optimizer, evaluation); default: the data set's config for google/ddpm-*, "
      "else configs/default.py. Override its fields with --config.a.b=value.",
      flag_values=values, lock_config=True, sys_argv=argv)
  flags.DEFINE_string("from_diffusers", None, "A diffusers model or pipeline folder to convert "
                      "into --out.", flag_values=values)
  flags.DEFINE_bool("to_diffusers", False, "Write --workdir's checkpoint as a DDPMPipeline "
                    "folder --out.", flag_values=values)
  flags.DEFINE_string("workdir", None, "--to_diffusers: the workdir to export.",
                      flag_values=values)
  flags.DEFINE_string("out", None, "The new workdir (--from_diffusers) or folder "
                      "(--to_diffusers).", flag_values=values)
  flags.DEFINE_integer("step", None, "--from_diffusers: the step to record (default 0); "
                       "--to_diffusers: the checkpoint to export (default: the newest).",
                       flag_values=values)
  flags.DEFINE_enum("params", "ema", ["ema", "raw"], "--to_diffusers: the EMA parameters "
                    "(what samples use) or the raw ones.", flag_values=values)


@cli.reports_errors(ConversionError, FileExistsError, ImportError)
def main(argv: Sequence[str] | None = None) -> None:
  """The command line (`argv`: the arguments, default `sys.argv[1:]`). Mistakes end it with one
  `error:` line, exit 2."""
  args = cli.parse_own_flags(_define_flags, argv, prog=_PROG, doc=__doc__, config_flag="config")
  if bool(args.from_diffusers) == bool(args.to_diffusers):
    raise app.UsageError("pass one of --from_diffusers DIR (into --out) or --to_diffusers "
                         "(--workdir into --out)")
  if not args.out:
    raise app.UsageError("--out is required")
  if args.step is not None and args.step < 0:
    raise app.UsageError(f"--step={args.step}: a step is a whole number >= 0")
  if args.from_diffusers:
    if args.workdir or args["params"].present:
      raise app.UsageError("--workdir and --params are --to_diffusers' flags")
    from_diffusers(args.from_diffusers, args.out, base=args.config,
                   step=0 if args.step is None else args.step)
    return
  if not args.workdir:
    raise app.UsageError("--to_diffusers needs --workdir")
  if args.config is not None:
    raise app.UsageError("--to_diffusers uses the config saved with the checkpoint; drop "
                         "--config")
  to_diffusers(args.workdir, args.out, step=args.step, ema=args.params == "ema")


if __name__ == "__main__":
  main()
