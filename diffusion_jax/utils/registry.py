"""Components by name: the table that `diffusion_jax.samplers.registry` and
`diffusion_jax.models.registry` each keep of their entries.

An entry is a dataclass with a `name` and its own `settings` (`utils.settings.Setting`). The
table owns what is the same for every kind of component: registration (explicit, or from an
entry-point group read on first use), the settings of a config section (the common ones, then
each entry's own) with their defaults, and who owns a setting.
"""
from __future__ import annotations

import importlib.metadata
from typing import Any, Generic, Iterable, Mapping, TypeVar

from diffusion_jax.utils.settings import Setting

Entry = TypeVar("Entry")


class Registry(Generic[Entry]):
  """Entries of one kind by name, in registration order.

  Attributes:
    kind: what an entry is, for messages ('sampler', 'architecture').
    entry_type: the entries' class.
    section, key: the config section the entries' settings are fields of, and the field that
      chooses an entry ('sample', 'sampler').
    common: the settings every entry reads.
    reserved: other fields of the section no entry may name a setting after.
    entry_point_group: the group of the entry points read on first use (each loads an entry, or
      a list of them).
    plugins_loaded: whether the entry points were read.
  """

  def __init__(self, kind: str, entry_type: type, *, section: str, key: str,
               common: tuple[Setting, ...], entry_point_group: str,
               reserved: Iterable[str] = ()):
    self.kind, self.entry_type = kind, entry_type
    self.section, self.key = section, key
    self.common, self.entry_point_group = common, entry_point_group
    self.reserved = frozenset(reserved) | {key} | {s.name for s in common}
    self.plugins_loaded = False
    self._entries: dict[str, Entry] = {}

  def register(self, entry: Entry) -> Entry:
    """Adds `entry`; returns it.

    Raises:
      ValueError: an entry of that name exists, or a setting clashes with a common one or with
        another entry's setting of the same name (another default, kind or rule).
    """
    kind = self.kind
    if not isinstance(entry, self.entry_type):
      raise TypeError(f"register takes a {self.entry_type.__name__}, got "
                      f"{type(entry).__name__}")
    if entry.name in self._entries:
      raise ValueError(f"a {kind} named {entry.name!r} is registered already")
    for setting in entry.settings:
      if setting.name in self.reserved:
        raise ValueError(f"{kind} {entry.name!r}: its setting {setting.name!r} is a field every "
                         f"{kind} has; name it after the {kind}")
      for other in self._entries.values():
        for theirs in other.settings:
          if theirs.name == setting.name and theirs != setting:
            raise ValueError(f"{kind} {entry.name!r}: its setting {setting.name!r} differs from "
                             f"the one of {kind} {other.name!r}: {setting} vs {theirs}; give it "
                             f"the same default and rules, or another name")
    self._entries[entry.name] = entry
    return entry

  def unregister(self, name: str) -> None:
    """Removes an entry registered with `register` (for tests and interactive use)."""
    self._entries.pop(name, None)

  def _load_plugins(self) -> None:
    if self.plugins_loaded:
      return
    self.plugins_loaded = True
    for point in importlib.metadata.entry_points(group=self.entry_point_group):
      loaded = point.load()
      for entry in (loaded if isinstance(loaded, (list, tuple)) else [loaded]):
        self.register(entry)

  def names(self) -> tuple[str, ...]:
    """The registered entries' names, in registration order."""
    self._load_plugins()
    return tuple(self._entries)

  def get(self, name: str, *, flag_prefix: str = "") -> Entry:
    """The entry `name`; ValueError saying which names exist."""
    self._load_plugins()
    if name not in self._entries:
      known = ", ".join(repr(n) for n in self._entries)
      raise ValueError(f"unknown {self.kind} {name!r}: set {flag_prefix}{self.section}."
                       f"{self.key} to one of {known}")
    return self._entries[name]

  def settings(self) -> tuple[Setting, ...]:
    """Every setting of the section an entry reads: the common ones, then each registered
    entry's own (a shared one once)."""
    out = {s.name: s for s in self.common}
    for name in self.names():
      for setting in self._entries[name].settings:
        out.setdefault(setting.name, setting)
    return tuple(out.values())

  def default_settings(self, reference: str) -> dict[str, Any]:
    """The section's fields with their defaults: the key (the entry `reference`), then
    `settings()`."""
    return {self.key: reference, **{s.name: s.default for s in self.settings()}}

  def owners(self, setting_name: str) -> list[str]:
    """The entries that read a setting of their own named `setting_name`."""
    return [n for n in self.names()
            if any(s.name == setting_name for s in self._entries[n].settings)]

  def resolved(self, values: Mapping[str, Any]) -> dict[str, Any]:
    """Every setting's value: from `values` where given (other keys dropped), else its
    default."""
    known = self.settings()
    names = {s.name for s in known}
    return {**{s.name: s.default for s in known},
            **{k: v for k, v in values.items() if k in names}}

  def foreign(self, name: str, values: Mapping[str, Any]) -> list[Setting]:
    """The settings of other entries than `name` that `values` sets to other than their
    defaults (each must keep its default)."""
    own = {s.name for s in self.get(name).settings}
    return [s for s in self.settings() if s.name not in own and s not in self.common
            and s.name in values and values[s.name] != s.default]
