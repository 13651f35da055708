"""The benchmark command runs with the JAX stack alone and ends with one JSON record."""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from diffusion_jax.tools import bench

REPO = pathlib.Path(__file__).resolve().parents[2]
BLOCKED = ("tensorflow", "tensorflow_datasets", "clu", "orbax", "etils", "PIL")


def _blocker(blocked, no_backend: bool = False) -> str:
  """A script that runs the benchmark with every import of `blocked` packages failing.

  Installed before anything else runs: any import of a blocked package (or its submodules)
  raises, as it would on a machine without it. With `no_backend`, the script also fails if a JAX
  backend was started by the time the benchmark ended (loading a config imports jax, for the
  samplers' settings, but must start nothing).
  """
  return textwrap.dedent(f"""
      import runpy, sys
      from importlib.abc import MetaPathFinder

      class _Block(MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
          if name.split(".")[0] in {tuple(blocked)!r}:
            raise ImportError("blocked in this test: " + name)
          return None

      sys.meta_path.insert(0, _Block())
      sys.argv = ["diffusion_jax.tools.bench"] + sys.argv[1:]
      try:
        runpy.run_module("diffusion_jax.tools.bench", run_name="__main__", alter_sys=True)
      finally:
        if {no_backend!r} and "jax" in sys.modules:
          from jax._src import xla_bridge
          assert not xla_bridge._backends, "a JAX backend was started"
      assert not any(m.split(".")[0] in {tuple(blocked)!r} for m in sys.modules)
  """)


# As on a machine with only jax, flax and optax installed.
_BLOCKER = _blocker(BLOCKED)
# Schedule fields (15) plus the sampler's timesteps: the most T-long arrays a program holds.
_T_LONG_ARRAYS = 16


@pytest.mark.slow  # compiles and times training and sampling programs in a subprocess
def test_bench_without_tensorflow_prints_one_json_record(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, "-c", _BLOCKER, "--config", "configs/test.py", "--batch", "2",
       "--steps", "2", "--warmup", "1", "--sample_steps", "2",
       "--config.model.dropout=0.0", "--profile", str(tmp_path / "trace"),
       "--scaling", "30,60,240", "--samplers",
       "ancestral,ddim3,dpmsolver++2,ancestral2,ddim_continuous4",
       "--eval_samples", "1000"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  lines = [l for l in proc.stdout.splitlines() if l.strip()]
  assert lines[0].startswith("[bench]")
  record = json.loads(lines[-1])
  assert record["batch"] == 2 and record["devices"] >= 1
  assert record["params"] == 702_499
  assert record["dtype"] == "float32" and record["dropout"] == 0.0
  assert record["config"] == "configs/test.py"
  assert record["jax_version"] and record["device_kind"]
  # The benchmark adds no XLA flags of its own: what ran is what the environment asked for.
  assert record["xla_flags"] == ""
  for field in ("compile_train_s", "train_step_median_s", "train_images_per_s",
                "compile_sample_s", "forward_median_s", "sample_step_median_s",
                "flops_per_train_step", "achieved_train_tflops"):
    assert isinstance(record[field], float) and record[field] > 0, field
  assert record["sample_steps"] == 2
  assert abs(record["train_images_per_s"] * record["train_step_median_s"] - 2) < 1e-6
  # --profile traced one more step and summarised it by XLA op kind.
  assert list((tmp_path / "trace").rglob("*.xplane.pb"))
  profile = [l for l in lines if l.startswith("[bench] profile:")]
  assert len(profile) == 1, proc.stdout
  ops = lines[lines.index(profile[0]) + 1:]
  shares = [float(l.split()[-1].rstrip("%")) for l in ops if l.endswith("%")]
  assert shares and all(0 < s <= 100 for s in shares) and sum(shares) <= 100.5, ops

  # --samplers: each sampler's program timed over at most --sample_steps (2) calls and its cost
  # per call scaled to its own calls (ancestral alone: all T = 100 of configs/test.py).
  samplers = record["samplers"]
  assert list(samplers) == ["ancestral", "ddim3", "dpmsolver++2", "ancestral2",
                            "ddim_continuous4"], samplers
  for tag, calls in (("ancestral", 100), ("ddim3", 3), ("dpmsolver++2", 2), ("ancestral2", 2),
                     ("ddim_continuous4", 4)):
    got = samplers[tag]
    assert got["calls"] == calls and got["timed_calls"] == min(calls, 2), (tag, got)
    assert got["call_median_s"] > 0 and got["compile_s"] > 0, (tag, got)
    assert got["images_per_s"] * got["call_median_s"] * calls == pytest.approx(2), (tag, got)
    assert got["eval_samples"] == 1000
    assert got["eval_hours"] * 3600 * got["images_per_s"] == pytest.approx(1000), (tag, got)
  assert [l for l in lines if l.startswith("[bench] ddim3: 3 calls")], proc.stdout

  # --scaling: each program compiled at every T; T=30 is shorter than the 50 steps of DDIM and
  # of the respaced schedule, so both visit all 30 there. 60 and 240 both respace.
  scaling = record["scaling"]
  assert set(scaling) == {"30", "60", "240"}, scaling
  for t, programs in scaling.items():
    assert set(programs) == {"ancestral", "ancestral_respaced50", "ddim50", "bpd"}, programs
    assert programs["ancestral"]["steps"] == programs["bpd"]["steps"] == int(t)
    assert programs["ddim50"]["steps"] == programs["ancestral_respaced50"]["steps"] == min(
        50, int(t))
    for name, got in programs.items():
      assert isinstance(got["compile_s"], float) and got["compile_s"] > 0, (t, name)
      for field in ("temp_bytes", "argument_bytes", "output_bytes", "hlo_chars"):
        assert isinstance(got[field], int) and got[field] > 0, (t, name, field)
  grown = 240 - 60
  for name in ("ancestral", "ancestral_respaced50", "ddim50", "bpd"):
    small, large = scaling["60"][name], scaling["240"][name]
    # Without the literal values of its constants the program text was the same size at both T
    # (and within 3 characters at T = 1000 and 4000, the digits of scalars such as T - 1): one
    # scan body, whatever its length. Unrolled, it would grow 4x from 60 to 240 steps.
    assert large["hlo_chars_without_constants"] <= 1.01 * small["hlo_chars_without_constants"], (
        name, small, large)
    # The whole text also holds the T-long arrays as constants: up to 16 characters a value
    # printed in decimal (8 in hex, as MLIR prints large ones), at most _T_LONG_ARRAYS of them
    # (6, 3 and 9 in these programs). Measured: +4.1k (ancestral), +2.5k, +7.0k of 170-190k.
    assert large["hlo_chars"] <= 1.2 * small["hlo_chars"] + grown * _T_LONG_ARRAYS * 16, (
        name, small, large)
    # Scratch memory: the samplers' was identical at both T; the bound's grew by its per-t
    # terms, stacked by the scan, and the scanned timesteps: (B + 1) x 4 bytes a step (+2,160
    # bytes here), which twice that allows for any alignment.
    assert large["temp_bytes"] <= 1.2 * small["temp_bytes"] + grown * (2 + 1) * 4 * 2, (
        name, small, large)
    # The coefficient arrays are constants of the program, so the arguments (parameters, keys,
    # images) were identical; were they passed in, they would add 4 bytes a value.
    assert large["argument_bytes"] <= small["argument_bytes"] + grown * _T_LONG_ARRAYS * 4, (
        name, small, large)
    assert large["output_bytes"] == small["output_bytes"], (name, small, large)


@pytest.mark.parametrize("flag, value, message", [
    ("--scaling", "1000,abc", "'abc' is not a whole number"),
    ("--scaling", "1000,1", "T must be at least 2"),
    ("--samplers", "ddim", "needs its number of calls, e.g. ddim20"),
    ("--samplers", "plms20", "'plms20' is not a sampler with its calls"),
    ("--samplers", "ddim0", "'ddim0' is not a sampler with its calls"),
    ("--samplers", "ddim5,ddim5", "'ddim5' is given twice")])
def test_bench_refuses_a_bad_list_before_starting_jax(flag, value, message):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  # With no JAX backend started: the lists are checked before anything runs.
  proc = subprocess.run(
      [sys.executable, "-c", _blocker(BLOCKED, no_backend=True), "--config",
       "configs/test.py", flag, value],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False)
  assert proc.returncode == 2, proc.stderr[-4000:]
  assert proc.stderr.startswith(f"error: flag {flag}={value}: "), proc.stderr
  assert message in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
  assert proc.stdout == "", proc.stdout


# With no JAX backend started: the flags and the config are checked before JAX starts (loading a
# config imports jax and flax for the settings of the registered samplers and architectures).
_BLOCKER_WITHOUT_JAX = _blocker(BLOCKED, no_backend=True)


def _bench_without_jax(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-c", _BLOCKER_WITHOUT_JAX, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("args, message", [
    (["--config", "configs/test.py", "--config.model.dropoutt=0.0"],
     "error: --config.model.dropoutt: the config has no field 'model.dropoutt'; did you mean "
     "--config.model.dropout?"),
    # The default config (cifar10), with a misspelled override.
    (["--config.optim.lrr=1e-4"],
     "error: --config.optim.lrr: the config has no field 'optim.lrr'; did you mean "
     "--config.optim.lr?"),
    (["--config", "test", "--config.model.dropout=much"],
     "error: flag --config.model.dropout=much: could not convert string to float"),
    (["--config", "configs/missing.py"], "error: config file 'configs/missing.py' not found"),
    (["--config", "configs/test.py:foo=1"],
     "error: flag --config=configs/test.py:foo=1: ValueError: unknown config argument 'foo'"),
    (["--batch", "eight"], "error: flag --batch=eight: invalid literal for int()"),
    (["--config", "test", "--set", "model.dropout"],
     "error: --set needs KEY=VALUE, got 'model.dropout'"),
    (["--config", "test", "--set", "model.dropoutt=0.0"],
     "error: --set model.dropoutt=0.0: config has no field 'model.dropoutt'"),
    (["--config", "test", "extra"], "error: unexpected arguments: ['extra']")])
def test_bench_reports_a_mistake_in_the_flags_in_one_line_before_starting_jax(args, message):
  proc = _bench_without_jax(*args)
  assert proc.returncode == 2, proc.stderr[-4000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and errors[0].startswith(message), proc.stderr
  assert "Traceback" not in proc.stderr and proc.stdout == "", proc.stderr


def test_bench_help_exits_0_before_starting_jax():
  proc = _bench_without_jax("--help")
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert proc.stdout.startswith("Benchmark: compile and step times"), proc.stdout[:500]
  for flag in ("--config:", "--batch:", "--samplers:", "--scaling:", "--set:", "--profile:"):
    assert flag in proc.stdout, flag
  assert proc.stderr == "", proc.stderr


def test_bench_set_still_overrides_the_config_with_a_deprecation_warning():
  with pytest.warns(DeprecationWarning, match=r"--set is deprecated .* use --config.KEY=VALUE"):
    args = bench._parse(["--config=configs/test.py", "--set", "model.dropout=0.0", "--set",
                         "model.ch_mult=[1, 2]", "--batch=4"])
  assert args.config.model.dropout == 0.0 and args.config.model.ch_mult == (1, 2)
  assert args.batch == 4 and args["config"].config_filename == "configs/test.py"


def test_bench_flags_parse_anew_on_each_call():
  first = bench._parse(["--config=test", "--config.model.dropout=0.0", "--scaling=30,60",
                        "--samplers=ancestral,ddim5"])
  assert first.config.model.dropout == 0.0 and first.scaling == [30, 60]
  assert first.samplers == [("ancestral", 0), ("ddim", 5)]
  second = bench._parse(["--config=test"])
  assert second.config.model.dropout == 0.1 and second.scaling == [] and second.samplers == []
  assert first.config.model.dropout == 0.0  # its own config, untouched by the second call


@pytest.mark.parametrize("args, message", [
    (["--samplers", "ddim500"], "ddim500: 500 calls, more than the T=100 steps"),
    (["--samplers", "dpmsolver++3", "--sample_steps", "2", "--config.sample.solver_order=3"],
     "dpmsolver++3 (timed over 2 calls, --sample_steps)"),
    (["--samplers", "ddim5", "--eval_samples", "0"], "--eval_samples must be at least 1")])
@pytest.mark.slow  # the benchmark's command line, with JAX, in a subprocess
def test_bench_refuses_samplers_it_cannot_price_before_compiling(args, message):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, "-m", "diffusion_jax.tools.bench", "--config", "configs/test.py", *args],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 2, proc.stderr[-4000:]
  assert proc.stderr.startswith("error: --") and message in proc.stderr, proc.stderr
  # Refused before the training step compiles: nothing was timed.
  assert "train step compiled" not in proc.stdout, proc.stdout
