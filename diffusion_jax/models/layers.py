"""What the U-Nets share: per-example dropout, the parameter table and PyTorch's layout of a
parameter (for the name maps of PyTorch-format checkpoints)."""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from diffusion_jax.core import prng


def example_dropout(h_BxHxWxC, rate: float, keys_B, site: int):
  """Inverted dropout with one key per example: mask b is bernoulli(fold_in(keys_B[b], site))."""
  keep = 1.0 - rate
  keep_B = jax.vmap(lambda k: jax.random.bernoulli(k, keep, h_BxHxWxC.shape[1:]))(
      prng.fold_in_each(keys_B, site))
  return lax.select(keep_B, h_BxHxWxC / jnp.asarray(keep, h_BxHxWxC.dtype),
                    jnp.zeros_like(h_BxHxWxC))


def count_params(params_tree) -> int:
  """Total number of scalars in a pytree of arrays or ShapeDtypeStructs.

  Args:
    params_tree: e.g. `variables['params']`, or the output of `jax.eval_shape(model.init, ...)`.

  Returns:
    the parameter count.
  """
  return int(sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params_tree)))


def param_table(params, order: Sequence[str]) -> str:
  """The parameter count of each top-level module of `params`, in `order`, then the total.

  Returns:
    a multi-line table ending with the line `total params: N` (N comma-formatted).
  """
  width = max(len(name) for name in order)
  lines = [f"{'block':<{width}}  {'params':>12}"]
  for name in order:
    lines.append(f"{name:<{width}}  {count_params(params[name]):>12,}")
  lines.append(f"total params: {count_params(params):,}")
  return "\n".join(lines)


def to_torch_layout(value, path: Sequence[str], *, conv1d: Sequence[str] = (),
                    conv1x1: Sequence[str] = ()) -> np.ndarray:
  """One of our parameters in PyTorch's layout: a convolution's kernel [kh, kw, I, O] ->
  [O, I, kh, kw]; a Dense kernel [I, O] -> a linear layer's [O, I], or a 1-wide conv1d's
  [O, I, 1] for the modules named in `conv1d`, or a 1x1 conv2d's [O, I, 1, 1] for those in
  `conv1x1`; biases, norms and embeddings as they are.

  Args:
    value: the array.
    path: its path in our parameter tree (module names, then the leaf's).
    conv1d, conv1x1: the module names whose Dense kernels the format stores as convolutions.
  """
  value = np.asarray(value)
  if path[-1] != "kernel":
    return value
  if value.ndim == 4:
    return np.ascontiguousarray(np.transpose(value, (3, 2, 0, 1)))
  if value.ndim != 2:
    return value
  if path[-2] in conv1d:
    return np.ascontiguousarray(value.T[:, :, None])
  if path[-2] in conv1x1:
    return np.ascontiguousarray(value.T[:, :, None, None])
  return np.ascontiguousarray(value.T)

