"""Multi-host start-up and the watchdog that ends a run cleanly when one of its processes is lost.

`initialize_distributed` joins the processes of a TPU pod, a SLURM or Open MPI job, or an explicit
coordinator; `PeerWatchdog` watches the others' heartbeats through the distributed runtime's
key-value store.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Callable

import jax

# Environment variables that mean "this process is one of several" (set by TPU pod runtimes,
# SLURM, Open MPI); jax.distributed.initialize() auto-detects the rest from them.
_MULTI_PROCESS_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")

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


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None,
                           heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S) -> bool:
  """Calls `jax.distributed.initialize` only when this is one process of several.

  Explicit flags win; otherwise a TPU pod (several TPU worker hostnames or slices), SLURM or
  Open MPI with more than one task is auto-detected. Calling again (a re-run notebook cell) or
  on a single machine does nothing. Must run before anything touches the JAX backend.

  Args:
    coordinator_address: host:port of process 0 (None: auto-detected).
    num_processes: how many processes the run has (None: auto-detected).
    process_id: this process's index (None: auto-detected).
    heartbeat_timeout_s: the runtime aborts every process once one has sent no heartbeat for
      this many seconds (`PeerWatchdog` should notice a lost process before that).

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
                               num_processes=num_processes, process_id=process_id,
                               heartbeat_timeout_seconds=heartbeat_timeout_s)
  else:
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_s)
  return True


class PeerWatchdog:
  """Notices, from a background thread, a process of this run that is gone (killed, host lost).

  Every `every_s` seconds each process writes a growing counter to the distributed runtime's
  key-value store and reads every other process's. A process whose counter has not changed for
  `timeout_s` seconds is reported to `on_lost(process_index, why)`, called from the watchdog
  thread; it should end this process (`os._exit`), since the main thread may be blocked for
  good inside a collective with the lost process. The runtime itself aborts only after the
  `heartbeat_timeout_s` of `initialize_distributed`, so `timeout_s` must be shorter.

  A process that leaves (`close`) writes "done", or "failed" when it ends with an error: the
  others stop watching a done process and report a failed one after `timeout_s`, as a silent
  one (unless they are ending with an error themselves). A single-process run starts no thread.

  Args:
    timeout_s: seconds without a new heartbeat after which a process counts as lost.
    every_s: seconds between two heartbeats (and two reads of the others').
    on_lost: called with the lost process's index and a few words on why.
  """

  _PREFIX = "diffusion_jax/heartbeat"
  _DONE, _FAILED = "done", "failed"
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
    self._closing = False
    self._changes: dict[int, int] = {}  # process -> heartbeats seen change
    self._ended: set[int] = set()       # processes that wrote done or failed
    self.lost: tuple[int, str] | None = None  # set when on_lost returned instead of exiting

  def start(self) -> "PeerWatchdog":
    """Starts watching (a multi-process run only); returns self."""
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    if jax.process_count() == 1 or distributed.global_state.client is None:
      return self
    self._client = distributed.global_state.client
    PeerWatchdog._started += 1
    self._dir = f"{self._PREFIX}/{PeerWatchdog._started}/"
    me = jax.process_index()
    self._changes = {p: 0 for p in range(jax.process_count()) if p != me}
    self._thread = threading.Thread(target=self._run, name="PeerWatchdog", daemon=True)
    self._thread.start()
    return self

  def _key(self, process: int) -> str:
    return f"{self._dir}{process}"

  def _report(self, process: int, why: str) -> None:
    with self._changed:
      self.lost = (process, why)
      self._changed.notify_all()
    self._on_lost(process, why)

  def _run(self) -> None:
    me = jax.process_index()
    start = time.monotonic()
    last_value = {p: None for p in self._changes}
    last_change = dict.fromkeys(self._changes, start)
    last_answer = start
    count = 0
    while True:
      count += 1
      now = time.monotonic()
      try:
        self._client.key_value_set(self._key(me), str(count), allow_overwrite=True)
        entries = self._client.key_value_dir_get(self._dir)
      except Exception as e:  # pylint: disable=broad-except  # the coordinator is gone or slow
        if now - last_answer > self.timeout_s:
          self._report(0, f"the coordinator has not answered for {now - last_answer:.0f} s: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}")
          return
      else:
        last_answer = now
        values = {int(key.rsplit("/", 1)[1]): value for key, value in entries}
        for process in self._changes:
          if last_value[process] == self._DONE:
            continue
          value = values.get(process)
          if value != last_value[process]:
            last_value[process], last_change[process] = value, now
            with self._changed:
              self._changes[process] += 1
              if value in (self._DONE, self._FAILED):
                self._ended.add(process)
              self._changed.notify_all()
          silent = now - last_change[process]
          # A failed process gets the same time as a silent one, so that a process failing for
          # the same reason reports its own error rather than the other's.
          if value != self._DONE and silent > self.timeout_s and not (
              value == self._FAILED and self._closing):
            self._report(process, f"it ended with an error {silent:.0f} s ago; see its log"
                         if value == self._FAILED else f"no heartbeat for {silent:.0f} s")
            return
      if self._stop.wait(self.every_s):
        return

  def confirm_peers(self) -> bool:
    """Waits until every other process shows it is alive, or one is found lost.

    For a process about to end with an error, which may come from a lost process (a collective
    that failed): then `on_lost` runs (and ends this process) instead of the error surfacing.

    Returns:
      True once every other process has written two new heartbeats (at least one after this
      call) or ended; False if one was found lost (and `on_lost` returned) or none is watched.
    """
    if self._thread is None:
      return False
    with self._changed:
      self._closing = True
      wanted = {p: n + 2 for p, n in self._changes.items()}

      def settled():
        return self.lost is not None or all(
            self._changes[p] >= n or p in self._ended for p, n in wanted.items())

      done = self._changed.wait_for(settled, timeout=self.timeout_s + 3 * self.every_s)
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
      self._client.key_value_set(self._key(jax.process_index()),
                                 self._FAILED if failed else self._DONE, allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except  # the coordinator is gone: nobody to tell
      pass
