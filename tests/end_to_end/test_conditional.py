"""Class labels end to end: the training step, training with sample grids, every evaluation mode,
the Python Sampler and the sample dumps, on a tiny class-conditional Improved DDPM U-Net under
mocked CIFAR-10 (whose labels come with the images)."""
import copy
import os

import jax
import numpy as np
import pytest
from PIL import Image

from diffusion_jax.config import build
from diffusion_jax.config import programs
from diffusion_jax.config import checks as config_checks
from diffusion_jax.config import config_lib
from diffusion_jax.core import diffusion
from diffusion_jax.data import images as images_lib
from diffusion_jax.evaluation import inference
from diffusion_jax.evaluation import modes as evaluate
from diffusion_jax import parallel
from diffusion_jax.training import loop as train
from tests import checkpoint_fixtures, helpers

STEP = 5

conditional_config = helpers.conditional_config
mock_cifar = helpers.mock_cifar


# The tests marked slow compile and run whole sampling, evaluation or training programs.
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  config = conditional_config()
  path = tmp_path_factory.mktemp("conditional")
  ema = checkpoint_fixtures.randomized_checkpoint(config, path, STEP)
  return config, path, ema


@pytest.mark.slow
def test_sample_mode_saves_each_samples_label_and_samples_follow_their_labels(workdir):
  config, path, _ = workdir
  out_dir = evaluate.run_sample(config, os.fspath(path))
  with np.load(out_dir / "samples_0.npz") as f:
    images, index, labels = f["images"], f["index"], f["labels"]
  np.testing.assert_array_equal(index, np.arange(10))
  np.testing.assert_array_equal(labels, np.arange(10) % 10)  # sample i: class i mod 10
  # The grid has one column per class: one row of 10 8x8 images, 2 px apart, upscaled 16x.
  upscale = images_lib.grid_upscale(config.data.image_size)
  assert Image.open(out_dir / "grid.png").size == ((10 * 10 + 2) * upscale, 12 * upscale)

  one = inference.Sampler(inference.load(os.fspath(path), config),
                          mesh=parallel.make_mesh(jax.devices()[:1]))
  eight = inference.Sampler(inference.load(os.fspath(path), config))
  default = one.sample_batch(np.arange(8), seed=3)
  np.testing.assert_array_equal(images_lib.to_uint8(default), images[:8])
  # The default labels are i mod num_classes; given explicitly, the same samples.
  np.testing.assert_array_equal(one.sample_batch(np.arange(8), seed=3, labels=np.arange(8)),
                                default)
  # 8 devices hold the labels split like the keys: the same samples (to float rounding).
  np.testing.assert_allclose(eight.sample_batch(np.arange(8), seed=3), default, atol=1e-5)
  # Same keys, other labels: other samples, row by row.
  threes = one.sample_batch(np.arange(8), seed=3, labels=np.full(8, 3))
  differs = np.abs(threes - default).reshape(8, -1).max(axis=1)
  assert differs[3] == 0 and np.all(np.delete(differs, 3) > 1e-3), differs


@pytest.mark.slow
def test_python_sampler_takes_labels_and_refuses_bad_ones(workdir):
  config, path, _ = workdir
  sampler = inference.Sampler.from_workdir(os.fspath(path), config)
  assert sampler.num_classes == 10
  one_label = sampler.sample(3, seed=1, labels=7)
  np.testing.assert_array_equal(one_label, sampler.sample(3, seed=1, labels=[7, 7, 7]))
  assert one_label.shape == (3, 8, 8, 3)
  with pytest.raises(ValueError, match=r"label 10 is outside the model's classes 0..9"):
    sampler.sample(2, labels=[1, 10])
  with pytest.raises(ValueError, match="3 samples asked for, 2 labels given"):
    sampler.sample(3, labels=[1, 2])
  with pytest.raises(ValueError, match="labels must be integers"):
    sampler.sample(2, labels=[0.5, 1.0])
  unconditional = config_lib.load_config("configs/test.py")
  with pytest.raises(ValueError, match=r"the model is unconditional \(model.num_classes=0\)"):
    build.check_sample_labels(unconditional, [1])
  assert programs.sample_labels(unconditional, np.arange(4), sampler.mesh) == ()


@pytest.mark.slow
def test_bits_per_dim_is_of_each_image_given_its_label(workdir):
  config, path, ema = workdir
  mesh = parallel.make_mesh()
  with mock_cifar():
    got = evaluate.bits_per_dim(config, parallel.replicate(ema, mesh), mesh, "test", seed=3,
                                batch_size=8, max_examples=10)
    source = evaluate.split_source(config, "test")
    examples = [source.example(i) for i in range(10)]
  images = np.stack([e["image"] for e in examples]).astype(np.float32) / 127.5 - 1.0
  labels = np.asarray([e["label"] for e in examples], np.int32)
  assert len(set(labels.tolist())) > 1
  model, sched = build.make_model(config), build.make_schedule(config)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(jax.random.key(3), 12), i))(
      np.arange(10))

  def direct(labels_):
    return float(diffusion.calc_bpd_loop(
        sched, programs.denoiser(model, ema, labels_), images, keys, mean_type="eps",
        var_type="fixedlarge").total_bpd.mean())

  assert got["bpd"] == pytest.approx(direct(labels), rel=1e-5)
  assert abs(direct((labels + 1) % 10) - got["bpd"]) > 1e-4  # the labels do enter


@pytest.mark.slow
def test_progressive_and_interpolate_grids_of_a_conditional_model(workdir):
  config, path, _ = workdir
  config = copy.deepcopy(config)
  config.sample.update(dict(sampler="ancestral", num_steps=0))
  progressive = evaluate.run_progressive(config, os.fspath(path))
  assert Image.open(progressive).size == ((5 * 10 + 2) * 8, (3 * 10 + 2) * 8)
  with mock_cifar():
    interp = evaluate.run_interpolate(config, os.fspath(path))
  assert Image.open(interp).size == ((5 * 10 + 2) * 8, (2 * 10 + 2) * 8)


@pytest.mark.slow
def test_training_reads_labels_and_draws_labelled_grids(tmp_path, capsys):
  config = conditional_config()
  config.train.update(dict(num_steps=3, checkpoint_every=3, sample_every=3))
  with mock_cifar():
    state = train.train_and_evaluate(config, os.fspath(tmp_path))
  assert int(state.step) == 3
  assert "label_emb" in state.params
  # 8 samples, of classes 0..7: one column per class, one row.
  upscale = images_lib.grid_upscale(config.data.image_size)
  assert Image.open(tmp_path / "samples" / "grid_3.png").size == ((8 * 10 + 2) * upscale,
                                                                  12 * upscale)
  assert "Wrote" in capsys.readouterr().out


@pytest.mark.slow
def test_conditional_steps_do_not_depend_on_the_device_count():
  """Labels are split with their images, over devices and micro-batches: 1 device and 2 devices
  of 2 micro-batches each train the same parameters over 3 steps; other labels give other
  losses. (8 devices: test_guidance's guided training, the same model with label dropout.)"""
  batch, _, loss = helpers.assert_steps_do_not_depend_on_the_devices(conditional_config(),
                                                             ((2, 2),))
  shifted = dict(batch, label=(batch["label"] + 1) % 10)
  assert abs(loss(shifted) - loss(batch)) > 1e-3 * loss(batch)


@pytest.mark.parametrize("change,match", [
    ({"data.dataset": "lsun/bedroom"},
     r"'lsun/bedroom' has no class labels.*--config.model.num_classes=0"),
    ({"model.num_classes": 5}, r"10 classes.*set --config.model.num_classes=10"),
    ({"model.architecture": "ddpm"},
     r"model.num_heads=2, model.scale_shift_norm=True, model.num_classes=10: DDPM's U-Net.*"
     r"--config.model.architecture=iddpm"),
])
def test_conditional_configs_the_data_or_model_cannot_serve_are_refused(change, match):
  config = config_lib.apply_overrides(conditional_config(), change)
  with pytest.raises(config_checks.ConfigError, match=match):
    config_checks.check_training(config, 8)
