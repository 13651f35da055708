"""Training as launch/slurm/train.sbatch starts it, on this machine's CPU: the same command
line, `python -m diffusion_jax.main --config ... --workdir ...` with no multi-process flags, in 2
processes that find each other from the variables srun sets (faked: tests/helpers.slurm_env).

What a SLURM job goes through: training, a second job refused its workdir, SIGTERM to every
process (a preemption, or the script passing on the time limit's signal) stopping all at one
step with one checkpoint, the requeued job resuming from it; and a process killed (its node
lost) ending the other with status 75.
"""
import re
import signal
import subprocess
import sys
import time

import pytest

from tests import helpers

# Slow: every test trains in 2 processes.
pytestmark = pytest.mark.slow

ROOT, CACHE = helpers.ROOT, helpers.CACHE


def _start(workdir, job_id, *flags):
  """The 2 tasks of a job step of `job_id`, each with 2 CPU devices, training configs/digits.py
  (without grids) into `workdir`."""
  port = helpers.free_port()
  command = [sys.executable, "-m", "diffusion_jax.main", "--config=configs/digits.py",
             f"--workdir={workdir}", "--config.train.sample_every=0",
             "--config.train.log_every=1", f"--config.train.compile_cache_dir={CACHE}", *flags]
  return [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True,
                           env=helpers.slurm_env(2, task, port, job_id, JAX_NUM_CPU_DEVICES=2))
          for task in range(2)]


def _wait(procs, timeout=300):
  """Each process's (status, output); none is left running."""
  results = []
  try:
    for proc in procs:
      out, _ = proc.communicate(timeout=timeout)
      results.append((proc.returncode, out))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.communicate()
  return results


def _checkpoint_steps(workdir):
  directory = workdir / "checkpoints"
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def test_slurm_job_trains_keeps_its_workdir_stops_on_sigterm_and_resumes(tmp_path):
  workdir = tmp_path / "work"
  procs = _start(workdir, 4242, "--config.train.num_steps=10000",
                 "--config.train.checkpoint_every=10000", "--config.train.stop_check_every=2")
  try:
    lines = helpers.read_until(procs[0], "step 3/")
    assert lines and lines[-1].startswith("step 3/"), "".join(lines)[-4000:]
    assert any("4 devices on 2 host(s)" in line for line in lines), "".join(lines)[-4000:]

    # Another job submitted with the same workdir: both of its processes refuse it.
    refused = _wait(_start(workdir, 4343, "--config.train.num_steps=10"), timeout=120)
    for (status, out), holder in zip(refused, (f"process {procs[0].pid} ", "another run")):
      assert status == 2, out[-4000:]
      assert f"error: --workdir {workdir} is in use by {holder}" in out, out[-4000:]
      assert "Compiling" not in out and "Traceback" not in out

    for proc in procs:  # SLURM signals every task of the step
      proc.send_signal(signal.SIGTERM)
    (status0, out0), (status1, out1) = _wait(procs, timeout=120)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  out0 = "".join(lines) + out0
  assert status0 == 0 and status1 == 0, out0[-3000:] + out1[-3000:]
  # The runtime's preemption notifier sees SIGTERM too: the processes stop at the step it
  # agrees on, or at the next multiple of train.stop_check_every, whichever comes first.
  stopped = re.search(r"Stopping at step (\d+) \((SIGTERM|preemption notice)\); checkpoint "
                      r"saved", out0)
  assert stopped, out0[-4000:]
  step = int(stopped.group(1))
  assert step >= 4 and (stopped.group(2) == "preemption notice" or step % 2 == 0)
  assert _checkpoint_steps(workdir) == [step]  # one checkpoint, of the step both agreed on

  # The requeued job: the same command, the same workdir.
  (status0, out0), (status1, out1) = _wait(
      _start(workdir, 4242, f"--config.train.num_steps={step + 2}"))
  assert status0 == 0 and status1 == 0, out0[-3000:] + out1[-3000:]
  assert "Resumed from" in out0 and f"steps {step} -> {step + 2}" in out0, out0[-4000:]
  assert _checkpoint_steps(workdir) == [step, step + 2]
  assert "Taking over the lock" not in out0  # the first job released it


def test_slurm_job_a_killed_process_ends_the_other_with_status_75(tmp_path):
  workdir = tmp_path / "work"
  heartbeat_timeout_s = 100  # the runtime's own: it aborts every process after that
  procs = _start(workdir, 4242, "--config.train.num_steps=10000",
                 "--config.train.checkpoint_every=3", "--config.train.lost_process_timeout_s=5",
                 f"--config.train.heartbeat_timeout_s={heartbeat_timeout_s}")
  out, killed = helpers.kill_second_process(procs, "step 4/", workdir / "checkpoints" / "3",
                                            timeout=heartbeat_timeout_s + 60)
  assert procs[0].returncode == 75, out[-4000:]
  assert time.time() - killed < heartbeat_timeout_s  # the watchdog, not the runtime's abort
  lost = re.search(r"^error: process 1 of 2 is lost \(no heartbeat for \d+ s\); the last "
                   r"checkpoint is step (\d+), (\S+)\. Process 0 exits with status 75", out,
                   re.MULTILINE)
  assert lost, out[-4000:]
  assert int(lost.group(1)) == _checkpoint_steps(workdir)[-1] >= 3
  assert "Check failure stack trace" not in out
