"""Classifier-free guidance: the guided output against a float64 NumPy combination in eps space,
the doubled batch against two separate network calls, the null class's training dropout, the
device count, sample mode end to end, and the settings refused before compiling."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.config import build
from diffusion_jax.config import programs
from diffusion_jax.config import checks as config_checks
from diffusion_jax.config import config_lib
from diffusion_jax.core import diffusion
from diffusion_jax.core import prng
from diffusion_jax.evaluation import inference
from diffusion_jax.evaluation import modes as evaluate
from diffusion_jax import parallel
from diffusion_jax import samplers
from diffusion_jax.training import step as train_step
from tests import checkpoint_fixtures, helpers

STEP = 4


def guided_config():
  """The conditional tests' tiny Improved DDPM U-Net, with a null class (p_uncond 0.1)."""
  config = helpers.conditional_config()
  config.model.p_uncond = 0.1
  config.sample.guidance_scale = 2.0
  return config


# The tests marked slow compile and run whole sampling or training programs.
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  config = guided_config()
  path = tmp_path_factory.mktemp("guided")
  ema = checkpoint_fixtures.randomized_checkpoint(config, path, STEP)
  return config, path, ema


def _np_eps_from(output, kind, x_t, abar, abar_prev, alpha):
  """eps implied by an output of mean type `kind` at x_t (float64, the papers' formulas)."""
  if kind == "eps":
    return output
  if kind == "v":  # v = sqrt(abar) eps - sqrt(1 - abar) x0; x_t = sqrt(abar) x0 + ...
    return np.sqrt(1 - abar) * x_t + np.sqrt(abar) * output
  if kind == "xprev":
    # posterior mean = c1 x0 + c2 x_t (Ho et al. eq. 7) -> x0 -> eps.
    c1 = np.sqrt(abar_prev) * (1 - alpha) / (1 - abar)
    c2 = np.sqrt(alpha) * (1 - abar_prev) / (1 - abar)
    output = (output - c2 * x_t) / c1
  return (x_t - np.sqrt(abar) * output) / np.sqrt(1 - abar)


def _np_output_from(eps, kind, x_t, abar, abar_prev, alpha):
  if kind == "eps":
    return eps
  x0 = (x_t - np.sqrt(1 - abar) * eps) / np.sqrt(abar)
  if kind == "xstart":
    return x0
  if kind == "v":
    return np.sqrt(abar) * eps - np.sqrt(1 - abar) * x0
  c1 = np.sqrt(abar_prev) * (1 - alpha) / (1 - abar)
  c2 = np.sqrt(alpha) * (1 - abar_prev) / (1 - abar)
  return c1 * x0 + c2 * x_t


@pytest.mark.parametrize("mean_type", [m for m in diffusion.MEAN_TYPES])
@pytest.mark.parametrize("var_type", ["fixedlarge", "learned_range"])
def test_guided_output_is_the_combination_in_eps_space(mean_type, var_type):
  """Each output converted to eps, combined as (1 + w) eps_c - w eps_u, converted back: what
  `guided_output` gives by combining the outputs directly; a learned variance is the
  conditional one's."""
  betas = np.linspace(1e-4, 0.02, 1000)  # the original's linear schedule
  abar_all = np.cumprod(1 - betas)
  rng = np.random.default_rng(0)
  t = np.array([1, 10, 500, 999])
  shape = (4, 3, 3, 2)
  bcast = lambda v: v[t].reshape(-1, 1, 1, 1)
  abar, alpha = bcast(abar_all), bcast(1 - betas)
  abar_prev = bcast(np.append(1.0, abar_all[:-1]))
  x_t = rng.standard_normal(shape)
  cond, uncond = rng.standard_normal(shape), rng.standard_normal(shape)
  learned = var_type == "learned_range"
  var_c, var_u = rng.uniform(-1, 1, shape), rng.uniform(-1, 1, shape)
  for w in (0.0, 0.5, 3.0):
    eps = ((1 + w) * _np_eps_from(cond, mean_type, x_t, abar, abar_prev, alpha)
           - w * _np_eps_from(uncond, mean_type, x_t, abar, abar_prev, alpha))
    want = _np_output_from(eps, mean_type, x_t, abar, abar_prev, alpha)
    with jax.enable_x64(True):
      got = np.asarray(diffusion.guided_output(
          np.concatenate([cond, var_c], -1) if learned else cond,
          np.concatenate([uncond, var_u], -1) if learned else uncond, w, shape,
          var_type=var_type))
    if learned:
      np.testing.assert_array_equal(got[..., 2:], var_c)
      got = got[..., :2]
    # float64 round trips through 1 / sqrt(abar) ~ 200 at t = 999 and 1 / c1 at t = 1.
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    if w == 0:
      np.testing.assert_array_equal(got, cond)


@pytest.mark.slow
def test_guided_denoiser_is_one_doubled_call_of_the_conditional_and_null_models(workdir):
  config, _, ema = workdir
  model = build.make_model(config)
  rng = np.random.default_rng(1)
  x = rng.standard_normal((6, 8, 8, 3)).astype(np.float32)
  t = np.array([0, 3, 7, 11, 15, 19], np.int32)
  labels = np.array([0, 1, 2, 3, 9, 5], np.int32)
  cond = programs.denoiser(model, ema, labels)(x, t)
  null = programs.denoiser(model, ema, np.full(6, 10, np.int32))(x, t)
  assert float(jnp.abs(cond - null).max()) > 1e-3  # the null class is a class of its own
  for w in (0.0, 1.0, 3.0):
    got = programs.denoiser(model, ema, labels, guidance_scale=w, var_type="fixedlarge")(x, t)
    np.testing.assert_allclose(got, (1 + w) * cond - w * null, rtol=1e-5, atol=1e-5)
  # w = 0 is the conditional model itself.
  np.testing.assert_array_equal(
      programs.denoiser(model, ema, labels, guidance_scale=0.0)(x, t), cond)


def test_null_class_row_exists_only_with_p_uncond():
  for p_uncond, rows in ((0.0, 10), (0.1, 11)):
    config = guided_config()
    config.model.p_uncond = p_uncond
    model = build.make_model(config)
    params = jax.eval_shape(lambda k: build.init_params(config, model, k), jax.random.key(0))
    assert params["label_emb"]["embedding"].shape[0] == rows


def test_label_dropout_rate_and_its_independence_of_the_batch_split():
  n, p = 20_000, 0.1
  keys = prng.example_keys(jax.random.key(7), np.arange(n))
  labels = jnp.asarray(np.arange(n) % 10, jnp.int32)
  dropped = np.asarray(jax.jit(lambda l, k: train_step.drop_labels(l, k, p, 10))(labels, keys))
  is_null = dropped == 10
  # Binomial(20000, 0.1): mean 2000, sd 42.4; 5 sd either side.
  assert abs(int(is_null.sum()) - n * p) < 5 * np.sqrt(n * p * (1 - p)), int(is_null.sum())
  np.testing.assert_array_equal(dropped[~is_null], np.asarray(labels)[~is_null])
  # Each example's draw comes from its own key: any split of the batch drops the same ones.
  half = np.asarray(train_step.drop_labels(labels[5000:6000], keys[5000:6000], p, 10))
  np.testing.assert_array_equal(half, dropped[5000:6000])
  np.testing.assert_array_equal(np.asarray(train_step.drop_labels(labels, keys, 0.0, 10)),
                                np.asarray(labels))


@pytest.mark.slow
def test_guided_training_does_not_depend_on_the_device_count():
  """With label dropout: 1 device and 8 devices train the same parameters over 3 steps, and
  the dropout changes the loss (the dropped labels reach the model)."""
  config = guided_config()
  config.model.p_uncond = 0.5
  batch, _, loss = helpers.assert_steps_do_not_depend_on_the_devices(config, ((8, 1),))
  losses = [loss(batch, p_uncond) for p_uncond in (0.0, 0.5)]
  assert abs(losses[1] - losses[0]) > 1e-4 * losses[0], losses


@pytest.mark.slow
@pytest.mark.parametrize("sampler,settings", [("ancestral", dict(num_steps=0)),
                                              ("ddim", dict(num_steps=4)),
                                              ("dpmsolver++", dict(num_steps=4))])
def test_guided_sampling_by_every_sampler_on_one_and_eight_devices(workdir, sampler, settings):
  config, path, ema = workdir
  one = inference.Sampler(inference.load(os.fspath(path), config),
                          mesh=parallel.make_mesh(jax.devices()[:1]))
  eight = inference.Sampler(inference.load(os.fspath(path), config))
  kw = dict(sampler=sampler, **settings)
  guided = one.sample_batch(np.arange(8), seed=2, guidance_scale=2.0, **kw)
  np.testing.assert_allclose(eight.sample_batch(np.arange(8), seed=2, guidance_scale=2.0, **kw),
                             guided, atol=1e-5)
  plain = one.sample_batch(np.arange(8), seed=2, guidance_scale=0.0, **kw)
  assert float(np.abs(guided - plain).max()) > 1e-3
  # The sampler on a hand-made guided model (two separate calls) gives the same samples.
  model, sched = one.model, one.sched
  labels = jnp.arange(8, dtype=jnp.int32) % 10

  def by_hand(x, t):
    c = programs.denoiser(model, ema, labels)(x, t)
    u = programs.denoiser(model, ema, jnp.full(8, 10, jnp.int32))(x, t)
    return 3.0 * c - 2.0 * u

  keys = prng.example_keys(prng.run_key(2, prng.RunStream.SAMPLE), np.arange(8))
  want = samplers.sample(sampler, sched, by_hand, keys, (8, 8, 8, 3),
                         mean_type=config.diffusion.mean_type, var_type=config.diffusion.var_type,
                         **settings)
  np.testing.assert_allclose(guided, want, atol=1e-4)


def test_sample_mode_names_guided_samples(workdir):
  config, path, _ = workdir
  out_dir = evaluate.run_sample(config, os.fspath(path))
  assert config.sample.guidance_scale == 2.0
  assert build.sampler_tag(config).endswith("_guidance2"), build.sampler_tag(config)
  with np.load(out_dir / "samples_0.npz") as f:
    assert f["images"].shape == (10, 8, 8, 3)
  assert "guidance2" in os.fspath(out_dir)


@pytest.mark.parametrize("change,match", [
    ({"model.p_uncond": 0.0}, r"sample.guidance_scale=2 needs a model trained with a null class"),
    ({"model.num_classes": 0, "model.p_uncond": 0.0},
     r"sample.guidance_scale=2 needs a class-conditional model"),
    ({"model.num_classes": 0},
     r"model.p_uncond=0.1 trains classifier-free guidance's null class.*num_classes"),
    ({"model.p_uncond": 1.0}, r"model.p_uncond=1.0 must be a finite number in \[0, 1\)"),
    ({"model.p_uncond": -0.1}, r"model.p_uncond=-0.1 must be"),
    ({"sample.guidance_scale": -1.0}, r"sample.guidance_scale=-1.0 must be a finite number >= 0"),
])
def test_guidance_settings_the_model_cannot_serve_are_refused(change, match):
  config = config_lib.apply_overrides(guided_config(), change)
  with pytest.raises(config_checks.ConfigError, match=match):
    config_checks.check(config, "sample")


def test_python_sampler_refuses_guidance_without_a_null_class(workdir):
  _, path, _ = workdir
  config = helpers.conditional_config()  # class-conditional, no null class
  model, sched = build.make_model(config), build.make_schedule(config)
  with pytest.raises(ValueError, match="needs a model trained with a null class"):
    programs.make_sample_fn(config, model, sched, parallel.make_mesh(),
                         **build.sampler_kwargs(config, guidance_scale=1.0))
  sampler = inference.Sampler(inference.load(os.fspath(path), guided_config()))
  with pytest.raises(ValueError, match=r"guidance_scale=nan: use a number >= 0"):
    sampler.sample_fn(guidance_scale=float("nan"))
