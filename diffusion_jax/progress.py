"""Progress lines with a rate and an ETA, for the modes that run for minutes or hours.

  sample: 1024/5000 images (41.3 images/s, ETA 0:01:36, elapsed 0:00:24)

Only process 0 prints; a line goes out at most every `every_s` seconds, and always for the
first and the last update, so a log file shows steady progress without flooding.
"""
from __future__ import annotations

import time
from typing import Callable

import jax


def format_duration(seconds: float) -> str:
  """Seconds as h:mm:ss (negative values count as 0)."""
  seconds = int(max(0, seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
  """Counts work done towards a known total and prints `label: done/total unit (rate, ETA)`.

  Example:
    progress = Progress("sample", total=5000, unit="images")
    for ...:
      progress.update(done)
  """

  def __init__(self, label: str, total: int, *, unit: str = "images", every_s: float = 10.0,
               clock: Callable[[], float] = time.monotonic,
               print_fn: Callable[[str], None] | None = None):
    self.label, self.total, self.unit, self.every_s = label, int(total), unit, every_s
    self._clock = clock
    self._print = print_fn or (lambda line: print(line, flush=True))
    self._start = clock()
    self._last_print: float | None = None

  def line(self, done: int) -> str:
    """The progress line for `done` units of work finished now."""
    done = min(int(done), self.total)
    elapsed = self._clock() - self._start
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (self.total - done) / rate if rate > 0 else float("nan")
    eta_text = format_duration(eta) if rate > 0 else "?"
    return (f"{self.label}: {done}/{self.total} {self.unit} ({rate:.3g} {self.unit}/s, "
            f"ETA {eta_text}, elapsed {format_duration(elapsed)})")

  def update(self, done: int) -> None:
    """Records that `done` units are finished; prints when a line is due (process 0 only)."""
    now = self._clock()
    due = (self._last_print is None or done >= self.total
           or now - self._last_print >= self.every_s)
    if due and jax.process_index() == 0:
      self._print(self.line(done))
      self._last_print = now
