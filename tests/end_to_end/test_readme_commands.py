"""README's commands, read from README.md and run as written from a fresh directory.

A user in the repository root has `configs/` beside them and names the workdir relative to it;
the tests run each command from a new temporary directory holding a `configs` link to the
repository's, shortened only by `--config.a.b=...` overrides appended at the end (a few steps,
few samples), and check that everything lands under the relative workdir and nowhere else.
"""
import os
import pathlib
import re
import shlex
import subprocess
import sys
import textwrap

import pytest

# Slow: README's commands train, sample and evaluate in subprocesses.
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
CACHE = os.environ.get("DIFFUSION_JAX_TEST_CACHE", str(ROOT / ".cache" / "jax_tests"))

# Appended to README's commands: what keeps them to seconds. Everything else is as written.
TRAIN_OVERRIDES = {"train.num_steps": 4, "train.checkpoint_every": 2, "train.log_every": 2,
                   "train.sample_every": 0}
SAMPLE_OVERRIDES = {"eval.num_samples": 8}
EVAL_OVERRIDES = {"eval.num_samples": 16, "eval.bpd_max_examples": 8}

# A line of absl's log format (`W1205 20:20:07.873 ... file.py:452] ...`) or Python's default one
# (`WARNING:absl:...`): a library talking on the console, where only the run's lines belong.
LIBRARY_LOG_LINE = re.compile(r"^([IWEF]\d{4} \d\d:\d\d:\d\d|(DEBUG|INFO|WARNING|ERROR):\w)",
                              re.MULTILINE)


def _section(heading: str) -> str:
  """The text of README's `## heading` section, up to the next `## ` heading."""
  text = README.read_text()
  match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
  assert match, f"README.md has no '## {heading}' section"
  return match.group(1)


def _code_blocks(text: str, language: str) -> list[str]:
  return re.findall(rf"^```{language}\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def _shell_commands(block: str) -> list[str]:
  """The commands of a bash block, a line continued with a backslash joined to the next."""
  joined = block.replace("\\\n", " ")
  return [line.strip() for line in joined.splitlines()
          if line.strip() and not line.strip().startswith("#")]


def main_job() -> str:
  """Quick start's first command: `pip install -e . && python -m diffusion_jax.main ...`, less
  its install step (the package is installed)."""
  blocks = _code_blocks(_section("Quick start"), "bash")
  assert blocks, "README's Quick start has no ```bash block"
  commands = [c for c in _shell_commands(blocks[0]) if "diffusion_jax.main" in c]
  assert len(commands) == 1, f"expected one diffusion_jax.main command in {blocks[0]!r}"
  *installs, command = [part.strip() for part in commands[0].split("&&")]
  assert all(part.startswith("pip install") for part in installs), commands[0]
  return command


def next_commands() -> dict[str, str]:
  """{mode: command} of the bash block after Quick start's test command ('sample', 'eval')."""
  blocks = _code_blocks(_section("Quick start"), "bash")
  tests = [i for i, block in enumerate(blocks) if "pytest" in block]
  assert tests and tests[0] + 1 < len(blocks), (
      "README's Quick start has no ```bash block after the one that runs the tests")
  found = {}
  for command in _shell_commands(blocks[tests[0] + 1]):
    mode = re.search(r"--mode[= ](\w+)", command)
    if mode:
      found[mode.group(1)] = command
  assert {"sample", "eval"} <= set(found), f"expected --mode sample and --mode eval: {found}"
  return found


def python_example() -> str:
  """The first Python block of "From Python (notebooks)", less the lines for class-conditional
  models (a `labels=` argument): the digits model has no classes."""
  blocks = _code_blocks(_section("From Python (notebooks)"), "python")
  assert blocks, "README's 'From Python (notebooks)' has no ```python block"
  code = "\n".join(line for line in blocks[0].splitlines() if "labels=" not in line)
  for expected in ("config_lib.load_config(", "loop.train_and_evaluate(",
                   "inference.Sampler.from_workdir(", "sampler.sample("):
    assert expected in code, f"README's Python example lost its {expected}...) line"
  old_paths = re.findall(r"^from diffusion_jax import .*\b(config_lib|inference|train|diffusion|"
                         r"sampling|schedules)\b", code, re.M)
  assert not old_paths, f"README's Python example imports the 0.1 paths {old_paths}"
  return code


def _argv(command: str, overrides: dict) -> list[str]:
  argv = shlex.split(command)
  assert argv[:3] == ["python", "-m", "diffusion_jax.main"], command
  return [sys.executable, *argv[1:], *(f"--config.{k}={v}" for k, v in overrides.items())]


def _workdir(command: str) -> str:
  """The --workdir of a command; it must be relative, as a user in the repository types it."""
  argv = shlex.split(command)
  values = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--workdir"]
  values += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--workdir=")]
  assert len(values) == 1, f"expected one --workdir in {command!r}"
  workdir = values[0]
  assert not (os.path.isabs(workdir) or workdir.startswith("~") or "://" in workdir), (
      f"README's workdir {workdir!r} should be relative (runs/...): {command!r}")
  return workdir


def _env():
  # The tests' compile cache, shared by every mode (training would set its own otherwise).
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=CACHE,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2")
  env.pop("XLA_FLAGS", None)
  return env


def _user_directory(tmp_path: pathlib.Path) -> pathlib.Path:
  """A new current directory as the repository root looks to the commands: `configs/` there."""
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  (cwd / "configs").symlink_to(ROOT / "configs", target_is_directory=True)
  return cwd


def _run(argv, cwd) -> subprocess.CompletedProcess:
  proc = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=400)
  output = proc.stdout[-3000:] + proc.stderr[-3000:]
  assert proc.returncode == 0, f"{shlex.join(argv)} exited {proc.returncode}:\n{output}"
  return proc


def _only_under(cwd: pathlib.Path, workdir: str) -> None:
  """Nothing was written in the current directory but the workdir (and the folders above it);
  `configs` is still the link it was."""
  target = cwd / workdir
  allowed = {cwd / "configs", target, *(p for p in target.parents if cwd in p.parents)}
  for path in cwd.rglob("*"):  # (not into the `configs` link)
    assert path in allowed or target in path.parents, f"written outside {workdir}: {path}"
  assert (cwd / "configs").is_symlink()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """README's main job, shortened, run from a fresh directory: (cwd, workdir, process)."""
  repo_runs_before = sorted(os.listdir(ROOT / "runs")) if (ROOT / "runs").exists() else None
  command = main_job()
  workdir = _workdir(command)
  cwd = _user_directory(tmp_path_factory.mktemp("readme"))
  proc = _run(_argv(command, TRAIN_OVERRIDES), cwd)
  repo_runs_after = sorted(os.listdir(ROOT / "runs")) if (ROOT / "runs").exists() else None
  assert repo_runs_after == repo_runs_before  # nothing written into the repository's runs/
  return cwd, workdir, proc


def test_main_job_trains_into_the_relative_workdir(trained):
  cwd, workdir, proc = trained
  steps = sorted(p.name for p in (cwd / workdir / "checkpoints").iterdir())
  assert steps == ["2", "4"], steps
  assert (cwd / workdir / "checkpoints" / "4" / "commit_success.txt").exists()
  assert (cwd / workdir / "metrics.jsonl").exists()
  assert not LIBRARY_LOG_LINE.search(proc.stdout + proc.stderr), proc.stderr[-3000:]
  _only_under(cwd, workdir)


def test_sample_and_eval_commands_write_into_the_same_workdir(trained):
  cwd, workdir, _ = trained
  commands = next_commands()
  for mode in ("sample", "eval"):
    assert _workdir(commands[mode]) == workdir, (mode, commands[mode])
  sample = _run(_argv(commands["sample"], SAMPLE_OVERRIDES), cwd)
  npz = list((cwd / workdir / "samples").glob("4*/samples_0.npz"))
  assert len(npz) == 1, sample.stdout[-2000:]
  evaluation = _run(_argv(commands["eval"], EVAL_OVERRIDES), cwd)
  results = list((cwd / workdir / "eval").glob("4*.json"))
  assert len(results) == 1, evaluation.stdout[-2000:]
  assert "bpd_test" in results[0].read_text()
  # Only the run's own lines: no orbax notices (read-only readers), no failure told twice.
  for proc in (sample, evaluation):
    assert not LIBRARY_LOG_LINE.search(proc.stdout + proc.stderr), proc.stdout + proc.stderr
  _only_under(cwd, workdir)


def test_python_example_runs_from_a_fresh_directory(tmp_path):
  code = python_example()
  # README's own lines, with training shortened the way the command line's overrides do it.
  prelude = textwrap.dedent(f"""
      from diffusion_jax.config import config_lib
      _load_config = config_lib.load_config

      def _shortened(*args, **kwargs):
        config = _load_config(*args, **kwargs)
        config.update_from_flattened_dict({TRAIN_OVERRIDES!r})
        return config

      config_lib.load_config = _shortened
  """)
  cwd = _user_directory(tmp_path)
  script = prelude + code + "\nprint('images', images.shape, images.dtype)\n"
  proc = _run([sys.executable, "-c", script], cwd)
  workdir = re.search(r"""Sampler\.from_workdir\(["']([^"']+)["']\)""", code).group(1)
  assert not os.path.isabs(workdir), workdir
  assert sorted(p.name for p in (cwd / workdir / "checkpoints").iterdir()) == ["2", "4"]
  assert "images (16, 8, 8, 1) uint8" in proc.stdout, proc.stdout[-2000:]
  _only_under(cwd, workdir)
