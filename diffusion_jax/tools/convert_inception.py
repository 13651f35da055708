"""Converts pytorch-fid's FID Inception weights into the NumPy .npz that JAX code loads.

Get the weights (the TF `inception-2015-12-05` graph's, ported by pytorch-fid) from
    https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
then, once, with torch installed (pip install "diffusion_jax[inception]"):
    python -m diffusion_jax.tools.convert_inception \
        --torch_weights pt_inception-2015-12-05-6726825d.pth --out inception_fid.npz

Every tensor is checked against the Flax model's variables (names and shapes), so a file for a
different network fails here rather than at evaluation time. Afterwards only NumPy is needed:
`diffusion_jax.evaluation.metrics.inception.load_inception_params("inception_fid.npz")`.
A mistake (a missing flag or file, a file of another network) ends the command with one `error:`
line, exit status 2.
"""
from __future__ import annotations

import os
import sys
from typing import Mapping, Sequence

import numpy as np
from absl import app
from absl import flags

from diffusion_jax import cli
from diffusion_jax.evaluation.metrics import inception

__all__ = ["NotFidInceptionError", "expected_torch_shapes", "convert_state_dict",
           "load_torch_state_dict", "main"]

_PROG = "python -m diffusion_jax.tools.convert_inception"


class NotFidInceptionError(ValueError):
  """A state_dict that is not pytorch-fid's FID Inception network's."""


def _torch_layout_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  if path[-1] == "kernel" and len(shape) == 4:
    kh, kw, cin, cout = shape
    return (cout, cin, kh, kw)
  if path[-1] == "kernel" and len(shape) == 2:
    return shape[::-1]
  return shape


def expected_torch_shapes(model: inception.InceptionV3 | None = None) -> dict[str, tuple]:
  """torch state_dict key -> torch-layout shape for every variable of the Flax model.

  Traced with `jax.eval_shape`, so nothing is compiled or allocated.

  Args:
    model: the module (default `InceptionV3()`).

  Returns:
    dict of the 472 keys (without `num_batches_tracked`) to shapes.
  """
  import jax
  import jax.numpy as jnp
  from flax import traverse_util

  model = inception.InceptionV3() if model is None else model
  x = jax.ShapeDtypeStruct((1, inception.INCEPTION_SIZE, inception.INCEPTION_SIZE, 3),
                           jnp.float32)
  shapes = jax.eval_shape(lambda k, x: model.init(k, x), jax.random.key(0), x)
  return {inception.flax_to_torch_name(path): _torch_layout_shape(path, tuple(leaf.shape))
          for path, leaf in traverse_util.flatten_dict(shapes).items()}


def convert_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict:
  """Checks a torch-layout state_dict against the Flax model and converts it.

  Args:
    state_dict: torch key -> NumPy array (torch layout); `num_batches_tracked` is ignored.

  Returns:
    Flax variables {'params': ..., 'batch_stats': ...} of float32 arrays.

  Raises:
    NotFidInceptionError: listing missing or unexpected keys and mismatched shapes.
  """
  expected = expected_torch_shapes()
  given = {k: np.asarray(v) for k, v in state_dict.items()
           if not k.endswith("num_batches_tracked")}
  missing = sorted(set(expected) - set(given))
  unexpected = sorted(set(given) - set(expected))
  wrong = sorted(f"{k}: {given[k].shape} != {expected[k]}" for k in set(given) & set(expected)
                 if tuple(given[k].shape) != tuple(expected[k]))
  if missing or unexpected or wrong:
    raise NotFidInceptionError("not pytorch-fid's FID Inception state_dict:\n"
                     f"  missing: {missing[:10]}{' ...' if len(missing) > 10 else ''}\n"
                     f"  unexpected: {unexpected[:10]}"
                     f"{' ...' if len(unexpected) > 10 else ''}\n"
                     f"  wrong shapes: {wrong[:10]}")
  return inception.torch_state_dict_to_variables(given)


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a torch .pth state_dict into NumPy arrays (imports torch here, only here).

  Raises:
    FileNotFoundError: with the download URL, if `path` does not exist.
    ImportError: if torch is not installed.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{os.fspath(path)!r} not found; download it from {inception.FID_WEIGHTS_URL}")
  try:
    import torch
  except ImportError as e:
    raise ImportError("converting the weights needs torch: "
                      'pip install "diffusion_jax[inception]" (or pip install torch)') from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  return {k: v.detach().cpu().numpy() for k, v in state.items()}


def _define_flags(values: flags.FlagValues, argv: list[str]) -> None:
  """The converter's flags, into `values`."""
  del argv  # no config flag
  flags.DEFINE_string("torch_weights", None, "pytorch-fid's pt_inception-2015-12-05-6726825d.pth.",
                      flag_values=values)
  flags.DEFINE_string("out", None, "Output .npz (e.g. inception_fid.npz).", flag_values=values)


@cli.reports_errors(ImportError, NotFidInceptionError)
def main(argv: Sequence[str] | None = None) -> None:
  """The command line: converts --torch_weights into --out (`argv`: the arguments, default
  `sys.argv[1:]`). Mistakes end it with one `error:` line, exit 2."""
  args = cli.parse_own_flags(_define_flags, argv, prog=_PROG, doc=__doc__)
  for name in ("torch_weights", "out"):
    if not args[name].value:
      raise app.UsageError(f"--{name} is required")
  variables = convert_state_dict(load_torch_state_dict(args.torch_weights))
  inception.save_inception_params(args.out, variables)
  print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
  main()
