"""What every sampler shares: one key per example, the noise each step draws from it, and the
x_0 predictions a progressive run keeps."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.core import prng
from diffusion_jax.core.schedules import Schedule


def check_keys(keys, shape):
  """`shape` as ints, after checking there is one key per example."""
  shape = tuple(int(d) for d in shape)
  if prng.num_keys(keys) != shape[0]:
    raise ValueError(f"need one key per example: {prng.num_keys(keys)} keys for shape {shape}")
  return shape


def initial_noise(keys, shape, sched: Schedule):
  """x_T of each example, keyed by T."""
  return prng.normal_each(prng.fold_in_each(keys, sched.base_num_timesteps), shape[1:])


def step_noise(keys, sched: Schedule, t, x):
  """The noise of the step leaving entry t (a scalar) of `sched`, keyed by its original step."""
  return prng.normal_each(prng.fold_in_each(keys, sched.original_timesteps(t)), x.shape[1:],
                          x.dtype)


def prediction_slots(num_calls: int, every: int) -> np.ndarray:
  """Where each of `num_calls` network calls keeps its x_0 prediction in a progressive run:
  every `every`-th call counted back from the last one fills one of N = num_calls // every
  slots, noisiest first (the last call fills slot N - 1); the others get -1.

  Returns:
    int32 [num_calls].
  """
  if not 1 <= every <= num_calls:
    raise ValueError(f"x_0 predictions every {every} calls: keep it in 1..{num_calls}, the "
                     f"network calls of the run")
  back = num_calls - 1 - np.arange(num_calls)
  slot = num_calls // every - 1 - back // every
  return np.where((back % every == 0) & (slot >= 0), slot, -1).astype(np.int32)


def empty_predictions(x, num_slots: int):
  """Zeros [B, num_slots, ...] for a progressive run's x_0 predictions, varying over the mesh as
  x does (a `lax.scan` carry keeps one type)."""
  return jnp.broadcast_to((x * 0)[:, None], (x.shape[0], num_slots) + x.shape[1:])


def keep_prediction(preds, slot, pred):
  """`preds` with `pred` [B, ...] written to slot `slot` (a traced scalar) when it is >= 0."""
  updated = jax.lax.dynamic_update_index_in_dim(preds, pred.astype(preds.dtype),
                                                jnp.maximum(slot, 0), axis=1)
  return jnp.where(slot >= 0, updated, preds)
