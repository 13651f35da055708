"""The benchmark command runs with the JAX stack alone and ends with one JSON record."""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

REPO = pathlib.Path(__file__).resolve().parents[1]
BLOCKED = ("tensorflow", "tensorflow_datasets", "clu", "orbax", "etils", "PIL")

# Installed before anything else runs: any import of a blocked package (or its submodules)
# raises, as it would on a machine with only jax, flax and optax installed.
_BLOCKER = textwrap.dedent(f"""
    import runpy, sys
    from importlib.abc import MetaPathFinder

    class _Block(MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
          raise ImportError("blocked in this test: " + name)
        return None

    sys.meta_path.insert(0, _Block())
    sys.argv = ["diffusion_jax.bench"] + sys.argv[1:]
    runpy.run_module("diffusion_jax.bench", run_name="__main__", alter_sys=True)
    assert not any(m.split(".")[0] in {BLOCKED!r} for m in sys.modules)
""")


def test_bench_without_tensorflow_prints_one_json_record(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, "-c", _BLOCKER, "--config", "configs/test.py", "--batch", "2",
       "--steps", "2", "--warmup", "1", "--sample_steps", "2",
       "--set", "model.dropout=0.0", "--profile", str(tmp_path / "trace")],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  lines = [l for l in proc.stdout.splitlines() if l.strip()]
  assert lines[0].startswith("[bench]")
  record = json.loads(lines[-1])
  assert record["batch"] == 2 and record["devices"] >= 1
  assert record["params"] == 702_499
  assert record["dtype"] == "float32"
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
