"""Checks of every value in a config, before anything compiles: one rule per field, each stated
by the field's owner.

A rule names a field, its type and its allowed range; a bound may be another field's name
("diffusion.num_timesteps"). The config's own fields have their line in `RULES`; the `model` and
`sample` sections' rules are made from the settings the registered architectures and samplers
state (`model_rules`, `sampler_rules`). Beyond the rules, `check` asks the owners about what
their fields mean together: the diffusion types (`diffusion.type_problems`) in every mode, the
architecture (`models.check`, via `build.check_model`) and the dataset's labels, and, in the modes
that sample, the sampler (`samplers.check`) and guidance (`build.check_guidance`); each is asked
once the fields it reads passed their rules. It reports every problem at once in one
`ConfigError`, each line naming the field, its value, what is allowed and the flag to set. A
numeric field added to configs/default.py needs a rule (a test fails until it has one).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable

import ml_collections

from diffusion_jax.config import build
from diffusion_jax.config import modes as modes_lib
from diffusion_jax.core import diffusion
from diffusion_jax.core import timestep_sampling
from diffusion_jax.data import input_pipeline
from diffusion_jax import models
from diffusion_jax import parallel
from diffusion_jax import samplers
from diffusion_jax.utils import settings as settings_lib

MODES = modes_lib.NAMES
# Modes that draw samples with the `sample` section's sampler (train: its grids, when
# train.sample_every > 0; encode: DDIM's timesteps, clipping and guidance).
_SAMPLER_MODES = tuple(mode.name for mode in modes_lib.MODES.values() if mode.samples)


class ConfigError(ValueError):
  """Config values a run cannot use; the message says what to set for each."""


@dataclasses.dataclass(frozen=True)
class Rule:
  """What one config field may hold.

  Attributes:
    path: the dotted field name, e.g. "optim.lr".
    kind: "int" (not bool), "float" (a finite int or float, not bool), "ints" (a tuple of ints),
      "bool", or "str" (with `choices`).
    low, high: the bounds, a number or another field's dotted name; None = unbounded.
    low_open, high_open: exclude the bound (low < value, value < high).
    choices: the only allowed values, when not a range.
    modes: the --modes that use the field; its range is checked only there (its type always),
      so one mode's default never blocks another mode (eval.is_splits vs --mode sample).
    when: the range applies only where when(config) is true (a schedule that uses the field).
    note: what a special value means, added to the message, e.g. "0 = off".
  """
  path: str
  kind: str
  low: float | str | None = None
  high: float | str | None = None
  low_open: bool = False
  high_open: bool = False
  choices: tuple = ()
  modes: tuple[str, ...] | None = None
  when: Callable[[Any], bool] | None = None
  note: str = ""


def _schedule_uses(*schedules: str) -> Callable[[Any], bool]:
  return lambda config: _get(config, "diffusion.beta_schedule") in schedules


# beta_start ramps up to beta_end in these; `const` uses beta_end alone; `jsd` and `cosine`
# use neither (schedules.get_beta_schedule).
_RAMPS = ("linear", "quad", "warmup10", "warmup50")
_T = "diffusion.num_timesteps"

RULES = (
    Rule("seed", "int", 0, 2**32, high_open=True),  # jax.random.key keeps the low 32 bits
    Rule("data.image_size", "int", 1),
    Rule("data.channels", "int", choices=(1, 3)),
    Rule("data.num_workers", "int", 1),
    Rule("data.prefetch", "int", 1),
    # model.architecture and the model's settings: `model_rules`, from the models' registry.
    Rule("diffusion.beta_start", "float", 0, "diffusion.beta_end", low_open=True,
         when=_schedule_uses(*_RAMPS)),
    Rule("diffusion.beta_end", "float", 0, 1, low_open=True, high_open=True,
         when=_schedule_uses(*_RAMPS, "const")),
    Rule(_T, "int", 2),  # schedules need at least two steps
    Rule("diffusion.timestep_sampler", "str", choices=timestep_sampling.TIMESTEP_SAMPLERS),
    Rule("diffusion.rescale_timesteps", "bool"),
    Rule("diffusion.rescale_learned_sigmas", "bool"),
    Rule("diffusion.min_snr_gamma", "float", 0, note="0 = no weighting"),
    Rule("optim.lr", "float", 0, low_open=True),
    Rule("optim.warmup_steps", "int", 0, note="0 = no warmup"),
    Rule("optim.grad_clip", "float", 0, note="0 = no clipping"),
    Rule("optim.b1", "float", 0, 1, high_open=True),
    Rule("optim.b2", "float", 0, 1, high_open=True),
    Rule("optim.eps", "float", 0, low_open=True),
    Rule("optim.ema_decay", "float", 0, 1, high_open=True),
    Rule("optim.grad_accum_steps", "int", 1),
    Rule("train.batch_size", "int", 1),
    Rule("train.num_steps", "int", 1),
    Rule("train.log_every", "int", 1),
    Rule("train.checkpoint_every", "int", 1),
    Rule("train.keep_checkpoints", "int", 1),
    Rule("train.sample_every", "int", 0, note="0 = no sample grids"),
    Rule("train.time_limit_s", "float", 0, note="0 = no limit"),
    Rule("train.stop_check_every", "int", 1),
    Rule("train.heartbeat_every_s", "float", 0, low_open=True),
    Rule("train.lost_process_timeout_s", "float", "train.heartbeat_every_s",
         "train.heartbeat_timeout_s", low_open=True, high_open=True,
         note="the runtime aborts every process after train.heartbeat_timeout_s"),
    Rule("train.heartbeat_timeout_s", "int", 1),
    Rule("train.profile_start", "int", -1, note="-1 = no trace"),
    Rule("train.profile_steps", "int", 1),
    # sample.sampler and the sampler settings: `sampler_rules`, from the samplers' registry.
    Rule("sample.guidance_scale", "float", 0, note="0 = no guidance"),
    Rule("sample.num_samples", "int", 1),
    Rule("eval.batch_size", "int", 1),
    Rule("eval.num_samples", "int", 1),
    Rule("eval.seed", "int", 0, 2**32, high_open=True),
    Rule("eval.bpd_max_examples", "int", 0, note="0 = the whole split"),
    Rule("eval.bpd_clip_denoised", "bool"),
    Rule("eval.fid_max_real", "int", 0, note="0 = the whole split"),
    Rule("eval.inception_size", "int", 75),  # the Inception network's smallest input
    Rule("eval.digits_confidence", "float", 0, 1, low_open=True),
    Rule("eval.is_splits", "int", 1, "eval.num_samples", modes=("eval",)),
    Rule("eval.watch_poll_s", "float", 0, low_open=True),
    Rule("eval.watch_timeout_s", "float", 0, low_open=True),
    Rule("eval.progressive_freq", "int", 1, _T, modes=("progressive",)),
    Rule("eval.progressive_num", "int", 1),
    Rule("eval.interp_t", "int", 0, _T, high_open=True, modes=("interpolate",)),
    Rule("eval.interp_pairs", "int", 1),
    Rule("eval.interp_steps", "int", 2),
    Rule("eval.encode_max_examples", "int", 0, note="0 = the whole split"),
    Rule("eval.edit_images", "str"),
    Rule("eval.edit_num", "int", 1),
    Rule("eval.edit_t", "ints", 1, _T, high_open=True, modes=("edit",)),
    Rule("eval.inpaint_mask", "str"),
    Rule("eval.inpaint_jump_length", "int", 1),
    Rule("eval.inpaint_jump_n_sample", "int", 1, note="1 = no resampling"),
    Rule("distill.teacher_step", "int", 0, note="0 = the latest"),
    Rule("distill.start_steps", "int", 1, modes=("distill",)),
    Rule("distill.end_steps", "int", 1, "distill.start_steps", modes=("distill",)),
    Rule("distill.steps_per_round", "int", 1),
    Rule("distill.lr", "float", 0, low_open=True),
    Rule("distill.ema_decay", "float", 0, 1, high_open=True),
)

_MISSING = object()


def _get(config, path: str):
  """A field's value, or _MISSING."""
  node = config
  for name in path.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or name not in node:
      return _MISSING
    node = node[name]
  return node


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value))


def _fmt(value) -> str:
  return repr(value) if isinstance(value, str) else str(value)


def _range_text(rule: Rule, config) -> tuple[str, float | None, float | None]:
  """('>= 1' / 'in [0, 1)' / 'one of 1, 3', low, high) with field bounds resolved."""
  if rule.choices:
    return "one of " + ", ".join(map(str, rule.choices)), None, None
  if rule.low is None and rule.high is None:
    return "", None, None

  def bound(b):
    if isinstance(b, str):
      value = _get(config, b)
      return f"{b}={_fmt(value)}", (value if _is_number(value) else None)
    return f"{b:g}" if isinstance(b, float) else str(b), b

  low_text, low = bound(rule.low) if rule.low is not None else ("", None)
  high_text, high = bound(rule.high) if rule.high is not None else ("", None)
  if rule.low is not None and rule.high is not None:
    text = (f"in {'(' if rule.low_open else '['}{low_text}, {high_text}"
            f"{')' if rule.high_open else ']'}")
  elif rule.low is not None:
    text = f"{'>' if rule.low_open else '>='} {low_text}"
  else:
    text = f"{'<' if rule.high_open else '<='} {high_text}"
  return text, low, high


def _in_range(value, rule: Rule, low, high) -> bool:
  if rule.choices:
    return value in rule.choices
  if low is not None and (value <= low if rule.low_open else value < low):
    return False
  if high is not None and (value >= high if rule.high_open else value > high):
    return False
  return True


def _setting_rule(section: str, setting, modes: tuple[str, ...] | None = None) -> Rule:
  """The rule of a registered component's setting (`utils.settings.Setting`), T being the
  schedule's length."""
  high = _T if setting.high == settings_lib.T else setting.high
  return Rule(f"{section}.{setting.name}", setting.kind, setting.low, high,
              high_open=setting.high_open, choices=setting.choices,
              modes=modes if isinstance(high, str) else None,
              note=setting.note if setting.kind != "str" or not setting.choices else "")


def model_rules() -> tuple[Rule, ...]:
  """The rules of `model.architecture` and of every architecture's setting, as the registered
  architectures state them (`models.registry`)."""
  return (Rule("model.architecture", "str", choices=models.names()),
          *(_setting_rule("model", setting) for setting in models.settings()))


def sampler_rules() -> tuple[Rule, ...]:
  """The rules of `sample.sampler` and of every sampler setting, as the registered samplers
  state them (`samplers.Setting`): a setting's bounds, with T for the schedule's length."""
  return (Rule("sample.sampler", "str", choices=samplers.names()),
          *(_setting_rule("sample", setting, _SAMPLER_MODES) for setting in samplers.settings()))


def rules() -> tuple[Rule, ...]:
  """Every rule: `RULES`, with the architectures' (`model_rules`) and the samplers'
  (`sampler_rules`, both depending on what is registered) first among their sections'."""
  models_at = next(i for i, rule in enumerate(RULES) if rule.path.startswith("diffusion."))
  samplers_at = next(i for i, rule in enumerate(RULES) if rule.path.startswith("sample."))
  return (RULES[:models_at] + model_rules() + RULES[models_at:samplers_at] + sampler_rules()
          + RULES[samplers_at:])


def _problem(rule: Rule, value, config, mode: str) -> str | None:
  """The message for one field, or None when its value is allowed."""
  what = {"int": "an integer", "float": "a finite number", "ints": "a tuple of integers",
          "bool": "True or False", "str": "a string" if not rule.choices else ""}[rule.kind]
  placeholder = {"int": "N", "float": "X", "ints": "'(N, ...)'", "bool": "True|False",
                 "str": "|".join(map(str, rule.choices))}[rule.kind]
  if rule.kind == "ints":
    ok_type = isinstance(value, (tuple, list)) and all(_is_int(v) for v in value)
    items = list(value) if ok_type else []
  elif rule.kind == "int":
    ok_type, items = _is_int(value), [value]
  elif rule.kind == "bool":
    ok_type, items = isinstance(value, bool), []
  elif rule.kind == "str":
    ok_type, items = isinstance(value, str), [value]
  else:
    ok_type, items = _is_number(value), [value]
  checked = ((rule.modes is None or mode in rule.modes)
             and (rule.when is None or rule.when(config)))
  text, low, high = _range_text(rule, config)
  if ok_type and (not checked or all(_in_range(v, rule, low, high) for v in items)):
    return None
  if rule.kind == "ints":
    what += " each"
  note = f" ({rule.note})" if rule.note else ""
  return (f"{rule.path}={_fmt(value)} must be {' '.join(filter(None, (what, text)))}{note}: "
          f"set --config.{rule.path}={placeholder}")


# The diffusion types a config argument sets (`config_lib.parse_diffusion_arg`).
_CONFIG_ARGUMENT_TYPES = ("mean_type", "var_type", "loss_type")


def diffusion_problems(config, bad: frozenset[str] = frozenset()) -> list[str]:
  """What `diffusion.type_problems` refuses in `config.diffusion`, saying what to set.

  Args:
    config: a full config.
    bad: the fields whose rules failed already (their values are not asked about again).

  Returns:
    one message per problem (empty: the types are usable). An unknown type's names the flag and
    the config argument (`--config file.py:key=value`) that set it.
  """
  types = {name: value for name in _CONFIG_ARGUMENT_TYPES + ("min_snr_gamma",)
           if (value := _get(config, f"diffusion.{name}")) is not _MISSING
           and f"diffusion.{name}" not in bad}
  return diffusion.type_problems(
      **types, field=lambda n: f"diffusion.{n}", flag=lambda n: f"--config.diffusion.{n}",
      also=lambda n, values: (f", or the config argument :{n}={values}"
                              if n in _CONFIG_ARGUMENT_TYPES else ""))


def check_diffusion(config) -> None:
  """Raises ConfigError, saying what to set, for diffusion types the library cannot use:
  an unknown mean_type, var_type or loss_type, or the mse loss with a learned variance."""
  raise_if_any(diffusion_problems(config))


def _draws_samples(config, mode: str) -> bool:
  if mode != "train":
    return mode in _SAMPLER_MODES
  every = _get(config, "train.sample_every")
  return _is_number(every) and every > 0


def sampler_problems(config, mode: str = "sample") -> list[str]:
  """What the sampler of `config.sample` refuses (`samplers.check`), and classifier-free
  guidance a model cannot take, for a mode that samples.

  Args:
    config: a full config.
    mode: the --mode of the run; train samples only when train.sample_every > 0, and
      progressive / interpolate always sample ancestrally, so only the train, sample and eval
      modes use the sampler.

  Returns:
    a list with the one message, or empty.
  """
  if not _draws_samples(config, mode):
    return []
  section = _get(config, "sample")
  num_timesteps, mean_type = _get(config, _T), _get(config, "diffusion.mean_type")
  if section is _MISSING or "sampler" not in section or not _is_int(num_timesteps):
    return []
  try:
    samplers.check(section["sampler"], dict(section), num_timesteps,
                   mean_type="eps" if mean_type is _MISSING else mean_type,
                   flag_prefix="--config.")
  except ValueError as e:
    return [str(e)]
  guidance = _get(config, "sample.guidance_scale")
  if _is_number(guidance) and guidance > 0 and all(
      _is_number(_get(config, p)) for p in ("model.num_classes", "model.p_uncond")):
    try:
      build.check_guidance(_get(config, "model"), guidance)
    except ValueError as e:
      return [str(e)]
  return []


def _reads_labels(config, mode: str) -> bool:
  # The modes that read the dataset's examples with a class-conditional model's labels.
  if mode == "eval":
    return bool(_get(config, "eval.bpd_split"))
  return modes_lib.get(mode).reads_labels


def model_problems(config, mode: str = "train") -> list[str]:
  """What `build.check_model` refuses in the model section (`models.check`: a setting of
  another architecture, what the architecture cannot build for these images), and, where `mode` reads the dataset, labels the dataset cannot give a
  class-conditional model (`input_pipeline.check_labels`)."""
  needed = ("data.image_size", "data.channels", "data.dataset", "model")
  if any(_get(config, path) is _MISSING for path in needed):
    return []
  if not isinstance(config, ml_collections.ConfigDict):
    config = ml_collections.ConfigDict(config)
  out = []
  for check_one, args, applies in (
      (build.check_model, (config,), True),
      (input_pipeline.check_labels, (config.data, build.num_classes(config)),
       _reads_labels(config, mode))):
    if applies:
      try:
        check_one(*args)
      except ValueError as e:
        out.append(str(e))
  return out


def problems(config, mode: str = "train") -> list[str]:
  """Every complaint about `config` for a run in `mode` (empty: all values allowed).

  Args:
    config: a full config (configs/*.py; a config saved by an older version after
      `config_lib.upgrade`).
    mode: the --mode of the run: which fields' cross-field ranges matter.

  Returns:
    one message per bad field, in `rules()` order, then the diffusion types', the model's and the
    sampler's.
  """
  modes_lib.get(mode)  # ValueError for an unknown one
  out, bad = [], set()
  for rule in rules():
    value = _get(config, rule.path)
    if value is not _MISSING:
      message = _problem(rule, value, config, mode)
      if message:
        out.append(message)
        bad.add(rule.path)
  out += diffusion_problems(config, frozenset(bad))
  # The model as a whole, once its fields have the right types and ranges.
  if not any(path.startswith("model.") or path in ("data.image_size", "data.channels")
             for path in bad):
    out += model_problems(config, mode)
  # The sampler's own limits, once its fields and T have the right types and ranges.
  if not bad & ({rule.path for rule in sampler_rules()} | {_T}):
    out += sampler_problems(config, mode)
  return out


def raise_if_any(messages: list[str]) -> None:
  """Raises one ConfigError listing every message (none: returns)."""
  if len(messages) == 1:
    raise ConfigError(messages[0])
  if messages:
    raise ConfigError(f"{len(messages)} config problems:\n  " + "\n  ".join(messages))


def check(config, mode: str = "train") -> None:
  """Raises ConfigError naming every field whose value `mode` cannot use: `rules()`, the diffusion
  types (`check_diffusion`) and, where `mode` samples, the sampler (`sampler_problems`)."""
  raise_if_any(problems(config, mode))


def check_training(config, num_devices: int, mode: str = "train", more=()) -> None:
  """Raises ConfigError, before anything compiles, with what to change for a training run
  (--mode `mode`, train or distill) on `num_devices` devices: every problem of `check(config,
  mode)` (the U-Net included), then the dataset and the split of the batch over devices and
  micro-batches, then those of each `more(config)` (a list of messages), all reported at once
  (the latter only once every value is in its range)."""
  value_problems = problems(config, mode)
  messages = list(value_problems)
  checks = [(input_pipeline.check_data_config, (config.data,))]
  if not value_problems:
    checks.append((parallel.check_batch_size, (config.train.batch_size, num_devices,
                                               config.optim.grad_accum_steps)))
  for check_one, args in checks:
    try:
      check_one(*args)
    except ValueError as e:
      messages.append(str(e))
  if not value_problems:
    for problems_of in more:
      messages += problems_of(config)
  raise_if_any(messages)
