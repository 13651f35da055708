"""Stopping a training run cleanly: signals, the time limit, preemption and lost processes.

`StopRequest` turns SIGTERM and SIGINT into a request to stop after the current step that
every process agrees on, and in a multi-process run watches the other processes
(`parallel.PeerWatchdog`), ending this one with a clear message when one is lost.

The command line catches the signals from before it parses its flags (`catch_signals`), so a
stop requested at any point of a run's start-up ends it before its first step. Each start-up
stage is announced by name (`START_UP_STAGES`, `add_stage_listener`).
"""
from __future__ import annotations

import contextlib
import os
import signal
from typing import Callable, Iterator

import jax
import ml_collections
import numpy as np
from etils import epath

from diffusion_jax import parallel
from diffusion_jax.training import checkpoints

SIGNALS = (signal.SIGTERM, signal.SIGINT)

# The start-up of a training run, in order: reading the flags and config (the command line
# only), building the data source, creating or restoring the model, compiling the training
# step, compiling the sampler of the training grids (when `train.sample_every` > 0).
START_UP_STAGES = ("flags", "data", "model", "compile_step", "compile_sampler")

_stage_listeners: list[Callable[[str], None]] = []


def add_stage_listener(listener: Callable[[str], None]) -> Callable[[], None]:
  """Calls `listener(stage)` as each stage of `START_UP_STAGES` begins, in this process.

  Returns:
    a function that removes the listener.
  """
  _stage_listeners.append(listener)
  return lambda: _stage_listeners.remove(listener)


def begin_stage(stage: str) -> None:
  """Announces that the start-up stage `stage` (one of `START_UP_STAGES`) begins."""
  if stage not in START_UP_STAGES:
    raise ValueError(f"unknown start-up stage {stage!r}; use one of {START_UP_STAGES}")
  for listener in list(_stage_listeners):
    listener(stage)


class _Handlers:
  """This process's SIGTERM and SIGINT handlers, installed while anyone holds them: the command
  line from before it parses flags, and each `StopRequest`. The first signal received since
  they were installed is kept, so that a run sees one that came during its start-up.

  The first SIGINT puts back the handler that was there before, so that a second Ctrl-C does
  what it did (raises KeyboardInterrupt); a signal that was ignored stays ignored.
  """

  def __init__(self):
    self.signum: int | None = None  # the first signal received
    self._holders = 0
    self._previous = {}

  @property
  def signal_name(self) -> str | None:
    return None if self.signum is None else signal.Signals(self.signum).name

  def hold(self) -> None:
    self._holders += 1
    if self._holders > 1:
      return
    self.signum = None
    for signum in SIGNALS:
      try:
        previous = signal.signal(signum, self._handle)
      except ValueError:  # not the main thread (e.g. some notebook kernels): no handler.
        continue
      if previous is signal.SIG_IGN:  # e.g. SIGINT of a background job: keep ignoring it
        signal.signal(signum, previous)
        continue
      self._previous[signum] = signal.SIG_DFL if previous is None else previous

  def release(self) -> bool:
    """Lets go of the handlers; True when that put the previous ones back."""
    self._holders -= 1
    if self._holders > 0:
      return False
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}
    return True

  def _handle(self, signum, frame):
    del frame
    if self.signum is None:
      self.signum = signum
    name = signal.Signals(signum).name
    again = ""
    if signum == signal.SIGINT:
      signal.signal(signum, self._previous[signum])  # the next Ctrl-C is not caught here
      again = "; press Ctrl-C again to abort without saving"
    # os.write, not print: the handler may run in the middle of a print to the same stream.
    os.write(2, f"{name} received: stopping before the next step{again}\n".encode())


_handlers = _Handlers()
_caught_from_start = False


@contextlib.contextmanager
def catch_signals() -> Iterator[None]:
  """Catches SIGTERM and SIGINT for the block, from its start: a training run started inside
  it stops cleanly on a signal received earlier, even before its flags were parsed. A command
  that does not stop that way hands them back with `hand_back_signals`."""
  global _caught_from_start
  _handlers.hold()
  _caught_from_start = True
  try:
    yield
  finally:
    if _caught_from_start:
      _caught_from_start = False
      _handlers.release()


def hand_back_signals() -> None:
  """Ends `catch_signals` early for a command that does not stop cleanly (evaluation): puts the
  previous handlers back, then raises a signal received meanwhile again, so that it acts as if
  never caught (Ctrl-C: KeyboardInterrupt). Does nothing outside `catch_signals`."""
  global _caught_from_start
  if not _caught_from_start:
    return
  _caught_from_start = False
  signum = _handlers.signum
  if _handlers.release() and signum is not None:
    signal.raise_signal(signum)


class StopRequest:
  """Turns SIGTERM and SIGINT (Ctrl-C) into a request to stop after the current step, agreed on
  by every process; a second SIGINT aborts at once, as users expect of Ctrl-C. Inside
  `catch_signals`, a signal received before the request was entered counts too.

  In a multi-process run it also watches the other processes (`parallel.PeerWatchdog`): when
  one is lost, this process prints which one and the last checkpoint, and exits with status
  `parallel.LOST_PROCESS_EXIT_CODE` rather than wait in a collective for the runtime's abort.

  Args:
    config: the training config (the `train.heartbeat_every_s` and
      `train.lost_process_timeout_s` of the watchdog); None: no watchdog.
    checkpoint_dir: where the run's checkpoints go, named when a process is lost.
  """

  def __init__(self, config: ml_collections.ConfigDict | None = None,
               checkpoint_dir: epath.Path | None = None):
    self._signal_name: str | None = None  # kept from the handlers when the block ends
    self._entered = False
    self._agreed_reason: str | None = None
    self._checkpoint_dir = checkpoint_dir
    self._watchdog = None
    if config is not None:
      self._watchdog = parallel.PeerWatchdog(
          timeout_s=config.train.lost_process_timeout_s,
          every_s=config.train.heartbeat_every_s, on_lost=self._lost)

  @property
  def signal_name(self) -> str | None:
    """The first signal this process received (since `catch_signals` when inside it)."""
    return _handlers.signal_name if self._entered else self._signal_name

  @property
  def requested(self) -> bool:
    return self.signal_name is not None

  @property
  def reason(self) -> str:
    """Why the run stops: this process's signal, the time limit, preemption or another's."""
    return self.signal_name or self._agreed_reason or "a stop request to another process"

  def __enter__(self):
    _handlers.hold()
    self._entered = True
    if self._watchdog is not None:
      self._watchdog.start()
    return self

  def _lost(self, process_index: int, why: str) -> None:
    """Ends this process: another one of the run is gone (runs in the watchdog thread)."""
    where = "there is no complete checkpoint yet (a restart begins at step 0)"
    if self._checkpoint_dir is not None:
      try:
        steps = checkpoints.complete_steps(self._checkpoint_dir)
      except Exception:  # pylint: disable=broad-except  # e.g. storage unreachable
        steps = None
      if steps is None:
        where = f"could not list {self._checkpoint_dir}"
      elif steps:
        where = (f"the last checkpoint is step {max(steps)}, "
                 f"{self._checkpoint_dir / str(max(steps))}")
    code = parallel.LOST_PROCESS_EXIT_CODE
    message = (f"error: process {process_index} of {jax.process_count()} is lost ({why}); "
               f"{where}. Process {jax.process_index()} exits with status {code}: start "
               f"every process of the run again to resume (launch/supervise.sh does)\n")
    # os.write, not print: the main thread may hold the stream's lock, stuck in a collective.
    os.write(2, message.encode())
    os._exit(code)

  def __exit__(self, exc_type, *exc):
    if self._watchdog is not None:
      if exc_type is not None and exc_type is not KeyboardInterrupt:
        # An error may come from a collective with a lost process: wait for the watchdog's
        # word, so that it is reported as such (and the runtime's abort does not come first).
        self._watchdog.confirm_peers()
      self._watchdog.close(failed=exc_type is not None)
    self._signal_name = _handlers.signal_name
    self._entered = False
    _handlers.release()

  def should_stop(self, step: int, *, over_time: bool = False, every: int = 1) -> bool:
    """Whether every process stops after `step`; the same answer on each of them.

    Args:
      step: the number of steps done.
      over_time: this process's clock says the time limit has passed.
      every: with several processes, agree (one collective, which waits for the steps
        dispatched so far) only when `step` is a multiple of this; a preemption notice is
        agreed on at every step without a collective.

    Returns:
      True if any process received SIGTERM/SIGINT or saw the time limit pass (as of the last
      agreement), or the runtime's preemption notice falls on this step.
    """
    if jax.process_count() == 1:
      if over_time and not self.requested:
        self._agreed_reason = "time limit"
      return self.requested or over_time
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    try:
      if multihost_utils.reached_preemption_sync_point(step):
        self._agreed_reason = "preemption notice"
        return True
    except Exception:  # pylint: disable=broad-except  # no preemption service
      pass
    if step % every:
      return False
    # Every process must agree: stop when any of them was asked to or is over time.
    flags = multihost_utils.process_allgather(np.asarray([self.requested, over_time]))
    requested, over = np.asarray(flags).reshape(-1, 2).any(axis=0)
    if over and not self.requested:
      self._agreed_reason = "time limit"
    return bool(requested or over)
