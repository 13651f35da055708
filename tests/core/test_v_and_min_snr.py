"""v-prediction and min-SNR weighting: conversions in float64, the weighted losses against NumPy
(tests/reference.py), every sampler with a v model against the same model's eps form, and the
settings refused."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.config import checks as config_checks
from diffusion_jax.config import config_lib
from diffusion_jax.core import diffusion
from diffusion_jax.core import prng
from diffusion_jax.core import schedules
from diffusion_jax import samplers
from diffusion_jax.samplers import dpm_solver
from tests import math_helpers, reference

T = 1000


@pytest.fixture(scope="module")
def sched():
  return math_helpers.linear_schedule()


@pytest.fixture(scope="module")
def ref():
  return math_helpers.linear_coefficients()


def test_v_eps_and_x0_convert_into_each_other_exactly(ref):
  """float64, every t from 0 (alpha_bar ~ 1) to T - 1 (alpha_bar ~ 4e-5): x_t and v from
  (x_0, eps), then x_0 and eps back from (x_t, v). The schedule's coefficients (float32 in
  `Schedule`) are replaced by their float64 values, so that the round trips are exact."""
  with jax.enable_x64(True):
    abar = ref["abar"]
    sched64 = dataclasses.replace(
        schedules.make_schedule("linear", num_diffusion_timesteps=T),
        **{name: jnp.asarray(value, jnp.float64) for name, value in (
            ("alphas_cumprod", abar), ("sqrt_alphas_cumprod", np.sqrt(abar)),
            ("sqrt_one_minus_alphas_cumprod", np.sqrt(1 - abar)),
            ("sqrt_recip_alphas_cumprod", np.sqrt(1 / abar)),
            ("sqrt_recipm1_alphas_cumprod", np.sqrt(1 / abar - 1)))})
    t = np.arange(T)
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, (T, 2, 2, 1))
    eps = rng.standard_normal((T, 2, 2, 1))
    x_t = diffusion.q_sample(sched64, x0, t, eps)
    v = diffusion.v_target(sched64, x0, t, eps)
    np.testing.assert_allclose(v, reference.v_of(ref, x0, t, eps), rtol=0, atol=1e-14)
    np.testing.assert_allclose(diffusion.predict_xstart_from_v(sched64, x_t, t, v), x0,
                               rtol=0, atol=1e-13)
    np.testing.assert_allclose(diffusion.predict_eps_from_v(sched64, x_t, t, v), eps,
                               rtol=0, atol=1e-13)
    # And through the output of each mean type: x_0 from a v output is x_0 from the eps one.
    np.testing.assert_allclose(
        diffusion.pred_xstart_from_output(sched64, v, x_t, t, mean_type="v"),
        diffusion.pred_xstart_from_output(sched64, eps, x_t, t, mean_type="eps"),
        rtol=0, atol=1e-11)  # eps -> x_0 divides by sqrt(alpha_bar) (up to ~160)


@pytest.mark.parametrize("mean_type", diffusion.MIN_SNR_MEAN_TYPES)
@pytest.mark.parametrize("var_type, loss_type", [("fixedlarge", "mse"),
                                                 ("learned_range", "hybrid")])
def test_min_snr_weights_the_mse_term_only(sched, ref, mean_type, var_type, loss_type):
  x0, t, noise = math_helpers.data(3), math_helpers.timesteps(3), math_helpers.normal(4)
  model_fn = lambda x, t_: math_helpers.model_output(x, t_, var_type)
  xt = reference.q_sample(ref, x0, t, noise)
  f32 = math_helpers.f32
  got = {gamma: diffusion.training_losses(
      sched, model_fn, f32(x0), jnp.asarray(t), f32(noise), mean_type=mean_type,
      var_type=var_type, loss_type=loss_type, min_snr_gamma=gamma) for gamma in (0.0, 5.0)}
  want = reference.training_loss(ref, model_fn(xt, t), x0, xt, t, noise, mean_type, var_type,
                                 loss_type, min_snr_gamma=5.0)
  # The weights themselves, at the batch's t (0 and T - 1 among them).
  weights = reference.min_snr_weight(ref, t, 5.0, mean_type)
  math_helpers.close(diffusion.min_snr_weight(sched, jnp.asarray(t), 5.0, mean_type=mean_type),
                       weights)
  math_helpers.close(got[5.0]["mse"], want["mse"])
  math_helpers.close(got[5.0]["mse"], weights * np.asarray(got[0.0]["mse"]))
  if loss_type == "hybrid":
    np.testing.assert_array_equal(got[5.0]["vb"], got[0.0]["vb"])  # the bound's term unweighted
    math_helpers.close(got[5.0]["loss"], np.asarray(got[5.0]["mse"]) + np.asarray(got[5.0]["vb"]))
  else:
    np.testing.assert_array_equal(got[5.0]["loss"], got[5.0]["mse"])
  # Weights at or below one for eps and v; for x_0 they are min(SNR, 5) <= 5.
  assert np.all(weights <= (5.0 if mean_type == "xstart" else 1.0) + 1e-12)


def test_min_snr_weights_at_both_ends_of_the_schedule(sched, ref):
  """SNR is ~1e4 at t = 0 and ~4e-5 at t = T - 1: gamma caps the first, leaves the second."""
  t = np.array([0, T - 1])
  snr = ref["abar"][t] / (1 - ref["abar"][t])
  assert snr[0] > 5 > snr[1]
  got = {m: np.asarray(diffusion.min_snr_weight(sched, jnp.asarray(t), 5.0, mean_type=m))
         for m in diffusion.MIN_SNR_MEAN_TYPES}
  np.testing.assert_allclose(got["eps"], [5 / snr[0], 1.0], rtol=1e-5)
  np.testing.assert_allclose(got["xstart"], [5.0, snr[1]], rtol=1e-5)
  np.testing.assert_allclose(got["v"], [5 / (snr[0] + 1), snr[1] / (snr[1] + 1)], rtol=1e-5)


def test_min_snr_weights_are_finite_where_alpha_bar_is_zero():
  """A schedule may end with beta = 1 (alpha_bar_T = 0, SNR 0): weight 1 for eps, 0 otherwise."""
  end = schedules.Schedule.from_betas(np.append(np.linspace(1e-4, 0.02, 9), 1.0))
  t = jnp.array([9])
  got = {m: float(diffusion.min_snr_weight(end, t, 5.0, mean_type=m)[0])
         for m in diffusion.MIN_SNR_MEAN_TYPES}
  assert got == {"eps": 1.0, "xstart": 0.0, "v": 0.0}, got


@pytest.mark.parametrize("kwargs, match", [
    (dict(mean_type="xprev"), r"not mean_type 'xprev'"),
    (dict(loss_type="kl", var_type="learned"), r"with loss_type 'kl': set"),
    (dict(loss_type="rescaled_kl", var_type="learned"), r"with loss_type 'rescaled_kl': set"),
    (dict(min_snr_gamma=-1.0), r"min_snr_gamma=-1.0 must be a number >= 0"),
    (dict(min_snr_gamma=float("nan")), r"min_snr_gamma=nan must be a number >= 0"),
])
def test_min_snr_settings_the_loss_cannot_use_are_refused(sched, kwargs, match):
  settings = dict(mean_type="eps", var_type="fixedlarge", loss_type="mse", min_snr_gamma=5.0)
  settings.update(kwargs)
  x = jnp.zeros((2, 2, 2, 1))
  with pytest.raises(ValueError, match=match):
    diffusion.training_losses(sched, lambda x_, t_: x_, x, jnp.array([1, 2]), x, **settings)


@pytest.mark.parametrize("change, match", [
    ({"diffusion.mean_type": "xprev"},
     r"diffusion.min_snr_gamma=5.0 weights the mse term.*not mean_type 'xprev'.*"
     r"--config.diffusion.min_snr_gamma=0"),
    ({"diffusion.var_type": "learned", "diffusion.loss_type": "kl"},
     r"not mean_type 'eps' with loss_type 'kl'"),
    ({"diffusion.min_snr_gamma": -2.0}, r"diffusion.min_snr_gamma=-2.0 must be a finite number"),
])
def test_min_snr_configs_are_refused_before_compiling(change, match):
  config = config_lib.load_config("configs/test.py",
                                  dict({"diffusion.min_snr_gamma": 5.0}, **change))
  with pytest.raises(config_checks.ConfigError, match=match):
    config_checks.check(config, "train")


@pytest.mark.parametrize("sampler, settings", [
    ("ancestral", dict(num_steps=0)), ("ancestral", dict(respacing="10")),
    ("ddim", dict(num_steps=10)), ("ddim", dict(num_steps=10, eta=1.0)),
    ("dpmsolver++", dict(num_steps=10)), ("dpmsolver", dict(num_steps=10))])
def test_every_sampler_samples_a_v_model_as_its_eps_form(sampler, settings):
  """The exact model of Gaussian data in its eps and v forms (tests/math_helpers.py; at the
  discrete samplers' integer labels its alpha is the schedule's): the same samples, up to the
  float32 rounding of x_0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v against the eps form's
  (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)."""
  sched = schedules.make_schedule("linear", beta_end=0.1, num_diffusion_timesteps=100)
  vp = dpm_solver.discrete_vp(sched)
  shape = math_helpers.GAUSSIAN_SHAPE
  keys = prng.example_keys(jax.random.key(3), np.arange(shape[0]))
  got = {}
  for mean_type in ("eps", "v"):
    model_fn = math_helpers.gaussian_model(vp, vp.num_steps, mean_type=mean_type)
    got[mean_type] = np.asarray(samplers.sample(
        sampler, sched, model_fn, keys, shape, mean_type=mean_type, var_type="fixedlarge",
        clip_denoised=False, **settings))
  assert np.abs(got["eps"]).max() > 0.1
  np.testing.assert_allclose(got["v"], got["eps"], rtol=1e-4, atol=1e-4)
