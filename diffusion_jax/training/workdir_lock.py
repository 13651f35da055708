"""One training run per workdir: a lock file, WORKDIR/run.lock, naming its holder.

Two runs writing checkpoints into one workdir overwrite each other's steps and temporary
folders; the second run is refused before it restores or compiles anything.

  * Local workdir: an exclusive `fcntl.flock` on WORKDIR/run.lock, held for the whole run. The
    kernel drops it when the process ends, however it ends (kill -9 included), so a lock left by
    a dead process is never in the way: the next run takes it over and says whose it was. The
    file holds JSON naming the holder (host, pid, boot id, start time, command) and is emptied,
    not deleted, when the run ends.
  * gs:// and other object stores have no locks: a documented best effort. The run writes the
    same JSON with a heartbeat time, refreshed every `heartbeat_s` by a background thread, and
    deletes it when it ends. A lock whose heartbeat is older than `stale_after_s`, or whose
    holder was a process of this machine's current boot that no longer runs, is taken over with
    a message; any other is refused. Two runs started within the same second can still both
    pass the check.
  * A pod: process 0 holds the lock; the others learn from it whether the run may go on, so
    every process stops alike.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import threading
import time

from diffusion_jax.utils import outputs

LOCK_NAME = "run.lock"


class WorkdirBusyError(RuntimeError):
  """Another run holds the workdir's lock."""


def _boot_id() -> str:
  try:
    with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
      return f.read().strip()
  except OSError:
    return ""


def _process_running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


def _describe(holder: dict) -> str:
  started = holder.get("started")
  when = (datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds")
          if isinstance(started, (int, float)) else "an unknown time")
  return (f"process {holder.get('pid', '?')} on {holder.get('host', '?')}, started {when} "
          f"({holder.get('command', '?')})")


def _parse(text: str) -> dict | None:
  """The holder a lock file names; None for an empty (released) one."""
  if not text.strip():
    return None
  try:
    holder = json.loads(text)
  except ValueError:
    return {"host": "?", "pid": "?", "command": f"unreadable lock contents {text[:80]!r}"}
  return holder if isinstance(holder, dict) else {"command": repr(holder)[:80]}


class WorkdirLock:
  """Holds WORKDIR/run.lock for one run (see the module docstring).

  Args:
    workdir: the run's workdir (gs://, or local: a relative one starts at the current
      directory); it must exist.
    heartbeat_s: object stores only: how often the holder refreshes its heartbeat.
    stale_after_s: object stores only: a heartbeat older than this marks a dead run.
    clock: time source (tests).
    print_fn: where the takeover message goes.
  """

  def __init__(self, workdir: str, *, heartbeat_s: float = 60.0, stale_after_s: float = 600.0,
               clock=time.time, print_fn=None):
    self.path = outputs.resolve(workdir) / LOCK_NAME
    self.local = not outputs.is_object_store(workdir)
    self._heartbeat_s = heartbeat_s
    self._stale_after_s = stale_after_s
    self._clock = clock
    self._print = print_fn or (lambda msg: print(msg, flush=True))
    self._fd = None
    self._stop = threading.Event()
    self._thread = None
    self.holder = dict(host=socket.gethostname(), pid=os.getpid(), boot_id=_boot_id(),
                       started=clock(), command=" ".join(sys.argv)[:300])

  def acquire(self) -> None:
    """Takes the lock, or raises WorkdirBusyError naming the run that holds it."""
    if self.local:
      self._acquire_local()
    else:
      self._acquire_object()

  def _busy(self, holder: dict | None) -> WorkdirBusyError:
    who = _describe(holder) if holder else "another process"
    return WorkdirBusyError(
        f"--workdir {os.fspath(self.path.parent)} is in use by {who}: two runs in one workdir "
        f"overwrite each other's checkpoints. Wait for it to end or stop it, or pass another "
        f"--workdir (the lock is {os.fspath(self.path)})")

  def _acquire_local(self) -> None:
    import fcntl  # pylint: disable=g-import-not-at-top
    fd = os.open(os.fspath(self.path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _parse(os.pread(fd, 65536, 0).decode("utf-8", "replace"))
      os.close(fd)
      raise self._busy(holder) from None
    previous = _parse(os.pread(fd, 65536, 0).decode("utf-8", "replace"))
    if previous is not None:
      self._print(f"Taking over the lock of {_describe(previous)}, which ended without "
                  f"releasing it (killed or crashed)")
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(self.holder) + "\n").encode(), 0)
    os.fsync(fd)
    self._fd = fd

  def _stale_reason(self, holder: dict) -> str | None:
    """Why an object-store lock's holder is known to be gone; None if it may be running."""
    beat = holder.get("heartbeat")
    if isinstance(beat, (int, float)) and self._clock() - beat > self._stale_after_s:
      return f"its last heartbeat was {self._clock() - beat:.0f} s ago"
    if (holder.get("host") == self.holder["host"] and isinstance(holder.get("pid"), int)
        and holder.get("boot_id") == self.holder["boot_id"]
        and not _process_running(holder["pid"])):
      return "that process no longer runs"
    if holder.get("host") == self.holder["host"] and holder.get("boot_id") != self.holder[
        "boot_id"]:
      return "this machine has restarted since"
    return None

  def _write_object(self) -> None:
    self.path.write_text(json.dumps(dict(self.holder, heartbeat=self._clock())) + "\n")

  def _acquire_object(self) -> None:
    if self.path.exists():
      holder = _parse(self.path.read_text())
      if holder is not None:
        reason = self._stale_reason(holder)
        if reason is None:
          raise self._busy(holder)
        self._print(f"Taking over the lock of {_describe(holder)}: {reason}")
    self._write_object()
    self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat",
                                    daemon=True)
    self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(self._heartbeat_s):
      try:
        self._write_object()
      except Exception as e:  # pylint: disable=broad-except  # a missed beat is not fatal
        self._print(f"WARNING: could not refresh {os.fspath(self.path)} ({e})")

  def release(self) -> None:
    """Empties (local) or deletes (object store) the lock; safe to call twice."""
    if self._fd is not None:
      os.ftruncate(self._fd, 0)
      os.close(self._fd)  # closing drops the flock
      self._fd = None
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None
      try:
        holder = _parse(self.path.read_text()) if self.path.exists() else None
        if holder and holder.get("pid") == self.holder["pid"] and holder.get(
            "host") == self.holder["host"]:
          self.path.unlink()
      except Exception as e:  # pylint: disable=broad-except
        self._print(f"WARNING: could not remove {os.fspath(self.path)} ({e}); delete it "
                    f"before the next run, which would otherwise wait for it to go stale")

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()


def hold_for_run(workdir: str, *, is_main: bool, multi_process: bool) -> WorkdirLock | None:
  """Process 0 takes the workdir's lock; on a pod every process learns the outcome.

  Returns:
    The held lock on process 0 (release it when the run ends), None on the others.

  Raises:
    WorkdirBusyError: on every process, when another run holds the lock.
  """
  lock, error = None, None
  if is_main:
    lock = WorkdirLock(workdir)
    try:
      lock.acquire()
    except WorkdirBusyError as e:
      lock, error = None, e
  if multi_process:
    import numpy as np  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    held = bool(multihost_utils.broadcast_one_to_all(np.asarray(error is None)))
    if not held and error is None:
      error = WorkdirBusyError(f"--workdir {workdir} is in use by another run (process 0 "
                               f"could not take its lock; see its output)")
  if error is not None:
    raise error
  return lock
