"""The names of Improved DDPM's PyTorch state dict for its U-Net (`models.iddpm_unet`).

`torch_name` and its inverse `param_path` map one name onto the other (numbered parts joined to
the name before them: `input_blocks.3.0.in_layers.2.weight` is our
`input_blocks_3_0/in_layers_2/kernel`); `match_state_dict` and `params_from_torch` check a state
dict's shapes against the model's and convert its arrays (used by
tools/convert_torch_checkpoint.py).
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import jax
import numpy as np

from diffusion_jax.models import layers


# Our leaf -> PyTorch's, by module kind; GroupNorms are the modules named norm, in_layers_0,
# out_layers_0 and out_0.
_NORMS = re.compile(r"^(norm|in_layers_0|out_layers_0|out_0)$")


def torch_name(path: Sequence[str] | str) -> str:
  """The reference state dict's name of one of our parameters.

  Args:
    path: the parameter's path in `variables['params']`, as keys or '/'-joined (a leading
      'params' is ignored), e.g. ('input_blocks_3_0', 'in_layers_2', 'kernel').

  Returns:
    e.g. 'input_blocks.3.0.in_layers.2.weight'.
  """
  parts = path.split("/") if isinstance(path, str) else list(path)
  if parts and parts[0] == "params":
    parts = parts[1:]
  if len(parts) < 2 or parts[-1] not in ("kernel", "bias", "scale", "embedding"):
    raise ValueError(f"not a parameter path: {path!r}")
  modules = [re.sub(r"_(\d+)", r".\1", name) for name in parts[:-1]]
  leaf = "bias" if parts[-1] == "bias" else "weight"
  return ".".join(modules + [leaf])


def param_path(name: str) -> tuple[str, ...]:
  """Inverse of `torch_name`: a state dict name to our parameter path.

  Args:
    name: e.g. 'middle_block.1.qkv.weight'.

  Returns:
    e.g. ('middle_block_1', 'qkv', 'kernel').
  """
  parts = name.split(".")
  if len(parts) < 2 or parts[-1] not in ("weight", "bias"):
    raise ValueError(f"not a state dict parameter name: {name!r}")
  modules = []
  for part in parts[:-1]:
    if part.isdigit() and modules:
      modules[-1] += "_" + part
    else:
      modules.append(part)
  if parts[-1] == "bias":
    leaf = "bias"
  elif modules[-1] == "label_emb":
    leaf = "embedding"
  elif _NORMS.match(modules[-1]):
    leaf = "scale"
  else:
    leaf = "kernel"
  return (*modules, leaf)


def _to_ours(value: np.ndarray, leaf: str) -> np.ndarray:
  # conv2d [O, I, kh, kw] -> [kh, kw, I, O]; conv1d with a 1-wide kernel [O, I, 1] (qkv,
  # proj_out) and linear [O, I] -> Dense [I, O]; vectors and embeddings as they are.
  if leaf != "kernel":
    return value
  if value.ndim == 4:
    return np.transpose(value, (2, 3, 1, 0))
  if value.ndim == 3 and value.shape[-1] == 1:
    return value[..., 0].T
  return value.T if value.ndim == 2 else value


# What a mismatch in these tensors most likely means.
_HINTS = (("label_emb", "model.num_classes (class labels)"),
          ("emb_layers", "model.scale_shift_norm (its emb_layers are twice as wide)"),
          ("qkv", "model.attn_resolutions or the heads"),
          ("out.2.", "diffusion.var_type (a learned variance has 2C outputs)"),
          ("_blocks.", "model.ch, model.ch_mult or model.num_res_blocks"))


def _our_shape(shape: Sequence[int], leaf: str) -> tuple[int, ...]:
  # The shape `_to_ours` gives a tensor of this shape.
  shape = tuple(shape)
  if leaf != "kernel":
    return shape
  if len(shape) == 4:
    return (shape[2], shape[3], shape[1], shape[0])
  if len(shape) == 3 and shape[-1] == 1:
    return (shape[1], shape[0])
  return shape[::-1] if len(shape) == 2 else shape


def mismatch_summary(missing: Sequence[str], unexpected: Sequence[str],
                     misshapen: Sequence[str]) -> str:
  """One line counting and naming (the first 6 of each) the missing, unexpected and misshapen
  tensors of a state dict; '' when all three are empty."""
  problems = []
  for what, names in (("missing", missing), ("unexpected", unexpected),
                      ("with another shape", misshapen)):
    if names:
      shown = ", ".join(names[:6]) + (f" (and {len(names) - 6} more)" if len(names) > 6 else "")
      problems.append(f"{len(names)} {what}: {shown}")
  return "; ".join(problems)


def match_state_dict(shapes: Mapping[str, Sequence[int]], abstract_params
                     ) -> dict[str, tuple[str, ...]]:
  """Pairs every tensor of a reference state dict with one of our parameters, by name and shape.

  Args:
    shapes: {state dict name: its shape}.
    abstract_params: our parameter tree (arrays or ShapeDtypeStructs) for the intended config.

  Returns:
    {state dict name: our parameter path}.

  Raises:
    ValueError: naming every missing, unexpected and misshapen tensor (name, its shape, our path
      and shape), and the settings that probably differ.
  """
  flat = {tuple(k.key for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
  expected = {torch_name(path): path for path in flat}
  missing = [f"{name} (our {'/'.join(path)} {flat[path]})"
             for name, path in sorted(expected.items()) if name not in shapes]
  unexpected = [f"{name} {tuple(shape)}" for name, shape in sorted(shapes.items())
                if name not in expected]
  misshapen = [f"{name} {tuple(shapes[name])} for our {'/'.join(path)} {flat[path]}"
               for name, path in sorted(expected.items())
               if name in shapes and _our_shape(shapes[name], path[-1]) != flat[path]]
  text = mismatch_summary(missing, unexpected, misshapen)
  if text:
    hints = [hint for key, hint in _HINTS if key in text]
    raise ValueError(text + (f". Settings that may differ: {', '.join(hints)}" if hints else ""))
  return expected


def params_from_torch(state_dict: Mapping[str, np.ndarray], abstract_params) -> dict:
  """Our parameter tree from a reference state dict, checked against the model's shapes
  (`match_state_dict`, whose ValueError names every mismatch).

  Args:
    state_dict: {name: array} of the reference UNetModel.
    abstract_params: our parameter tree (arrays or ShapeDtypeStructs) for the intended config.

  Returns:
    nested dict of float32 NumPy arrays in our layout.
  """
  mapping = match_state_dict({name: np.shape(value) for name, value in state_dict.items()},
                             abstract_params)
  tree = {}
  for name, path in mapping.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    value = np.asarray(state_dict[name], np.float32)
    node[path[-1]] = np.ascontiguousarray(_to_ours(value, path[-1]))
  return tree


# Our Dense kernels that the reference stores as 1-wide conv1d kernels [O, I, 1].
_CONV1D = ("qkv", "proj_out")


def to_torch_layout(value: np.ndarray, path: Sequence[str]) -> np.ndarray:
  """One of our arrays in the reference's layout (the inverse of the layout change
  `params_from_torch` makes; `layers.to_torch_layout`, the attention's `qkv` and `proj_out` as
  1-wide conv1d kernels)."""
  return layers.to_torch_layout(value, path, conv1d=_CONV1D)


def state_dict_from_params(params) -> dict[str, np.ndarray]:
  """The reference UNetModel's state dict (float32, its names and layout) from our parameter
  tree: what `params_from_torch` reads back unchanged."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  out = {}
  for path, value in flat:
    keys = tuple(k.key for k in path)
    out[torch_name(keys)] = to_torch_layout(np.asarray(value, np.float32), keys)
  return out
