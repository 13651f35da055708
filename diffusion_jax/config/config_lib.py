"""Config code: loading configs from Python (what `--config file.py:arg --config.a.b=value`
does on the command line, for notebooks, scripts and tests), parsing config arguments, and
upgrading a config saved with a checkpoint to today's layout.

The files in configs/ hold values only; the code they share lives here. They ship with the
package as `diffusion_jax.configs` (setup.cfg maps the folder to that name), so a config is
named by its path (`configs/cifar10.py`) or, anywhere, by its name (`cifar10`).
"""
from __future__ import annotations

import importlib
import importlib.util
import pathlib
import re
from typing import Any, Mapping

import ml_collections

SHIPPED_PACKAGE = "diffusion_jax.configs"


def shipped_dir() -> pathlib.Path:
  """The folder of the configs installed with the package: the checkout's configs/ under
  `pip install -e .`, site-packages/diffusion_jax/configs/ under `pip install .`.

  Raises:
    FileNotFoundError: when the installed package lacks its configs (an editable install made
      before they were part of the package).
  """
  try:
    package = importlib.import_module(SHIPPED_PACKAGE)
  except ImportError:
    raise FileNotFoundError(
        f"{SHIPPED_PACKAGE} is not installed; install the package again (pip install -e . in "
        f"a checkout) to have its configs") from None
  return pathlib.Path(package.__file__).resolve().parent


def shipped_names() -> list[str]:
  """The names of the shipped configs (`--config NAME`), sorted."""
  return sorted(p.stem for p in shipped_dir().glob("*.py") if not p.stem.startswith("_"))


def resolve_path(path: str) -> pathlib.Path:
  """The file of a config: `path` as given when it is a file, else the shipped config it names.

  Args:
    path: a file's path ('configs/cifar10.py', '/abs/my_config.py') or a shipped config's name
      ('cifar10').

  Returns:
    the file, as given or in the installed package.

  Raises:
    FileNotFoundError: for neither a file nor a shipped config, naming the shipped ones.
  """
  candidate = pathlib.Path(path).expanduser()
  if candidate.is_file():
    return candidate
  names = shipped_names()
  relative = pathlib.PurePath(path)
  if path in names:
    return shipped_dir() / f"{path}.py"
  # README, docs and launch scripts say `--config configs/NAME.py`, as typed in a checkout's
  # root. Elsewhere (a pip install, another directory) no such file exists, and the command can
  # only mean the same config, shipped with the package: the same file in an editable install.
  if (not relative.is_absolute() and relative.suffix == ".py" and relative.stem in names
      and relative.parent in (pathlib.PurePath("."), pathlib.PurePath("configs"))):
    return shipped_dir() / relative.name
  shipped = ", ".join(names)
  if relative.suffix == ".py" or len(relative.parts) > 1:
    raise FileNotFoundError(
        f"config file {path!r} not found (relative paths start at {pathlib.Path.cwd()}); name "
        f"an existing file, or a config shipped with diffusion_jax by its name: {shipped}")
  raise FileNotFoundError(
      f"unknown config {path!r}: not a file, nor a config shipped with diffusion_jax "
      f"({shipped}); name one of those (e.g. digits, or digits:num_steps=100 with its "
      f"argument), or a config file's path")


def resolve_spec(spec: str) -> str:
  """`resolve_path` for a config spec with its argument: 'cifar10:var_type=fixedsmall' ->
  '/.../diffusion_jax/configs/cifar10.py:var_type=fixedsmall', what absl's config flag loads."""
  path, colon, arg = spec.partition(":")
  return f"{resolve_path(path)}{colon}{arg}"


def resolve_config_args(argv: list[str]) -> list[str]:
  """Command-line arguments with each `--config` value made a file's path (`resolve_spec`):
  absl's config flag loads files only, and `--config digits:num_steps=100` names the installed
  digits.py.

  Args:
    argv: the program's name, then its arguments.

  Returns:
    a new list; a `--config` without a value, and what follows `--`, left for absl to judge.

  Raises:
    FileNotFoundError: for a value that is neither a file nor a shipped config.
  """
  out = list(argv)
  for i in range(1, len(argv)):
    if argv[i] == "--":  # the flags end here
      break
    match = re.fullmatch(r"(--?config)(?:=(.*))?", argv[i])
    if not match:
      continue
    if match.group(2) is not None:
      out[i] = f"{match.group(1)}={resolve_spec(match.group(2))}"
    elif i + 1 < len(argv) and not argv[i + 1].startswith("-"):
      out[i + 1] = resolve_spec(argv[i + 1])
  return out


def sibling_module(config_file: str, name: str):
  """Loads `name`.py from the directory of `config_file`, by its path.

  A config starts with `default = config_lib.sibling_module(__file__, "default")`, so the same
  file works where configs are loaded by path and never imported: in a checkout, installed with
  the package, and in a copied configs/ directory with its own default.py.
  """
  path = pathlib.Path(config_file).resolve().with_name(f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"diffusion_jax_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses a config argument `key=value,key=value` against typed defaults.

  Values are converted to their default's type only; whether a value is allowed is for
  `config_checks` to say, so a config file and a `--config.a.b=value` flag meet the same checks.

  Args:
    arg: the text after the colon in `--config file.py:arg` (None or '' for none).
    **defaults: every accepted key with its default value (the value's type is kept).

  Returns:
    a ConfigDict with one entry per default, overridden where `arg` says so.

  Raises:
    ValueError: for an unknown key, a malformed item or a value of the wrong type.
  """
  out = ml_collections.ConfigDict(dict(defaults))
  for item in (arg or "").split(","):
    if not item.strip():
      continue
    if "=" not in item:
      raise ValueError(f"config argument {item!r} is not key=value; allowed keys: "
                       f"{sorted(defaults)}")
    key, value = (s.strip() for s in item.split("=", 1))
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; allowed keys: {sorted(defaults)}")
    default = defaults[key]
    if isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key} must be true or false, got {value!r}")
      value = value.lower() in ("true", "1")
    elif default is not None:
      try:
        value = type(default)(value)
      except ValueError:
        raise ValueError(f"config argument {key}={value!r} must be of type "
                         f"{type(default).__name__}, like its default {default!r}") from None
    out[key] = value
  return out


def parse_diffusion_arg(arg: str | None, *, var_type: str, **extra) -> ml_collections.ConfigDict:
  """Parses `mean_type`, `var_type`, `loss_type` (+ `extra` keys) from a config argument.

  Args:
    arg: the text after the colon in `--config file.py:arg`.
    var_type: the config's default variance type (mean_type defaults to 'eps', loss_type to
      'mse').
    **extra: further accepted keys with their defaults.

  Returns:
    a ConfigDict of the parsed values. A learned variance needs `loss_type=kl` given with it
    (`:var_type=learned,loss_type=kl`); `config_checks.check_diffusion` says so otherwise.
  """
  return parse_arg(arg, mean_type="eps", var_type=var_type, loss_type="mse", **extra)


def parse_variant(arg: str | None, variants: tuple[str, ...]) -> str:
  """Parses `variant=NAME` (default: the first of `variants`), for configs that describe a few
  runs of one recipe (e.g. the released models of Improved DDPM).

  Raises:
    ValueError: for another key, or a variant not in `variants` (naming them).
  """
  variant = parse_arg(arg, variant=variants[0]).variant
  if variant not in variants:
    raise ValueError(f"unknown variant {variant!r}; allowed: {', '.join(variants)}")
  return variant


def apply_diffusion_args(config: ml_collections.ConfigDict, args) -> ml_collections.ConfigDict:
  """Sets the diffusion types parsed by `parse_diffusion_arg` on a config; returns it."""
  config.diffusion.mean_type = args.mean_type
  config.diffusion.var_type = args.var_type
  config.diffusion.loss_type = args.loss_type
  return config


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Sets dotted fields like `--config.key=value` flags do; returns the config (changed in place).

  Args:
    config: the config to change.
    overrides: {'optim.lr': 1e-4, 'train.num_steps': 10}: dotted keys that must already exist;
      a list for a tuple field becomes a tuple.

  Returns:
    `config`.

  Raises:
    KeyError: for a key the config does not have.
  """
  for key, value in (overrides or {}).items():
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
      if not isinstance(node, ml_collections.ConfigDict) or name not in node:
        raise KeyError(f"config has no field {key!r}")
      node = node[name]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise KeyError(f"config has no field {key!r}")
    if isinstance(node[leaf], tuple) and isinstance(value, list):
      value = tuple(value)
    node[leaf] = value
  return config


def load_config(spec: str, overrides: Mapping[str, Any] | None = None
                ) -> ml_collections.ConfigDict:
  """Builds a config like `--config spec --config.key=value ...`.

  Args:
    spec: a file or a shipped config's name, with an optional argument:
      'configs/cifar10.py', 'cifar10', 'cifar10:var_type=fixedsmall'.
    overrides: {'optim.lr': 1e-4, 'train.num_steps': 10}: dotted keys that must already exist.

  Returns:
    the ConfigDict.

  Raises:
    FileNotFoundError: for neither a file nor a shipped config.
    KeyError: for an override key the config does not have.
  """
  path, _, arg = spec.partition(":")
  file = resolve_path(path)
  module_spec = importlib.util.spec_from_file_location(f"diffusion_jax_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return apply_overrides(module.get_config(arg or None), overrides or {})


# --- Configs saved by older versions -----------------------------------------------------------

# Fields of older layouts that `upgrade` translates rather than drops.
_OLD_SAMPLER_FIELDS = ("sample.ddim_steps", "eval.ddim_steps", "eval.ddim_eta")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': 1}, 'c': {}} -> {'a.b': 1}: the leaves by dotted name."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _saved_value(value, like):
  """A saved value in the type of today's field: JSON's lists back to tuples."""
  if isinstance(like, tuple) and isinstance(value, list):
    return tuple(value)
  return value


def upgrade(saved: Mapping[str, Any] | ml_collections.ConfigDict,
            base: ml_collections.ConfigDict | None = None
            ) -> tuple[ml_collections.ConfigDict, str | None]:
  """A config saved with a checkpoint, in today's layout.

  Every saved value whose field still exists is kept; fields that no longer exist are dropped;
  fields the saved config lacks take `base`'s value. A config of the layout before samplers were
  chosen by name (sample.ddim_steps, eval.ddim_steps, eval.ddim_eta) gets the sampler that its
  evaluation modes used: eval.ddim_steps=0 -> sample.sampler='ancestral', sample.num_steps=0;
  K > 0 -> 'ddim', K, with sample.eta=eval.ddim_eta. Its training grids' sample.ddim_steps has no
  field of its own any more (the grids use the same sampler) and is dropped.

  Args:
    saved: the saved config, as a ConfigDict or as the dict its JSON holds (lists for tuples).
    base: today's layout with default values; default: the installed package's default.py
      (never the current directory's configs/, which may belong to another version).

  Returns:
    (the upgraded config, one line saying what changed), or (the config, None) when `saved` was
    already in today's layout.
  """
  tree = saved.to_dict() if isinstance(saved, ml_collections.ConfigDict) else dict(saved)
  base = load_config(str(shipped_dir() / "default.py")) if base is None else base
  config = base.copy_and_resolve_references()
  flat_saved = _flatten(tree)
  flat_base = _flatten(config.to_dict())
  values = {}
  dropped = []
  for path, value in flat_saved.items():
    if path in flat_base:
      values[path] = _saved_value(value, flat_base[path])
    elif path not in _OLD_SAMPLER_FIELDS:
      dropped.append(path)

  changes = []
  if any(path in flat_saved for path in _OLD_SAMPLER_FIELDS):
    steps = flat_saved.get("eval.ddim_steps", 0)
    eta = flat_saved.get("eval.ddim_eta", 0.0)
    old = [f"{p}={flat_saved[p]!r}" for p in ("eval.ddim_steps", "eval.ddim_eta")
           if p in flat_saved] or ["no eval.ddim_steps (ancestral)"]
    new_fields = {"sample.sampler": "ddim" if steps > 0 else "ancestral",
                  "sample.num_steps": steps if steps > 0 else 0,
                  "sample.eta": float(eta) if steps > 0 else 0.0}
    for path, value in new_fields.items():
      values.setdefault(path, value)
    changes.append(", ".join(old) + " -> " +
                   ", ".join(f"{p}={values[p]!r}" for p in new_fields))
    if "sample.ddim_steps" in flat_saved:
      grid_steps = flat_saved["sample.ddim_steps"]
      if grid_steps != steps:
        changes.append(f"dropped sample.ddim_steps={grid_steps} (the training grids' own "
                       f"sampler setting: the grids now use sample.sampler too)")
      else:
        changes.append(f"dropped sample.ddim_steps={grid_steps} (the same as eval.ddim_steps)")
    if steps == 0 and eta != 0:
      changes.append(f"dropped eval.ddim_eta={eta!r} (ancestral sampling never used it)")
  added = sorted(p for p in flat_base if p not in values)
  if added:
    changes.append("added " + ", ".join(f"{p}={flat_base[p]!r}" for p in added))
  if dropped:
    changes.append("dropped fields no longer in the layout: " +
                   ", ".join(f"{p}={flat_saved[p]!r}" for p in sorted(dropped)))
  for path, value in values.items():
    *parents, leaf = path.split(".")
    node = config
    for name in parents:
      node = node[name]
    with node.ignore_type():
      node[leaf] = value
  if not changes:
    return config, None
  return config, "config saved by an older version, upgraded: " + "; ".join(changes)
