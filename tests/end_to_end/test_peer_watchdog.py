"""parallel.PeerWatchdog in 4 processes joined by the real distributed runtime on 127.0.0.1.

Each process joins the others as a task of a (faked) SLURM job step, with no flags, and only
watches: no training. The watchdog's timeout is 3 s, the runtime's own 60 s: a process that exits
with status 75 (`parallel.LOST_PROCESS_EXIT_CODE`) was ended by its watchdog, not by the runtime,
which aborts (status 134) the processes still connected when the coordinator's process ends.
"""
import re
import subprocess
import sys
import textwrap

import pytest

from tests import helpers

# Slow: each test starts 4 processes that import JAX and join a distributed runtime.
pytestmark = pytest.mark.slow

_TIMEOUT_S = 3.0

# Joins the run from the SLURM variables, watches; on stdin "leave" closes its watchdog ("done").
_WORKER = textwrap.dedent("""
    import os, sys
    from diffusion_jax import parallel
    assert parallel.initialize_distributed(heartbeat_timeout_s=60)
    import jax

    def lost(process, why):
      os.write(1, f"lost process {process} ({why})\\n".encode())
      os._exit(parallel.LOST_PROCESS_EXIT_CODE)

    watchdog = parallel.PeerWatchdog(timeout_s=float(os.environ["TIMEOUT_S"]), every_s=0.25,
                                     on_lost=lost).start()
    print(f"watching as process {jax.process_index()} of {jax.process_count()}", flush=True)
    for line in sys.stdin:
      if line.strip() == "leave":
        watchdog.close()
        print("left", flush=True)
    os._exit(0)
""")


def _start(tmp_path, count=4):
  script = tmp_path / "worker.py"
  script.write_text(_WORKER)
  port = helpers.free_port()
  procs = [subprocess.Popen([sys.executable, str(script)], cwd=helpers.ROOT,
                            env=helpers.slurm_env(count, i, port, TIMEOUT_S=_TIMEOUT_S),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
           for i in range(count)]
  for i, proc in enumerate(procs):
    lines = helpers.read_until(proc, "watching as process", timeout=120)
    assert lines and lines[-1].strip() == f"watching as process {i} of {count}", lines
  return procs


def _finish(procs, timeout=60):
  """Each process's (status, output), once it ends (its stdin stays open: a worker whose stdin
  closes exits 0); kills those still running after `timeout` s (status None then)."""
  results = []
  for proc in procs:
    try:
      status = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
      status = None
    results.append((status, proc.stdout.read()))
  return results


def _kill_the_rest(procs):
  for proc in procs:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


@pytest.mark.parametrize("killed", [1, 2])
def test_a_killed_process_ends_every_other_one_with_status_75(tmp_path, killed):
  """The process before the killed one in the ring finds it lost (process 0 when 1 is killed);
  the others read what it published. Process 0 ends last, so that its end (the coordinator's)
  aborts nobody."""
  finder = killed - 1
  procs = _start(tmp_path)
  try:
    procs[killed].kill()
    survivors = [p for p in range(1, 4) if p != killed] + [0]  # process 0 last
    results = dict(zip(survivors, _finish([procs[p] for p in survivors],
                                          timeout=_TIMEOUT_S + 57)))
  finally:
    _kill_the_rest(procs)
  for process, (status, out) in results.items():
    assert status == 75, (process, out)
    assert "Terminating process because the JAX distributed service" not in out
    found = "" if process == finder else f"; found by process {finder}"
    assert re.search(rf"^lost process {killed} \(no heartbeat for \d+ s{found}\)$", out,
                     re.MULTILINE), (process, out)


def test_past_processes_that_left_the_next_one_is_watched(tmp_path):
  """Processes 1 and 2 leave ("done"); process 0, which watched 1, now watches 3 and reports it
  when it is killed."""
  procs = _start(tmp_path)
  try:
    for i in (1, 2):
      procs[i].stdin.write("leave\n")
      procs[i].stdin.flush()
      assert helpers.read_until(procs[i], "left", timeout=30)[-1].strip() == "left"
    procs[3].kill()
    ((status, out),) = _finish([procs[0]], timeout=_TIMEOUT_S + 57)
  finally:
    _kill_the_rest(procs)
  assert status == 75, out
  assert re.search(r"^lost process 3 \(no heartbeat for \d+ s\)$", out, re.MULTILINE), out
