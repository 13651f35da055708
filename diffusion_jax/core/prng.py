"""The one place random keys are derived.

Every random number of a run comes from `key(seed)`, folded with a named stream (one per use,
`RunStream`, so no two uses share numbers), then with each example's global index
(`example_keys`): an example's numbers depend on the seed, the use and its index only, never on
the batch it is in or on how many devices or hosts share that batch. Inside one example's key,
a training step draws its timestep, noise and dropout masks from `ExampleStream`s; a sampler
draws x_T from `fold_in(key, T)` and the noise leaving timestep t from `fold_in(key, t)` (and
interpolation and SDEdit their forward noises from T + 1 and T + 2, RePaint the noise of its
transitions from T + 1 folded with each transition's index); a dropout site folds in a hash of
its block's name. All keys are typed (`jax.random.key`); raw uint32 key data appears only where
a key array is assembled from each host's rows.

The stream values are part of what a seed means: changing one changes every run's numbers.
"""
from __future__ import annotations

import enum

import jax
import jax.numpy as jnp


class RunStream(enum.IntEnum):
  """Folded into `key(seed)`: one per use of randomness in a run."""
  INIT = 1         # the initial parameters
  TRAIN = 2        # the training steps (then folded with the step and each example's row)
  GRID = 3         # the sample grids written during training
  DISTILL = 4      # progressive distillation's steps (then the step and each example's row)
  SAMPLE = 11      # --mode sample, the samples of --mode eval, the notebook Sampler
  BPD = 12         # the bound's noise in bits/dim
  PROGRESSIVE = 13
  INTERPOLATE = 14
  EDIT = 15        # --mode edit and Sampler.edit (SDEdit)
  INPAINT = 16     # --mode inpaint and Sampler.inpaint (RePaint)


class ExampleStream(enum.IntEnum):
  """Folded into one example's key of a training step."""
  TIMESTEP = 0
  NOISE = 1
  DROPOUT = 2
  LABEL_DROP = 3   # classifier-free guidance's training: the label replaced by the null class


def run_key(seed: int, stream: RunStream) -> jax.Array:
  """The typed key of one use of randomness: fold_in(key(seed), stream)."""
  return jax.random.fold_in(jax.random.key(seed), int(stream))


def example_keys(base_key: jax.Array, indices) -> jax.Array:
  """One key per example: `base_key` folded with each example's global index.

  Args:
    base_key: a typed key (`run_key`, or the training key folded with the step).
    indices: int [n] global example indices (traced or concrete).

  Returns:
    typed keys [n].
  """
  indices = jnp.asarray(indices, jnp.uint32)
  return jax.vmap(lambda i: jax.random.fold_in(base_key, i))(indices)


def fold_in_each(keys: jax.Array, data) -> jax.Array:
  """Folds the same integer `data` (a Python int or a traced scalar) into each of `keys` [B]."""
  return jax.vmap(lambda key: jax.random.fold_in(key, data))(keys)


def normal_each(keys: jax.Array, sample_shape, dtype=jnp.float32) -> jax.Array:
  """One standard normal array of `sample_shape` per key: [B] keys -> [B, *sample_shape]."""
  return jax.vmap(lambda key: jax.random.normal(key, tuple(sample_shape), dtype))(keys)


def num_keys(keys: jax.Array) -> int:
  """Number of keys in a typed key array [B] (`jax.random.key`; raw uint32 data is refused)."""
  if not jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
    raise ValueError(f"keys must be a key array [B] of typed keys (jax.random.key), got "
                     f"{keys.dtype} of shape {keys.shape}; wrap raw key data with "
                     f"jax.random.wrap_key_data")
  if keys.ndim != 1:
    raise ValueError(f"keys must be a key array [B] (jax.random.key), got shape {keys.shape}")
  return keys.shape[0]


def varying_like_keys(tree, keys: jax.Array):
  """Returns `tree` unchanged in value, but marked as varying wherever `keys` varies.

  Under `jax.shard_map` a value built without the (sharded) keys, such as a zero buffer or noise
  shared by the whole batch, is device-invariant, while the loop state computed from the keys
  varies over the mesh axis; a `lax.scan` carry must have one type throughout. Adding a zero
  derived from the keys gives the initial value the keys' type. Outside shard_map it is a no-op.
  """
  zero = (jax.random.key_data(keys)[:, 0] * 0).astype(jnp.float32)
  return jax.tree_util.tree_map(
      lambda x: x + zero.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype), tree)
