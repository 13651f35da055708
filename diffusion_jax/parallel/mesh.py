"""The 1-D data mesh over every device, and global batches.

One mesh axis, `data`, spans all devices of all hosts (`jax.devices()` order, so each host's
devices hold one contiguous block of rows). Parameters are replicated; batches are split along
`data`; per-device code runs under `jax.shard_map` and averages gradients with
`jax.lax.pmean(..., DATA_AXIS)`.
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh named `data` over the given devices (default: every device of every host)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch: int, num_devices: int, grad_accum_steps: int = 1) -> None:
  """Raises ValueError unless the global batch splits evenly over devices and micro-batches."""
  if global_batch <= 0 or global_batch % (num_devices * grad_accum_steps):
    per = num_devices * grad_accum_steps
    raise ValueError(
        f"train.batch_size={global_batch} is not divisible by the number of devices "
        f"({num_devices}) x optim.grad_accum_steps ({grad_accum_steps}) = {per}; use a "
        f"multiple of {per}, e.g. --config.train.batch_size={max(per, global_batch // per * per)}")


def host_rows(mesh: Mesh, global_batch: int) -> slice:
  """The rows of a [global_batch, ...] batch this host's devices hold (contiguous)."""
  index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
  ranges = [(idx[0].start or 0, idx[0].stop if idx[0].stop is not None else global_batch)
            for idx in index_map.values()]
  return contiguous_rows(ranges)


def contiguous_rows(row_ranges) -> slice:
  """The single contiguous slice covering the given (start, stop) row ranges."""
  start = min(r[0] for r in row_ranges)
  stop = max(r[1] for r in row_ranges)
  if stop - start != sum(r[1] - r[0] for r in set(row_ranges)):
    raise ValueError(f"this host's rows {sorted(row_ranges)} are not contiguous")
  return slice(start, stop)


def global_batch(local_rows: np.ndarray, mesh: Mesh, global_batch_size: int) -> jax.Array:
  """Assembles each host's rows into one global array split along `data`."""
  shape = (global_batch_size,) + local_rows.shape[1:]
  return jax.make_array_from_process_local_data(batch_sharding(mesh), local_rows, shape)


def shard_rows(values: np.ndarray, mesh: Mesh) -> jax.Array:
  """A host array that every process holds whole, split along `data` like a batch (each
  process places only its own rows)."""
  values = np.asarray(values)
  return global_batch(values[host_rows(mesh, len(values))], mesh, len(values))


def batch_map(fn: Callable, mesh: Mesh, num_batched: int = 1) -> Callable:
  """`fn(replicated, *batched)` run on every device for its rows, as one jitted program.

  The first argument (parameters, say) is replicated; the `num_batched` other arguments and
  every output are split along `data`, rows with rows.

  Returns:
    the jitted f(replicated, *batched) taking and returning global arrays.
  """
  in_specs = (P(),) + (P(DATA_AXIS),) * num_batched
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=P(DATA_AXIS)))


def round_up_to_devices(n: int, mesh: Mesh) -> int:
  """`n` rounded up to a multiple of the mesh's devices (rows every device can share evenly)."""
  devices = mesh.devices.size
  return -(-n // devices) * devices


def replicate(tree, mesh: Mesh):
  """Places a pytree of host values (identical on every host) replicated on the mesh."""
  sharding = replicated_sharding(mesh)

  def put(x):
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    if isinstance(x, jax.Array) and x.is_fully_replicated and x.sharding == sharding:
      return x
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

  return jax.tree_util.tree_map(put, tree)


def fetch(tree):
  """Brings a pytree of (possibly multi-host) arrays to host numpy on every process."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree_util.tree_map(get, tree)
