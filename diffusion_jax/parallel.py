"""Multi-host setup, the 1-D data mesh over every device, and global batches.

One mesh axis, `data`, spans all devices of all hosts (`jax.devices()` order, so each host's
devices hold one contiguous block of rows). Parameters are replicated; batches are split along
`data`; per-device code runs under `jax.shard_map` and averages gradients with
`jax.lax.pmean(..., DATA_AXIS)`.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"

# Environment variables that mean "this process is one of several" (set by TPU pod runtimes,
# SLURM, Open MPI); jax.distributed.initialize() auto-detects the rest from them.
_MULTI_PROCESS_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def _distributed_initialized() -> bool:
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return distributed.global_state.client is not None


def _tpu_pod_detected() -> bool:
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if len([h for h in hosts.split(",") if h.strip()]) > 1:
    return True
  return int(os.environ.get("MEGASCALE_NUM_SLICES", "1") or 1) > 1


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """Calls `jax.distributed.initialize` only when this is one process of several.

  Explicit flags win; otherwise a TPU pod (several TPU worker hostnames or slices), SLURM or
  Open MPI with more than one task is auto-detected. Calling again (a re-run notebook cell) or
  on a single machine does nothing. Must run before anything touches the JAX backend.

  Returns:
    True if the distributed runtime is (now) initialized.
  """
  if _distributed_initialized():
    return True
  explicit = bool(coordinator_address) or (num_processes or 1) > 1
  detected = _tpu_pod_detected() or any(
      int(os.environ.get(k, "1") or 1) > 1 for k in _MULTI_PROCESS_ENV)
  if not (explicit or detected):
    return False
  if explicit:
    jax.distributed.initialize(coordinator_address=coordinator_address or None,
                               num_processes=num_processes, process_id=process_id)
  else:
    jax.distributed.initialize()
  return True


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


def index_keys(seed: int, stream: int, indices: np.ndarray) -> np.ndarray:
  """Raw key data uint32 [n, 2]: fold_in(fold_in(key(seed), stream), index) per index.

  An example's key depends only on its global index, never on the batch or device count.
  """
  base = jax.random.fold_in(jax.random.key(seed), stream)
  keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jax.numpy.asarray(indices, np.uint32))
  return np.asarray(jax.random.key_data(keys))


def sharded_index_keys(seed: int, stream: int, indices: np.ndarray, mesh: Mesh) -> jax.Array:
  """`index_keys` of a global batch of example indices, split over the mesh like a batch.

  Each process computes only its own rows' keys.
  """
  rows = host_rows(mesh, len(indices))
  local = index_keys(seed, stream, np.asarray(indices)[rows])
  return jax.random.wrap_key_data(global_batch(local, mesh, len(indices)))


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
