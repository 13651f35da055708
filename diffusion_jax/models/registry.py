"""Model architectures by name: each one an entry that owns its settings (their defaults and
rules), its checks, its parameter table and the name maps of the checkpoint formats it reads.

The `model` section of a config is built from the registry (`default_settings`): `architecture`,
the settings every architecture reads (`COMMON`: widths, levels, attention resolutions, dropout,
dtype, remat), then each registered architecture's own. The section keeps every registered
architecture's settings, so that one command line can switch architecture and set the new one's
settings (`--config.model.architecture=iddpm --config.model.num_heads=4`); a setting of another
architecture must keep its default (`check` says which architecture reads it). Everything that
builds or checks a model by name reads the entries: `make` (config.build), `check` and the
rules of `diffusion_jax.config.checks`, `summary` (`--mode summary`), and the converters
(`name_map`).

Registration is explicit. The package registers its architectures in
`diffusion_jax/models/__init__.py`; one from another package is registered with `register(entry)`,
or through the entry-point group `diffusion_jax.models` (each entry point loads an `Architecture`,
or a list of them), read the first time the registry is asked for its names.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from diffusion_jax.models import layers
from diffusion_jax.utils import registry as registry_lib
from diffusion_jax.utils.settings import Setting

ENTRY_POINT_GROUP = "diffusion_jax.models"
# The original's U-Net: the default architecture.
REFERENCE = "ddpm"
# model.dtype: the compute dtype (parameters stay float32).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# The settings of every architecture, the keywords of every entry's `build`.
COMMON = (
    Setting("ch", 128, "int", 1, note="the base width"),
    Setting("ch_mult", (1, 2, 2, 2), "ints", 1, note="each level's width over ch"),
    Setting("num_res_blocks", 2, "int", 1, note="residual blocks per level"),
    Setting("attn_resolutions", (16,), "ints", 1,
            note="feature-map sizes with self-attention"),
    Setting("dropout", 0.1, "float", 0, 1, high_open=True),
    Setting("dtype", "float32", "str", choices=tuple(DTYPES),
            note="compute dtype; weights stay float32"),
    Setting("remat", False, "bool", note="recompute activations in the backward pass"),
)


@dataclasses.dataclass(frozen=True)
class Architecture:
  """A model architecture, all of it.

  Attributes:
    name: how configs name it (`model.architecture`).
    title: what messages call it, e.g. "DDPM's U-Net".
    build: build(*, out_ch, ch, ch_mult, num_res_blocks, attn_resolutions, dropout, dtype, remat,
      **settings) -> a Flax module called as module(x [B, H, W, C], t [B], train=..., and
      labels_B=labels [B] for a class-conditional model), returning [B, H, W, out_ch]. `dtype`
      is the jnp dtype, ch_mult and attn_resolutions tuples; settings are its own.
    settings: its own fields of the `model` section (after `COMMON`). Two architectures may
      share one (the same default and rules).
    check: check(field, *, image_size, channels, **settings) raises ValueError, saying with
      `field(name)` what to set, for settings (common and its own) it cannot build beyond each
      setting's own rules.
    summary: summary(module, image_size, channels) -> its parameter table ending with the line
      `total params: N`; None: one row per top-level module, by name.
    name_maps: checkpoint format ('tf', 'torch', ...) -> the module that maps that format's
      names onto this architecture's parameters (a dotted module name, imported when asked for).
    summary_line: one line for help texts.
  """
  name: str
  title: str
  build: Callable[..., Any]
  settings: tuple[Setting, ...] = ()
  check: Callable[..., None] | None = None
  summary: Callable[[Any, int, int], str] | None = None
  name_maps: Mapping[str, str] = dataclasses.field(default_factory=dict)
  summary_line: str = ""


# The architectures by name.
REGISTRY = registry_lib.Registry("architecture", Architecture, section="model",
                                 key="architecture", common=COMMON,
                                 entry_point_group=ENTRY_POINT_GROUP)


def register(entry: Architecture) -> Architecture:
  """Adds `entry` to the architectures by name; returns it
  (`utils.registry.Registry.register`)."""
  return REGISTRY.register(entry)


def unregister(name: str) -> None:
  """Removes an architecture registered with `register` (for tests and interactive use)."""
  REGISTRY.unregister(name)


def names() -> tuple[str, ...]:
  """The registered architectures' names, in registration order."""
  return REGISTRY.names()


def get(name: str, *, flag_prefix: str = "") -> Architecture:
  """The entry of the architecture `name`; ValueError saying which names exist."""
  return REGISTRY.get(name, flag_prefix=flag_prefix)


def settings() -> tuple[Setting, ...]:
  """Every setting of the `model` section an architecture reads: the common ones, then each
  registered architecture's own (a shared one once)."""
  return REGISTRY.settings()


def default_settings() -> dict[str, Any]:
  """The `model` section with its defaults: `architecture` (the reference's), then
  `settings()`."""
  return REGISTRY.default_settings(REFERENCE)


def owners(setting_name: str) -> list[str]:
  """The architectures that read a setting of their own named `setting_name`."""
  return REGISTRY.owners(setting_name)


def check(values: Mapping[str, Any], *, image_size: int, channels: int,
          flag_prefix: str = "") -> None:
  """Raises ValueError, saying what to set, unless the architecture `values['architecture']`
  can be built with these settings for images of this size.

  Args:
    values: the `model` section (missing settings take their defaults; other keys are ignored).
    image_size, channels: the images' height and width, and channels.
    flag_prefix: put before the field names in the message ('--config.' for the command line).
  """
  field = lambda n: f"{flag_prefix}model.{n}"
  name = values.get("architecture", REFERENCE)
  entry = get(name, flag_prefix=flag_prefix)
  values = REGISTRY.resolved(values)
  for setting in COMMON + entry.settings:
    message = setting.problem(values[setting.name], section="model", field=field)
    if message:
      raise ValueError(message)
  own = {s.name for s in entry.settings}
  foreign = REGISTRY.foreign(name, values)
  if foreign:
    given = ", ".join(f"model.{s.name}={values[s.name]!r}" for s in foreign)
    whose = owners(foreign[0].name)
    reset = " ".join(f"{field(s.name)}={s.default!r}" for s in foreign)
    raise ValueError(
        f"{given}: {entry.title} (model.architecture={name!r}) does not read "
        f"{'them; they are settings' if len(foreign) > 1 else 'it; it is a setting'} of "
        f"{' or '.join(f'{get(w).title} ({w!r})' for w in whose)}: set "
        f"{field('architecture')}={whose[0]}, or {reset}")
  if entry.check is not None:
    entry.check(field, image_size=image_size, channels=channels,
                **{k: values[k] for k in [s.name for s in COMMON] + sorted(own)})


def make(values: Mapping[str, Any], *, out_ch: int):
  """The Flax module of the architecture `values['architecture']` with these settings (missing
  ones take their defaults), `out_ch` output channels."""
  entry = get(values.get("architecture", REFERENCE))
  values = REGISTRY.resolved(values)
  common = {s.name: values[s.name] for s in COMMON}
  common.update(ch_mult=tuple(common["ch_mult"]),
                attn_resolutions=tuple(common["attn_resolutions"]),
                dtype=DTYPES[common["dtype"]])
  return entry.build(out_ch=out_ch, **common, **{s.name: values[s.name] for s in entry.settings})


def summary(name: str, module, image_size: int, channels: int, **init_kwargs) -> str:
  """The parameter table of `module` (the architecture `name`), without compiling: the entry's
  own, or one row per top-level module, by name; `init_kwargs` (e.g. labels_B) go to its `init`."""
  entry = get(name)
  if entry.summary is not None:
    return entry.summary(module, image_size, channels)
  x = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  params = jax.eval_shape(lambda k, x, t: module.init(k, x, t, **init_kwargs),
                          jax.random.key(0), x, t)["params"]
  return layers.param_table(params, sorted(params))


def name_map(name: str, fmt: str):
  """The module mapping checkpoint format `fmt`'s names onto architecture `name`'s parameters.

  Raises:
    ValueError: the architecture has no map for `fmt`, saying which architectures have one.
  """
  entry = get(name)
  if fmt not in entry.name_maps:
    having = [n for n in names() if fmt in get(n).name_maps]
    which = " or ".join(f"model.architecture={n!r} ({get(n).title})" for n in having)
    raise ValueError(f"{fmt} checkpoints hold the parameters of another architecture than "
                     f"{entry.title} (model.architecture={name!r}): use a config with "
                     f"{which or 'an architecture that has them'}")
  return importlib.import_module(entry.name_maps[fmt])
