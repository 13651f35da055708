"""The names of the authors' TensorFlow variables for DDPM's U-Net (`models.unet`).

Our module names are the original's variable scopes, so the mapping is a rule on the leaf:
`tf_variable_name` and its inverse `flax_param_path` (used by tools/convert_tf_checkpoint.py).
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from diffusion_jax.models import layers


_LEAF_TO_TF = {"kernel": "W", "bias": "b"}
_NORM_LEAF_TO_TF = {"scale": "gamma", "bias": "beta"}
_TF_TO_LEAF = {v: k for k, v in _LEAF_TO_TF.items()}
_TF_TO_NORM_LEAF = {v: k for k, v in _NORM_LEAF_TO_TF.items()}


def _is_norm(module_name: str) -> bool:
  # GroupNorms are exactly the modules named norm, norm1, norm2 and norm_out.
  return module_name.startswith("norm")


def tf_variable_name(param_path: Sequence[str] | str) -> str:
  """Name of the original TF variable holding one of our parameters.

  The rule: prefix `model/`, keep every module name (they are the original's variable
  scopes), and rename the leaf: Conv/Dense `kernel` -> `W`, `bias` -> `b`; GroupNorm
  (modules named `norm*`) `scale` -> `gamma`, `bias` -> `beta`. Shapes need no change: TF conv
  `W` is [kh, kw, in, out] like a flax Conv kernel, and TF `nin`/`dense` `W` is [in, out]
  like a flax Dense kernel (our 1x1 layers are Dense).

  Args:
    param_path: path inside `variables['params']`, as a tuple of keys or a '/'-joined string;
      a leading 'params' is ignored.

  Returns:
    e.g. 'model/down_0/block_0/conv1/W' for ('down_0', 'block_0', 'conv1', 'kernel').
  """
  parts = param_path.split("/") if isinstance(param_path, str) else list(param_path)
  if parts and parts[0] == "params":
    parts = parts[1:]
  if len(parts) < 2:
    raise ValueError(f"not a parameter path: {param_path!r}")
  *modules, leaf = parts
  table = _NORM_LEAF_TO_TF if _is_norm(modules[-1]) else _LEAF_TO_TF
  if leaf not in table:
    raise ValueError(f"unknown parameter {leaf!r} in {param_path!r}")
  return "/".join(["model", *modules, table[leaf]])


def flax_param_path(tf_name: str) -> tuple[str, ...]:
  """Inverse of `tf_variable_name`: a TF variable name to our params path (no 'params').

  Args:
    tf_name: e.g. 'model/mid/attn_1/q/W' (a trailing ':0' is accepted).

  Returns:
    e.g. ('mid', 'attn_1', 'q', 'kernel').
  """
  name = tf_name.split(":")[0]
  parts = name.split("/")
  if len(parts) < 3 or parts[0] != "model":
    raise ValueError(f"not a U-Net variable name: {tf_name!r}")
  *modules, leaf = parts[1:]
  table = _TF_TO_NORM_LEAF if _is_norm(modules[-1]) else _TF_TO_LEAF
  if leaf not in table:
    raise ValueError(f"unknown variable {leaf!r} in {tf_name!r}")
  return (*modules, table[leaf])


def state_dict_from_params(params) -> dict[str, np.ndarray]:
  """Our parameter tree as {TF variable name: float32 array in PyTorch's layout}
  (`layers.to_torch_layout`), for exports that keep the authors' names."""
  out = {}
  for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = tuple(k.key for k in path)
    out[tf_variable_name(keys)] = layers.to_torch_layout(np.asarray(value, np.float32), keys)
  return out

