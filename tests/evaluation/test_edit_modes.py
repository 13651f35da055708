"""--mode edit (SDEdit), --mode inpaint (RePaint) and the grid modes with any sampler, on a tiny
digits model with randomized weights: refusals before compiling, outputs, device counts, the
command line."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from diffusion_jax.config import checks as config_checks
from diffusion_jax.config import config_lib
from diffusion_jax.evaluation import inference
from diffusion_jax.evaluation import modes as evaluate
from diffusion_jax import parallel
from tests import checkpoint_fixtures, helpers

STEP = 5


def digits_config(**overrides):
  """The evaluation tests' config (T = 20, DDIM over 4 steps) on the 8x8 grey digits, with short
  edits: 3 images, SDEdit at t = 6 and 12, RePaint jumps of 2 twice."""
  config = config_lib.apply_overrides(helpers.eval_config(), {
      "data.dataset": "digits", "data.channels": 1, "eval.edit_num": 3, "eval.edit_t": (6, 12),
      "eval.inpaint_jump_length": 2, "eval.inpaint_jump_n_sample": 2})
  return config_lib.apply_overrides(config, overrides)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = tmp_path_factory.mktemp("edit")
  checkpoint_fixtures.randomized_checkpoint(digits_config(), path, STEP)
  return path


def write_png(path, array):
  Image.fromarray(array).save(path)
  return path


def test_bad_inputs_are_refused_before_anything_compiles(tmp_path, monkeypatch):
  def no_loading(*args, **kwargs):
    raise AssertionError("read a checkpoint before refusing")

  monkeypatch.setattr(inference, "load", no_loading)
  workdir = os.fspath(tmp_path)
  small = write_png(tmp_path / "small.png", np.zeros((4, 4), np.uint8))
  colour = write_png(tmp_path / "colour.png", np.zeros((8, 8, 3), np.uint8))
  for run, overrides, error, match in [
      (evaluate.run_edit, {"eval.edit_t": (6, 20)}, config_checks.ConfigError,
       r"eval.edit_t=\(6, 20\) must be a tuple of integers each in \[1, diffusion.num_timesteps"),
      (evaluate.run_edit, {"sample.num_steps": 8, "eval.edit_t": (6,)},
       config_checks.ConfigError, r"sample.num_steps=8 steps cannot fit in the 7 timesteps 0..6 "
       r"below --config.eval.edit_t=6: set --config.sample.num_steps to at most 7"),
      (evaluate.run_edit, {"eval.edit_images": os.fspath(tmp_path / "missing.png")},
       FileNotFoundError, r"missing.png does not exist; set --config.eval.edit_images"),
      (evaluate.run_edit, {"eval.edit_images": os.fspath(small)}, config_checks.ConfigError,
       r"small.png is 4x4 with 1 channel\(s\); the model takes 8x8 with 1"),
      (evaluate.run_inpaint, {"eval.edit_images": f"{small},{colour}",
                              "sample.sampler": "ancestral", "sample.num_steps": 0},
       config_checks.ConfigError, r"small.png is 4x4"),
      (evaluate.run_inpaint, {}, config_checks.ConfigError,
       r"takes ancestral steps, not sample.sampler='ddim': set --config.sample.sampler=ancestral"),
      (evaluate.run_inpaint, {"sample.sampler": "ancestral", "sample.num_steps": 0,
                              "eval.inpaint_mask": "middle"}, config_checks.ConfigError,
       r"eval.inpaint_mask='middle' is neither a built-in mask"),
      (evaluate.run_inpaint, {"sample.sampler": "ancestral", "sample.num_steps": 0,
                              "eval.inpaint_mask": f"{small},{small}"},
       config_checks.ConfigError, r"names 2 PNG files for 3 images"),
      (evaluate.run_inpaint, {"sample.sampler": "ancestral", "sample.num_steps": 0,
                              "eval.inpaint_mask": os.fspath(small)},
       config_checks.ConfigError, r"mask .*small.png is 4x4; the images are 8x8"),
      (evaluate.run_progressive, {}, config_checks.ConfigError,
       r"eval.progressive_freq=5: sampler 'ddim' makes 4 network calls here; set "
       r"--config.eval.progressive_freq to at most 4"),
      (evaluate.run_interpolate, {"sample.sampler": "ancestral",
                                  "sample.num_steps": 15}, config_checks.ConfigError,
       r"sample.num_steps=15 steps cannot fit in the 11 timesteps 0..10 below "
       r"--config.eval.interp_t=10")]:
    with pytest.raises(error, match=match):
      run(digits_config(**overrides), workdir)


def test_sampler_methods_refuse_bad_inputs_before_compiling(workdir, monkeypatch):
  sampler = inference.Sampler(inference.load(os.fspath(workdir), digits_config()))

  def no_compiling(*args, **kwargs):
    raise AssertionError("compiled before refusing")

  monkeypatch.setattr(inference, "make_rows_fn", no_compiling)
  images = np.zeros((2, 8, 8, 1), np.uint8)
  for call, match in [
      (lambda: sampler.edit(images, 25), r"outside the schedule's timesteps 0..19"),
      (lambda: sampler.edit(np.zeros((2, 8, 8, 3), np.uint8), 5), r"images of shape"),
      (lambda: sampler.inpaint(images, np.ones((2, 8, 4))), r"masks of shape \(2, 8, 4, 1\)"),
      (lambda: sampler.inpaint(images, np.full((2, 8, 8), 0.5)), "other than 0 and 1"),
      (lambda: sampler.inpaint(images, np.ones((2, 8, 8))), "RePaint takes ancestral steps"),
      (lambda: sampler.interpolate(images, images, [0.5, 0.5], sampler="ancestral",
                                   num_steps=0), "give t, or a deterministic sampler"),
      (lambda: sampler.progressive(2, 9), r"makes 4 network calls .* keep every in 1..4")]:
    with pytest.raises(ValueError, match=match):
      call()


@pytest.mark.slow
def test_edit_and_inpaint_modes_write_named_grids_and_arrays(workdir, capsys):
  config = digits_config()
  grid = evaluate.run_edit(config, os.fspath(workdir))
  assert grid == workdir / "samples" / str(STEP) / "edit_test_t6-12_ddim4_n3_seed3.png"
  with np.load(grid.with_suffix(".npz")) as f:
    assert f["edits"].shape == (3, 2, 8, 8, 1) and f["t"].tolist() == [6, 12]
    edits, images = f["edits"], f["images"]
  source = evaluate.split_source(config, "test")
  np.testing.assert_array_equal(images, np.stack([source[i] for i in range(3)]))
  width, height = Image.open(grid).size
  assert (width, height) == ((3 * 10 + 2) * 8, (3 * 10 + 2) * 8)  # 3 columns, 3 rows, x8
  # The Sampler gives the same edits.
  sampler = inference.Sampler(inference.load(os.fspath(workdir), config))
  again = sampler.edit(images, 12, seed=3)
  assert np.abs(again * 127.5 + 127.5 - edits[:, 1]).max() <= 1.0

  config = digits_config(**{"sample.sampler": "ancestral", "sample.num_steps": 10,
                            "eval.inpaint_mask": "left_half"})
  grid = evaluate.run_inpaint(config, os.fspath(workdir))
  assert grid == (workdir / "samples" / str(STEP) /
                  "inpaint_test_left_half_jump2x2_ancestral10_n3_seed3.png")
  with np.load(grid.with_suffix(".npz")) as f:
    masks, completed = f["masks"], f["completed"]
  assert masks[..., 0].tolist() == [[[1] * 4 + [0] * 4] * 8] * 3
  np.testing.assert_array_equal(completed[:, :, :4], images[:, :, :4])  # known pixels kept
  assert np.any(completed[:, :, 4:] != images[:, :, 4:])
  results = json.loads(grid.with_suffix(".json").read_text())
  assert results["num_images"] == 3 and 0 <= results["recognised_completed"] <= 1
  assert "the digits classifier recognises" in capsys.readouterr().out


@pytest.mark.slow
def test_inpaint_does_not_depend_on_the_devices(workdir):
  config = digits_config()
  loaded = inference.load(os.fspath(workdir), config)
  one = inference.Sampler(loaded, mesh=parallel.make_mesh(jax.devices()[:1]))
  many = inference.Sampler(loaded)
  images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 1)).astype(np.uint8)
  masks = np.zeros((1, 8, 8), bool)
  masks[:, 2:6, 2:6] = True
  kwargs = dict(sampler="ancestral", num_steps=6, jump_length=2, jump_n_sample=2, seed=1)
  got = many.inpaint(images, masks, **kwargs)
  np.testing.assert_allclose(one.inpaint(images, masks, **kwargs), got, atol=1e-5)
  # Row i's numbers are example i's: the first rows alone give the same.
  np.testing.assert_allclose(many.inpaint(images[:2], masks, **kwargs), got[:2], atol=1e-5)


@pytest.mark.slow
def test_grids_follow_any_sampler(workdir):
  config = digits_config(**{"sample.sampler": "heun",
                            "sample.num_steps": 7, "eval.progressive_freq": 2})
  grid = evaluate.run_progressive(config, os.fspath(workdir))
  assert grid.name == "progressive_heun7_rho7_round_n3_every2_seed3.png"
  width, _ = Image.open(grid).size
  assert width == (4 * 10 + 2) * 8  # 3 predictions and the sample
  config = digits_config()  # ddim, eta 0: latents
  grid = evaluate.run_interpolate(config, os.fspath(workdir))
  assert grid.name == "interpolate_latent_ddim4_test_2x3_seed3.png"
  config = digits_config(**{"sample.eta": 1.0})
  grid = evaluate.run_interpolate(config, os.fspath(workdir))
  assert grid.name == "interpolate_ddim4_eta1_test_t10_2x3_seed3.png"


@pytest.mark.slow  # the command line in a subprocess
def test_command_line_edit_and_inpaint_of_png_files(workdir):
  pngs = workdir.parent / f"{workdir.name}_pngs"
  pngs.mkdir(exist_ok=True)
  rng = np.random.default_rng(0)
  for i in range(2):
    write_png(pngs / f"digit{i}.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
  mask = np.zeros((8, 8), np.uint8)
  mask[:4] = 255
  write_png(pngs / "mask.png", mask)
  env = helpers.subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=2")
  base = [sys.executable, "-m", "diffusion_jax.main", f"--workdir={workdir.name}",
          f"--config.eval.edit_images={pngs.name}/digit0.png,{pngs.name}/digit1.png"]
  run = lambda *extra: subprocess.run(base + list(extra), cwd=workdir.parent, env=env,
                                      capture_output=True, text=True, timeout=300)
  out = run("--mode", "inpaint", f"--config.eval.inpaint_mask={pngs.name}/mask.png",
            "--config.sample.sampler=ancestral", "--config.sample.num_steps=4",
            "--config.eval.inpaint_jump_length=1", "--config.eval.inpaint_jump_n_sample=1")
  assert out.returncode == 0, out.stderr[-2000:]
  written = list((workdir / "samples" / str(STEP)).glob("inpaint_files*_files*_jump1x1_"
                                                        "ancestral4_n2_seed3.npz"))
  assert len(written) == 1
  with np.load(written[0]) as f:
    np.testing.assert_array_equal(f["completed"][:, :4], f["images"][:, :4])
  out = run("--mode", "edit", "--config.eval.edit_t=(5,)", "--config.sample.num_steps=2")
  assert out.returncode == 0, out.stderr[-2000:]
  assert list((workdir / "samples" / str(STEP)).glob("edit_files*_t5_ddim2_n2_seed3.png"))
  bad = run("--mode", "edit", "--config.eval.edit_t=(5,)", "--config.sample.sampler=heun",
            "--config.sample.num_steps=9")
  assert bad.returncode == 2
  assert "error: " in bad.stderr and "--config.sample.num_steps to at most 6" in bad.stderr
