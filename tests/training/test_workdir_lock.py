"""One run per workdir: the lock's refusals, takeovers of dead holders, and the command line."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from diffusion_jax.training import workdir_lock
from tests.helpers import ROOT
from tests.helpers import subprocess_env as _env

_HOLDER = textwrap.dedent("""
    import sys, time
    from diffusion_jax.training import workdir_lock
    lock = workdir_lock.WorkdirLock(sys.argv[1])
    lock.acquire()
    print("held", flush=True)
    time.sleep(120)
""")


def test_a_relative_workdir_is_locked_where_it_was_when_the_run_began(tmp_path, monkeypatch):
  (tmp_path / "run").mkdir()
  monkeypatch.chdir(tmp_path)
  lock = workdir_lock.WorkdirLock("run")
  assert lock.path == tmp_path / "run" / "run.lock"
  lock.acquire()
  monkeypatch.chdir(tmp_path / "run")
  with pytest.raises(workdir_lock.WorkdirBusyError, match=f"--workdir {tmp_path}/run is in use"):
    workdir_lock.WorkdirLock(str(tmp_path / "run")).acquire()
  lock.release()
  assert (tmp_path / "run" / "run.lock").read_text() == ""
  assert not (tmp_path / "run" / "run" / "run.lock").exists()


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_a_second_lock_is_refused_until_the_first_is_released(tmp_path):
  first = workdir_lock.WorkdirLock(str(tmp_path))
  first.acquire()
  holder = json.loads((tmp_path / "run.lock").read_text())
  assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
  with pytest.raises(workdir_lock.WorkdirBusyError,
                     match=rf"in use by process {os.getpid()} on {socket.gethostname()}"):
    workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  first.release()
  assert (tmp_path / "run.lock").read_text() == ""  # emptied, not deleted
  messages = []
  with workdir_lock.WorkdirLock(str(tmp_path), print_fn=messages.append):
    pass
  assert messages == []  # a released lock is simply taken


def test_a_lock_held_by_a_live_process_refuses_and_after_kill_9_is_taken_over(tmp_path):
  proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], cwd=ROOT, env=_env(),
                          stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(workdir_lock.WorkdirBusyError, match=rf"process {proc.pid} "):
      workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  finally:
    proc.send_signal(signal.SIGKILL)  # no handler runs: the file still names the holder
    proc.wait(timeout=30)
  assert json.loads((tmp_path / "run.lock").read_text())["pid"] == proc.pid
  messages = []
  lock = workdir_lock.WorkdirLock(str(tmp_path), print_fn=messages.append)
  lock.acquire()
  assert len(messages) == 1 and f"Taking over the lock of process {proc.pid}" in messages[0]
  assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
  lock.release()


class _Clock:
  def __init__(self, now=1_000_000.0):
    self.now = now

  def __call__(self):
    return self.now


def _object_store_lock(path, clock, messages):
  """The object-store (gs://) protocol, exercised on a local folder."""
  lock = workdir_lock.WorkdirLock(str(path), heartbeat_s=3600, stale_after_s=600, clock=clock,
                                  print_fn=messages.append)
  lock.local = False
  return lock


def test_object_store_lock_refuses_a_live_holder_and_takes_over_stale_ones(tmp_path):
  clock, messages = _Clock(), []
  lock_file = tmp_path / "run.lock"

  def write(**holder):
    lock_file.write_text(json.dumps(dict(dict(host="other-vm", pid=4321, boot_id="b",
                                              started=clock.now - 50), **holder)))

  write(heartbeat=clock.now - 30)  # another machine, beating recently
  with pytest.raises(workdir_lock.WorkdirBusyError, match="process 4321 on other-vm"):
    _object_store_lock(tmp_path, clock, messages).acquire()

  write(heartbeat=clock.now - 601)  # another machine, silent for longer than stale_after_s
  lock = _object_store_lock(tmp_path, clock, messages)
  lock.acquire()
  assert "last heartbeat was 601 s ago" in messages[-1]
  written = json.loads(lock_file.read_text())
  assert written["pid"] == os.getpid() and written["heartbeat"] == clock.now
  lock.release()
  assert not lock_file.exists()  # deleted on release, unlike a local lock

  # This machine and boot, recent heartbeat, but the process is gone.
  write(host=socket.gethostname(), boot_id=workdir_lock._boot_id(), pid=_dead_pid(),
        heartbeat=clock.now - 1)
  with _object_store_lock(tmp_path, clock, messages):
    assert "no longer runs" in messages[-1]


def test_command_line_refuses_a_workdir_in_use_before_compiling(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  with workdir_lock.WorkdirLock(str(workdir)):
    proc = subprocess.run(
        [sys.executable, "-m", "diffusion_jax.main", "--config=configs/test.py",
         f"--workdir={workdir}", "--config.train.num_steps=2"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert proc.stderr.startswith(f"error: --workdir {workdir} is in use by process "
                                f"{os.getpid()} on {socket.gethostname()}"), proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (workdir / "checkpoints").exists()
