"""Time the checksums a checkpoint save adds, at the size of a config's train state.

  python benchmarks/checkpoint_checksums.py configs/cifar10.py

Builds the state's shapes without compiling (params, ema_params and the optimizer state),
fills them with random values on the default device, then times `array_checksums` (the
device-to-host copy plus CRC-32 of every array), as `Checkpointer.save` runs it.
"""
import sys
import time

import jax
import numpy as np

from diffusion_jax.config import build
from diffusion_jax.config import config_lib
from diffusion_jax import parallel
from diffusion_jax.training import checkpoints
from diffusion_jax.training import step as train_step


def main(config_path: str, repeats: int = 3) -> None:
  config = config_lib.load_config(config_path)
  mesh = parallel.make_mesh(jax.devices()[:1])
  model, optimizer = build.make_model(config), build.make_optimizer(config)
  abstract = train_step.abstract_state(config, model, optimizer, mesh).to_dict()
  rng = np.random.default_rng(0)
  state = jax.tree_util.tree_map(
      lambda s: jax.device_put(rng.standard_normal(s.shape).astype(s.dtype)), abstract)
  jax.block_until_ready(state)
  num_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
  params = sum(x.size for x in jax.tree_util.tree_leaves(state["params"]))
  print(f"{config_path}: {params:,} parameters; state {num_bytes / 1e6:.0f} MB on "
        f"{jax.devices()[0].device_kind}")
  for _ in range(repeats):
    start = time.perf_counter()
    checkpoints.array_checksums(state)
    seconds = time.perf_counter() - start
    print(f"checksums: {seconds:.3f} s ({num_bytes / seconds / 1e9:.2f} GB/s)")


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "configs/cifar10.py")
