"""DDIM inversion of a tiny model with randomized weights: `Sampler.encode` / `decode` and
`--mode encode` (on the digits, which need no download)."""
import copy
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from diffusion_jax.config import build
from diffusion_jax.config import checks as config_checks
from diffusion_jax.config import config_lib
from diffusion_jax.config import programs
from diffusion_jax.data import images as images_lib
from diffusion_jax.evaluation import inference
from diffusion_jax.evaluation import modes as evaluate
from diffusion_jax import parallel
from diffusion_jax import samplers
from diffusion_jax.samplers import inversion
from tests import checkpoint_fixtures, helpers

STEP = 5


def digits_config():
  """The evaluation tests' config (T = 20, DDIM over 4 steps) on the 8x8 grey digits."""
  return config_lib.apply_overrides(helpers.eval_config(),
                                    {"data.dataset": "digits", "data.channels": 1})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """(config, a workdir whose checkpoint of step STEP holds randomized weights, those weights)."""
  path = tmp_path_factory.mktemp("encode")
  return (digits_config(), path,
          checkpoint_fixtures.randomized_checkpoint(digits_config(), path, STEP))


def test_encode_refuses_a_stochastic_sampler_and_no_split():
  config = digits_config()
  evaluate.check_encode(config)  # DDIM, eta 0, the test split
  for overrides, match in [
      ({"sample.sampler": "ancestral", "sample.num_steps": 0},
       r"inverts deterministic DDIM, not sample.sampler='ancestral': set "
       r"--config.sample.sampler=ddim --config.sample.eta=0"),
      ({"sample.eta": 0.5}, r"not sample.sampler='ddim' with sample.eta=0.5"),
      ({"eval.bpd_split": ""}, r"set --config.eval.bpd_split to a split")]:
    bad = config_lib.apply_overrides(copy.deepcopy(config), overrides)
    with pytest.raises(config_checks.ConfigError, match=match):
      evaluate.check_encode(bad)
  config.eval.encode_max_examples = -1
  with pytest.raises(config_checks.ConfigError, match=r"eval.encode_max_examples=-1 must be an "
                                                      r"integer >= 0 \(0 = the whole split\)"):
    config_checks.check(config, mode="encode")


def test_latents_are_named_for_the_timesteps_split_and_count(tmp_path):
  config = digits_config()
  assert evaluate.encode_name(config, STEP) == f"{STEP}_ddim4_test"
  config.eval.encode_max_examples = 10
  config.sample.clip_denoised = False
  assert evaluate.encode_name(config, STEP) == f"{STEP}_ddim4_noclip_test_n10"
  config = config_lib.apply_overrides(digits_config(), {
      "sample.num_steps": 0, "sample.respacing": "ddim5", "eval.bpd_split": "train"})
  assert evaluate.latents_path(config, os.fspath(tmp_path), 7) == (
      tmp_path / "latents" / "7_ddim_respacedddim5_train.npz")


def test_sampler_refuses_bad_inputs_before_compiling(workdir, monkeypatch):
  config, path, _ = workdir
  sampler = inference.Sampler(inference.load(os.fspath(path), config))

  def no_compiling(*args, **kwargs):
    raise AssertionError("compiled before refusing")

  monkeypatch.setattr(inference, "make_ddim_fn", no_compiling)
  images = np.zeros((2, 8, 8, 1), np.uint8)
  for call, match in [
      (lambda: sampler.encode(np.zeros((2, 8, 8, 3), np.uint8)),
       r"images of shape \(2, 8, 8, 3\): give \[n, 8, 8, 1\]"),
      (lambda: sampler.encode(np.zeros((2, 16, 16, 1), np.uint8)),
       r"images of shape \(2, 16, 16, 1\)"),
      (lambda: sampler.encode(np.full((2, 8, 8, 1), 2.0)), r"floats outside \[-1, 1\]"),
      (lambda: sampler.encode(images.astype(np.int32)), "give uint8"),
      (lambda: sampler.encode(images, labels=[1, 2]), "the model is unconditional"),
      (lambda: sampler.encode(images, num_steps=21), r"sample.num_steps=21 must be in 0..20"),
      (lambda: sampler.encode(images, respacing="ddim6"), "no integer stride keeps exactly 6"),
      (lambda: sampler.encode(images, batch_size=0), "give a positive batch size"),
      (lambda: sampler.decode(np.zeros((2, 8, 8), np.float32)),
       r"latents of shape \(2, 8, 8\)"),
      (lambda: sampler.decode(images), "give the floats `encode` returned")]:
    with pytest.raises(ValueError, match=match):
      call()
  with pytest.raises(TypeError, match="unknown settings \\['eta'\\] for DDIM inversion"):
    sampler.encode(images, eta=0.0)


@pytest.mark.slow
def test_encode_and_decode_are_the_direct_loops_on_any_device_count(workdir):
  config, path, ema = workdir
  loaded = inference.load(os.fspath(path), config)
  one = inference.Sampler(loaded, mesh=parallel.make_mesh(jax.devices()[:1]))
  eight = inference.Sampler(loaded)
  images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 1)).astype(np.uint8)
  latents = eight.encode(images)  # the config's 4 steps; 5 rows padded to 8
  assert latents.dtype == np.float32 and latents.shape == images.shape
  np.testing.assert_allclose(one.encode(images_lib.to_float(images)), latents, atol=1e-5)
  model, sched = build.make_model(config), build.make_schedule(config)
  model_fn = programs.denoiser(model, ema)
  visited = samplers.visited_timesteps(20, 4)
  direct = jax.jit(lambda x: inversion.ddim_reverse_sample_loop(
      sched, model_fn, x, timesteps=visited, mean_type="eps", var_type="fixedlarge"))(
          images_lib.to_float(images))
  np.testing.assert_allclose(latents, np.asarray(direct), atol=1e-5)
  decoded = eight.decode(latents)
  np.testing.assert_allclose(one.decode(latents), decoded, atol=1e-5)
  back = jax.jit(lambda z: samplers.ddim_sample_loop(
      sched, model_fn, None, z.shape, x_init=z, timesteps=visited, mean_type="eps",
      var_type="fixedlarge"))(latents)
  np.testing.assert_allclose(decoded, np.asarray(back), atol=1e-5)
  # Other timesteps give other latents.
  assert np.abs(eight.encode(images, num_steps=2) - latents).max() > 1e-3


@pytest.mark.slow
def test_encode_mode_writes_latents_and_the_reconstruction_error(workdir, capsys):
  config, path, _ = workdir
  config = config_lib.apply_overrides(copy.deepcopy(config), {"eval.encode_max_examples": 10})
  out = evaluate.run_encode(config, os.fspath(path))
  assert out == path / "latents" / f"{STEP}_ddim4_test_n10.npz"
  assert "encode (test): 10/10 images" in capsys.readouterr().out
  with np.load(out) as f:
    arrays = dict(f)
  assert sorted(arrays) == ["images", "indices", "latents"]  # unconditional: no labels
  np.testing.assert_array_equal(arrays["indices"], np.arange(10))
  source = evaluate.split_source(config, "test")
  np.testing.assert_array_equal(arrays["images"], np.stack([source[i] for i in range(10)]))
  assert arrays["latents"].dtype == np.float32 and arrays["latents"].shape == (10, 8, 8, 1)
  sampler = inference.Sampler(inference.load(os.fspath(path), config))
  np.testing.assert_allclose(sampler.encode(arrays["images"]), arrays["latents"], atol=1e-5)
  error = sampler.decode(arrays["latents"]) - images_lib.to_float(arrays["images"])
  results = json.loads(out.with_suffix(".json").read_text())
  assert results["step"] == STEP and results["num_examples"] == 10
  assert results["split"] == "test" and results["num_steps"] == 4
  np.testing.assert_allclose(results["mse"], np.mean(error.astype(np.float64)**2), rtol=1e-4)
  np.testing.assert_allclose(results["max_abs"], np.abs(error).max(), rtol=1e-4)
  assert results["settings"]["num_steps"] == 4 and results["settings"]["clip_denoised"]


@pytest.mark.slow
def test_a_conditional_model_encodes_each_image_with_its_label(tmp_path):
  config = helpers.conditional_config()
  config.eval.encode_max_examples = 6
  ema = checkpoint_fixtures.randomized_checkpoint(config, tmp_path, STEP)
  with helpers.mock_cifar():
    out = evaluate.run_encode(config, os.fspath(tmp_path))
    source = evaluate.split_source(config, "test")
    labels = np.asarray([source.example(i)["label"] for i in range(6)])
  with np.load(out) as f:
    np.testing.assert_array_equal(f["labels"], labels)
    images, latents = f["images"], f["latents"]
  sampler = inference.Sampler(inference.Loaded(config, ema, STEP))
  with pytest.raises(ValueError, match="class-conditional \\(10 classes\\): give labels"):
    sampler.encode(images)
  np.testing.assert_allclose(sampler.encode(images, labels), latents, atol=1e-5)
  assert np.abs(sampler.encode(images, (labels + 1) % 10) - latents).max() > 1e-4


@pytest.mark.slow  # the command line in a subprocess
def test_command_line_encode_mode_with_a_relative_workdir(workdir):
  _, path, _ = workdir
  env = helpers.subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=2")
  command = [sys.executable, "-m", "diffusion_jax.main", "--mode", "encode",
             f"--workdir={path.name}", "--config.eval.encode_max_examples=3",
             "--config.sample.num_steps=2"]
  # No --config: the checkpoint's own (8x8 grey digits, T = 20).
  out = subprocess.run(command, cwd=path.parent, env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  written = path / "latents" / f"{STEP}_ddim2_test_n3.npz"
  with np.load(written) as f:
    assert f["latents"].shape == (3, 8, 8, 1)
  assert json.loads(written.with_suffix(".json").read_text())["num_steps"] == 2
  assert "reconstruction mse=" in out.stdout
  bad = subprocess.run(command + ["--config.sample.sampler=ancestral"], cwd=path.parent,
                       env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2
  assert "error: --mode encode inverts deterministic DDIM" in bad.stderr
