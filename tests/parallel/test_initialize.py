"""parallel.initialize_distributed: when it joins other processes, and what it tells JAX.

jax.distributed.initialize is replaced by a recorder; the environment is this process's, cleared
of the variables that mean "one process of several" and set by each test.
"""
import jax
import pytest

from diffusion_jax import parallel
from diffusion_jax.parallel import distributed as parallel_distributed

_SLURM_TASK = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "gpu[001-002]", "SLURM_NTASKS": "16",
               "SLURM_PROCID": "9", "SLURM_LOCALID": "1"}


@pytest.fixture
def initialize(monkeypatch):
  """Records the calls of jax.distributed.initialize; returns (calls, a setter of variables)."""
  calls = []
  monkeypatch.setattr(parallel_distributed, "_distributed_initialized", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
  for name in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
               "MEGASCALE_NUM_SLICES", "CUDA_VISIBLE_DEVICES"):
    monkeypatch.delenv(name, raising=False)

  def set_env(**variables):
    for name, value in variables.items():
      monkeypatch.setenv(name, value)

  return calls, set_env


def test_a_single_process_joins_nothing(initialize):
  calls, set_env = initialize
  assert not parallel.initialize_distributed()
  set_env(SLURM_NTASKS="1", SLURM_PROCID="0")  # a one-task SLURM job
  assert not parallel.initialize_distributed()
  assert calls == []


def test_a_slurm_task_leaves_everything_to_jax(initialize):
  calls, set_env = initialize
  set_env(**_SLURM_TASK)
  assert parallel.initialize_distributed(heartbeat_timeout_s=50)
  assert calls == [{"heartbeat_timeout_seconds": 50}]


def test_a_slurm_task_bound_to_one_gpu_uses_it(initialize):
  """With --gpus-per-task=1 a task sees one GPU, number 0, whatever its SLURM_LOCALID."""
  calls, set_env = initialize
  set_env(**_SLURM_TASK, CUDA_VISIBLE_DEVICES="5")
  assert parallel.initialize_distributed()
  assert calls[0]["local_device_ids"] == [0]
  calls.clear()
  set_env(CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")  # every task sees the node's GPUs
  assert parallel.initialize_distributed()
  assert "local_device_ids" not in calls[0]


def test_slurm_without_srun_is_refused_with_a_clear_message(initialize):
  calls, set_env = initialize
  set_env(SLURM_NTASKS="16", SLURM_JOB_ID="77")
  with pytest.raises(RuntimeError, match=r"SLURM_NTASKS=16 makes this one process of several, "
                     r"but SLURM_STEP_NODELIST, SLURM_PROCID, SLURM_LOCALID are not set: start "
                     r"every process with srun"):
    parallel.initialize_distributed()
  assert calls == []
  # Explicit flags say where the others are.
  assert parallel.initialize_distributed("10.0.0.1:1234", 16, 3)
  assert calls == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 16,
                    "process_id": 3, "heartbeat_timeout_seconds": 100}]


def test_explicit_flags_and_open_mpi(initialize):
  calls, set_env = initialize
  assert parallel.initialize_distributed("host:1", 2, 1, heartbeat_timeout_s=30)
  set_env(OMPI_COMM_WORLD_SIZE="4")
  assert parallel.initialize_distributed()
  assert calls == [{"coordinator_address": "host:1", "num_processes": 2, "process_id": 1,
                    "heartbeat_timeout_seconds": 30}, {"heartbeat_timeout_seconds": 100}]
