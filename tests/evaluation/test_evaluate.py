"""Evaluation modes on a tiny model with randomized weights, under mocked CIFAR-10."""
import copy
import json
import os
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from diffusion_jax.config import build
from diffusion_jax.config import programs
from diffusion_jax.config import config_lib
from diffusion_jax.core import diffusion
from diffusion_jax.core import prng
from diffusion_jax.data import images as images_lib
from diffusion_jax.evaluation import inference
from diffusion_jax.evaluation import modes as evaluate
from diffusion_jax import parallel
from diffusion_jax.samplers import dpm_solver
from diffusion_jax.training import checkpoints
from diffusion_jax.utils import outputs
from tests import checkpoint_fixtures, helpers

STEP = 5

load_config = helpers.eval_config
mock_cifar = helpers.mock_cifar


# The tests marked slow compile and run whole sampling, evaluation or training programs.
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A workdir whose checkpoint holds randomized weights (the real init's outputs are ~0)."""
  config = load_config()
  path = tmp_path_factory.mktemp("eval")
  ema = checkpoint_fixtures.randomized_checkpoint(config, path, STEP)
  return config, path, ema


@pytest.mark.slow
def test_sample_mode_writes_this_process_share_and_is_device_count_independent(workdir, capsys):
  config, path, _ = workdir
  out_dir = evaluate.run_sample(config, os.fspath(path))
  assert "sample: 10/10 images (" in capsys.readouterr().out  # the last progress line
  # Named for the test config's sampler (DDIM over 4 steps), sample count and seed.
  assert (config.sample.sampler, config.sample.num_steps) == ("ddim", 4)
  assert out_dir == path / "samples" / f"{STEP}_ddim4_n10_seed3"
  with np.load(out_dir / "samples_0.npz") as f:
    images, index = f["images"], f["index"]
  assert images.dtype == np.uint8 and images.shape == (10, 8, 8, 3)
  np.testing.assert_array_equal(index, np.arange(10))
  assert images.std() > 0
  assert Image.open(out_dir / "grid.png").size[0] > 8
  assert not list(out_dir.glob("*.tmp"))

  # The same examples drawn on one device equal those drawn on eight (to float rounding).
  one = inference.Sampler(inference.load(os.fspath(path), config),
                          mesh=parallel.make_mesh(jax.devices()[:1]))
  first8 = one.sample_batch(np.arange(8), seed=3)
  eight = inference.Sampler(inference.load(os.fspath(path), config))
  np.testing.assert_allclose(eight.sample_batch(np.arange(8), seed=3), first8, atol=1e-5)
  np.testing.assert_array_equal(images_lib.to_uint8(first8), images[:8])
  # Settings given by name replace the config's: ancestral sampling is another chain.
  ancestral = one.sample_batch(np.arange(8), seed=3, sampler="ancestral", num_steps=0)
  assert np.abs(ancestral - first8).max() > 0.1


@pytest.mark.slow
def test_dpm_solver_by_name_in_every_sampling_mode(workdir):
  """DPM-Solver++ from the sample section: the same samples on 1 and 8 devices, what
  dpm_solver.solve gives directly, and --mode sample's results named for it."""
  config, path, ema = workdir
  config = config_lib.apply_overrides(copy.deepcopy(config), {
      "sample.sampler": "dpmsolver++", "sample.num_steps": 4, "sample.solver_order": 2})
  one = inference.Sampler(inference.load(os.fspath(path), config),
                          mesh=parallel.make_mesh(jax.devices()[:1]))
  eight = inference.Sampler(inference.load(os.fspath(path), config))
  got = one.sample_batch(np.arange(8), seed=3)
  np.testing.assert_allclose(eight.sample_batch(np.arange(8), seed=3), got, atol=1e-5)
  model, sched = build.make_model(config), build.make_schedule(config)
  keys = prng.example_keys(prng.run_key(3, prng.RunStream.SAMPLE), np.arange(8))
  direct = dpm_solver.solve(sched, programs.denoiser(model, ema), keys, (8, 8, 8, 3), num_steps=4,
                            order=2, clip_denoised=True)
  np.testing.assert_allclose(got, np.asarray(direct), atol=1e-5)
  assert got.std() > 0.05
  out_dir = evaluate.run_sample(config, os.fspath(path))
  assert out_dir == path / "samples" / f"{STEP}_dpmsolver++4_order2_time_uniform_n10_seed3"


def _record_batches(monkeypatch) -> list[int]:
  """The length of every batch the Sampler draws from here on."""
  seen = []
  original = inference.Sampler.sample_global

  def sample_global(self, indices, **kwargs):
    seen.append(len(indices))
    return original(self, indices, **kwargs)

  monkeypatch.setattr(inference.Sampler, "sample_global", sample_global)
  return seen


@pytest.mark.slow
def test_batches_are_no_larger_than_the_samples_asked_for(workdir, monkeypatch):
  """eval.batch_size is a bound: 100 samples run in one batch of 104 (rounded up to the 8
  devices), not 504, and give the same samples bit for bit as eval.batch_size=100."""
  config, path, _ = workdir
  seen = _record_batches(monkeypatch)
  config = config_lib.apply_overrides(copy.deepcopy(config), {
      "eval.num_samples": 100, "eval.batch_size": 500})
  out_dir = evaluate.run_sample(config, os.fspath(path))
  assert seen == [104]
  with np.load(out_dir / "samples_0.npz") as f:
    large = f["images"]
  assert large.shape == (100, 8, 8, 3)
  config.eval.batch_size = 100
  assert evaluate.run_sample(config, os.fspath(path)) == out_dir  # the same settings, name
  assert seen == [104, 104]
  with np.load(out_dir / "samples_0.npz") as f:
    np.testing.assert_array_equal(f["images"], large)
  # The Python API likewise; bits/dim and the real images' statistics by their examples.
  sampler = inference.Sampler(inference.load(os.fspath(path), config))
  assert sampler.sample(10, seed=3, batch_size=500).shape == (10, 8, 8, 3)
  assert seen[2:] == [16]
  with mock_cifar():
    indices, valid, _, _ = next(evaluate.split_batches(config, "test", sampler.mesh, 500, 10))
  assert len(indices) == 16 and valid.sum() == 10
  with pytest.raises(ValueError, match="ask for at least one sample"):
    sampler.sample(0)


@pytest.mark.slow
def test_dumps_of_other_settings_are_kept_and_the_same_settings_give_the_same_name(workdir):
  config, path, _ = workdir
  config = config_lib.apply_overrides(copy.deepcopy(config), {"eval.seed": 0})
  ten = evaluate.run_sample(config, os.fspath(path))
  config.eval.num_samples = 4
  four = evaluate.run_sample(config, os.fspath(path))
  assert (ten.name, four.name) == (f"{STEP}_ddim4_n10", f"{STEP}_ddim4_n4")
  with np.load(ten / "samples_0.npz") as f10, np.load(four / "samples_0.npz") as f4:
    assert (len(f10["images"]), len(f4["images"])) == (10, 4)
    # Sample i depends on the seed and i only: the 4 are the first of the 10.
    np.testing.assert_array_equal(f4["images"], f10["images"][:4])
  first = (four / "samples_0.npz").read_bytes()
  assert evaluate.run_sample(config, os.fspath(path)) == four
  assert (four / "samples_0.npz").read_bytes() == first
  # A relative workdir is the same directory.
  relative = os.path.relpath(path)
  assert evaluate.samples_dir(config, relative, STEP) == four
  assert inference.load(relative, config).step == STEP


def test_result_names_and_results_of_other_settings_are_refused(workdir, monkeypatch):
  config, path, _ = workdir
  config = config_lib.apply_overrides(copy.deepcopy(config), {
      "eval.num_samples": 7, "eval.bpd_max_examples": 6, "eval.watch": True,
      "eval.inception_weights": "never_read.npz", "eval.is_splits": 1,
      "eval.watch_poll_s": 0.01, "eval.watch_timeout_s": 0.01, "train.num_steps": STEP})
  digits = config_lib.load_config("configs/digits.py")
  assert evaluate.run_name(digits, 400) == "400_n1000"  # the digits config: 1,000 samples
  digits.eval.update(dict(num_samples=100, seed=2))
  digits.sample.update(dict(sampler="ddim", num_steps=50))
  assert evaluate.run_name(digits, 400) == "400_ddim50_n100_seed2"
  assert evaluate.results_path(digits, "/runs/d", 400) == pathlib.Path(
      "/runs/d/eval/400_ddim50_n100_seed2.json")
  # A step with results under these settings is skipped by eval.watch.
  path_7 = evaluate.results_path(config, os.fspath(path), STEP)
  assert path_7.name == f"{STEP}_ddim4_n7_seed3.json"
  outputs.write_json(path_7, {"step": STEP, "settings": evaluate.result_settings(config)})
  assert evaluate.run_eval(config, os.fspath(path)) == {}
  # Other settings under the same name: refused before anything is sampled.
  monkeypatch.setattr(inference.Sampler, "sample_global", None)
  config.eval.bpd_max_examples = 8
  with pytest.raises(FileExistsError, match="bpd_max_examples=6 there, 8 here.*move it away"):
    evaluate.run_eval(config, os.fspath(path))
  config.eval.watch = False
  with pytest.raises(FileExistsError, match="holds results made with other eval settings"):
    evaluate.run_eval(config, os.fspath(path))
  assert json.loads(path_7.read_text())["settings"]["bpd_max_examples"] == 6


def test_watch_skips_steps_evaluated_under_the_names_before_count_and_seed(workdir,
                                                                         monkeypatch):
  config, path, _ = workdir
  config = config_lib.apply_overrides(copy.deepcopy(config), {
      "eval.num_samples": 7, "eval.seed": 0, "eval.is_splits": 1, "eval.watch": True,
      "eval.watch_poll_s": 0.01,
      "eval.watch_timeout_s": 0.01, "train.num_steps": STEP})
  earlier = path / "eval" / f"{STEP}_ddim4.json"  # <step><tag>.json, as results were named
  assert not evaluate.results_path(config, os.fspath(path), STEP).exists()
  monkeypatch.setattr(inference.Sampler, "sample_global", None)  # evaluating would fail
  try:
    outputs.write_json(earlier, {"step": STEP, "num_samples": 7})
    assert evaluate.run_eval(config, os.fspath(path)) == {}
    # Of another count, or under another seed, it is not the same evaluation.
    assert not evaluate._has_unnamed_results(  # pylint: disable=protected-access
        config_lib.apply_overrides(copy.deepcopy(config), {"eval.num_samples": 8}), path, STEP)
    assert not evaluate._has_unnamed_results(  # pylint: disable=protected-access
        config_lib.apply_overrides(copy.deepcopy(config), {"eval.seed": 1}), path, STEP)
  finally:
    earlier.unlink()


@pytest.mark.slow
def test_notebook_api_reads_the_saved_config(workdir):
  config, path, ema = workdir
  loaded = inference.load(os.fspath(path))  # config from the checkpoint
  assert loaded.step == STEP and loaded.config.model.ch == config.model.ch
  np.testing.assert_array_equal(loaded.params["conv_in"]["kernel"], ema["conv_in"]["kernel"])
  sampler = inference.Sampler.from_workdir(os.fspath(path), config)
  images = sampler.sample(3, seed=1, num_steps=2)
  assert images.shape == (3, 8, 8, 3) and images.dtype == np.uint8


@pytest.mark.slow
def test_bits_per_dim_is_an_exact_average_over_the_split(workdir, capsys):
  config, path, ema = workdir
  mesh = parallel.make_mesh()
  params = parallel.replicate(ema, mesh)
  with mock_cifar():
    got = evaluate.bits_per_dim(config, params, mesh, "test", seed=3, batch_size=8,
                                max_examples=10)
    source = evaluate.split_source(config, "test")
    images = np.stack([source[i] for i in range(10)]).astype(np.float32) / 127.5 - 1.0
  assert got["num_examples"] == 10
  assert "bits/dim (test): 10/10 images (" in capsys.readouterr().out
  # Independently: all 10 examples in one batch on one device, with the same per-example keys.
  model, sched = build.make_model(config), build.make_schedule(config)
  # The stream written out, independently of prng.py: BPD = 12, then each example's index.
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(jax.random.key(3), 12), i))(
      np.arange(10))
  direct = diffusion.calc_bpd_loop(
      sched, lambda x, t: model.apply({"params": ema}, x, t, train=False), images, keys,
      mean_type="eps", var_type="fixedlarge")
  assert got["bpd"] == pytest.approx(float(direct.total_bpd.mean()), rel=1e-5)
  assert got["prior_bpd"] == pytest.approx(float(direct.prior_bpd.mean()), rel=1e-4)
  assert got["terms_bpd"] + got["prior_bpd"] == pytest.approx(got["bpd"], rel=1e-6)


def test_sharded_example_keys_do_not_depend_on_the_mesh():
  indices = np.arange(16)
  grid = prng.RunStream.GRID
  base = jax.random.fold_in(jax.random.key(5), 3)  # GRID = 3, written out
  want = np.stack([np.asarray(jax.random.key_data(jax.random.fold_in(base, int(i))))
                   for i in indices])
  data = lambda keys: np.asarray(jax.random.key_data(keys))
  for n in (1, 8):
    keys = parallel.sharded_example_keys(5, grid, indices, parallel.make_mesh(jax.devices()[:n]))
    np.testing.assert_array_equal(data(keys), want)
  # Each row folds its own index: a sub-range has the same keys as those rows of the whole.
  np.testing.assert_array_equal(data(prng.example_keys(prng.run_key(5, grid), indices[4:9])),
                                want[4:9])
  assert len({tuple(k) for k in want}) == len(want)
  assert not np.array_equal(
      data(prng.example_keys(prng.run_key(5, prng.RunStream.SAMPLE), indices)), want)


@pytest.mark.slow
def test_progressive_and_interpolate_grids(workdir):
  config, path, _ = workdir
  # The original's chains (docs/editing.md has the grids of other samplers).
  config = config_lib.apply_overrides(copy.deepcopy(config), {"sample.sampler": "ancestral",
                                                              "sample.num_steps": 0})
  progressive = evaluate.run_progressive(config, os.fspath(path))
  # Named for the settings that change it: 3 rows, a prediction every 5 steps, seed 3.
  assert progressive == path / "samples" / str(STEP) / "progressive_n3_every5_seed3.png"
  width, height = Image.open(progressive).size
  # 3 rows; 20 // 5 = 4 predictions + the sample per row; 8x8 images upscaled 8x, 2 px gaps.
  assert (width, height) == ((5 * 10 + 2) * 8, (3 * 10 + 2) * 8)
  with mock_cifar():
    interp = evaluate.run_interpolate(config, os.fspath(path))
  assert interp == path / "samples" / str(STEP) / "interpolate_test_t10_2x3_seed3.png"
  width, height = Image.open(interp).size
  assert (width, height) == ((5 * 10 + 2) * 8, (2 * 10 + 2) * 8)  # 2 originals + 3 lams
  # Another seed draws another grid beside the first, which is kept as it was.
  first = progressive.read_bytes()
  other = evaluate.run_progressive(
      config_lib.apply_overrides(copy.deepcopy(config), {"eval.seed": 0}), os.fspath(path))
  assert other == path / "samples" / str(STEP) / "progressive_n3_every5.png"
  assert progressive.read_bytes() == first and other.read_bytes() != first


def test_missing_checkpoints_are_reported(workdir, tmp_path):
  config, path, _ = workdir
  with pytest.raises(FileNotFoundError, match="no checkpoint in .*train first"):
    inference.load(os.fspath(tmp_path), config)
  with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 7 .* steps there: \[5\]"):
    inference.load(os.fspath(path), config, step=7)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
  """Randomized FID-Inception weights (shapes from eval_shape; nothing downloaded)."""
  from diffusion_jax.evaluation.metrics import inception
  shapes = jax.eval_shape(lambda: inception.InceptionV3().init(
      jax.random.key(0), np.zeros((1, 75, 75, 3), np.float32)))
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      return (rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    if name == "var":
      return np.ones(leaf.shape, np.float32)
    if name == "scale":
      return np.ones(leaf.shape, np.float32)
    return (0.01 * rng.standard_normal(leaf.shape)).astype(np.float32)

  variables = jax.tree_util.tree_map_with_path(fill, shapes)
  path = tmp_path_factory.mktemp("inception") / "inception.npz"
  inception.save_inception_params(path, variables)
  return str(path)


@pytest.mark.slow
def test_eval_mode_writes_fid_is_and_bpd_for_each_checkpoint(workdir, inception_weights,
                                                             monkeypatch):
  config, path, ema = workdir
  config = config.copy_and_resolve_references()
  config.eval.update(dict(inception_weights=inception_weights, inception_size=75,
                          num_samples=12, is_splits=2, fid_max_real=12, bpd_max_examples=6,
                          watch=True, watch_poll_s=0.1, watch_timeout_s=0.5, batch_size=500))
  config.train.num_steps = 10_000
  seen = _record_batches(monkeypatch)
  with mock_cifar():
    results = evaluate.run_eval(config, os.fspath(path))
  assert list(results) == [STEP]
  assert seen == [16]  # 12 samples in one batch, rounded up to the 8 devices: not 504
  # Named for the test config's sampler (DDIM over 4 steps), sample count and seed.
  written = json.loads((path / "eval" / f"{STEP}_ddim4_n12_seed3.json").read_text())
  for key in ("fid_train", "fid_test", "inception_score", "inception_score_std", "bpd_test",
              "prior_bpd_test", "terms_bpd_test"):
    assert np.isfinite(written[key]), key
  assert written["inception_score"] >= 1.0
  assert written["fid_train"] > 0 and written["num_samples"] == 12
  assert written["settings"]["bpd_max_examples"] == 6 and written["settings"]["is_splits"] == 2
  assert list((path / "eval" / "stats").glob("cifar10_train_8px_inception75_first12.npz"))
  assert list((path / "eval" / "tensorboard").iterdir())
  # Watching again finds nothing new and returns after the timeout.
  with mock_cifar():
    assert evaluate.run_eval(config, os.fspath(path)) == {}


def test_eval_errors(workdir, tmp_path):
  config, path, _ = workdir
  config = config.copy_and_resolve_references()
  with pytest.raises(FileNotFoundError, match="needs the FID Inception weights"):
    evaluate.evaluate_step(config, os.fspath(path))
  config.eval.inception_weights = str(tmp_path / "missing.npz")
  with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
    evaluate.evaluate_step(config, os.fspath(path))
  from diffusion_jax.evaluation.metrics import fid
  bad = tmp_path / "stats.npz"
  np.savez(bad, mu=np.zeros(64), sigma=np.eye(64))
  with pytest.raises(ValueError, match="64"):
    fid.load_statistics(bad)


@pytest.mark.slow  # the command line in a subprocess
def test_command_line_sample_mode_uses_the_saved_config_without_config(workdir):
  import subprocess
  import sys
  config, path, _ = workdir
  root = pathlib.Path(__file__).resolve().parents[2]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  # No --config: the checkpoint's own (8x8 RGB, T = 20); the default, digits, would not load.
  out = subprocess.run([sys.executable, "-m", "diffusion_jax.main", "--mode", "sample",
                        f"--workdir={path}", "--config.eval.num_samples=3",
                        "--config.sample.num_steps=2", "--config.eval.batch_size=2",
                        f"--step={STEP}"],
                       cwd=root, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  with np.load(path / "samples" / f"{STEP}_ddim2_n3_seed3" / "samples_0.npz") as f:
    assert f["images"].shape == (3, 8, 8, 3)
  bad = subprocess.run([sys.executable, "-m", "diffusion_jax.main", "--config",
                        "configs/test.py", "--mode", "sample", f"--workdir={path}", "--step=99"],
                       cwd=root, env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0
  assert "no checkpoint for step 99" in bad.stderr


@pytest.mark.slow
def test_a_checkpoint_saved_with_the_previous_config_layout_samples_the_same(
    workdir, tmp_path, capsys):
  """A config saved by the layout with `ddim_steps` (tests/golden/config_saved_v0.json, what
  configs/test.py saved then) is upgraded with one message and gives the same samples as
  today's config with the same settings."""
  config, path, ema = workdir
  saved = json.loads((pathlib.Path(__file__).resolve().parents[1] / "golden" /
                      "config_saved_v0.json").read_text())
  saved["diffusion"]["num_timesteps"] = 20
  saved["eval"].update(batch_size=8, num_samples=10, seed=3, ddim_steps=4, ddim_eta=0.0)
  saver = checkpoints.Checkpointer(os.fspath(tmp_path / "checkpoints"), async_save=False)
  saver.save(STEP, {"step": np.int32(STEP), "params": ema, "ema_params": ema}, saved)
  saver.close()
  upgraded = inference.saved_config(os.fspath(tmp_path))
  assert "upgraded" in capsys.readouterr().out
  assert (upgraded.sample.sampler, upgraded.sample.num_steps) == ("ddim", 4)
  old_dir = evaluate.run_sample(upgraded, os.fspath(tmp_path))
  new_dir = evaluate.run_sample(config, os.fspath(path))
  with np.load(old_dir / "samples_0.npz") as old, np.load(new_dir / "samples_0.npz") as new:
    np.testing.assert_array_equal(old["images"], new["images"])


@pytest.mark.slow
def test_eval_mode_on_digits_reports_the_classifier_measures_without_inception(tmp_path):
  config = config_lib.load_config("configs/digits.py")
  config.diffusion.num_timesteps = 10
  config.model.ch_mult = (1,)
  config.eval.update(dict(batch_size=8, num_samples=16, bpd_max_examples=16, seed=1))
  assert not config.eval.inception_weights
  model = build.make_model(config)
  size = config.data.image_size
  params = jax.jit(lambda k: model.init(k, np.zeros((1, size, size, 1), np.float32),
                                        np.zeros((1,), np.int32))["params"])(jax.random.key(0))
  saver = checkpoints.Checkpointer(os.fspath(tmp_path / "checkpoints"), async_save=False)
  saver.save(STEP, {"step": np.int32(STEP), "params": params, "ema_params": params},
             config.to_dict())
  saver.close()
  results = evaluate.run_eval(config, os.fspath(tmp_path))
  written = json.loads((tmp_path / "eval" / f"{STEP}_n16_seed1.json").read_text())
  assert results[STEP]["digits_class_counts"] == written["digits_class_counts"]
  assert written["num_samples"] == 16 and sum(written["digits_class_counts"]) == 16
  assert len(written["digits_class_counts"]) == 10
  assert written["digits_num_train_real"] == 16
  for key in ("digits_confident", "digits_not_a_digit"):
    assert 0.0 <= written[key] <= 1.0, key
  assert written["digits_confident_test_real"] >= 0.9
  for key in ("digits_frechet_test", "digits_frechet_train_real", "digits_frechet_noise",
              "bpd_test", "prior_bpd_test", "terms_bpd_test"):
    assert np.isfinite(written[key]), key
  assert written["digits_frechet_train_real"] < written["digits_frechet_noise"]
  assert written["num_examples_test"] == 16
  assert not any(key.startswith(("fid", "inception")) for key in written)
  assert len(list((tmp_path / "eval").glob("digits_classifier_*.npz"))) == 1


def _break_array(step_dir: pathlib.Path, value: np.ndarray) -> None:
  """Makes one stored array unreadable: zeroes the magic number of the compressed (zstd) frame
  that holds its bytes (random float32 bytes are stored verbatim inside the frame)."""
  needle = np.ascontiguousarray(value).tobytes()[:64]
  for path in (step_dir / "state").rglob("*"):
    data = bytearray(path.read_bytes()) if path.is_file() else b""
    at = data.find(needle)
    if at > 0:
      magic = data.rfind(b"\x28\xb5\x2f\xfd", max(0, at - 32), at)
      assert magic >= 0, "no zstd frame header just before the array's bytes"
      data[magic:magic + 4] = b"\0\0\0\0"
      path.write_bytes(bytes(data))
      return
  raise AssertionError("the array's bytes were not found in the checkpoint")


@pytest.mark.slow
def test_sample_mode_skips_a_corrupt_latest_and_ignores_a_damaged_optimizer_state(
    workdir, tmp_path, capsys):
  config, _, ema = workdir
  rng = np.random.default_rng(5)
  # Finite floats of 31 random bits each: incompressible, so stored verbatim.

  def incompressible(tree):
    return jax.tree_util.tree_map(lambda x: (rng.integers(0, 2**32, x.shape, dtype=np.uint32)
                                             & 0xBFFFFFFF).view(np.float32), tree)

  mu = incompressible(ema)
  state = {"step": np.int32(STEP), "params": ema, "ema_params": ema, "opt_state": {"mu": mu}}
  # The latest step's EMA parameters are random bytes too, so that the array sampling reads is
  # the one broken (the layout of arrays in files varies from run to run).
  latest_ema = incompressible(ema)
  directory = tmp_path / "checkpoints"
  saver = checkpoints.Checkpointer(os.fspath(directory), async_save=False)
  saver.save(STEP, state, config.to_dict())
  saver.save(STEP + 2, dict(state, step=np.int32(STEP + 2), ema_params=latest_ema),
             config.to_dict())
  saver.close()
  _break_array(directory / str(STEP), max(jax.tree_util.tree_leaves(mu), key=np.size))
  _break_array(directory / str(STEP + 2), max(jax.tree_util.tree_leaves(latest_ema), key=np.size))
  with pytest.raises(Exception):  # reading the whole state fails: the optimizer state is broken
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        read_only=True), item_handlers={"state": ocp.StandardCheckpointHandler()})
    manager.restore(STEP, args=ocp.args.Composite(state=ocp.args.StandardRestore()))

  out_dir = evaluate.run_sample(config, os.fspath(tmp_path))
  assert out_dir == tmp_path / "samples" / f"{STEP}_ddim4_n10_seed3"
  out = capsys.readouterr().out
  assert f"checkpoint at step {STEP + 2}" in out and "trying the previous one" in out, out
  assert f"parameters of step {STEP} from" in out, out
  assert (directory / str(STEP + 2)).is_dir()  # evaluation reports, never moves or deletes
  with np.load(out_dir / "samples_0.npz") as f:
    assert f["images"].shape == (10, 8, 8, 3)


def test_results_are_named_for_the_sampler():
  """Evaluations of one checkpoint with different sampler settings go to different files; the
  original's (ancestral over all T, clipped) keep the plain name."""
  config = config_lib.load_config("configs/digits.py")
  cases = [({}, ""), ({"sample.num_steps": 200}, ""),
           ({"sample.respacing": "50"}, "_ancestral_respaced50"),
           ({"sample.num_steps": 25}, "_ancestral25"),
           ({"sample.sampler": "ddim", "sample.num_steps": 50}, "_ddim50"),
           ({"sample.sampler": "ddim", "sample.eta": 1.0}, "_ddim_eta1"),
           ({"sample.sampler": "ddim", "sample.respacing": "10,20", "sample.eta": 0.5},
            "_ddim_respaced10,20_eta0.5"),
           ({"sample.clip_denoised": False}, "_noclip"),
           ({"sample.sampler": "ddim", "sample.num_steps": 50, "sample.dynamic_threshold": 99.5},
            "_ddim50_dynthresh99.5"),
           ({"sample.sampler": "dpmsolver++", "sample.num_steps": 20},
            "_dpmsolver++20_order2_time_uniform"),
           ({"sample.sampler": "dpmsolver", "sample.num_steps": 10, "sample.solver_order": 3,
             "sample.solver_grid": "logSNR"}, "_dpmsolver10_order3_logSNR")]
  for overrides, tag in cases:
    assert build.sampler_tag(config_lib.load_config("configs/digits.py", overrides)) == tag
  assert build.sampler_tag(config) == ""
