"""Samplers by name: each one an entry that owns its settings, their defaults and rules, its part
of a result's name and its run function.

The `sample` section of a config is built from the registry (`default_settings`): the settings
every sampler has (`COMMON`), then each registered sampler's own. Everything that samples by name
reads the entries: `sample`, the config checks (`check`, and the rules of
`diffusion_jax.config.checks` made from the settings), the result names (`tag`), the command
line, the `Sampler` and the benchmark.

Registration is explicit. The package registers its samplers in `diffusion_jax/samplers/
__init__.py`; a sampler from another package is registered with `register(entry)`, or through the
entry-point group `diffusion_jax.samplers` (each entry point loads a `SamplerEntry`, or a list of
them), read the first time the registry is asked for its names.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from diffusion_jax.core import schedules
from diffusion_jax.utils import registry as registry_lib
from diffusion_jax.utils import settings as settings_lib
from diffusion_jax.utils.settings import Setting

ENTRY_POINT_GROUP = "diffusion_jax.samplers"
# The sampler of the original code: over all T steps it needs no name in a result's name.
REFERENCE = "ancestral"
# `Setting.high` meaning the schedule's length T.
T = settings_lib.T


@dataclasses.dataclass(frozen=True)
class SamplerEntry:
  """A sampler, all of it.

  Attributes:
    name: how configs and commands name it (`sample.sampler`).
    run: run(sched, model_fn, keys, shape, *, clip_denoised, dynamic_threshold, mean_type,
      var_type, **settings) -> samples [B, H, W, C], where settings are its own (`settings`),
      the x_0 predictions it makes are clipped by `diffusion.clip_xstart(x_0,
      clip_denoised=..., dynamic_threshold=...)`, and it gets either
      `timesteps` (the steps to visit, ascending, from num_steps or the respacing) or, with
      `visits_timesteps` False, `num_steps` (its count of network calls, >= 1).
    settings: its own fields of the `sample` section. Two samplers may share one (the same
      default and rules).
    check: check(field, *, count, num_timesteps, mean_type, **settings) raises ValueError, saying
      with `field(name)` what to set, for settings it cannot run beyond each setting's own rules
      (count: the steps it would take).
    tag: tag(**settings) -> the parts of a result's name its settings add (e.g. ['eta1']).
    summary: one line for help texts.
    min_steps: the fewest steps it runs.
    visits_timesteps: it visits a subset of the trained timesteps (and so takes a respacing).
    clips: it steps with x_0 predictions, and so can clip them (`clip_denoised`,
      `dynamic_threshold`); False: it ignores both.
    progressive: optional. progressive(sched, model_fn, keys, shape, *, every, **the run's
      keywords) -> (samples [B, H, W, C], x0_preds [B, N, H, W, C]): the same run, also keeping
      the x_0 prediction of every `every`-th network call counted back from the last one
      (N = calls // every, noisiest first; `common.prediction_slots`). `--mode progressive`
      and `progressive` refuse a sampler without it.
    run_from: optional. run_from(sched, model_fn, keys, x_init, *, start, **the run's
      keywords) -> samples: the run started from x_init [B, H, W, C] taken as x at the trained
      timestep `start` (sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps there), down to x_0;
      it spreads its steps over timesteps 0..start as its run spreads them over 0..T-1 (its
      `timesteps` are `start_timesteps`, the last one `start`; or `num_steps` calls, T of them
      meaning start + 1). With start None it is the run from given x_T in place of its own
      draw (at the top of its own steps). SDEdit, decoding latents and the mix of
      `--mode interpolate` refuse a sampler without it.
    deterministic: optional. deterministic(**settings) -> whether, with these settings, the
      run draws no noise after x_T (so it decodes DDIM latents: `--mode interpolate` through
      latents, `Sampler.decode`); None: it always draws noise.
  """
  name: str
  run: Callable[..., Any]
  settings: tuple[Setting, ...] = ()
  check: Callable[..., None] | None = None
  tag: Callable[..., list[str]] | None = None
  summary: str = ""
  min_steps: int = 1
  visits_timesteps: bool = True
  clips: bool = True
  progressive: Callable[..., Any] | None = None
  run_from: Callable[..., Any] | None = None
  deterministic: Callable[..., bool] | None = None


def capabilities(run_all: Callable[..., Any]) -> dict[str, Callable[..., Any]]:
  """`progressive` and `run_from` of an entry from one function run_all(sched, model_fn, keys,
  shape, *, x_init=None, start=None, record_every=0, **the run's keywords) that returns the
  samples, or (samples, x0_preds) when record_every > 0 (the entry's `run` is run_all without
  the three, with its own keywords alone)."""

  def progressive(sched, model_fn, keys, shape, *, every, **kwargs):
    return run_all(sched, model_fn, keys, shape, record_every=every, **kwargs)

  def run_from(sched, model_fn, keys, x_init, *, start, **kwargs):
    return run_all(sched, model_fn, keys, x_init.shape, x_init=x_init, start=start, **kwargs)

  return dict(progressive=progressive, run_from=run_from)


# What each optional capability of an entry is for, in messages.
CAPABILITIES = {
    "progressive": "x_0 predictions along its run (progressive grids)",
    "run_from": "a start from given images at a timestep (SDEdit, interpolation, latents)",
    "deterministic": "a deterministic run (decoding DDIM latents)",
}


# The settings of every sampler.
COMMON = (
    # K in 1..T: K timesteps evenly spaced from 0 to T-1 (`evenly_spaced`), a network call each.
    Setting("num_steps", 0, "int", 0, T, note="0 = all T"),
    # Improved DDPM's respacing spec instead (num_steps 0): 'ddim50' (every 20th step of 1000
    # from 0), '50' (50 evenly spaced, rounded), '10,20,30' (counts in equal sections of T).
    Setting("respacing", "", "str", note="'' = none, or e.g. 'ddim50', '50', '10,20,30'"),
    Setting("clip_denoised", True, "bool", note="clip each x_0 prediction to [-1, 1]"),
    # Imagen's dynamic thresholding (`diffusion.clip_xstart`) instead of the clip to [-1, 1].
    Setting("dynamic_threshold", 0.0, "float", 0, 100,
            note="clip each x_0 prediction by dynamic thresholding at this percentile; 0 = to "
            "[-1, 1]"),
)

# The samplers by name (the fields every sampler has and the sample section's other fields
# reserved).
REGISTRY = registry_lib.Registry(
    "sampler", SamplerEntry, section="sample", key="sampler", common=COMMON,
    entry_point_group=ENTRY_POINT_GROUP, reserved=("guidance_scale", "num_samples"))


def register(entry: SamplerEntry) -> SamplerEntry:
  """Adds `entry` to the samplers by name; returns it (`utils.registry.Registry.register`)."""
  return REGISTRY.register(entry)


def unregister(name: str) -> None:
  """Removes a sampler registered with `register` (for tests and interactive use)."""
  REGISTRY.unregister(name)


def names() -> tuple[str, ...]:
  """The registered samplers' names, in registration order."""
  return REGISTRY.names()


def get(name: str, *, flag_prefix: str = "") -> SamplerEntry:
  """The entry of the sampler `name`; ValueError saying which names exist."""
  return REGISTRY.get(name, flag_prefix=flag_prefix)


def settings() -> tuple[Setting, ...]:
  """Every setting of the `sample` section a sampler reads: the common ones, then each
  registered sampler's own (a shared one once)."""
  return REGISTRY.settings()


def default_settings() -> dict[str, Any]:
  """The `sample` section's sampler fields with their defaults: `sampler` (the reference
  sampler), then `settings()`."""
  return REGISTRY.default_settings(REFERENCE)


def owners(setting_name: str) -> list[str]:
  """The samplers that read a setting of their own named `setting_name`."""
  return REGISTRY.owners(setting_name)


def visited_timesteps(num_timesteps: int, num_steps: int = 0, respacing: str = "") -> np.ndarray:
  """The timesteps a sampler visits, ascending: all T (num_steps 0 or T), K evenly spaced from 0
  to T-1 (rounded; K in 1..T), or those of a `schedules.space_timesteps` spec."""
  if respacing:
    return schedules.space_timesteps(num_timesteps, respacing)
  if num_steps in (0, num_timesteps):
    return np.arange(num_timesteps)
  return evenly_spaced(num_timesteps, num_steps)


def evenly_spaced(num_timesteps: int, num_steps: int) -> np.ndarray:
  """K of T timesteps, ascending, evenly spaced from 0 to T-1 (rounded; T-1 alone for K = 1)."""
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"num_steps must be in [1, T={num_timesteps}], got {num_steps}")
  if num_steps == 1:
    return np.array([num_timesteps - 1])
  return np.round(np.linspace(0, num_timesteps - 1, num_steps)).astype(np.int32)


def check(name: str, values: Mapping[str, Any], num_timesteps: int, *, mean_type: str = "eps",
          flag_prefix: str = "") -> None:
  """Raises ValueError, saying what to set, unless `sample` can run sampler `name` with these
  settings (missing ones take their defaults; other keys, e.g. guidance_scale, are ignored).

  Args:
    name: the sampler.
    values: settings by name (a `sample` section, or some of its fields).
    num_timesteps: T, the schedule's length.
    mean_type: what the model predicts (a sampler may need one).
    flag_prefix: put before the field names in the message ('--config.' for the command line).
  """
  field = lambda n: f"{flag_prefix}sample.{n}"
  entry = get(name, flag_prefix=flag_prefix)
  values = REGISTRY.resolved(values)
  own = {s.name for s in entry.settings}
  for setting in COMMON + entry.settings:
    message = setting.problem(values[setting.name], section="sample", field=field,
                              num_timesteps=num_timesteps)
    if message:
      raise ValueError(message)
  for setting in REGISTRY.foreign(name, values):
    whose = " or ".join(repr(n) for n in owners(setting.name))
    note = f" ({setting.note})" if setting.note else ""
    raise ValueError(
        f"sample.{setting.name}={values[setting.name]!r} is a setting of sampler {whose}{note}, "
        f"which {name!r} does not use: set {field(setting.name)}={setting.default!r}, or "
        f"{field('sampler')}={owners(setting.name)[0]!r}")
  threshold = values["dynamic_threshold"]
  if threshold and not entry.clips:
    raise ValueError(f"sample.dynamic_threshold={threshold!r}: sampler {name!r} steps with noise "
                     f"predictions and clips no x_0 prediction; set "
                     f"{field('dynamic_threshold')}=0, or another {field('sampler')}")
  if threshold and not values["clip_denoised"]:
    raise ValueError(f"sample.dynamic_threshold={threshold!r} is a way to clip the x_0 "
                     f"predictions, and sample.clip_denoised=False clips none: set "
                     f"{field('clip_denoised')}=True, or {field('dynamic_threshold')}=0")
  num_steps, respacing = values["num_steps"], values["respacing"]
  if respacing:
    if not entry.visits_timesteps:
      raise ValueError(f"sample.respacing={respacing!r}: {name!r} takes its steps from "
                       f"{field('num_steps')}, not from a respacing; set {field('respacing')}=''")
    if num_steps != 0:
      raise ValueError(
          f"sample.respacing={respacing!r} and sample.num_steps={num_steps} both choose the "
          f"timesteps: set {field('num_steps')}=0 to use the respacing, or "
          f"{field('respacing')}='' to use the step count")
    try:
      count = len(schedules.space_timesteps(num_timesteps, respacing))
    except ValueError as e:
      raise ValueError(f"{e}: set {field('respacing')} to a spec such as 'ddim50', '50' or "
                       f"'10,20,30' (steps of T={num_timesteps}), or '' for none") from None
  else:
    count = num_steps or num_timesteps
  if count < entry.min_steps:
    raise ValueError(
        f"sampler {name!r} needs at least {entry.min_steps} steps, got {count}: set "
        f"{field('num_steps')} or {field('respacing')} to keep more, or another "
        f"{field('sampler')}")
  if entry.check is not None:
    entry.check(field, count=count, num_timesteps=num_timesteps, mean_type=mean_type,
                **{k: values[k] for k in own})


def sample(name: str, sched, model_fn, keys, shape, *, mean_type: str, var_type: str,
           **values) -> Any:
  """Samples with the sampler `name`, after `check`.

  Args:
    name: a registered sampler ('ancestral', 'ddim', 'dpmsolver++', 'dpmsolver', ...).
    sched, model_fn, keys, shape: the schedule, the network (`model_fn(x, t)`), one key per
      example [B] and the samples' shape [B, H, W, C].
    mean_type, var_type: the model's output types.
    **values: settings by name (`settings()`: num_steps, respacing, clip_denoised, and the
      samplers' own, e.g. eta, solver_order, solver_grid); missing ones take their defaults.

  Returns:
    Samples [B, H, W, C], nominally in [-1, 1].
  """
  entry, kwargs = _run_kwargs(name, sched.num_timesteps, mean_type, values)
  return entry.run(sched, model_fn, keys, shape, mean_type=mean_type, var_type=var_type,
                   **kwargs)


def progressive(name: str, sched, model_fn, keys, shape, *, every: int, mean_type: str,
                var_type: str, **values) -> tuple[Any, Any]:
  """`sample`, also keeping the x_0 prediction of every `every`-th network call counted back
  from the last (`SamplerEntry.progressive`).

  Returns:
    (samples [B, H, W, C], x0_preds [B, calls // every, H, W, C], noisiest first).
  """
  entry, kwargs = _run_kwargs(name, sched.num_timesteps, mean_type, values,
                              capability="progressive")
  calls = num_calls(name, values, sched.num_timesteps)
  if not 1 <= every <= calls:
    raise ValueError(f"x_0 predictions every {every} network calls: sampler {name!r} makes "
                     f"{calls} with these settings; keep it in 1..{calls}")
  return entry.progressive(sched, model_fn, keys, shape, every=int(every), mean_type=mean_type,
                           var_type=var_type, **kwargs)


def sample_from(name: str, sched, model_fn, keys, x_init, *, start: int | None,
                mean_type: str, var_type: str, **values) -> Any:
  """Runs the sampler `name` from x_init [B, H, W, C], x at the trained timestep `start` (None:
  x_T, at the top of the sampler's own steps), down to x_0 (`SamplerEntry.run_from`), after
  `check` and `check_start`.

  Returns:
    Samples [B, H, W, C].
  """
  num_timesteps = sched.num_timesteps
  entry, kwargs = _run_kwargs(name, num_timesteps, mean_type, values, capability="run_from",
                              start=start)
  return entry.run_from(sched, model_fn, keys, x_init,
                        start=None if start is None else int(start), mean_type=mean_type,
                        var_type=var_type, **kwargs)


def _run_kwargs(name: str, num_timesteps: int, mean_type: str, values: Mapping[str, Any], *,
                capability: str = "", start: int | None = None) -> tuple[SamplerEntry, dict]:
  """The entry and the keywords of its run (its steps, clipping and own settings), after the
  checks; `capability` names an optional function it must have."""
  known = {s.name for s in settings()}
  unknown = set(values) - known
  if unknown:
    raise TypeError(f"unknown sampler settings {sorted(unknown)}; allowed: {sorted(known)}")
  check(name, values, num_timesteps, mean_type=mean_type)
  if capability:
    require(name, capability)
  if start is not None:
    check_start(name, values, num_timesteps, start, mean_type=mean_type)
  entry = get(name)
  values = REGISTRY.resolved(values)
  own = {s.name: values[s.name] for s in entry.settings}
  top = num_timesteps if start is None else int(start) + 1
  timesteps = visited_timesteps(top, values["num_steps"], values["respacing"])
  steps = (dict(timesteps=timesteps) if entry.visits_timesteps else
           dict(num_steps=len(timesteps)))
  return entry, dict(clip_denoised=values["clip_denoised"],
                     dynamic_threshold=values["dynamic_threshold"], **steps, **own)


def require(name: str, capability: str, *, flag_prefix: str = "", purpose: str = "") -> None:
  """Raises ValueError, naming the samplers that have it, unless sampler `name` has the optional
  `capability` ('progressive', 'run_from' or 'deterministic', `CAPABILITIES`)."""
  if getattr(get(name, flag_prefix=flag_prefix), capability) is not None:
    return
  able = [n for n in names() if getattr(get(n), capability) is not None]
  what = purpose or CAPABILITIES[capability]
  raise ValueError(f"sampler {name!r} has no {what}: set {flag_prefix}sample.sampler to one of "
                   f"{', '.join(repr(n) for n in able) or 'none registered'}")


def is_deterministic(name: str, values: Mapping[str, Any]) -> bool:
  """Whether sampler `name` with these settings draws no noise after x_T."""
  entry = get(name)
  if entry.deterministic is None:
    return False
  values = REGISTRY.resolved(values)
  return bool(entry.deterministic(**{s.name: values[s.name] for s in entry.settings}))


def num_calls(name: str, values: Mapping[str, Any], num_timesteps: int) -> int:
  """The network calls of sampler `name` with these settings (from a checked config)."""
  values = REGISTRY.resolved(values)
  if values["respacing"]:
    return len(schedules.space_timesteps(num_timesteps, values["respacing"]))
  return values["num_steps"] or num_timesteps


def start_timesteps(num_timesteps: int, start: int, num_steps: int = 0,
                    respacing: str = "") -> np.ndarray:
  """The timesteps a sampler started at `start` visits, ascending: `visited_timesteps` of the
  start + 1 timesteps 0..start (the last one is `start`; ValueError when a respacing spec would
  not keep it)."""
  if not 0 <= start < num_timesteps:
    raise ValueError(f"start {start} is outside the schedule's timesteps 0..{num_timesteps - 1}")
  timesteps = visited_timesteps(start + 1, num_steps, respacing)
  if timesteps[-1] != start:
    raise ValueError(f"respacing {respacing!r} of the {start + 1} timesteps 0..{start} does not "
                     f"keep {start}, where the run starts")
  return timesteps


def check_start(name: str, values: Mapping[str, Any], num_timesteps: int, start: int, *,
                mean_type: str = "eps", flag_prefix: str = "", start_field: str = "") -> None:
  """Raises ValueError, saying what to set, unless sampler `name` (with these settings, already
  `check`ed) can start at the trained timestep `start`: it spreads its steps over 0..start.

  Args:
    name, values, num_timesteps, mean_type, flag_prefix: as `check`'s.
    start: the timestep its run starts at.
    start_field: the field that chose `start` (e.g. '--config.eval.edit_t'), for messages.
  """
  field = lambda n: f"{flag_prefix}sample.{n}"
  where = start_field or "the start"
  if not 0 <= start < num_timesteps:
    raise ValueError(f"{where}={start} is outside the schedule's timesteps 0..{num_timesteps - 1}"
                     f": set it in that range")
  values = REGISTRY.resolved(values)
  entry = get(name, flag_prefix=flag_prefix)
  num_steps, respacing = values["num_steps"], values["respacing"]
  if num_steps > start + 1:
    raise ValueError(f"sample.num_steps={num_steps} steps cannot fit in the {start + 1} timesteps "
                     f"0..{start} below {where}={start}: set {field('num_steps')} to at most "
                     f"{start + 1} (0 = all of them), or raise {where}")
  try:
    count = len(start_timesteps(num_timesteps, start, num_steps, respacing))
  except ValueError as e:
    raise ValueError(f"{e}: set {field('num_steps')} (and {field('respacing')}='') or a "
                     f"respacing such as '{max(start // 2, 1)}', or another {where}") from None
  if count < entry.min_steps:
    raise ValueError(f"sampler {name!r} needs at least {entry.min_steps} steps, and from "
                     f"{where}={start} it would take {count}: raise {where} or "
                     f"{field('num_steps')}")
  if entry.check is not None:
    own = {s.name for s in entry.settings}
    try:
      entry.check(field, count=count, num_timesteps=start + 1, mean_type=mean_type,
                  **{k: values[k] for k in own})
    except ValueError as e:
      raise ValueError(f"starting at {where}={start}: {e}") from None


def tag(values: Mapping[str, Any], num_timesteps: int) -> str:
  """A file-name suffix for these sampler settings, so that results of one checkpoint under
  different samplers sit side by side: '' for the reference sampler over all T steps with
  clipping (the original's), else e.g. '_ddim50', '_ancestral_respaced25', '_ddim_eta1',
  '_ancestral_noclip', '_ddim50_dynthresh99.5', '_dpmsolver++20_order2_logSNR'.

  Args:
    values: a `sample` section (its `sampler` and settings; missing settings take defaults).
    num_timesteps: T.
  """
  name = values["sampler"]
  entry = get(name)
  values = REGISTRY.resolved(values)
  num_steps, respacing = values["num_steps"], values["respacing"]
  steps = ("_respaced" + respacing if respacing else
           str(num_steps) if num_steps not in (0, num_timesteps) else "")
  parts = [name + steps] if (name != REFERENCE or steps) else []
  if entry.tag is not None:
    parts += entry.tag(**{s.name: values[s.name] for s in entry.settings})
  if not values["clip_denoised"]:
    parts.append("noclip")
  if values["dynamic_threshold"]:
    parts.append(f"dynthresh{values['dynamic_threshold']:g}")
  return "".join("_" + part for part in parts)
