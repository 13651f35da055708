"""Old import paths kept for one release after a module moved.

A module at its old path is a few lines that call `moved`: importing it warns once (a
DeprecationWarning naming the new path, attributed to the importing line) and hands back the
module at its new path itself, so `from diffusion_jax import sampling` and
`from diffusion_jax import samplers` give the same object. Run with `python -m OLD`, it warns
and runs the new module as `python -m NEW` would.
"""
from __future__ import annotations

import importlib
import runpy
import sys
import warnings

REMOVED_IN = "0.3.0"


def _importer_stacklevel() -> int:
  """The stacklevel, as seen from `moved`, of the first frame outside the import machinery and
  the old-path modules: the line that imported the old path. `warnings.warn` skips the import
  machinery's frames when it counts, so they are not counted here either."""
  frame, level = sys._getframe(2), 2  # pylint: disable=protected-access
  while frame is not None:
    name = frame.f_code.co_filename
    internal = "importlib" in name and "_bootstrap" in name
    if not internal and not frame.f_globals.get("__deprecated_path__"):
      return level
    if not internal:
      level += 1
    frame = frame.f_back
  return 2


def moved(old: str, new: str, *, run: bool = False) -> None:
  """Makes the module named `old` an alias of `new`, with a DeprecationWarning.

  Args:
    old: the old module's dotted name (its `__spec__.name`).
    new: the dotted name of the module it moved to.
    run: the old module runs as `__main__` (`python -m OLD`): run `new` the same way.
  """
  message = (f"{old} moved to {new}; the old path goes in diffusion_jax {REMOVED_IN}: "
             f"{'run python -m ' + new if run else 'import ' + new}")
  if run:
    warnings.warn(message, DeprecationWarning, stacklevel=2)
    runpy.run_module(new, run_name="__main__", alter_sys=True)
    return
  module = importlib.import_module(new)
  warnings.warn(message, DeprecationWarning, stacklevel=_importer_stacklevel())
  sys.modules[old] = module
