"""A setting a registered component owns: one field of a config section, with its default and
its rule.

Samplers (`diffusion_jax.samplers.registry`, the `sample` section) and model architectures
(`diffusion_jax.models.registry`, the `model` section) state their settings this way. The config
builds its sections from them and turns each into the rule the config checks apply
(`diffusion_jax.config.checks`), so a setting's default and allowed values are written once, by
the component that reads it.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable

import numpy as np

# `Setting.high` meaning the schedule's length T (known only with a config or a schedule).
T = "T"

KINDS = {"int": "an integer", "float": "a finite number", "str": "a string",
         "bool": "True or False", "ints": "a tuple of integers"}


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class Setting:
  """One field of a config section.

  Attributes:
    name: the field, `<section>.<name>`, and the keyword of the function that reads it.
    default: its value when not given; a component that does not own the setting needs it there.
    kind: "int" (not bool), "float" (int or float, not bool), "str", "bool" or "ints" (a tuple of
      integers, each within the bounds).
    low, high: the bounds (None = unbounded), inclusive unless `high_open`; `high` may be `T`,
      the schedule's length.
    high_open: the value must stay below `high`.
    choices: the only allowed values, when not a range.
    note: what it is, for messages and the config's documentation, e.g. "DDIM's noise scale".
  """
  name: str
  default: Any
  kind: str
  low: float | None = None
  high: float | str | None = None
  choices: tuple = ()
  note: str = ""
  high_open: bool = False

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"setting {self.name!r}: kind must be one of {', '.join(KINDS)}")

  def has_type(self, value) -> bool:
    """Whether `value` is of this setting's kind."""
    if self.kind == "int":
      return _is_int(value)
    if self.kind == "float":
      return (isinstance(value, numbers.Real) and not isinstance(value, bool)
              and math.isfinite(value))
    if self.kind == "bool":
      return isinstance(value, (bool, np.bool_))
    if self.kind == "ints":
      return isinstance(value, (tuple, list)) and all(_is_int(v) for v in value)
    return isinstance(value, str)

  def problem(self, value, *, section: str, field: Callable[[str], str],
              num_timesteps: int | None = None) -> str | None:
    """What is wrong with `value` for this setting (None: nothing).

    Args:
      value: the setting's value.
      section: the config section it is a field of ('sample', 'model'), for the message.
      field: how to set a field by name, e.g. `lambda n: f"--config.sample.{n}"`.
      num_timesteps: T, for a bound `T`.
    """
    path = f"{section}.{self.name}"
    note = f" ({self.note})" if self.note else ""
    example = {"int": "N", "float": f"{self.default!r}", "str": f"{self.default!r}",
               "bool": "True|False", "ints": "'(N, ...)'"}[self.kind]
    if not self.has_type(value):
      return f"{path}={value!r} must be {KINDS[self.kind]}{note}: set {field(self.name)}={example}"
    if self.choices and value not in self.choices:
      allowed = "|".join(map(str, self.choices))
      return (f"{path}={value!r} must be one of {allowed}{note}: set "
              f"{field(self.name)}={allowed}")
    low, high = self.low, num_timesteps if self.high == T else self.high
    items = value if self.kind == "ints" else [value] if self.kind in ("int", "float") else []
    for item in items:
      if ((low is not None and item < low) or
          (high is not None and (item >= high if self.high_open else item > high))):
        if low is not None and high is not None:
          bounds, wanted = ((f"in [{low:g}, {high:g})", f"a number in [{low:g}, {high:g})")
                            if self.high_open else
                            (f"in {low:g}..{high:g}", f"one of {low:g}..{high:g}"))
        elif low is not None:
          bounds, wanted = f">= {low:g}", f"{low:g} or more"
        else:
          bounds = f"< {high:g}" if self.high_open else f"<= {high:g}"
          wanted = f"below {high:g}" if self.high_open else f"{high:g} or less"
        each = " each" if self.kind == "ints" else ""
        return (f"{path}={value!r} must be{each} {bounds}{note}: set {field(self.name)} to "
                f"{wanted}")
    return None
