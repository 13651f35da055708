"""Checkpoints for the evaluation tests, built without training."""
import os

import jax
import numpy as np

from diffusion_jax.config import build
from diffusion_jax.training import checkpoints


def randomized_checkpoint(config, workdir, step: int):
  """Saves WORKDIR/checkpoints/<step> whose EMA weights are the init plus N(0, 0.05^2) noise
  (the real init's output layer is zero, which would make every sample independent of the
  model), with `config`; returns the EMA parameters."""
  model = build.make_model(config)
  params = jax.jit(lambda k: build.init_params(config, model, k))(jax.random.key(0))
  leaves, treedef = jax.tree_util.tree_flatten(params)
  rng = np.random.default_rng(0)
  noisy = [np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32)
           for x in leaves]
  ema = jax.tree_util.tree_unflatten(treedef, noisy)
  saver = checkpoints.Checkpointer(os.fspath(workdir / "checkpoints"), async_save=False)
  saver.save(step, {"step": np.int32(step), "params": params, "ema_params": ema},
             config.to_dict())
  saver.close()
  return ema
