"""The command line and multi-process runs, in subprocesses (each sets its own JAX flags)."""
import json
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from tests import helpers

# Slow: every test runs the command line or worker processes that train.
pytestmark = pytest.mark.slow

ROOT, CACHE = helpers.ROOT, helpers.CACHE

_WORKER = textwrap.dedent("""
    import os, signal, sys
    # A shell starts background jobs with SIGINT ignored; the tests send it on purpose.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import jax
    jax.config.update("jax_num_cpu_devices", int(os.environ["NUM_CPU_DEVICES"]))
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_compilation_cache_dir", os.environ["CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    import importlib.util, json, time, types
    import numpy as np
    import tensorflow_datasets as tfds
    from diffusion_jax import parallel
    from diffusion_jax.training import loop as train

    spec = importlib.util.spec_from_file_location("cfg", os.environ["CONFIG"])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.train.num_steps = int(os.environ["NUM_STEPS"])
    config.train.checkpoint_every = int(os.environ.get("CHECKPOINT_EVERY", "3"))
    config.train.log_every = 1
    for field, value in json.loads(os.environ.get("OVERRIDES", "{}")).items():
      section, name = field.split(".")
      config[section][name] = value
    if "CLOCK_RATE" in os.environ:  # this host's clock runs CLOCK_RATE times too fast
      rate, start = float(os.environ["CLOCK_RATE"]), time.time()
      train.time = types.SimpleNamespace(time=lambda: start + (time.time() - start) * rate)

    process_id = int(os.environ["PROCESS_ID"])
    num_processes = int(os.environ["NUM_PROCESSES"])
    if num_processes > 1:
      for _ in range(2):  # the second call does nothing
        assert parallel.initialize_distributed(os.environ["COORDINATOR"], num_processes,
                                               process_id, config.train.heartbeat_timeout_s)
    else:
      assert not parallel.initialize_distributed()
    with tfds.testing.mock_data(num_examples=32, policy=tfds.testing.MockPolicy.USE_CODE):
      state = train.train_and_evaluate(config, os.environ["WORKDIR"])
    params = parallel.fetch(state.params)
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    np.savez(os.path.join(os.environ["OUT"], f"params_{process_id}.npz"), **flat)
""")


_free_port = helpers.free_port
_env = helpers.subprocess_env


def _start_workers(tmp_path, num_processes, devices_each, num_steps, overrides=None,
                   per_process=None, **extra):
  """Starts the worker processes of one run; `per_process[i]` adds process i's variables."""
  script = tmp_path / "worker.py"
  script.write_text(_WORKER)
  coordinator = f"127.0.0.1:{_free_port()}"
  procs = []
  for i in range(num_processes):
    env = _env(NUM_CPU_DEVICES=devices_each, PROCESS_ID=i, NUM_PROCESSES=num_processes,
               COORDINATOR=coordinator, NUM_STEPS=num_steps, WORKDIR=tmp_path / "work",
               OUT=tmp_path, OVERRIDES=json.dumps(overrides or {}),
               **extra, **(per_process[i] if per_process else {}))
    procs.append(subprocess.Popen([sys.executable, str(script)], env=env, cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  return procs


def _wait(procs, timeout=300):
  outs = []
  try:
    for proc in procs:
      out, _ = proc.communicate(timeout=timeout)
      outs.append(out)
      assert proc.returncode == 0, out[-4000:]
  finally:
    for proc in procs:  # on a failure or a hang, leave no worker behind
      if proc.poll() is None:
        proc.kill()
        proc.communicate()
  return outs


def _params(tmp_path, num_processes):
  return [dict(np.load(tmp_path / f"params_{i}.npz")) for i in range(num_processes)]


def _checkpoint_steps(tmp_path):
  directory = tmp_path / "work/checkpoints"
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def test_pod_simulation_two_processes_of_four_devices(tmp_path):
  outs = _wait(_start_workers(tmp_path, 2, 4, num_steps=3))
  assert "8 devices on 2 host(s)" in outs[0]
  first = _params(tmp_path, 2)
  assert first[0].keys() == first[1].keys()
  for key in first[0]:
    np.testing.assert_array_equal(first[0][key], first[1][key])
  # Restart both processes: they restore step 3 and go on, again in agreement, until SIGTERM
  # to process 1 alone stops both at the same step, a multiple of train.stop_check_every.
  procs = _start_workers(tmp_path, 2, 4, num_steps=10_000, CHECKPOINT_EVERY=10_000,
                         overrides={"train.stop_check_every": 2})
  lines = helpers.read_until(procs[0], "step 5/")
  procs[1].send_signal(signal.SIGTERM)
  outs = _wait(procs, timeout=120)
  out = "".join(lines) + outs[0]
  assert "Resumed from" in out and "steps 3 -> 10000" in out
  assert "SIGTERM received" in outs[1]
  stopped = re.search(r"Stopping at step (\d+) \(a stop request to another process\); "
                      r"checkpoint saved", out)
  assert stopped, out[-4000:]
  step = int(stopped.group(1))
  assert step >= 6 and step % 2 == 0
  second = _params(tmp_path, 2)
  for key in second[0]:
    np.testing.assert_array_equal(second[0][key], second[1][key])
  assert any(not np.array_equal(first[0][k], second[0][k]) for k in first[0])
  assert _checkpoint_steps(tmp_path) == [3, step]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_exits(tmp_path, signum):
  (proc,) = _start_workers(tmp_path, 1, 8, num_steps=10_000, CHECKPOINT_EVERY=10_000)
  lines = helpers.read_until(proc, "step 2/")
  proc.send_signal(signum)
  out, _ = proc.communicate(timeout=120)
  out = "".join(lines) + out
  assert proc.returncode == 0, out[-4000:]
  assert "Stopping at step" in out and signum.name in out
  assert "Traceback" not in out
  steps = [int(p.name) for p in (tmp_path / "work/checkpoints").iterdir() if p.name.isdigit()]
  assert len(steps) == 1 and steps[0] >= 2


def test_time_limit_on_one_fast_clock_stops_every_process_at_the_same_step(tmp_path):
  # Process 1's clock runs 1000 times too fast: its time limit passes within a second, while
  # process 0's would take 10 minutes. On its own, process 1 would leave the others waiting
  # in the next step's collective.
  procs = _start_workers(tmp_path, 2, 2, num_steps=10_000, CHECKPOINT_EVERY=10_000,
                         overrides={"train.time_limit_s": 600.0, "train.stop_check_every": 4},
                         per_process=[{}, {"CLOCK_RATE": 1000}])
  outs = _wait(procs, timeout=150)
  stopped = re.search(r"Stopping at step (\d+) \(time limit\); checkpoint saved", outs[0])
  assert stopped, outs[0][-4000:]
  step = int(stopped.group(1))
  assert step % 4 == 0
  assert _checkpoint_steps(tmp_path) == [step]
  first, second = _params(tmp_path, 2)
  for key in first:
    np.testing.assert_array_equal(first[key], second[key])


def test_a_lost_process_ends_the_other_with_status_75_naming_it(tmp_path):
  procs = _start_workers(tmp_path, 2, 2, num_steps=10_000, CHECKPOINT_EVERY=3,
                         overrides={"train.lost_process_timeout_s": 5.0})
  out, _ = helpers.kill_second_process(procs, "step 4/", tmp_path / "work/checkpoints/3",
                                       timeout=150)
  assert procs[0].returncode == 75, out[-4000:]
  lost = re.search(r"^error: process 1 of 2 is lost \(no heartbeat for \d+ s\); the last "
                   r"checkpoint is step (\d+), (\S+)\. Process 0 exits with status 75", out,
                   re.MULTILINE)
  assert lost, out[-4000:]
  step = int(lost.group(1))
  assert step >= 3 and step == _checkpoint_steps(tmp_path)[-1]
  assert lost.group(2) == str(tmp_path / "work/checkpoints" / str(step))
  assert "Check failure stack trace" not in out and "Fatal Python error" not in out


def test_sigterm_while_compiling_stops_before_the_first_step(tmp_path):
  # An empty compile cache: the step compiles for seconds after the start-up line is printed.
  (proc,) = _start_workers(tmp_path, 1, 8, num_steps=10_000, CACHE=tmp_path / "cache")
  lines = helpers.read_until(proc, "8 devices on 1 host(s)")
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=240)
  out = "".join(lines) + out
  assert proc.returncode == 0, out[-4000:]
  assert "Stopped by SIGTERM before the first step; nothing new to save" in out, out[-4000:]
  assert "Traceback" not in out and "step 1/" not in out
  checkpoints = tmp_path / "work/checkpoints"
  assert not checkpoints.exists() or not any(p.name.isdigit() for p in checkpoints.iterdir())


def test_command_line_digits_run_writes_grid_and_profile(tmp_path):
  workdir = tmp_path / "digits"
  cmd = [sys.executable, "-m", "diffusion_jax.main", "--config", "configs/digits.py",
         f"--workdir={workdir}", "--config.train.num_steps=4", "--config.train.log_every=2",
         "--config.train.sample_every=4", "--config.sample.num_samples=4",
         "--config.sample.sampler=ddim", "--config.sample.num_steps=2",
         "--config.train.profile_start=1",
         "--config.train.profile_steps=1", f"--config.train.compile_cache_dir={CACHE}"]
  proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "steps/s" in proc.stdout and "images/s" in proc.stdout and "ETA" in proc.stdout
  assert (workdir / "samples" / "grid_4.png").exists()
  assert (workdir / "profile").exists()
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  assert json.loads(lines[-1])["step"] == 4


def test_command_line_summary_and_config_arguments():
  cmd = [sys.executable, "-m", "diffusion_jax.main", "--config",
         "configs/cifar10.py:var_type=fixedsmall", "--config.optim.lr=1e-4", "--mode=summary"]
  proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1] == "total params: 35,746,307"


def test_command_line_reports_config_errors(tmp_path):
  cmd = [sys.executable, "-m", "diffusion_jax.main", "--config", "configs/test.py",
         f"--workdir={tmp_path / 'unused'}", "--config.data.dataset=imagenet"]
  proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert "unknown dataset 'imagenet'" in proc.stderr


@pytest.mark.parametrize("args,message", [
    (["--config=configs/test.py", "--config.train.log_every=0"],
     "error: train.log_every=0 must be an integer >= 1: set --config.train.log_every=N"),
    (["--config=configs/test.py", "--config.optim.lr=-1", "--config.train.keep_checkpoints=0"],
     "error: 2 config problems:\n  optim.lr=-1.0 must be"),
    (["--config=configs/missing.py"], "error: config file 'configs/missing.py' not found"),
    (["--config=configs/test.py", "--config.optim.lrr=1"],
     "error: --config.optim.lrr: the config has no field 'optim.lrr'; did you mean "
     "--config.optim.lr?"),
    (["--config=configs/test.py:var_type=big"], "diffusion.var_type='big' must be one of"),
    (["--config=configs/test.py", "--config.train.num_steps=1.5"],
     "error: flag --config.train.num_steps=1.5: invalid literal for int()"),
    (["--config=configs/test.py", "--workdir=/dev/null/run"], "error: cannot write to --workdir"),
    (["--config=configs/digits.py", "--config.data.channels=3", "--config.data.split=val"],
     "error: dataset 'digits' is grayscale: set --config.data.channels=1"),
    (["--mode=distill", "--config=configs/digits_distill.py"],
     "error: distill.teacher is not set: give the workdir of the model to distil"),
])
def test_command_line_user_errors_exit_2_without_a_traceback(tmp_path, args, message):
  if not any(a.startswith("--workdir") for a in args):
    args = args + [f"--workdir={tmp_path / 'run'}"]
  proc = subprocess.run([sys.executable, "-m", "diffusion_jax.main", *args], cwd=ROOT,
                        env=_env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert message in proc.stderr
  assert "Traceback" not in proc.stderr
  assert proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) <= 3, proc.stderr
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag", ["--help", "--helpfull"])
def test_command_line_help_exits_0(flag):
  proc = subprocess.run([sys.executable, "-m", "diffusion_jax.main", flag], cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert proc.stdout.startswith("Command line: `python -m diffusion_jax.main"), proc.stdout[:500]
  assert "--workdir: Directory for checkpoints" in proc.stdout
  # The usage lines are shown as typed: a shell's line continuation kept.
  assert "var_type=fixedsmall \\\n      --config.optim.lr=1e-4" in proc.stdout
  assert proc.stderr == "", proc.stderr


def test_command_line_keyboard_interrupt_exits_130_without_a_traceback():
  script = textwrap.dedent("""
      import sys
      from absl import app
      from diffusion_jax import main

      def interrupted(mode, config, workdir):
        raise KeyboardInterrupt
      main._dispatch = interrupted
      sys.argv = ["main", "--config=configs/test.py", "--mode=summary"]
      app.run(main.main, flags_parser=main.parse_flags)
  """)
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 130, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines() == ["Interrupted (SIGINT); stopped without saving"]


def test_kill_9_then_restart_continues_exactly(tmp_path):
  """A run killed with SIGKILL after a checkpoint, restarted, ends where a straight run ends.

  (A kill while a save is in flight leaves a `<step>.orbax-checkpoint-tmp` directory, which the
  restart discards, starting from the previous committed checkpoint.)
  """
  straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
  straight_dir.mkdir()
  killed_dir.mkdir()
  _wait(_start_workers(straight_dir, 1, 2, num_steps=6))

  (proc,) = _start_workers(killed_dir, 1, 2, num_steps=10_000)
  deadline = time.time() + 240
  lines = []
  while time.time() < deadline:
    line = proc.stdout.readline()
    lines.append(line)
    if not line or line.startswith("step 3/"):
      break
  # Kill as soon as the (asynchronous) checkpoint of step 3 is committed: the next one, at step
  # 6, needs three more steps and its own save, far longer than the 10 ms polls.
  committed = killed_dir / "work" / "checkpoints" / "3"
  while time.time() < deadline and not committed.is_dir():
    time.sleep(0.01)
  proc.kill()  # SIGKILL: no handler runs, nothing is flushed
  proc.wait(timeout=60)
  assert committed.is_dir(), "".join(lines)[-3000:]
  (out,) = _wait(_start_workers(killed_dir, 1, 2, num_steps=6))
  assert "Resumed from" in out and "steps 3 -> 6" in out, out[-3000:]

  straight = np.load(straight_dir / "params_0.npz")
  resumed = np.load(killed_dir / "params_0.npz")
  assert straight.files == resumed.files
  for key in straight.files:
    np.testing.assert_array_equal(straight[key], resumed[key])


def _committed_steps(checkpoints_dir):
  return sorted(int(p.name) for p in checkpoints_dir.iterdir() if p.name.isdigit())


def _digits_training(workdir, *, log_every):
  """The command line of a digits training run with a checkpoint every 3 steps (num_steps to
  be added), sharing the tests' compile cache."""
  return [sys.executable, "-m", "diffusion_jax.main", "--config", "configs/digits.py",
          f"--workdir={workdir}", "--config.train.checkpoint_every=3",
          f"--config.train.log_every={log_every}", "--config.train.sample_every=0",
          f"--config.train.compile_cache_dir={CACHE}"]


def test_full_disk_stops_at_the_first_failed_save_with_one_error_line(tmp_path):
  """The second run may write no file over 100 kB (RLIMIT_FSIZE, with SIGXFSZ ignored so that
  writes fail with EFBIG), while its checkpoints' array data take megabytes (in one or a few
  files, as timing decides): its first save fails, as on a full disk, and the checkpoint of
  the first run, written without the limit, stays. Its other files (logs, metrics) stay small."""
  workdir = tmp_path / "work"
  cmd = _digits_training(workdir, log_every=1)
  first = subprocess.run(cmd + ["--config.train.num_steps=3"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=300)
  assert first.returncode == 0, first.stderr[-3000:]
  checkpoints_dir = workdir / "checkpoints"
  limit = 100_000
  largest = max(p.stat().st_size for p in (checkpoints_dir / "3").rglob("*") if p.is_file())
  assert largest > 20 * limit

  # The limit and the ignored signal are set in a small launcher that then execs the run (both
  # survive exec), rather than in a preexec_fn, which would run Python in a fork of this
  # multithreaded process.
  limited = [sys.executable, "-c", textwrap.dedent(f"""
      import os, resource, signal, sys
      signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
      resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
      os.execv(sys.executable, sys.argv[1:])
  """)]
  second = subprocess.run(limited + cmd + ["--config.train.num_steps=30"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
  assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-3000:]
  # orbax logs each failed write of the background save: one line each, no tracebacks.
  assert "Traceback" not in second.stderr, second.stderr[-3000:]
  assert len(second.stderr.splitlines()) < 30, second.stderr[-3000:]
  errors = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, second.stderr[-3000:]
  assert errors[0].startswith(f"error: saving the checkpoint of step 6 in {checkpoints_dir}")
  assert "File too large" in errors[0] and "the older checkpoints [3] are kept" in errors[0]
  # Not a full disk: the advice fits the cause, a limit on file sizes.
  assert "Free space" not in errors[0] and "Raise the limit on file sizes" in errors[0]
  assert errors[0].endswith("it resumes from step 3"), errors[0]
  steps = [line.split()[1] for line in second.stdout.splitlines() if line.startswith("step ")]
  print(f"the failed save of step 6 was noticed after step {steps[-1]}")
  assert "10/30" not in steps  # noticed as soon as the background save ended, by step 9's save
  assert sorted(p.name for p in checkpoints_dir.iterdir()) == ["3"]  # no half-written folder


def test_kill_9_at_seeded_moments_then_restart_finishes(tmp_path):
  """Killed twice at seeded moments (a save is in flight at nearly every step, as the runs save
  every step), the run resumes and finishes with a checkpoint that reads back verified."""
  rng = np.random.default_rng(20)
  checkpoints_dir = tmp_path / "work" / "checkpoints"
  for wait_for_a_checkpoint in (True, False):
    (proc,) = _start_workers(tmp_path, 1, 2, num_steps=10_000, CHECKPOINT_EVERY=1)
    lines = helpers.read_until(proc, "step ")  # training has started
    deadline = time.time() + 120
    while (wait_for_a_checkpoint and time.time() < deadline
           and not (checkpoints_dir.exists() and _committed_steps(checkpoints_dir))):
      time.sleep(0.01)
    delay = float(rng.uniform(0.0, 1.0))
    time.sleep(delay)
    proc.kill()  # SIGKILL: no handler runs, nothing is flushed
    proc.wait(timeout=60)
    print(f"killed {delay:.2f} s later; {sorted(p.name for p in checkpoints_dir.iterdir())}")
    assert lines and lines[-1].startswith("step "), "".join(lines)[-3000:]
  resumed_from = _committed_steps(checkpoints_dir)[-1]
  (out,) = _wait(_start_workers(tmp_path, 1, 2, num_steps=resumed_from + 2, CHECKPOINT_EVERY=1))
  assert f"steps {resumed_from} -> {resumed_from + 2}" in out, out[-3000:]
  assert "cannot be used" not in out, out[-3000:]
  assert _committed_steps(checkpoints_dir)[-1] == resumed_from + 2
  from diffusion_jax.training import checkpoints  # pylint: disable=g-import-not-at-top
  params, step = checkpoints.restore_params(str(checkpoints_dir))  # verified against checksums
  assert step == resumed_from + 2 and params


def test_a_damaged_checkpoint_is_set_aside_in_a_few_lines(tmp_path):
  """Random bytes in the array data of the latest checkpoint: training reports it in one line,
  moves it aside and resumes from the previous one; orbax's abandoned reads of every array
  (each reported with its TensorStore spec) stay off the console."""
  workdir = tmp_path / "work"
  cmd = _digits_training(workdir, log_every=3)
  first = subprocess.run(cmd + ["--config.train.num_steps=6"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=300)
  assert first.returncode == 0, first.stderr[-3000:]
  rng = np.random.default_rng(0)
  data = [p for p in (workdir / "checkpoints" / "6" / "state").rglob("ocdbt.process_0/d/*")
          if p.stat().st_size > 100_000]
  assert data
  for path in data:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 4096] = rng.integers(0, 256, 4096, np.uint8).tobytes()
    path.write_bytes(bytes(raw))
  second = subprocess.run(cmd + ["--config.train.num_steps=9"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
  assert second.returncode == 0, second.stderr[-3000:]
  assert (f"WARNING: checkpoint at step 6 in {workdir / 'checkpoints'} cannot be used"
          in second.stdout), second.stdout[-3000:]
  assert f"moved it to {workdir / 'checkpoints' / '6.corrupt'}" in second.stdout
  assert f"Resumed from {workdir / 'checkpoints' / '3'}" in second.stdout
  assert "cannot be used" not in second.stderr, second.stderr[-3000:]  # said once, above
  assert "Traceback" not in second.stderr and len(second.stderr.splitlines()) < 30, (
      second.stderr[-3000:])
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == [
      "3", "6", "6.corrupt", "9"]


@pytest.mark.slow  # the command line in a subprocess
def test_a_misspelled_override_of_the_default_config_is_one_error_line(tmp_path):
  # No --config: the default config (digits) takes the override while the flags are defined.
  proc = subprocess.run([sys.executable, "-m", "diffusion_jax.main", "--mode", "summary",
                         "--config.optim.lrr=1e-4"], cwd=tmp_path, env=helpers.subprocess_env(),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr.startswith("error: --config.optim.lrr: the config has no field "
                                "'optim.lrr'; did you mean --config.optim.lr?"), proc.stderr
  assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
