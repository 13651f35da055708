"""A gs:// workdir and gs:// weights, end to end, against a local Cloud Storage emulator.

Every file the project reads or writes goes through `etils.epath`; orbax's arrays go through
TensorStore. Both are pointed at an in-process `gcp-storage-emulator` (in-memory, a free port on
127.0.0.1), and the command line runs as subprocesses so that they read these settings first:

  * epath picks TensorFlow's gfile for gs:// whenever TensorFlow is installed, and TensorFlow's
    GCS client has no endpoint setting (it always calls storage.googleapis.com). EPATH_USE_TF=false
    makes epath use fsspec's gcsfs instead, which honours STORAGE_EMULATOR_HOST.
  * TensorStore reads TENSORSTORE_GCS_HTTP_URL; GOOGLE_AUTH_TOKEN_FOR_TESTING spares it the
    search for credentials (and the metadata server, which GCE_METADATA_ROOT points nowhere).
  * TensorBoard's event files (tensorboardX) and metrics.jsonl go through epath too; object
    stores cannot append, so both are rewritten whole (`outputs.MetricsLog`).
"""
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gcp_storage_emulator import server as emulator_server

# Slow: the command line trains, samples and evaluates in subprocesses against the emulator.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUCKET = "diffusion-test"

# Runs `python -m diffusion_jax.main ARGS` (as `-m` would, from `-c`).
_MAIN = textwrap.dedent("""
    import runpy, sys
    sys.argv = ["diffusion_jax.main"] + sys.argv[1:]
    runpy.run_module("diffusion_jax.main", run_name="__main__", alter_sys=True)
""")

TINY = ["--config", "configs/digits.py", "--config.train.num_steps=4",
        "--config.train.checkpoint_every=2", "--config.train.sample_every=4",
        "--config.train.batch_size=8", "--config.train.log_every=2",
        "--config.sample.num_samples=4", "--config.model.ch_mult=(1,)",
        "--config.diffusion.num_timesteps=10", "--config.train.compile_cache_dir="]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _with_generation_header(handler):
  """The emulator's media download without the x-goog-generation header that TensorStore
  requires of every read ("Malformed StorageGeneration" otherwise); adds it."""

  def download(request, response, storage, *args, **kwargs):
    handler(request, response, storage, *args, **kwargs)
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # pylint: disable=broad-except  # not found: the handler said so
      return
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))

  return download


@pytest.fixture(scope="module")
def emulator():
  """The emulator's URL, serving an empty BUCKET from memory, for this module's tests."""
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top
  original_download, original_handlers = objects.download, emulator_server.HANDLERS
  patched = _with_generation_header(original_download)
  # Both the download routes and `objects.get` (alt=media, TensorStore's read) call it.
  objects.download = patched
  emulator_server.HANDLERS = tuple(
      (regex, {method: patched if fn is original_download else fn
               for method, fn in methods.items()})
      for regex, methods in original_handlers)
  port = _free_port()
  server = emulator_server.create_server("127.0.0.1", port, in_memory=True,
                                         default_bucket=BUCKET)
  server.start()
  try:
    yield f"http://127.0.0.1:{port}"
  finally:
    server.stop()
    objects.download, emulator_server.HANDLERS = original_download, original_handlers


@pytest.fixture(scope="module")
def gcs_env(emulator, tmp_path_factory):
  env = {k: v for k, v in os.environ.items()
         if k not in ("GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG")}
  env.update(
      STORAGE_EMULATOR_HOST=emulator,
      TENSORSTORE_GCS_HTTP_URL=emulator,
      GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator",
      GCE_METADATA_ROOT="127.0.0.1:9",  # no metadata server: never wait for one
      NO_GCE_CHECK="true",
      EPATH_USE_TF="false",
      # gcsfs asks the storage-control API whether a bucket is zonal: the emulator has none.
      GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
      CLOUDSDK_CONFIG=str(tmp_path_factory.mktemp("gcloud")),  # no user's gcloud credentials
      JAX_PLATFORMS="cpu",
      PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
  )
  return env


def _run(env, args, *, code=_MAIN, timeout=300):
  result = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
  assert result.returncode == 0, (
      f"{' '.join(args[:8])} ... exited {result.returncode}:\n{result.stdout[-3000:]}\n"
      f"{result.stderr[-6000:]}")
  return result.stdout


def _read(env, path: str, *, binary=False):
  """A file's contents read back from the emulator by a fresh process."""
  code = textwrap.dedent("""
      import sys
      from etils import epath
      sys.stdout.buffer.write(epath.Path(sys.argv[1]).read_bytes())
  """)
  result = subprocess.run([sys.executable, "-c", code, path], cwd=ROOT, env=env,
                          capture_output=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr.decode()[-3000:]
  return result.stdout if binary else result.stdout.decode()


def test_train_eval_watch_and_sample_on_a_gs_workdir(gcs_env):
  workdir = f"gs://{BUCKET}/run"
  _run(gcs_env, [*TINY, "--workdir", workdir])
  logged = [json.loads(line) for line in _read(gcs_env, f"{workdir}/metrics.jsonl").splitlines()]
  assert [m["step"] for m in logged] == [2, 4]

  out = _run(gcs_env, ["--mode", "eval", "--workdir", workdir, "--config.eval.watch=True",
                       "--config.eval.num_samples=8", "--config.eval.batch_size=8",
                       "--config.eval.bpd_max_examples=8", "--config.eval.is_splits=1",
                       "--config.eval.watch_poll_s=0.1",
                       "--config.eval.watch_timeout_s=5"])
  assert "eval step 2:" in out and "eval step 4:" in out, out[-3000:]
  for step in (2, 4):
    metrics = json.loads(_read(gcs_env, f"{workdir}/eval/{step}_n8.json"))
    assert metrics["step"] == step and metrics["num_samples"] == 8
    assert np.isfinite(metrics["bpd_test"]), metrics

  _run(gcs_env, ["--mode", "sample", "--workdir", workdir, "--config.eval.num_samples=4",
                 "--config.eval.batch_size=4"])
  import io  # pylint: disable=g-import-not-at-top
  with np.load(io.BytesIO(_read(gcs_env, f"{workdir}/samples/4_n4/samples_0.npz",
                                binary=True))) as f:
    assert f["images"].shape == (4, 8, 8, 1) and f["images"].dtype == np.uint8
    np.testing.assert_array_equal(f["index"], np.arange(4))


def test_inception_weights_and_fid_statistics_from_gs(gcs_env):
  code = textwrap.dedent("""
      import jax
      import numpy as np
      from etils import epath
      from diffusion_jax.evaluation.metrics import fid
      from diffusion_jax.evaluation.metrics import inception

      shapes = jax.eval_shape(lambda: inception.InceptionV3().init(
          jax.random.key(0), np.zeros((1, 75, 75, 3), np.float32)))
      flat = jax.tree_util.tree_flatten_with_path(shapes)[0][:12]  # a few leaves: small
      rng = np.random.default_rng(0)
      variables = {}
      for path, leaf in flat:
        node = variables
        for key in path[:-1]:
          node = node.setdefault(key.key, {})
        node[path[-1].key] = rng.standard_normal(leaf.shape).astype(np.float32)
      weights = "gs://BUCKET/weights/inception.npz"
      inception.save_inception_params(weights, variables)
      loaded = inception.load_inception_params(weights)
      for (path, want), (_, got) in zip(jax.tree_util.tree_flatten_with_path(variables)[0],
                                        jax.tree_util.tree_flatten_with_path(loaded)[0]):
        np.testing.assert_array_equal(got, want, err_msg=jax.tree_util.keystr(path))
      try:
        inception.load_inception_params("gs://BUCKET/weights/missing.npz")
        raise AssertionError("a missing weights file loaded")
      except FileNotFoundError as e:
        assert "gs://BUCKET/weights/missing.npz" in str(e), e

      stats = epath.Path("gs://BUCKET/stats/ref.npz")
      with stats.open("wb") as f:
        np.savez(f, mu=np.arange(3.0), sigma=np.eye(3))
      mu, sigma = fid.load_statistics(str(stats), dim=3)
      np.testing.assert_array_equal(mu, np.arange(3.0))
      np.testing.assert_array_equal(sigma, np.eye(3))
      print("ok")
  """).replace("BUCKET", BUCKET)
  assert _run(gcs_env, [], code=code).strip().endswith("ok")


def test_tensorboard_events_and_metrics_log_on_gs(gcs_env):
  code = textwrap.dedent("""
      from etils import epath
      from diffusion_jax.utils import outputs
      log = outputs.MetricsLog("gs://BUCKET/log", enabled=True)
      log.scalars(1, {"loss": 1.0})
      log.scalars(2, {"loss": 0.5})
      log.close()
      again = outputs.MetricsLog("gs://BUCKET/log", enabled=True)  # a restart keeps the lines
      again.scalars(3, {"loss": 0.25})
      again.close()
      lines = epath.Path("gs://BUCKET/log/metrics.jsonl").read_text().splitlines()
      assert len(lines) == 3, lines
      files = list(epath.Path("gs://BUCKET/log/tensorboard").iterdir())
      assert len(files) == 2 and all(f.read_bytes() for f in files), files
      print("ok")
  """).replace("BUCKET", BUCKET)
  assert _run(gcs_env, [], code=code).strip().endswith("ok")
