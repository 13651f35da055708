"""Loading configs from Python: what `--config file.py:arg --config.a.b=value` does on the
command line, for notebooks, scripts and tests."""
from __future__ import annotations

import importlib.util
import pathlib
from typing import Any, Mapping

import ml_collections

# configs/ beside the package in a checkout (pip install -e .).
CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


def resolve_path(path: str) -> pathlib.Path:
  """A config file path as given, else relative to the checkout (`configs/x.py` works anywhere)."""
  candidate = pathlib.Path(path).expanduser()
  if candidate.is_file():
    return candidate
  for base in (CONFIG_DIR.parent, CONFIG_DIR):
    if (base / path).is_file():
      return base / path
  raise FileNotFoundError(f"config file {path!r} not found (looked in the current directory and "
                          f"{CONFIG_DIR}); configs ship with a checkout of the repository")


def load_config(spec: str, overrides: Mapping[str, Any] | None = None
                ) -> ml_collections.ConfigDict:
  """Builds a config like `--config spec --config.key=value ...`.

  Args:
    spec: 'configs/cifar10.py' or 'configs/cifar10.py:var_type=fixedsmall'.
    overrides: {'optim.lr': 1e-4, 'train.num_steps': 10}: dotted keys that must already exist.

  Returns:
    the ConfigDict.

  Raises:
    KeyError: for an override key the config does not have.
  """
  path, _, arg = spec.partition(":")
  file = resolve_path(path)
  module_spec = importlib.util.spec_from_file_location(f"diffusion_jax_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  for key, value in (overrides or {}).items():
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
      node = node[name]
    if leaf not in node:
      raise KeyError(f"config has no field {key!r}")
    if isinstance(node[leaf], tuple) and isinstance(value, list):
      value = tuple(value)
    node[leaf] = value
  return config
