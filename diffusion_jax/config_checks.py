"""Checks of every number in a config, before anything compiles: one rule per field.

A rule names a field, its type and its allowed range; a bound may be another field's name
("diffusion.num_timesteps"). `check` reports every problem at once in one `ConfigError`, each
line naming the field, its value, the allowed range and the flag to set. A numeric field added
to configs/default.py or `config_lib.eval_defaults` needs a line in `RULES` (a test fails until
it has one).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable

import ml_collections

from diffusion_jax import config_lib

MODES = ("train", "summary", "sample", "eval", "progressive", "interpolate")
_SAMPLING = ("sample", "eval")


class ConfigError(ValueError):
  """Config values a run cannot use; the message says what to set for each."""


@dataclasses.dataclass(frozen=True)
class Rule:
  """What one config field may hold.

  Attributes:
    path: the dotted field name, e.g. "optim.lr".
    kind: "int" (not bool), "float" (a finite int or float, not bool) or "ints" (a tuple of ints).
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
    Rule("model.ch", "int", 1),
    Rule("model.ch_mult", "ints", 1),
    Rule("model.num_res_blocks", "int", 1),
    Rule("model.attn_resolutions", "ints", 1),
    Rule("model.dropout", "float", 0, 1, high_open=True),
    Rule("model.block_size", "int", 1),
    Rule("diffusion.beta_start", "float", 0, "diffusion.beta_end", low_open=True,
         when=_schedule_uses(*_RAMPS)),
    Rule("diffusion.beta_end", "float", 0, 1, low_open=True, high_open=True,
         when=_schedule_uses(*_RAMPS, "const")),
    Rule(_T, "int", 2),  # schedules need at least two steps
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
    Rule("sample.num_samples", "int", 1),
    Rule("sample.ddim_steps", "int", 0, _T, modes=("train",), note="0 = ancestral"),
    Rule("eval.batch_size", "int", 1),
    Rule("eval.num_samples", "int", 1),
    Rule("eval.ddim_steps", "int", 0, _T, modes=_SAMPLING, note="0 = ancestral"),
    Rule("eval.ddim_eta", "float", 0),
    Rule("eval.seed", "int", 0, 2**32, high_open=True),
    Rule("eval.bpd_max_examples", "int", 0, note="0 = the whole split"),
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
)

_MISSING = object()


def _get(config, path: str):
  """A field's value; an `eval` field the config lacks has its `eval_defaults` value."""
  node = config
  for name in path.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or name not in node:
      if path.startswith("eval."):
        return config_lib.eval_defaults().get(path.split(".", 1)[1], _MISSING)
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


def _problem(rule: Rule, value, config, mode: str) -> str | None:
  """The message for one field, or None when its value is allowed."""
  what = {"int": "an integer", "float": "a finite number",
          "ints": "a tuple of integers"}[rule.kind]
  placeholder = {"int": "N", "float": "X", "ints": "'(N, ...)'"}[rule.kind]
  if rule.kind == "ints":
    ok_type = isinstance(value, (tuple, list)) and all(_is_int(v) for v in value)
    items = list(value) if ok_type else []
  elif rule.kind == "int":
    ok_type, items = _is_int(value), [value]
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
  return (f"{rule.path}={_fmt(value)} must be {what} {text}{note}: "
          f"set --config.{rule.path}={placeholder}")


def problems(config, mode: str = "train") -> list[str]:
  """Every rule's complaint about `config` for a run in `mode` (empty: all values allowed).

  Args:
    config: a full config (configs/*.py); an absent `eval` field takes its default.
    mode: the --mode of the run: which fields' cross-field ranges matter.

  Returns:
    one message per bad field, in `RULES` order.
  """
  if mode not in MODES:
    raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
  out = []
  for rule in RULES:
    value = _get(config, rule.path)
    if value is not _MISSING:
      message = _problem(rule, value, config, mode)
      if message:
        out.append(message)
  return out


def raise_if_any(messages: list[str]) -> None:
  """Raises one ConfigError listing every message (none: returns)."""
  if len(messages) == 1:
    raise ConfigError(messages[0])
  if messages:
    raise ConfigError(f"{len(messages)} config problems:\n  " + "\n  ".join(messages))


def check(config, mode: str = "train") -> None:
  """Raises ConfigError naming every field whose value `mode` cannot use (see `RULES`)."""
  raise_if_any(problems(config, mode))
