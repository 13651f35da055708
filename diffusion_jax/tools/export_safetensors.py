"""Writes the parameters of a diffusion_jax checkpoint as one `.safetensors` file.

  python -m diffusion_jax.tools.export_safetensors --workdir runs/cifar10 --out cifar10.safetensors
  python -m diffusion_jax.tools.export_safetensors --workdir runs/cifar10 --names tf \
      --params raw --step 400000 --out cifar10_raw.safetensors

The file holds float32 tensors named by one of the name maps of the model's architecture
(`--names`):

  diffusers  DDPM's U-Net as diffusers' UNet2DModel state dict (`models.diffusers_names`:
             `down_blocks.1.attentions.0.to_q.weight`, ...); the default for model.architecture
             'ddpm'. `UNet2DModel.load_state_dict(safetensors.torch.load_file(path))` loads it
             into the model `convert_diffusers --to_diffusers` describes.
  tf         DDPM's U-Net by the authors' TF variable names (`models.tf_names`:
             `model/down_1/attn_0/q/W`, ...).
  torch      Improved DDPM's U-Net as the reference UNetModel's state dict (`models.torch_names`:
             `input_blocks.3.1.qkv.weight`, ...); the default for model.architecture 'iddpm'.

Layout: PyTorch's, whatever the names: convolutions [O, I, kh, kw] (ours are [kh, kw, I, O]),
dense layers [O, I] (ours [I, O]), vectors as they are; with diffusers' names the 1x1 shortcut
is a convolution [O, I, 1, 1] and with torch's names the attention's qkv and proj_out are
conv1d [O, I, 1], as those models hold them. The file's metadata records the names, the layout,
the step, which parameters (`ema` or `raw`) and the config (JSON). Written with safetensors'
NumPy API: no PyTorch needed. An existing `--out` is never replaced.

A mistake (a flag, no checkpoint, names the architecture does not have) ends the command with
one `error:` line, exit status 2.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Sequence

import numpy as np
from absl import app
from absl import flags

from diffusion_jax import cli
from diffusion_jax.evaluation import inference
from diffusion_jax import models
from diffusion_jax.tools import convert_diffusers

LAYOUT = "pytorch"


class ExportError(ValueError):
  """The checkpoint cannot be written with the names asked for."""


def name_maps(architecture: str) -> tuple[str, ...]:
  """The names an architecture's parameters can be written with (its entry's name maps), the
  default first."""
  return tuple(models.get(architecture).name_maps)


def named_tensors(params, architecture: str, names: str) -> dict[str, np.ndarray]:
  """Our parameter tree as {name: float32 array in PyTorch's layout}, by the name map `names` of
  the architecture (`models.name_map`: 'diffusers' or 'tf' for DDPM's U-Net, 'torch' for
  Improved DDPM's).

  Raises:
    ExportError: for names the architecture does not have.
  """
  allowed = name_maps(architecture)
  if names not in allowed:
    raise ExportError(f"--names={names}: model.architecture={architecture!r} is written with "
                      f"{' or '.join(allowed) or 'none of our name maps'}")
  return models.name_map(architecture, names).state_dict_from_params(params)


def export(workdir: str, out: str, *, names: str | None = None, step: int | None = None,
           ema: bool = True) -> pathlib.Path:
  """Writes a checkpoint's parameters to the new file `out`; returns its path.

  Args:
    workdir: a diffusion_jax workdir.
    out: the .safetensors file to create.
    names: the name map (default: the architecture's first in `NAMES`).
    step: which checkpoint (default: the newest).
    ema: the EMA parameters (default) or the raw ones.
  """
  path = convert_diffusers.local_output(out)
  if path.exists():
    raise FileExistsError(f"{path} exists; choose a new --out")
  loaded = inference.load(workdir, step=step, ema=ema)
  architecture = loaded.config.model.get("architecture", "ddpm")
  names = names or (name_maps(architecture) or ("",))[0]
  tensors = named_tensors(loaded.params, architecture, names)
  save_file = convert_diffusers.safetensors_numpy().save_file
  metadata = {"format": "pt", "names": names, "layout": LAYOUT, "step": str(loaded.step),
              "params": "ema" if ema else "raw", "architecture": architecture,
              "config": json.dumps(loaded.config.to_dict(), default=str)}
  partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
  try:
    save_file(tensors, str(partial), metadata=metadata)
    if path.exists():
      raise FileExistsError(f"{path} appeared while exporting; choose a new --out")
    partial.rename(path)
  finally:
    partial.unlink(missing_ok=True)
  print(f"wrote {len(tensors)} tensors ({names} names, PyTorch layout) of step {loaded.step} "
        f"({'EMA' if ema else 'raw'} parameters) -> {path}")
  return path


_PROG = "python -m diffusion_jax.tools.export_safetensors"


def _define_flags(values: flags.FlagValues, argv: list[str]) -> None:
  del argv
  flags.DEFINE_string("workdir", None, "The workdir whose checkpoint to export.",
                      flag_values=values)
  flags.DEFINE_string("out", None, "The .safetensors file to write (a new file).",
                      flag_values=values)
  flags.DEFINE_enum("names", None, ["diffusers", "tf", "torch"], "The tensors' names (default: "
                    "diffusers for DDPM's U-Net, torch for Improved DDPM's).", flag_values=values)
  flags.DEFINE_integer("step", None, "The checkpoint (default: the newest).", flag_values=values)
  flags.DEFINE_enum("params", "ema", ["ema", "raw"], "The EMA parameters (what samples use) or "
                    "the raw ones.", flag_values=values)


@cli.reports_errors(ExportError, FileExistsError, ImportError)
def main(argv: Sequence[str] | None = None) -> None:
  """The command line (`argv`: the arguments, default `sys.argv[1:]`). Mistakes end it with one
  `error:` line, exit 2."""
  args = cli.parse_own_flags(_define_flags, argv, prog=_PROG, doc=__doc__)
  for name in ("workdir", "out"):
    if not args[name].value:
      raise app.UsageError(f"--{name} is required")
  export(args.workdir, args.out, names=args.names, step=args.step, ema=args.params == "ema")


if __name__ == "__main__":
  main()
