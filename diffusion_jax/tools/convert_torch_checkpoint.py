"""Converts a released PyTorch checkpoint of Improved DDPM (openai/improved-diffusion) into a
diffusion_jax checkpoint.

  python -m diffusion_jax.tools.convert_torch_checkpoint \
      --checkpoint cifar10_uncond_50M_500K.pt --out runs/cifar10_iddpm_released

The released files hold the U-Net's state dict. Every tensor is mapped one to one onto our
parameters by `models.torch_names.params_from_torch` (`input_blocks.3.0.in_layers.2.weight` ->
`input_blocks_3_0/in_layers_2/kernel`, kernels transposed to our layout), checked against the
shapes the config builds, and written to `OUT/checkpoints/<step>/` in the layout of
`diffusion_jax.training.checkpoints` (the parameters as both params and ema_params, the step and the
config; no optimizer state, so the result is for sampling and evaluation), which every `--mode` of
`diffusion_jax.main` loads with `--workdir OUT`.

The config: for the released files (`RELEASES`, recognised by their file name) the one their
flags in the reference's README describe; any other checkpoint needs `--config` (a file, or a
shipped config's name, as for `diffusion_jax.main`; `--config.a.b=value` overrides one of its
fields). PyTorch reads the file (`pip install -e ".[torch]"`); nothing else here uses it, and our
own formats stay free of pickles. A mistake (a flag, a missing file, a config that builds another
model) ends the command with one `error:` line, exit status 2.
"""
from __future__ import annotations

import functools
import pathlib
from typing import Sequence

import jax
import numpy as np
from absl import app
from absl import flags
from etils import epath
from ml_collections import config_flags

from diffusion_jax import cli
from diffusion_jax.config import build
from diffusion_jax.config import config_lib
from diffusion_jax import models
from diffusion_jax.training import checkpoints

# The released checkpoints (upsample_cond_500K, a super-resolution model, is not among them):
# file name -> (the config of its README flags, its training step).
RELEASES = {
    "cifar10_uncond_50M_500K": ("configs/cifar10_iddpm.py", 500_000),
    "cifar10_uncond_vlb_50M_500K": ("configs/cifar10_iddpm.py:variant=vlb", 500_000),
    "imagenet64_uncond_100M_1500K": ("configs/imagenet64_iddpm.py", 1_500_000),
    "imagenet64_uncond_vlb_100M_1500K": ("configs/imagenet64_iddpm.py:variant=vlb", 1_500_000),
    "imagenet64_cond_270M_250K": ("configs/imagenet64_iddpm.py:variant=cond", 250_000),
    "lsun_uncond_100M_1200K_bs128": ("configs/lsun_bedroom_iddpm.py", 1_200_000),
    "lsun_uncond_100M_2400K_bs64": ("configs/lsun_bedroom_iddpm.py:variant=lr2e-5", 2_400_000),
}


class CheckpointMismatchError(ValueError):
  """The state dict's tensors do not match the parameters the config builds."""


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """A PyTorch state dict file as {name: float32 NumPy array} (tensors only, no code run)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('reading a PyTorch checkpoint needs PyTorch: pip install -e ".[torch]" '
                      "(or pip install torch)") from e
  if not epath.Path(path).exists():
    raise FileNotFoundError(f"no PyTorch checkpoint at {path}")
  with epath.Path(path).open("rb") as f:
    loaded = torch.load(f, map_location="cpu", weights_only=True)
  if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor)
                                             for v in loaded.values()):
    raise ValueError(f"{path} does not hold a state dict (a dict of tensors): the released "
                     f"files of openai/improved-diffusion do")
  return {name: value.detach().to(torch.float32).numpy() for name, value in loaded.items()}


def release_config(checkpoint: str):
  """(config, step) of a released checkpoint, recognised by its file name; None if unknown."""
  name = pathlib.PurePath(checkpoint).stem
  if name not in RELEASES:
    return None
  spec, step = RELEASES[name]
  return config_lib.load_config(spec), step


def convert_state_dict(state_dict: dict[str, np.ndarray], config):
  """Our parameter tree from a state dict, for the U-Net `config` builds.

  Raises:
    CheckpointMismatchError: naming the missing, unexpected and misshapen tensors, and the
      config to use.
  """
  try:
    names = models.name_map(config.model.architecture, "torch")
  except ValueError as e:
    raise CheckpointMismatchError(f"{e} (configs/*_iddpm.py)") from None
  model = build.make_model(config)
  abstract = jax.eval_shape(functools.partial(build.init_params, config, model),
                            jax.random.key(0))
  try:
    return names.params_from_torch(state_dict, abstract)
  except ValueError as e:
    releases = ", ".join(f"{spec} for {name}" for name, (spec, _) in RELEASES.items())
    raise CheckpointMismatchError(
        f"the PyTorch checkpoint does not match the model this config builds: {e}. Use the "
        f"config the checkpoint was trained with ({releases})") from e


def convert(checkpoint: str, config, out: str, step: int = 0) -> int:
  """Converts a state dict file to `out/checkpoints/<step>`; returns the number of tensors."""
  checkpoints.check_new_workdir(out)
  state_dict = read_state_dict(checkpoint)
  params = convert_state_dict(state_dict, config)
  # The released files hold the EMA weights the reference samples with: params and EMA alike.
  out_dir = checkpoints.save_converted(out, step, params, params, config)
  print(f"converted {checkpoint} (step {step}, {len(state_dict)} tensors) -> {out_dir}")
  return len(state_dict)


_PROG = "python -m diffusion_jax.tools.convert_torch_checkpoint"


def _define_flags(values: flags.FlagValues, argv: list[str]) -> None:
  """The converter's flags, into `values` (`argv`: the command line, for the config flag)."""
  config_flags.DEFINE_config_file(
      "config", None, "The config the checkpoint was trained with (configs/*_iddpm.py[:argument], "
      "or a shipped config's name); default: the released checkpoint's, from its file name. "
      "Override its fields with --config.a.b=value.",
      flag_values=values, lock_config=True, sys_argv=argv)
  flags.DEFINE_string("checkpoint", None, "The PyTorch state dict file (.pt).",
                      flag_values=values)
  flags.DEFINE_string("out", None, "Output workdir (a new directory).", flag_values=values)
  flags.DEFINE_integer("step", None, "The step to record (default: a released checkpoint's "
                       "training steps, else 0).", flag_values=values)


@cli.reports_errors(CheckpointMismatchError, FileExistsError, ImportError)
def main(argv: Sequence[str] | None = None) -> None:
  """The command line: converts --checkpoint into --out (`argv`: the arguments, default
  `sys.argv[1:]`). Mistakes end it with one `error:` line, exit 2."""
  args = cli.parse_own_flags(_define_flags, argv, prog=_PROG, doc=__doc__, config_flag="config")
  for name in ("checkpoint", "out"):
    if not args[name].value:
      raise app.UsageError(f"--{name} is required")
  release = release_config(args.checkpoint)
  config, step = args.config, 0
  if release is not None:
    step = release[1]
    if config is None:
      config = release[0]
  if config is None:
    raise app.UsageError(
        f"{pathlib.PurePath(args.checkpoint).name} is not one of the released checkpoints "
        f"({', '.join(RELEASES)}): pass --config with the config it was trained with")
  convert(args.checkpoint, config, args.out, step if args.step is None else args.step)


if __name__ == "__main__":
  main()
