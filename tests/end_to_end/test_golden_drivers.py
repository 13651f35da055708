"""Golden values of the drivers: training losses, the training grid, samples (ancestral and
DDIM), the progressive and interpolation grids and bits/dim, for fixed seeds.

They pin what a user gets from a seed, end to end through the drivers (data, keys, step,
samplers, grids), so that reorganising the code around the math cannot change it unseen.
Values: tests/golden/drivers.npz. After an intended change to what a seed produces, run

    python tests/golden/make_drivers_golden.py

and say in the commit what changed and why.

Tolerances. The values were computed in float32 by XLA on one CPU; another CPU (another
instruction set, another matmul blocking) rounds sums differently, by ~1e-7 relative per
operation. Six Adam steps amplify that only where a gradient entry is ~0 (the first updates
are lr * sign(g)), so losses and norms get rtol 2e-3; a different key, stream, timestep
draw or learning rate moves them by far more (~10% and up). Images are uint8: float
differences of ~1e-5 move a pixel by one level only when it sits on a rounding boundary, so
at most 1 level and at most 2% of the pixels may differ; different random numbers change
nearly every pixel. Bits/dim averages 8 examples of a 100-step bound: rtol 1e-4.
"""
import json
import os
import pathlib

import numpy as np
import pytest
from PIL import Image

from diffusion_jax.config import config_lib
from diffusion_jax.evaluation import modes as evaluate
from diffusion_jax import parallel
from diffusion_jax.training import loop as train
from tests import checkpoint_fixtures

# Slow: trains, samples and evaluates end to end through the drivers.
pytestmark = pytest.mark.slow

GOLDEN_PATH = pathlib.Path(__file__).resolve().parents[1] / "golden" / "drivers.npz"
STEP = 7


def base_config():
  """configs/test.py on the digits (data that ships in a package: no mock, no download)."""
  config = config_lib.load_config("configs/test.py")
  config.data.dataset = "digits"
  config.data.channels = 1
  config.data.random_flip = True
  config.train.log_every = 1
  config.train.sample_every = 6
  config.eval.update(dict(batch_size=8, num_samples=8, seed=3, bpd_max_examples=8,
                          progressive_freq=25, progressive_num=2, interp_t=50,
                          interp_pairs=2, interp_steps=3))
  return config


def _png(path) -> np.ndarray:
  return np.asarray(Image.open(path))


def produce(tmp: pathlib.Path) -> dict[str, np.ndarray]:
  """Runs every driver on fixed seeds; returns the values the golden file pins."""
  out = {}
  config = base_config()
  train_dir = tmp / "train"
  train.train_and_evaluate(config, os.fspath(train_dir))
  logged = [json.loads(line) for line in (train_dir / "metrics.jsonl").read_text().splitlines()]
  out["train_loss"] = np.array([m["loss"] for m in logged], np.float64)
  out["train_grad_norm"] = np.array([m["grad_norm"] for m in logged], np.float64)
  out["train_param_norm"] = np.array([m["param_norm"] for m in logged], np.float64)
  out["train_grid"] = _png(train_dir / "samples" / "grid_6.png")  # DDIM, 5 steps

  eval_dir = tmp / "eval"
  ema = checkpoint_fixtures.randomized_checkpoint(config, eval_dir, STEP)
  config.sample.update(dict(sampler="ancestral", num_steps=0))
  samples = evaluate.run_sample(config, os.fspath(eval_dir))
  with np.load(samples / "samples_0.npz") as f:
    out["samples_ancestral"] = f["images"]
  # The grids of the original's chains (ancestral over all T).
  out["progressive_grid"] = _png(evaluate.run_progressive(config, os.fspath(eval_dir)))
  out["interpolate_grid"] = _png(evaluate.run_interpolate(config, os.fspath(eval_dir)))
  config.sample.update(dict(sampler="ddim", num_steps=4, eta=0.5))
  samples = evaluate.run_sample(config, os.fspath(eval_dir))
  with np.load(samples / "samples_0.npz") as f:
    out["samples_ddim_eta"] = f["images"]
  mesh = parallel.make_mesh()
  bpd = evaluate.bits_per_dim(config, parallel.replicate(ema, mesh), mesh, "test", seed=3,
                              batch_size=8, max_examples=8)
  out["bpd"] = np.array([bpd["bpd"], bpd["prior_bpd"], bpd["terms_bpd"]], np.float64)
  return out


def assert_images_close(got: np.ndarray, want: np.ndarray, name: str) -> None:
  assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, want.shape)
  diff = np.abs(got.astype(np.int32) - want.astype(np.int32))
  assert diff.max() <= 1, f"{name}: a pixel differs by {diff.max()} levels"
  assert np.mean(diff > 0) <= 0.02, f"{name}: {np.mean(diff > 0):.1%} of the pixels differ"


@pytest.fixture(scope="module")
def produced(tmp_path_factory):
  return produce(tmp_path_factory.mktemp("golden"))


def test_the_golden_file_covers_what_is_produced(produced):
  with np.load(GOLDEN_PATH) as f:
    assert sorted(f.files) == sorted(produced)


@pytest.mark.parametrize("name", ["train_loss", "train_grad_norm", "train_param_norm"])
def test_training_numbers(produced, name):
  with np.load(GOLDEN_PATH) as f:
    want = f[name]
  assert len(want) == 6
  np.testing.assert_allclose(produced[name], want, rtol=2e-3)


@pytest.mark.parametrize("name", ["train_grid", "samples_ancestral", "samples_ddim_eta",
                                  "progressive_grid", "interpolate_grid"])
def test_images(produced, name):
  with np.load(GOLDEN_PATH) as f:
    want = f[name]
  assert want.std() > 0
  assert_images_close(produced[name], want, name)


def test_bits_per_dim(produced):
  with np.load(GOLDEN_PATH) as f:
    np.testing.assert_allclose(produced["bpd"], f["bpd"], rtol=1e-4)
