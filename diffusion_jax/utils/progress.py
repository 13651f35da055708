"""Progress with a rate and an ETA, for the modes that run for minutes or hours (tqdm).

In a terminal, process 0 shows a live tqdm bar. Elsewhere (a log file, a pod's captured
output) it prints whole lines instead of a bar's carriage returns, at most every `every_s`
seconds and always for the first and the last update, formatted by tqdm:

  sample: 1024/5000 images (41.3 images/s, ETA 01:36, elapsed 00:24)

A caller whose line shows values that cost something to get (training's loss is on the
device) asks `due` first, a clock read, and fetches them only then.
"""
from __future__ import annotations

import sys
import time
from typing import Callable

import jax
import tqdm

_LINE = ("{desc}: {n_fmt}/{total_fmt} {unit} ({rate_noinv:.3g} {unit}/s, ETA {remaining}, "
         "elapsed {elapsed})")

# How often a live bar's values (`update(values=...)`) are refreshed: the bar itself moves at
# every update, but its values may need a fetch from the device.
BAR_VALUES_EVERY_S = 1.0


def format_duration(seconds: float) -> str:
  """Seconds as [h:]mm:ss, as tqdm writes durations (negative values count as 0)."""
  return tqdm.tqdm.format_interval(max(0.0, seconds))


def write(line: str) -> None:
  """Prints a whole line to stdout, above a live bar when one is drawn (a plain print would
  land in the middle of the bar's line)."""
  tqdm.tqdm.write(line, file=sys.stdout)
  sys.stdout.flush()


class Progress:
  """Counts work done towards a known total: a live bar in a terminal, lines elsewhere.

  Example:
    progress = Progress("sample", total=5000, unit="images")
    for ...:
      progress.update(done)

  Args:
    label: what is counted, the start of each line.
    total: the work to do.
    unit: the unit of the work.
    every_s: at most one line per this many seconds (when not in a terminal), forced ones
      aside.
    initial: the work already done before (a resumed run); the rate counts only what follows.
    time_limit_s: the work stops this many seconds after the start, done or not: the ETA is at
      most what is left of it. 0: no limit.
    line_format: a tqdm `bar_format` for the lines, which may also name `{values}` (see
      `update`) and the caller's own fields.
    clock: seconds (for tests).
    print_fn: where lines go (default: stdout; given, no live bar is drawn).
  """

  def __init__(self, label: str, total: int, *, unit: str = "images", every_s: float = 10.0,
               initial: int = 0, time_limit_s: float = 0.0, line_format: str = _LINE,
               clock: Callable[[], float] = time.monotonic,
               print_fn: Callable[[str], None] | None = None):
    self.label, self.total, self.unit, self.every_s = label, int(total), unit, every_s
    self.initial, self.time_limit_s, self.line_format = int(initial), time_limit_s, line_format
    self._clock = clock
    self._print = print_fn or (lambda line: print(line, flush=True))
    self._start = clock()
    self._last_shown: float | None = None
    self._shows = jax.process_index() == 0
    self._bar = None
    if print_fn is None and self._shows and sys.stdout.isatty():
      self._bar = tqdm.tqdm(total=self.total, initial=self.initial, desc=label,
                            unit=f" {unit}", file=sys.stdout, dynamic_ncols=True)

  def rate(self, done: int) -> float:
    """Units of work per second since the start (0 before any)."""
    return (min(int(done), self.total) - self.initial) / max(self._clock() - self._start, 1e-9)

  def line(self, done: int, values: str = "", **fields) -> str:
    """The progress line for `done` units of work finished now.

    Args:
      done: the work finished.
      values: the line format's `{values}`.
      **fields: the line format's other fields of the caller's.
    """
    done = min(int(done), self.total)
    elapsed = max(self._clock() - self._start, 1e-9)
    rate = (done - self.initial) / elapsed
    remaining = (self.total - done) / rate if rate > 0 else None
    if self.time_limit_s > 0:
      left = self.time_limit_s - elapsed
      remaining = left if remaining is None else min(remaining, left)
    eta = "?" if remaining is None else format_duration(remaining)
    return tqdm.tqdm.format_meter(done, self.total, elapsed, prefix=self.label, unit=self.unit,
                                  bar_format=self.line_format, initial=self.initial,
                                  **dict(fields, remaining=eta, values=values))

  def due(self, done: int) -> bool:
    """Whether `update(done)` would show a line now (in a terminal: refresh the bar's values):
    the first and last updates, then once per `every_s` (`BAR_VALUES_EVERY_S`); never on
    processes other than 0. Only a clock read."""
    if not self._shows:
      return False
    if self._last_shown is None or int(done) >= self.total:
      return True
    every = BAR_VALUES_EVERY_S if self._bar is not None else self.every_s
    return self._clock() - self._last_shown >= every

  def update(self, done: int, values: str = "", *, due: bool | None = None,
             force: bool = False, **fields) -> bool:
    """Records that `done` units are finished; shows it (process 0 only).

    Args:
      done: the work finished.
      values: what else to show (e.g. "loss 0.0412"): the bar's postfix in a terminal, the
        line format's `{values}` elsewhere.
      due: what `due(done)` answered the caller, who then fetched `values` (None: ask now).
      force: show a line now, however recent the last one; in a terminal it is written above
        the bar, where it stays.
      **fields: the line format's other fields of the caller's.

    Returns:
      whether a line was shown (or the bar's values refreshed).
    """
    done = min(int(done), self.total)
    if not self._shows:
      return False
    shown = force or (self.due(done) if due is None else due)
    if self._bar is not None:
      if shown and values:
        self._bar.set_postfix_str(values, refresh=False)
      self._bar.update(done - self._bar.n)
      if force:
        self._bar.write(self.line(done, values, **fields), file=sys.stdout)
      if done >= self.total:
        self._bar.close()
    elif shown:
      self._print(self.line(done, values, **fields))
    if shown:
      self._last_shown = self._clock()
    return shown

  def close(self) -> None:
    """Ends a live bar where it stands (the work stopped early)."""
    if self._bar is not None:
      self._bar.close()
