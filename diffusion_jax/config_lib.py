"""Loading configs from Python: what `--config file.py:arg --config.a.b=value` does on the
command line, for notebooks, scripts and tests."""
from __future__ import annotations

import importlib.util
import pathlib
from typing import Any, Mapping

import ml_collections

def eval_defaults() -> ml_collections.ConfigDict:
  """The `config.eval` section: settings of --mode sample / eval / progressive / interpolate."""
  return ml_collections.ConfigDict(dict(
      batch_size=256,        # global, over all devices (rounded up to a multiple of them)
      num_samples=50_000,    # for --mode sample and for FID / Inception Score
      ddim_steps=0,          # 0 = ancestral sampling over all T steps; K > 0 = DDIM, K steps
      ddim_eta=0.0,
      seed=0,
      bpd_split="test",      # split for bits/dim ('' = skip) and for interpolation images
      bpd_max_examples=0,    # 0 = the whole split
      fid_splits=("train", "test"),
      fid_stats_dir="",      # where reference statistics are cached ('' = WORKDIR/eval/stats)
      fid_stats_train="",    # TTUR-format .npz (mu, sigma) to use instead of computing them
      fid_stats_test="",
      fid_max_real=0,        # 0 = every example of a split
      inception_weights="",  # .npz made by diffusion_jax.metrics.convert_inception
      inception_size=299,    # input size of the Inception network (pytorch-fid: 299)
      is_splits=10,
      digits_classifier_dir="",  # dataset 'digits': classifier cache ('' = WORKDIR/eval)
      digits_confidence=0.9,     # probability a digit label needs to count as confident
      watch=False,           # evaluate every new checkpoint until training ends
      watch_poll_s=60.0,
      watch_timeout_s=3600.0,
      progressive_freq=50,
      progressive_num=8,
      interp_t=500,
      interp_pairs=4,
      interp_steps=9,
  ))


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


def sibling_module(config_file: str, name: str):
  """Loads `name`.py from the directory of `config_file` (config files are not a package).

  A config starts with `default = config_lib.sibling_module(__file__, "default")`, so a copied
  configs/ directory keeps working with its own default.py.
  """
  path = pathlib.Path(config_file).resolve().with_name(f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"diffusion_jax_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


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
