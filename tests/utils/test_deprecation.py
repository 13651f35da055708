"""The import paths of 0.1 still work for one release: the module itself, with a warning naming
its new path, attributed to the line that imported it; the old tool commands run the new ones."""
import importlib
import pathlib
import subprocess
import sys
import warnings

import pytest

from tests import helpers

# Old path -> new one; README and the notebook showed the first six, the docs the commands.
MOVED = {
    "config_lib": "config.config_lib",
    "inference": "evaluation.inference",
    "train": "training.loop",
    "diffusion": "core.diffusion",
    "sampling": "samplers",
    "schedules": "core.schedules",
    "bench": "tools.bench",
    "input_bench": "tools.input_bench",
    "convert_tf_checkpoint": "tools.convert_tf_checkpoint",
    "convert_torch_checkpoint": "tools.convert_torch_checkpoint",
}
PACKAGE = pathlib.Path(helpers.ROOT) / "diffusion_jax"


@pytest.mark.parametrize("old, new", sorted(MOVED.items()))
def test_old_path_is_the_new_module_with_a_warning(old, new, tmp_path, monkeypatch):
  sys.modules.pop(f"diffusion_jax.{old}", None)
  # Imported from a file of the user's, as a script would: the warning names that file.
  user = tmp_path / "user_script.py"
  user.write_text(f"from diffusion_jax import {old} as module\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  sys.modules.pop("user_script", None)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    script = importlib.import_module("user_script")
  assert script.module is importlib.import_module(f"diffusion_jax.{new}")
  assert sys.modules[f"diffusion_jax.{old}"] is script.module
  ours = [w for w in caught if issubclass(w.category, DeprecationWarning)
          and f"diffusion_jax.{old} moved to diffusion_jax.{new}" in str(w.message)]
  assert len(ours) == 1, [str(w.message) for w in caught]
  assert ours[0].filename == str(user), ours[0].filename
  assert "0.3.0" in str(ours[0].message)


def test_every_shim_is_listed():
  shims = {path.stem for path in PACKAGE.glob("*.py")
           if "__deprecated_path__ = True" in path.read_text()}
  assert shims == set(MOVED)


def test_old_command_runs_the_new_tool_with_a_warning():
  result = subprocess.run([sys.executable, "-m", "diffusion_jax.input_bench", "--help"],
                          capture_output=True, text=True, env=helpers.subprocess_env(),
                          cwd=helpers.ROOT, timeout=300)
  assert result.returncode == 0, result.stderr
  assert "diffusion_jax.tools.input_bench" in result.stdout  # the new tool's own help
  assert ("DeprecationWarning: diffusion_jax.input_bench moved to "
          "diffusion_jax.tools.input_bench" in result.stderr), result.stderr
