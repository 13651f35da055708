"""Progress with a rate and an ETA, for the modes that run for minutes or hours (tqdm).

In a terminal, process 0 shows a live tqdm bar. Elsewhere (a log file, a pod's captured
output) it prints whole lines instead of a bar's carriage returns, at most every `every_s`
seconds and always for the first and the last update, formatted by tqdm:

  sample: 1024/5000 images (41.3 images/s, ETA 01:36, elapsed 00:24)
"""
from __future__ import annotations

import sys
import time
from typing import Callable

import jax
import tqdm

_LINE = ("{desc}: {n_fmt}/{total_fmt} {unit} ({rate_noinv:.3g} {unit}/s, ETA {remaining}, "
         "elapsed {elapsed})")


def format_duration(seconds: float) -> str:
  """Seconds as [h:]mm:ss, as tqdm writes durations (negative values count as 0)."""
  return tqdm.tqdm.format_interval(max(0.0, seconds))


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
    every_s: at most one line per this many seconds (when not in a terminal).
    clock: seconds (for tests).
    print_fn: where lines go (default: stdout; given, no live bar is drawn).
  """

  def __init__(self, label: str, total: int, *, unit: str = "images", every_s: float = 10.0,
               clock: Callable[[], float] = time.monotonic,
               print_fn: Callable[[str], None] | None = None):
    self.label, self.total, self.unit, self.every_s = label, int(total), unit, every_s
    self._clock = clock
    self._print = print_fn or (lambda line: print(line, flush=True))
    self._start = clock()
    self._last_print: float | None = None
    self._bar = None
    if print_fn is None and jax.process_index() == 0 and sys.stdout.isatty():
      self._bar = tqdm.tqdm(total=self.total, desc=label, unit=f" {unit}", file=sys.stdout,
                            dynamic_ncols=True)

  def line(self, done: int) -> str:
    """The progress line for `done` units of work finished now."""
    elapsed = max(self._clock() - self._start, 1e-9)
    return tqdm.tqdm.format_meter(min(int(done), self.total), self.total, elapsed,
                                  prefix=self.label, unit=self.unit, bar_format=_LINE)

  def update(self, done: int) -> None:
    """Records that `done` units are finished; shows it (process 0 only)."""
    done = min(int(done), self.total)
    if self._bar is not None:
      self._bar.update(done - self._bar.n)
      if done >= self.total:
        self._bar.close()
      return
    now = self._clock()
    due = (self._last_print is None or done >= self.total
           or now - self._last_print >= self.every_s)
    if due and jax.process_index() == 0:
      self._print(self.line(done))
      self._last_print = now
