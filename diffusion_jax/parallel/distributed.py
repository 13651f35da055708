"""Multi-host start-up and the watchdog that ends a run cleanly when one of its processes is lost.

`initialize_distributed` joins the processes of a TPU pod, a SLURM or Open MPI job, or an explicit
coordinator; `PeerWatchdog` watches another process's heartbeats through the distributed runtime's
key-value store, each process one other in a ring, so that the coordinator's load grows as the
number of processes.
"""
from __future__ import annotations

import json
import os
import threading
import time
from typing import Callable

import jax

# Environment variables that mean "this process is one of several" (set by TPU pod runtimes,
# SLURM, Open MPI); jax.distributed.initialize() auto-detects the rest from them.
_MULTI_PROCESS_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")

# What jax.distributed.initialize() reads to join the processes of a SLURM job step: srun sets
# them in each task. The coordinator is the step's first node, on a port taken from the job's id
# (or JAX_COORDINATOR_PORT); each process uses the GPU numbered by its SLURM_LOCALID.
_SLURM_ENV = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
             "SLURM_LOCALID")

# jax.distributed.initialize's own default: a process silent this long makes the runtime abort
# every other process (with a C++ stack trace).
DEFAULT_HEARTBEAT_TIMEOUT_S = 100

# The exit status of a process that ends because another process of its run is lost:
# EX_TEMPFAIL of sysexits.h, "a temporary failure; run again". launch/supervise.sh restarts
# the run after any non-zero status.
LOST_PROCESS_EXIT_CODE = 75


def _distributed_initialized() -> bool:
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return distributed.global_state.client is not None


def _tpu_pod_detected() -> bool:
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if len([h for h in hosts.split(",") if h.strip()]) > 1:
    return True
  return int(os.environ.get("MEGASCALE_NUM_SLICES", "1") or 1) > 1


def _slurm_local_device_ids() -> list[int] | None:
  """The GPUs of this SLURM task, when JAX's own choice would be wrong; None: JAX's choice.

  JAX gives each task of a node the GPU numbered by its SLURM_LOCALID among those it sees: right
  when every task sees all of the node's GPUs (`--gpus-per-node`), wrong when SLURM binds each
  task to its own (`--gpus-per-task=1`, `--gpu-bind`): the task then sees one GPU, number 0.
  """
  visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
  return [0] if len(visible) == 1 else None


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None,
                           heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S) -> bool:
  """Calls `jax.distributed.initialize` only when this is one process of several.

  Explicit flags win; otherwise a TPU pod (several TPU worker hostnames or slices), SLURM or
  Open MPI with more than one task is auto-detected. Calling again (a re-run notebook cell) or
  on a single machine does nothing. Must run before anything touches the JAX backend.

  Under SLURM, every process must be a task of one job step (`srun python -m diffusion_jax.main
  ...`, as launch/slurm/train.sbatch does), with the variables srun sets (`_SLURM_ENV`); one task
  per GPU.

  Args:
    coordinator_address: host:port of process 0 (None: auto-detected).
    num_processes: how many processes the run has (None: auto-detected).
    process_id: this process's index (None: auto-detected).
    heartbeat_timeout_s: the runtime aborts every process once one has sent no heartbeat for
      this many seconds (`PeerWatchdog` should notice a lost process before that).

  Returns:
    True if the distributed runtime is (now) initialized.

  Raises:
    RuntimeError: SLURM says there are several tasks, but this process lacks some of the
      variables srun sets (started without srun?), and no flags say where the others are.
  """
  if _distributed_initialized():
    return True
  explicit = bool(coordinator_address) or (num_processes or 1) > 1
  detected = _tpu_pod_detected() or any(
      int(os.environ.get(k, "1") or 1) > 1 for k in _MULTI_PROCESS_ENV)
  if not (explicit or detected):
    return False
  slurm = all(k in os.environ for k in _SLURM_ENV)
  if (not explicit and not slurm and not _tpu_pod_detected()
      and int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1
      and int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) <= 1):
    missing = ", ".join(k for k in _SLURM_ENV if k not in os.environ)
    raise RuntimeError(
        f"SLURM_NTASKS={os.environ['SLURM_NTASKS']} makes this one process of several, but "
        f"{missing} {'is' if ',' not in missing else 'are'} not set: start every process with "
        f"srun (launch/slurm/train.sbatch does), or pass --coordinator_address, "
        f"--num_processes and --process_id")
  kwargs = dict(heartbeat_timeout_seconds=heartbeat_timeout_s)
  if slurm and _slurm_local_device_ids() is not None:
    kwargs["local_device_ids"] = _slurm_local_device_ids()
  if explicit:
    jax.distributed.initialize(coordinator_address=coordinator_address or None,
                               num_processes=num_processes, process_id=process_id, **kwargs)
  else:
    jax.distributed.initialize(**kwargs)
  return True


class PeerWatchdog:
  """Notices, from a background thread, a process of this run that is gone (killed, host lost).

  Every `every_s` seconds each process writes a growing counter (its heartbeat) to the
  distributed runtime's key-value store and reads the counter of one other process: the next
  in a ring (process i watches i + 1 mod N, or the first one after it that has not left). It
  also reads one directory of the store, where a process that finds the one it watches lost
  publishes it. Each process thus sends 3 requests per heartbeat and reads 1 counter, however
  many processes there are: the coordinator answers 3 N requests and about 2 N entries per
  heartbeat, where reading every process's counter would cost it N^2 entries. As long as one
  process runs, any set of lost ones includes one that a running process watches (the first
  lost after a running one), so none goes unnoticed.

  A process whose counter has not changed for `timeout_s` seconds is lost: the process watching
  it publishes it and reports it to `on_lost(process_index, why)`, called from the watchdog
  thread, and every other process reports it at its next heartbeat, a few seconds after
  `timeout_s`. `on_lost` should end this process (`os._exit`), since the main thread may be
  blocked for good inside a collective with the lost process. Process 0, whose end takes the
  coordinator down (the runtime then aborts the processes still connected to it), reports two
  heartbeats later than it could, so that the others have read the publication. The runtime
  itself aborts only after the `heartbeat_timeout_s` of `initialize_distributed`, so
  `timeout_s` must be shorter.

  A process that leaves (`close`) writes "done", or "failed" when it ends with an error: the
  process watching a done one watches the next one instead (reading at most `_MAX_READS`
  counters per heartbeat while it moves past several); it reports a failed one after
  `timeout_s`, as a silent one, unless it is ending with an error itself, and a process ending
  with an error ignores a failed one that another published. A single-process run starts no
  thread.

  Args:
    timeout_s: seconds without a new heartbeat after which a process counts as lost.
    every_s: seconds between two heartbeats (and two reads of the watched one's).
    on_lost: called with the lost process's index and a few words on why.
  """

  _PREFIX = "diffusion_jax/heartbeat"
  _DONE, _FAILED = "done", "failed"
  # Counters read in one heartbeat at most, while moving past processes that left done.
  _MAX_READS = 4
  # Heartbeats process 0 waits before it reports a loss (see the class docstring).
  _LINGER_BEATS = 2
  # Watchdogs started in this process so far. Every process starts them in the same order, so
  # each one's keys are apart from those a previous one (a re-run notebook cell) left behind.
  _started = 0

  def __init__(self, timeout_s: float, every_s: float, on_lost: Callable[[int, str], None]):
    if not 0 < every_s < timeout_s:
      raise ValueError(f"PeerWatchdog needs 0 < every_s < timeout_s, got every_s={every_s}, "
                       f"timeout_s={timeout_s}")
    self.timeout_s = timeout_s
    self.every_s = every_s
    self._on_lost = on_lost
    self._stop = threading.Event()
    self._changed = threading.Condition()
    self._thread = None
    self._client = None
    self._dir = None
    self._me = 0
    self._num = 1  # processes in the run
    self._closing = False
    self._sweep = False  # confirm_peers: read every process's counter, not the watched one's
    self._watched: int | None = None    # the process this one watches; None: all others left
    self._changes: dict[int, int] = {}  # process -> heartbeats seen change
    self._ended: set[int] = set()       # processes that wrote done or failed
    self._last_value: dict[int, str | None] = {}  # process -> its counter as last read
    self._last_change: dict[int, float] = {}      # process -> when first read or seen changing
    self.lost: tuple[int, str] | None = None  # set when on_lost returned instead of exiting

  def start(self) -> "PeerWatchdog":
    """Starts watching (a multi-process run only); returns self."""
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    if jax.process_count() == 1 or distributed.global_state.client is None:
      return self
    self._client = distributed.global_state.client
    PeerWatchdog._started += 1
    self._dir = f"{self._PREFIX}/{PeerWatchdog._started}/"
    self._me, self._num = jax.process_index(), jax.process_count()
    self._changes = {p: 0 for p in range(self._num) if p != self._me}
    self._watched = (self._me + 1) % self._num
    self._thread = threading.Thread(target=self._run, name="PeerWatchdog", daemon=True)
    self._thread.start()
    return self

  def _key(self, process: int) -> str:
    return f"{self._dir}beat/{process}"

  def _report(self, process: int, why: str, linger: bool = True) -> None:
    if linger and self._me == 0 and self._num > 2:
      time.sleep(self._LINGER_BEATS * self.every_s)
    with self._changed:
      self.lost = (process, why)
      self._changed.notify_all()
    self._on_lost(process, why)

  def _read(self, process: int) -> str | None:
    """The process's counter, "done" or "failed"; None before it first wrote."""
    try:
      return self._client.key_value_try_get(self._key(process))
    except Exception as e:  # pylint: disable=broad-except
      if "NOT_FOUND" in str(e):
        return None
      raise  # the coordinator is gone or slow: handled by the caller

  def _after(self, process: int, done: set[int]) -> int | None:
    """The first process after `process` in the ring that has not left done (as far as this one
    knows, or per `done`); None: all have, but this one."""
    for step in range(1, self._num):
      candidate = (process + step) % self._num
      if candidate == self._me:
        return None
      if candidate not in done and self._last_value.get(candidate) != self._DONE:
        return candidate
    return None

  def _read_watched(self) -> dict[int, str | None]:
    """Reads the watched process's counter, moving on past those that left done."""
    values, done = {}, set()
    while self._watched is not None and len(values) < self._MAX_READS:
      values[self._watched] = value = self._read(self._watched)
      if value != self._DONE:
        break
      done.add(self._watched)
      self._watched = self._after(self._watched, done)
    return values

  def _read_all(self) -> dict[int, str | None]:
    entries = self._client.key_value_dir_get(f"{self._dir}beat/")
    values = {int(key.rsplit("/", 1)[1]): value for key, value in entries}
    return {p: values.get(p) for p in self._changes if self._last_value.get(p) != self._DONE}

  def _observe(self, process: int, value: str | None, now: float) -> str | None:
    """Notes a counter read at `now`; returns why its process is lost, or None."""
    if process not in self._last_change:  # first read: silent from now on, if it never changes
      self._last_change[process] = now
      self._last_value.setdefault(process, None)
    if value != self._last_value[process]:
      self._last_value[process], self._last_change[process] = value, now
      with self._changed:
        self._changes[process] += 1
        if value in (self._DONE, self._FAILED):
          self._ended.add(process)
        self._changed.notify_all()
    silent = now - self._last_change[process]
    # A failed process gets the same time as a silent one, so that a process failing for the
    # same reason reports its own error rather than the other's.
    if value != self._DONE and silent > self.timeout_s and not (
        value == self._FAILED and self._closing):
      return (f"it ended with an error {silent:.0f} s ago; see its log"
              if value == self._FAILED else f"no heartbeat for {silent:.0f} s")
    return None

  def _published(self, entries) -> tuple[int, str] | None:
    """The first loss another process published that applies to this one."""
    for key, text in sorted(entries):
      try:
        record = json.loads(text)
        process, why, failed = int(record["process"]), str(record["why"]), record["failed"]
      except (ValueError, KeyError, TypeError):
        continue
      if failed and self._closing:  # as when this process finds a failed one itself
        continue
      return process, f"{why}; found by process {key.rsplit('/', 1)[1]}"
    return None

  def _publish(self, process: int, why: str) -> None:
    record = json.dumps({"process": process, "why": why,
                         "failed": self._last_value.get(process) == self._FAILED})
    try:
      self._client.key_value_set(f"{self._dir}lost/{self._me}", record, allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except  # the coordinator is gone: nobody to tell
      pass

  def _run(self) -> None:
    last_answer = time.monotonic()
    count = 0
    while True:
      count += 1
      now = time.monotonic()
      try:
        self._client.key_value_set(self._key(self._me), str(count), allow_overwrite=True)
        published = self._published(self._client.key_value_dir_get(f"{self._dir}lost/"))
        if published is None:
          values = self._read_all() if self._sweep else self._read_watched()
      except Exception as e:  # pylint: disable=broad-except  # the coordinator is gone or slow
        if now - last_answer > self.timeout_s:
          self._report(0, f"the coordinator has not answered for {now - last_answer:.0f} s: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}",
                       linger=False)
          return
      else:
        last_answer = now
        if published is not None:
          self._report(*published)
          return
        for process, value in values.items():
          why = self._observe(process, value, now)
          if why is not None:
            self._publish(process, why)
            self._report(process, why)
            return
      if self._stop.wait(self.every_s):
        return

  def confirm_peers(self) -> bool:
    """Waits until every other process shows it is alive, or one is found lost.

    For a process about to end with an error, which may come from a lost process (a collective
    that failed): then `on_lost` runs (and ends this process) instead of the error surfacing.
    From the call on, the watchdog reads every process's counter at each heartbeat (one request
    of N entries), not only the watched one's.

    Returns:
      True once every other process has written two new heartbeats (at least one after this
      call) or ended; False if one was found lost (and `on_lost` returned) or none is watched.
    """
    if self._thread is None:
      return False
    with self._changed:
      self._closing = True
      self._sweep = True
      wanted = {p: n + 2 for p, n in self._changes.items()}

      def settled():
        return self.lost is not None or all(
            self._changes[p] >= n or p in self._ended for p, n in wanted.items())

      done = self._changed.wait_for(
          settled, timeout=self.timeout_s + (3 + self._LINGER_BEATS) * self.every_s)
    return bool(done) and self.lost is None

  def close(self, failed: bool = False) -> None:
    """Stops the thread and tells the other processes this one left ("failed": with an error)."""
    if self._thread is None:
      return
    self._closing = True
    self._stop.set()
    self._thread.join(timeout=10 * self.every_s)
    self._thread = None
    try:
      self._client.key_value_set(self._key(self._me),
                                 self._FAILED if failed else self._DONE, allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except  # the coordinator is gone: nobody to tell
      pass
