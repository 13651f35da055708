"""Karras et al.'s samplers against NVlabs/edm's (golden values), against float64 NumPy written
here from the paper's Algorithms 1 and 2, and against the exact probability flow of Gaussian
data; their settings and errors through the registry.

Gaussian data x_0 ~ N(MU, S^2) per dimension has the exact denoiser D(x; sigma) = MU + S^2 /
(S^2 + sigma^2) (x - MU) in the variance-exploding form x = x_vp / alpha, and its probability-flow
ODE the solution x(sigma) - MU = sqrt((S^2 + sigma^2) / (S^2 + sigma_max^2)) (x(sigma_max) - MU).
"""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import parallel
from diffusion_jax import samplers
from diffusion_jax.core import prng
from diffusion_jax.core import schedules
from diffusion_jax.samplers import common
from diffusion_jax.samplers import continuous
from diffusion_jax.samplers import karras
from tests import math_helpers
from tests.math_helpers import GAUSSIAN_SHAPE, MU, S, gaussian_model

SHAPE = GAUSSIAN_SHAPE
T = 200

# NVlabs/edm's samplers on these cases: tests/golden/make_karras_golden.py writes them.
GOLDEN_PATH = pathlib.Path(__file__).resolve().parents[1] / "golden" / "karras_edm.npz"
CHURN = dict(s_churn=2.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)
# (name, method, sigma labels, noise levels N, settings): churn makes Algorithm 2.
GOLDEN_CASES = [
    ("heun_round", "heun", "round", 6, {}),
    ("heun_interpolate", "heun", "interpolate", 6, {}),
    ("heun_interpolate_rho3", "heun", "interpolate", 6,
     dict(rho=3.0, sigma_min=0.05, sigma_max=80.0)),
    ("euler_round", "euler", "round", 8, {}),
    ("euler_interpolate", "euler", "interpolate", 8, {}),
    ("stochastic_round", "heun", "round", 6, CHURN),
    ("stochastic_interpolate", "heun", "interpolate", 6, CHURN),
]


def digits_schedule(**kwargs):
  """The digits' schedule: linear 1e-4..0.1 over T = 200 (sigma from 0.01 to 178)."""
  return schedules.make_schedule("linear", beta_end=0.1, num_diffusion_timesteps=T, **kwargs)


def golden_levels():
  """The schedule's noise levels sqrt((1 - alpha_bar) / alpha_bar), float64 NumPy, [T]."""
  alpha_bar = np.exp(np.cumsum(np.asarray(digits_schedule().log_alphas, np.float64)))
  return np.sqrt((1 - alpha_bar) / alpha_bar)


def golden_keys():
  return prng.example_keys(jax.random.key(0), np.arange(SHAPE[0]))


def golden_latents():
  """Every sampler's x_T of examples 0..3, as float64."""
  return np.asarray(common.initial_noise(golden_keys(), SHAPE, digits_schedule()), np.float64)


def exact_model(sched, mean_type="eps"):
  """The exact network of the Gaussian data at the labels of the schedule's continuous view
  (all T steps: label n is timestep n), its arrays made when called (float64 in float64 runs)."""
  vp = continuous.discrete_vp(sched)
  return lambda x, t: gaussian_model(vp, sched.num_timesteps, mean_type=mean_type)(x, t)


def run(sched, model_fn, num_calls, *, method="heun", dtype=jnp.float64, **kwargs):
  with jax.enable_x64(True):
    return np.asarray(karras.solve(sched, model_fn, golden_keys(), SHAPE, num_steps=num_calls,
                                   method=method, dtype=dtype, **kwargs))


# --- NVlabs/edm ------------------------------------------------------------------------------

@pytest.mark.parametrize("name,method,labels,levels,settings", GOLDEN_CASES,
                         ids=[case[0] for case in GOLDEN_CASES])
def test_edm_reference_samplers(name, method, labels, levels, settings):
  """NVlabs/edm's `edm_sampler` (Heun; with S_churn Algorithm 2) and `ablation_sampler` (Euler)
  in float64 with the exact denoiser, its sigmas rounded by a `round_sigma` to the schedule's
  levels or not, and the same latents and added noise: equal to float64 rounding (the denoiser
  here goes through the VP network's eps and the view's interpolation, 1e-10 relative)."""
  golden = np.load(GOLDEN_PATH)
  np.testing.assert_array_equal(golden_latents(), golden["latents"])
  noise = golden[name + "_noise"]
  calls = 2 * levels - 1 if method == "heun" else levels
  got = run(digits_schedule(), exact_model(digits_schedule()), calls, method=method,
            sigma_labels=labels, clip_denoised=False,
            noise_fn=lambda step: jnp.asarray(noise)[step],
            **settings)
  np.testing.assert_allclose(got, golden[name], rtol=1e-8, atol=1e-8)


# --- Algorithms 1 and 2 in float64 NumPy ----------------------------------------------------

def numpy_sampler(sched, x_T, noise, calls, *, method, labels, mean_type, clip, rho=7.0,
                  s_churn=0.0, s_tmin=0.0, s_tmax=np.inf, s_noise=1.0):
  """Algorithm 2 of the paper (Algorithm 1 with s_churn = 0; Euler: no correction), on the
  schedule's range, with the network `math_helpers.model_output` read as `mean_type` at the
  trained timestep nearest each sigma ('round') or at the interpolated one."""
  log_alpha_bar = np.cumsum(np.asarray(sched.log_alphas, np.float64))
  levels = np.sqrt(np.expm1(-log_alpha_bar))
  times = np.arange(1, T + 1) / T

  def meet(sigma):
    if labels == "round":
      n = int(np.argmin(np.abs(levels - sigma)))
      return levels[n], float(n)
    # log alpha is linear in t between the levels; invert it at -log(1 + sigma^2) / 2.
    t = np.interp(-0.5 * np.log1p(sigma**2), 0.5 * log_alpha_bar[::-1], times[::-1])
    return sigma, (t - 1 / T) * T

  def denoise(x, sigma):
    sigma, label = meet(sigma)
    alpha = 1 / np.sqrt(1 + sigma**2)
    sigma_vp = alpha * sigma
    x_vp = alpha * x
    out = math_helpers.model_output(x_vp, np.full(x.shape[0], label), "fixedlarge")
    x0 = {"eps": (x_vp - sigma_vp * out) / alpha, "xstart": out,
          "v": alpha * x_vp - sigma_vp * out}[mean_type]
    return np.clip(x0, -1, 1) if clip else x0

  n = (calls + 1) // 2 if method == "heun" else calls
  i = np.arange(n)
  sigmas = (levels[-1] ** (1 / rho) + i / (n - 1) * (levels[0] ** (1 / rho) -
                                                    levels[-1] ** (1 / rho))) ** rho
  sigmas = np.append([meet(s)[0] for s in sigmas], 0.0)
  x = x_T * sigmas[0]
  for i in range(n):
    gamma = min(s_churn / n, np.sqrt(2) - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
    sigma_hat = meet(sigmas[i] * (1 + gamma))[0]
    x_hat = x + np.sqrt(sigma_hat**2 - sigmas[i]**2) * s_noise * noise[i]
    d = (x_hat - denoise(x_hat, sigma_hat)) / sigma_hat
    x = x_hat + (sigmas[i + 1] - sigma_hat) * d
    if method == "heun" and sigmas[i + 1] > 0:
      d_next = (x - denoise(x, sigmas[i + 1])) / sigmas[i + 1]
      x = x_hat + (sigmas[i + 1] - sigma_hat) * (d + d_next) / 2
  return x


@pytest.mark.parametrize("method,labels,mean_type,clip,churn", [
    ("heun", "round", "eps", True, False), ("heun", "interpolate", "v", False, False),
    ("euler", "interpolate", "xstart", True, False), ("euler", "round", "eps", False, False),
    ("heun", "round", "eps", True, True), ("heun", "interpolate", "eps", False, True)])
def test_the_scan_is_the_papers_algorithms(method, labels, mean_type, clip, churn):
  """The scan of per-call coefficients equals the step-by-step float64 loop of Algorithms 1 and 2
  (a smooth nonlinear stand-in network, each mean type, clipped or not)."""
  sched = digits_schedule()
  calls = 9
  noise = np.random.default_rng(1).standard_normal((calls,) + SHAPE)
  churn_settings = dict(s_churn=3.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003) if churn else {}
  model_fn = lambda x, t: math_helpers.model_output(x, t, "fixedlarge")
  got = run(sched, model_fn, calls, method=method, sigma_labels=labels, mean_type=mean_type,
            clip_denoised=clip, noise_fn=lambda step: jnp.asarray(noise)[step],
            **churn_settings)
  want = numpy_sampler(sched, golden_latents(), noise, calls, method=method, labels=labels,
                       mean_type=mean_type, clip=clip, **churn_settings)
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_round_meets_the_model_at_trained_levels_and_interpolate_at_float_labels():
  sched = digits_schedule()
  levels = golden_levels()
  rounded = karras.make_plan(sched, 11, sigma_labels="round")
  np.testing.assert_array_equal(rounded.label, np.round(rounded.label))
  np.testing.assert_allclose(rounded.sigma, levels[rounded.label.astype(int)], rtol=1e-12)
  interpolated = karras.make_plan(sched, 11, sigma_labels="interpolate")
  assert np.any(np.abs(interpolated.label - np.round(interpolated.label)) > 0.1)
  # At the ends of the range (trained levels) the float labels are the trained timesteps.
  np.testing.assert_allclose(interpolated.label[[0, -1]], [T - 1, 0], atol=1e-9)
  assert interpolated.num_calls == 11 and np.sum(interpolated.first) == 6


# --- Order of convergence ----------------------------------------------------------------------

def test_error_falls_at_the_samplers_order():
  """Against the exact flow of Gaussian data (float64, interpolated labels, so the ODE is the
  paper's with the exact denoiser): doubling the steps from 10 to 20 to 40 divides the error at
  sigma_min (before the last step, which maps both by the same denoiser) by ~4 for Heun and ~2
  for Euler (rates measured 2.36, 2.17 and 0.94, 0.98; Heun's first steps, from sigma 178, are
  still far from the asymptotic regime at 10 levels)."""
  sched = digits_schedule()
  levels = golden_levels()
  x_T = golden_latents()
  exact_at_min = MU + np.sqrt((S**2 + levels[0]**2) / (S**2 + levels[-1]**2)) * (
      x_T * levels[-1] - MU)
  want = MU + S**2 / (S**2 + levels[0]**2) * (exact_at_min - MU)
  errors = {}
  for method in karras.METHODS:
    errors[method] = np.array([np.abs(run(
        sched, exact_model(sched), 2 * n - 1 if method == "heun" else n, method=method,
        sigma_labels="interpolate", clip_denoised=False) - want).max() for n in (10, 20, 40)])
  rates = {method: np.log2(e[:-1] / e[1:]) for method, e in errors.items()}
  assert np.all(rates["heun"] > 1.9) and np.all(rates["heun"] < 2.6), rates
  assert np.all(rates["euler"] > 0.85) and np.all(rates["euler"] < 1.3), rates
  assert np.all(errors["heun"] < errors["euler"]), errors


# --- Through the registry ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["heun", "euler", "karras_stochastic"])
def test_each_sampler_by_name(name):
  """`samplers.sample` runs each entry; the deterministic ones approach the exact flow, the
  stochastic one (S_churn 40: gamma sqrt(2) - 1 for sigma in [0.05, 50]) samples the data's
  distribution; results are named for their settings."""
  sched = digits_schedule()
  keys = prng.example_keys(jax.random.key(1), np.arange(256))
  x = np.asarray(samplers.sample(name, sched, exact_model(sched), keys, (256, 1, 1, 1),
                                 mean_type="eps", var_type="fixedlarge", num_steps=35,
                                 clip_denoised=False, karras_sigma_labels="interpolate"))
  assert abs(x.mean() - MU) < 0.1 and abs(x.std() - S) < 0.1, (x.mean(), x.std())
  tag = samplers.tag(dict(sampler=name, num_steps=35), T)
  assert tag.startswith(f"_{name}35_rho7_round"), tag


def test_stochastic_samples_do_not_depend_on_the_device_count():
  """The batch split over 8 devices gives each example the samples it gets in one batch."""
  sched = digits_schedule()
  fn = lambda params, k: karras.solve(sched, exact_model(sched), k, (k.shape[0],) + SHAPE[1:],
                                      num_steps=5, s_churn=40.0, s_tmin=0.05, s_tmax=50.0)
  mesh = parallel.make_mesh(jax.devices()[:8])
  keys = parallel.sharded_example_keys(0, prng.RunStream.SAMPLE, np.arange(8), mesh)
  split = parallel.batch_map(fn, mesh)(parallel.replicate(np.zeros(()), mesh), keys)
  whole = jax.jit(fn)(None, jax.device_put(keys, jax.devices()[0]))
  np.testing.assert_allclose(np.asarray(split), np.asarray(whole), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name,values,match", [
    ("heun", dict(num_steps=10), r"odd count of at least 3; got 10: set sample.num_steps"),
    ("karras_stochastic", dict(num_steps=1), r"needs at least 3 steps, got 1"),
    ("euler", dict(num_steps=5, karras_rho=0.0), r"rho=0.0 must be > 0"),
    ("euler", dict(num_steps=5, karras_rho=-1.0), r"karras_rho=-1.0 must be >= 0"),
    ("euler", dict(num_steps=5, karras_sigma_min=2.0, karras_sigma_max=1.0),
     r"sigma_min=2.0 must be below sigma_max=1.0"),
    ("heun", dict(num_steps=5, karras_sigma_labels="nearest"),
     r"karras_sigma_labels='nearest' must be one of round\|interpolate"),
    ("karras_stochastic", dict(num_steps=5, karras_s_churn=0.0),
     r"s_churn=0.0 adds no noise.*sample.karras_s_churn"),
    ("karras_stochastic", dict(num_steps=5, karras_s_churn=-1.0), r"must be >= 0"),
    ("karras_stochastic", dict(num_steps=5, karras_s_tmin=2.0, karras_s_tmax=1.0),
     r"s_tmin=2.0 must not exceed s_tmax=1.0"),
    ("heun", dict(num_steps=5, karras_s_churn=3.0),
     r"a setting of sampler 'karras_stochastic'.*which 'heun' does not use"),
    ("heun", dict(num_steps=5, respacing="10"), r"takes its steps from sample.num_steps"),
])
def test_bad_settings_are_refused_before_compiling(name, values, match):
  with pytest.raises(ValueError, match=match):
    samplers.check(name, values, T)


def test_a_model_without_x0_and_a_range_outside_the_schedules_are_refused():
  with pytest.raises(ValueError, match=r"mean_type 'eps', 'xstart' or 'v'\), got mean_type "
                     r"'xprev'"):
    samplers.check("heun", dict(num_steps=5), T, mean_type="xprev")
  sched = digits_schedule()
  refused = [
      (dict(karras_sigma_max=500.0), r"sigma_max=500.0 \(sample.karras_sigma_max\) lies outside "
       r"the schedule's sigma range \[0.0100005, 177.889\]"),
      (dict(karras_sigma_min=0.001), r"sigma_min=0.001 \(sample.karras_sigma_min\) lies outside"),
      (dict(karras_s_tmin=200.0, karras_s_tmax=300.0),
       r"no step's sigma \(0.01..177.9\) lies in \[s_tmin, s_tmax\]")]
  for values, match in refused:
    name = "karras_stochastic" if "karras_s_tmin" in values else "euler"
    with pytest.raises(ValueError, match=match):
      jax.eval_shape(lambda k: samplers.sample(  # noqa: B023
          name, sched, exact_model(sched), k, SHAPE, mean_type="eps", var_type="fixedlarge",
          num_steps=5, **values), golden_keys())
