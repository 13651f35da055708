"""Stopping a training run: a signal at each start-up stage ends it before its first step; a stop
after some steps saves a checkpoint and draws no grid, while a normal end draws its grid.

Signals are delivered at a chosen point through `stopping.add_stage_listener` or a wrapped
collaborator, never after a sleep, so the tests do not depend on the machine's speed.
"""
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import pytest
import tensorflow_datasets as tfds

from diffusion_jax.config import config_lib
from diffusion_jax.training import loop as train
from diffusion_jax.training import stopping
from diffusion_jax.utils import outputs

# Slow: each test starts a training run, in this process or on the command line.
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[2]
CACHE = os.environ.get("DIFFUSION_JAX_TEST_CACHE", str(ROOT / ".cache" / "jax_tests"))
STOPPED = "Stopped by SIGTERM before the first step; nothing new to save"


def _config(**train_fields):
  """configs/test.py drawing grids every 2 steps (so the grid sampler compiles at start-up)."""
  config = config_lib.load_config("configs/test.py")
  config.train.num_steps = 4
  config.train.sample_every = 2
  config.train.checkpoint_every = 10
  for name, value in train_fields.items():
    config.train[name] = value
  return config


def _run(config, workdir):
  with tfds.testing.mock_data(num_examples=32, policy=tfds.testing.MockPolicy.USE_CODE):
    return train.train_and_evaluate(config, str(workdir))


def _checkpoint_steps(workdir) -> list[int]:
  directory = pathlib.Path(workdir) / "checkpoints"
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _grids(workdir) -> list[str]:
  directory = pathlib.Path(workdir) / "samples"
  return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


@pytest.mark.parametrize("stage", ["data", "model", "compile_step", "compile_sampler"])
def test_a_signal_at_any_start_up_stage_stops_before_the_first_step(stage, tmp_path, capfd):
  begun = []

  def listener(name):
    begun.append(name)
    if name == stage:
      os.kill(os.getpid(), signal.SIGTERM)

  remove = stopping.add_stage_listener(listener)
  try:
    state = _run(_config(), tmp_path)
  finally:
    remove()
  out, err = capfd.readouterr()
  # Stopped right after the stage that got the signal: no later stage began.
  stages = list(stopping.START_UP_STAGES[1:])
  assert begun == stages[:stages.index(stage) + 1]
  assert STOPPED in out
  assert "SIGTERM received" in err
  assert "step 1/" not in out
  assert state is None or int(state.step) == 0
  assert _checkpoint_steps(tmp_path) == []
  assert _grids(tmp_path) == []
  assert not (tmp_path / "metrics.jsonl").exists()


def test_a_later_run_forgets_an_earlier_signal_and_its_time_limit_draws_no_grid(tmp_path,
                                                                               capfd):
  """After a stopped run, the signal handlers are the previous ones again, and a second run in
  the same process (a notebook) starts afresh; its time limit stops it with a checkpoint and
  without the grid due at that step."""
  before = signal.getsignal(signal.SIGTERM)
  remove = stopping.add_stage_listener(
      lambda name: name == "data" and os.kill(os.getpid(), signal.SIGTERM))
  try:
    assert _run(_config(), tmp_path / "first") is None
  finally:
    remove()
  assert signal.getsignal(signal.SIGTERM) is before
  begun = []
  remove = stopping.add_stage_listener(begun.append)
  try:
    # Any step takes more than a microsecond: the limit has passed after step 1.
    state = _run(_config(time_limit_s=1e-6, sample_every=1), tmp_path / "second")
  finally:
    remove()
  assert begun == list(stopping.START_UP_STAGES[1:])
  assert int(state.step) == 1
  assert "Stopping at step 1 (time limit); checkpoint saved" in capfd.readouterr().out
  assert _checkpoint_steps(tmp_path / "second") == [1]
  assert _grids(tmp_path / "second") == []


def test_a_stop_after_some_steps_saves_a_checkpoint_and_draws_no_grid(tmp_path, capsys,
                                                                      monkeypatch):
  """SIGTERM while step 2 is logged stops the run after step 3, a grid step: checkpoint 3 and
  no grid. The run resumed to its end draws the final grid (step 5, no multiple of 3)."""
  config = _config(num_steps=5, sample_every=3, log_every=1)
  scalars = outputs.MetricsLog.scalars

  def scalars_then_signal(self, step, values):
    scalars(self, step, values)
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)

  with monkeypatch.context() as patch:
    patch.setattr(outputs.MetricsLog, "scalars", scalars_then_signal)
    state = _run(config, tmp_path)
  assert int(state.step) == 3
  assert "Stopping at step 3 (SIGTERM); checkpoint saved" in capsys.readouterr().out
  assert _checkpoint_steps(tmp_path) == [3]
  assert _grids(tmp_path) == []
  steps = [json.loads(line)["step"] for line in
           (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert steps == [1, 2, 3]

  state = _run(config, tmp_path)
  assert int(state.step) == 5
  assert _checkpoint_steps(tmp_path) == [3, 5]
  assert _grids(tmp_path) == ["grid_5.png"]


# --- The command line: signals from before the flags are parsed ------------------------------

# Runs `python -m diffusion_jax.main ARGS...` with the listener of argv[1] ({"stage": ...,
# "signals": [...]}) registered first.
_RUNNER = textwrap.dedent("""
    import json, os, runpy, signal, sys
    # A shell starts background jobs with SIGINT ignored; the tests send it on purpose.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from diffusion_jax.training import stopping

    spec = json.loads(sys.argv[1])

    def deliver(stage):
      if stage == spec["stage"]:
        for name in spec["signals"]:
          os.kill(os.getpid(), getattr(signal, name))

    stopping.add_stage_listener(deliver)
    sys.argv = ["diffusion_jax.main"] + sys.argv[2:]
    runpy.run_module("diffusion_jax.main", run_name="__main__", alter_sys=True)
""")


def _command_line(tmp_path, stage, signals, *args):
  runner = tmp_path / "runner.py"
  runner.write_text(_RUNNER)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
      [sys.executable, str(runner), json.dumps({"stage": stage, "signals": signals}),
       "--config=configs/digits.py", f"--workdir={tmp_path / 'work'}",
       "--config.train.num_steps=2", "--config.train.sample_every=2",
       "--config.sample.num_samples=8", "--config.sample.sampler=ddim",
       "--config.sample.num_steps=2", f"--config.train.compile_cache_dir={CACHE}", *args],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_signal_while_the_flags_are_parsed_stops_training_before_the_first_step(
    tmp_path, signum):
  proc = _command_line(tmp_path, "flags", [signum])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"Stopped by {signum} before the first step; nothing new to save" in proc.stdout
  assert f"{signum} received" in proc.stderr
  assert "step 1/" not in proc.stdout and "Compiling" not in proc.stdout
  assert _checkpoint_steps(tmp_path / "work") == []
  assert _grids(tmp_path / "work") == []


def test_a_second_ctrl_c_during_start_up_aborts_with_130(tmp_path):
  proc = _command_line(tmp_path, "data", ["SIGINT", "SIGINT"])
  assert proc.returncode == 130, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1] == "Interrupted (SIGINT); stopped without saving"
  assert "Traceback" not in proc.stderr
  assert _checkpoint_steps(tmp_path / "work") == []


def test_other_modes_keep_ctrl_c_as_an_interrupt(tmp_path):
  """--mode summary does not stop cleanly: a Ctrl-C caught while its flags were parsed
  interrupts it once they are (exit 130), as it would have uncaught."""
  proc = _command_line(tmp_path, "flags", ["SIGINT"], "--mode=summary")
  assert proc.returncode == 130, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1] == "Interrupted (SIGINT); stopped without saving"
  assert "total params" not in proc.stdout
