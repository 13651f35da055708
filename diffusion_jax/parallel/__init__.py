"""Running over devices and hosts: the data mesh and global batches (`mesh`), multi-host start-up
and the lost-process watchdog (`distributed`), and keys split over the mesh (`keys`).

The package re-exports each module's public names, so callers write `parallel.make_mesh(...)`.
"""
from diffusion_jax.parallel.distributed import DEFAULT_HEARTBEAT_TIMEOUT_S
from diffusion_jax.parallel.distributed import initialize_distributed
from diffusion_jax.parallel.distributed import LOST_PROCESS_EXIT_CODE
from diffusion_jax.parallel.distributed import PeerWatchdog
from diffusion_jax.parallel.keys import replicated_key
from diffusion_jax.parallel.keys import sharded_example_keys
from diffusion_jax.parallel.mesh import batch_map
from diffusion_jax.parallel.mesh import batch_sharding
from diffusion_jax.parallel.mesh import check_batch_size
from diffusion_jax.parallel.mesh import contiguous_rows
from diffusion_jax.parallel.mesh import DATA_AXIS
from diffusion_jax.parallel.mesh import fetch
from diffusion_jax.parallel.mesh import global_batch
from diffusion_jax.parallel.mesh import host_rows
from diffusion_jax.parallel.mesh import make_mesh
from diffusion_jax.parallel.mesh import replicate
from diffusion_jax.parallel.mesh import replicated_sharding
from diffusion_jax.parallel.mesh import round_up_to_devices
from diffusion_jax.parallel.mesh import shard_rows

__all__ = [
    "DEFAULT_HEARTBEAT_TIMEOUT_S",
    "initialize_distributed",
    "LOST_PROCESS_EXIT_CODE",
    "PeerWatchdog",
    "replicated_key",
    "sharded_example_keys",
    "batch_map",
    "batch_sharding",
    "check_batch_size",
    "contiguous_rows",
    "DATA_AXIS",
    "fetch",
    "global_batch",
    "host_rows",
    "make_mesh",
    "replicate",
    "replicated_sharding",
    "round_up_to_devices",
    "shard_rows",
]
