"""Per-example randomness.

Every random draw of the samplers and of training is made from one key per example, folded with
an integer (a timestep, a step number), so the numbers an example gets do not depend on which
device holds it or on how many devices share the batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def fold_in_each(keys: jax.Array, data) -> jax.Array:
  """Folds the same integer `data` (a Python int or a traced scalar) into each of `keys` [B]."""
  return jax.vmap(lambda key: jax.random.fold_in(key, data))(keys)


def normal_each(keys: jax.Array, sample_shape, dtype=jnp.float32) -> jax.Array:
  """One standard normal array of `sample_shape` per key: [B] keys -> [B, *sample_shape]."""
  return jax.vmap(lambda key: jax.random.normal(key, tuple(sample_shape), dtype))(keys)


def num_keys(keys: jax.Array) -> int:
  """Number of keys in a key array: typed keys [B], or raw uint32 keys [B, 2]."""
  if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
    if keys.ndim != 1:
      raise ValueError(f"keys must be a 1-D key array [B], got shape {keys.shape}")
    return keys.shape[0]
  if keys.ndim != 2:
    raise ValueError(f"keys must be a key array [B] (jax.random.key) or raw keys [B, 2], got "
                     f"shape {keys.shape}")
  return keys.shape[0]


def varying_like_keys(tree, keys: jax.Array):
  """Returns `tree` unchanged in value, but marked as varying wherever `keys` varies.

  Under `jax.shard_map` a value built without the (sharded) keys, such as a zero buffer or noise
  shared by the whole batch, is device-invariant, while the loop state computed from the keys
  varies over the mesh axis; a `lax.scan` carry must have one type throughout. Adding a zero
  derived from the keys gives the initial value the keys' type. Outside shard_map it is a no-op.
  """
  data = jax.random.key_data(keys) if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key) else keys
  zero = (data.reshape(data.shape[0], -1)[:, 0] * 0).astype(jnp.float32)
  return jax.tree_util.tree_map(
      lambda x: x + zero.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype), tree)
