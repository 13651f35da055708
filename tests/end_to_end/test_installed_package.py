"""The package as pip installs it: the configs ship inside it as `diffusion_jax.configs`, the
command line names them from any directory, and a wheel trains, samples and evaluates without a
checkout.
"""
import configparser
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from diffusion_jax.config import config_lib
import diffusion_jax

ROOT = pathlib.Path(__file__).resolve().parents[2]
CACHE = os.environ.get("DIFFUSION_JAX_TEST_CACHE", str(ROOT / ".cache" / "jax_tests"))

# What keeps the digits demo to seconds (as tests/end_to_end/test_readme_commands.py shortens it).
TRAIN_OVERRIDES = ["--config.train.num_steps=4", "--config.train.checkpoint_every=2",
                   "--config.train.log_every=2", "--config.train.sample_every=0"]
SAMPLE_OVERRIDES = ["--config.eval.num_samples=8"]
EVAL_OVERRIDES = ["--config.eval.num_samples=16", "--config.eval.bpd_max_examples=8"]
DIGITS_PARAMS = "total params: 651,041"


def _env(**extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=CACHE,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2", **extra)
  env.pop("XLA_FLAGS", None)
  return env


def _run(argv, cwd, env=None, returncode=0) -> subprocess.CompletedProcess:
  proc = subprocess.run([str(a) for a in argv], cwd=cwd, env=env or _env(), capture_output=True,
                        text=True, timeout=400)
  assert proc.returncode == returncode, (
      f"{argv} exited {proc.returncode}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
  return proc


def _python_files(folder: pathlib.Path) -> set[pathlib.Path]:
  return {p.relative_to(folder) for p in folder.rglob("*.py") if "__pycache__" not in p.parts}


# --- The configs as a package ------------------------------------------------------------------

def test_configs_are_the_package_diffusion_jax_configs():
  import diffusion_jax.configs  # pylint: disable=g-import-not-at-top
  package_dir = pathlib.Path(diffusion_jax.__file__).resolve().parent
  configs_dir = pathlib.Path(diffusion_jax.configs.__file__).resolve().parent
  if package_dir == ROOT / "diffusion_jax":
    # pip install -e .: the checkout's configs/, where they are edited.
    assert configs_dir == ROOT / "configs"
  else:
    assert configs_dir == package_dir / "configs"
  assert config_lib.shipped_dir() == configs_dir


def test_setup_cfg_lists_every_package():
  setup = configparser.ConfigParser(interpolation=None)
  setup.read(ROOT / "setup.cfg")
  listed = setup["options"]["packages"].split()
  found = {".".join(p.parent.relative_to(ROOT).parts)
           for p in (ROOT / "diffusion_jax").rglob("__init__.py")} | {"diffusion_jax.configs"}
  assert not found - set(listed), (
      f"add {sorted(found - set(listed))} to `packages` in setup.cfg's [options]: a package "
      f"not listed there is left out of the wheel")
  assert not set(listed) - found, f"setup.cfg lists packages that do not exist: {listed}"
  assert setup["options"]["package_dir"].split() == ["diffusion_jax.configs", "=", "configs"]


# --- --config by name ---------------------------------------------------------------------------
# The command line runs in subprocesses: importing diffusion_jax.main here would define absl
# flags that tests/tools/test_convert.py defines too, by importing convert_tf_checkpoint.

def test_config_flag_values_become_the_shipped_files():
  digits = config_lib.shipped_dir() / "digits.py"
  argv = ["main", "--config", "digits:num_steps=5", "--config.optim.lr=1", "--workdir=runs/x"]
  assert config_lib.resolve_config_args(argv) == [
      "main", "--config", f"{digits}:num_steps=5", "--config.optim.lr=1", "--workdir=runs/x"]
  assert config_lib.resolve_config_args(["main", "--config=digits", "--mode=summary"]) == [
      "main", f"--config={digits}", "--mode=summary"]
  assert config_lib.resolve_config_args(["main", "-config", "test"]) == [
      "main", "-config", str(config_lib.shipped_dir() / "test.py")]
  # A file as given; a missing value and what follows `--` left to absl.
  mine = str(ROOT / "configs" / "test.py") + ":var_type=fixedsmall"
  for argv in (["main", f"--config={mine}"], ["main", "--config"], ["main", "--config", "--x"],
               ["main", "--", "--config=nothing"]):
    assert config_lib.resolve_config_args(argv) == argv
  with pytest.raises(FileNotFoundError, match="^unknown config 'cifar': "):
    config_lib.resolve_config_args(["main", "--config", "cifar:var_type=fixedsmall"])


@pytest.mark.slow
@pytest.mark.parametrize("config", [["--config", "digits:num_steps=3"],
                                    ["--config=configs/digits.py"]],
                         ids=["name_with_argument", "path_of_a_checkout"])
def test_command_line_finds_a_shipped_config_from_any_directory(tmp_path, config):
  # configs/digits.py names no file here: the shipped digits (config_lib.resolve_path says why).
  proc = _run([sys.executable, "-m", "diffusion_jax.main", *config, "--mode=summary"],
              cwd=tmp_path)
  assert proc.stdout.strip().splitlines()[-1] == DIGITS_PARAMS
  assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_command_line_unknown_config_exits_2_naming_the_shipped_ones(tmp_path):
  proc = _run([sys.executable, "-m", "diffusion_jax.main", "--config",
               "cifar:var_type=fixedsmall", "--mode=summary"], cwd=tmp_path, returncode=2)
  assert proc.stderr.startswith("error: unknown config 'cifar': not a file, nor a config "
                                "shipped with diffusion_jax (celebahq256, cifar10, "), proc.stderr
  assert " digits, " in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
  assert "Traceback" not in proc.stderr and proc.stdout == ""


# --- A wheel, installed elsewhere ---------------------------------------------------------------

@pytest.mark.slow
def test_a_wheel_trains_samples_and_evaluates_outside_a_checkout(tmp_path):
  # A copy of what the build reads, so that its build/ and egg-info stay out of the checkout.
  # --no-build-isolation: this environment's setuptools builds it, nothing is downloaded.
  source = tmp_path / "source"
  source.mkdir()
  for name in ("setup.cfg", "pyproject.toml", "README.md", "LICENSE"):
    shutil.copy(ROOT / name, source / name)
  for name in ("diffusion_jax", "configs"):
    shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
  pip = [sys.executable, "-m", "pip"]
  _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
        tmp_path / "dist", source], cwd=tmp_path)
  [wheel] = (tmp_path / "dist").glob("diffusion_jax-*.whl")
  site = tmp_path / "site"
  _run([*pip, "install", "--no-deps", "--no-index", "--target", site, wheel], cwd=tmp_path)
  installed = site / "diffusion_jax"
  missing = _python_files(ROOT / "diffusion_jax") - _python_files(installed)
  assert not missing, f"the wheel lacks {sorted(map(str, missing))}"
  missing = _python_files(ROOT / "configs") - _python_files(installed / "configs")
  assert not missing, f"the wheel lacks the configs {sorted(map(str, missing))}"

  # The installed copy ahead of the checkout's editable install; no configs/ in the directory.
  env = _env(PYTHONPATH=str(site))
  cwd = tmp_path / "user"
  cwd.mkdir()
  where = _run([sys.executable, "-c", "import diffusion_jax; from diffusion_jax.config import "
                "config_lib; print(diffusion_jax.__file__); print(config_lib.shipped_dir())"],
               cwd, env).stdout.split()
  assert where == [str(installed / "__init__.py"), str(installed / "configs")]

  # The default config, without --config: the installed digits.py.
  summary = _run([sys.executable, "-m", "diffusion_jax.main", "--mode=summary"], cwd, env)
  assert summary.stdout.strip().splitlines()[-1] == DIGITS_PARAMS
  command = [sys.executable, "-m", "diffusion_jax.main", "--workdir", "runs/d"]
  _run([*command, "--config", "digits", *TRAIN_OVERRIDES], cwd, env)
  workdir = cwd / "runs" / "d"
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]
  # Without --config: the config saved with the checkpoint, upgraded through the installed
  # default.py.
  sample = _run([*command, "--mode", "sample", *SAMPLE_OVERRIDES], cwd, env)
  assert len(list((workdir / "samples").glob("4*/samples_0.npz"))) == 1, sample.stdout[-2000:]
  evaluation = _run([*command, "--mode", "eval", *EVAL_OVERRIDES], cwd, env)
  results = list((workdir / "eval").glob("4*.json"))
  assert len(results) == 1 and "bpd_test" in results[0].read_text(), evaluation.stdout[-2000:]
  images = _run([sys.executable, "-c", "from diffusion_jax.evaluation import inference\n"
                 "images = inference.Sampler.from_workdir('runs/d').sample(4)\n"
                 "print('images', images.shape, images.dtype)"], cwd, env)
  assert "images (4, 8, 8, 1) uint8" in images.stdout, images.stdout[-2000:]
  assert [p.name for p in cwd.iterdir()] == ["runs"]
  assert [p.name for p in (cwd / "runs").iterdir()] == ["d"]
