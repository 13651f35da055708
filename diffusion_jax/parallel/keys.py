"""Keys over the mesh: `core.prng`'s per-example keys split like a batch, and a replicated key."""
from __future__ import annotations

import jax
import numpy as np

from diffusion_jax.core import prng
from diffusion_jax.parallel import mesh as mesh_lib


def sharded_example_keys(seed: int, stream: prng.RunStream, indices: np.ndarray,
                         mesh) -> jax.Array:
  """`prng.example_keys(prng.run_key(seed, stream), indices)` of a global batch of example
  indices, split over the mesh like a batch; each process computes only its own rows' keys."""
  rows = mesh_lib.host_rows(mesh, len(indices))
  local = prng.example_keys(prng.run_key(seed, stream), np.asarray(indices)[rows])
  data = mesh_lib.global_batch(np.asarray(jax.random.key_data(local)), mesh, len(indices))
  return jax.random.wrap_key_data(data)


def replicated_key(key: jax.Array, mesh) -> jax.Array:
  """A typed key (the same on every process) replicated on every device of the mesh."""
  return jax.random.wrap_key_data(
      mesh_lib.replicate(np.asarray(jax.random.key_data(key)), mesh))
