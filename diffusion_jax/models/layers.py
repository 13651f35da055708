"""What the U-Nets share: per-example dropout and the parameter table."""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
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
