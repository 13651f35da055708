"""DDIM inversion against a float64 NumPy loop, Improved DDPM's reverse step (golden values), and
encode-then-decode on Gaussian data with the exact denoiser."""
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.core import schedules
from diffusion_jax import samplers
from diffusion_jax.samplers import common
from diffusion_jax.samplers import inversion
from tests import math_helpers
from tests import reference

T = 40
# Improved DDPM's 'linear' schedule for T = 40: the paper's betas scaled by 1000 / T, so that
# alpha_bar ends near 0 (1.4e-6) as it does over 1000 steps.
BETAS = np.linspace(1000 / T * 1e-4, 1000 / T * 0.02, T)
SHAPE = (3, 4, 4, 2)
GOLDEN_PATH = pathlib.Path(__file__).resolve().parents[1] / "golden" / "ddim_inversion.npz"
# (name, respacing spec or '' for every step, clip_denoised): what
# tests/golden/make_inversion_golden.py runs through the reference.
GOLDEN_CASES = (("all_clip", "", True), ("all_noclip", "", False),
                ("ddim10_clip", "ddim10", True), ("sections_noclip", "5,3", False))


def toy_eps(x, t, xp=np):
  """A fixed analytic noise prediction of x and the timestep t [B] (float), written for NumPy,
  JAX and PyTorch alike (`xp` the module)."""
  tt = t.reshape(-1, 1, 1, 1) / T
  return 0.6 * x * xp.cos(3 * tt) + 0.3 * xp.sin(2 * x + 5 * tt) - 0.2 * tt


def jax_toy(x, t):
  return toy_eps(x, t.astype(jnp.float32), jnp)


def x_start(seed=0, shape=SHAPE):
  """Images in [-1, 1] with both edge values."""
  return math_helpers.data(seed, shape)


# The float64 NumPy coefficients of BETAS.
REF = reference.coefficients(BETAS)


@pytest.fixture(scope="module")
def sched():
  return schedules.Schedule.from_betas(BETAS)


def reverse_np(ref, model_fn, x, visited, *, mean_type="eps", clip=True):
  """The loop in float64: at each visited k, x0 from the model at (x, k) (clipped), eps from
  x0, then x <- sqrt(a) x0 + sqrt(1 - a) eps with a = alpha_bar of the next visited step (0
  after the last)."""
  x = np.asarray(x, np.float64)
  for i, k in enumerate(visited):
    t = np.full(x.shape[0], k)
    _, _, x0 = reference.p_mean_variance(ref, model_fn(x, t), x, t, mean_type, "fixedlarge",
                                         clip)
    a_t = ref["abar"][k]
    eps = (x / math.sqrt(a_t) - x0) / math.sqrt(1 / a_t - 1)
    a_next = ref["abar"][visited[i + 1]] if i + 1 < len(visited) else 0.0
    x = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps
  return x


@pytest.mark.parametrize("num_steps, mean_type, clip", [(T, "eps", True), (T, "eps", False),
                                                        (7, "v", True), (1, "xstart", False)])
def test_reverse_loop_matches_numpy(sched, num_steps, mean_type, clip):
  x = x_start(1)
  got = inversion.ddim_reverse_sample_loop(sched, jax_toy, jnp.asarray(x, jnp.float32),
                                           num_steps=num_steps, mean_type=mean_type,
                                           var_type="fixedlarge", clip_denoised=clip)
  visited = list(samplers.ddim_timesteps(T, num_steps))
  want = reverse_np(REF, lambda x_, t_: toy_eps(x_, t_ * 1.0), x, visited,
                    mean_type=mean_type, clip=clip)
  assert got.dtype == jnp.float32 and got.shape == SHAPE
  # float32 against float64 over at most 40 steps of values below ~4: a few roundings (6e-8
  # relative) per step, amplified by 1/sqrt(alpha_bar) in x0 where nothing clips it; 1e-5
  # relative to the largest value holds that with margin (measured: < 2e-6).
  math_helpers.close(got, want, rtol=1e-5)
  if clip and num_steps == T:
    # The clip acts: without it the x_0 predictions of the edge pixels differ.
    plain = reverse_np(REF, lambda x_, t_: toy_eps(x_, t_ * 1.0), x, visited,
                       mean_type=mean_type, clip=False)
    assert np.abs(plain - want).max() > 1e-3


def test_a_learned_variance_is_ignored_and_labels_ride_in_the_model_fn(sched):
  x = jnp.asarray(x_start(2), jnp.float32)
  labels = jnp.arange(SHAPE[0])

  def conditional(x_, t_):  # a conditional model closes over its labels, as programs.denoiser
    eps = jax_toy(x_, t_) + 0.1 * labels.reshape(-1, 1, 1, 1)
    return jnp.concatenate([eps, jnp.full_like(eps, 7.0)], axis=-1)

  got = inversion.ddim_reverse_sample_loop(sched, conditional, x, num_steps=5, mean_type="eps",
                                           var_type="learned")
  want = inversion.ddim_reverse_sample_loop(
      sched, lambda x_, t_: conditional(x_, t_)[..., :SHAPE[-1]], x, num_steps=5,
      mean_type="eps", var_type="fixedlarge")
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  unlabelled = inversion.ddim_reverse_sample_loop(sched, jax_toy, x, num_steps=5,
                                                  mean_type="eps", var_type="fixedlarge")
  assert np.abs(np.asarray(got) - np.asarray(unlabelled))[1:].min() > 0


def test_examples_are_encoded_independently(sched):
  x = jnp.asarray(x_start(3, (8, 3, 3, 1)), jnp.float32)
  run = jax.jit(lambda x_: inversion.ddim_reverse_sample_loop(
      sched, jax_toy, x_, num_steps=9, mean_type="eps", var_type="fixedlarge"))
  np.testing.assert_allclose(np.asarray(run(x))[2:5], np.asarray(run(x[2:5])), atol=1e-6)


def test_matches_improved_diffusion(sched):
  """Improved DDPM's `ddim_reverse_sample` over every entry of its (spaced) diffusion, and its
  `ddim_sample_loop` from the result (tests/golden/make_inversion_golden.py, float64)."""
  with np.load(GOLDEN_PATH) as f:
    golden = dict(f)
  x = golden["x_start"]
  np.testing.assert_array_equal(x, x_start(0))
  for name, spec, clip in GOLDEN_CASES:
    visited = schedules.space_timesteps(T, spec) if spec else np.arange(T)
    latents = inversion.ddim_reverse_sample_loop(
        sched, jax_toy, jnp.asarray(x, jnp.float32), timesteps=visited, mean_type="eps",
        var_type="fixedlarge", clip_denoised=clip)
    # As against NumPy: float32 against the reference's float64 (measured: < 2e-6).
    math_helpers.close(latents, golden[f"{name}_latents"], rtol=1e-5)
    # Decoding the reference's latents with our DDIM gives its decoding.
    decoded = samplers.ddim_sample_loop(
        sched, jax_toy, None, SHAPE, timesteps=visited, mean_type="eps", var_type="fixedlarge",
        clip_denoised=clip, x_init=jnp.asarray(golden[f"{name}_latents"], jnp.float32))
    math_helpers.close(decoded, golden[f"{name}_decoded"], rtol=1e-5)
    # The same on the respaced schedule, whose entries are the visited steps.
    if spec:
      respaced = inversion.ddim_reverse_sample_loop(
          schedules.respace(sched, visited), jax_toy, jnp.asarray(x, jnp.float32),
          num_steps=len(visited), mean_type="eps", var_type="fixedlarge", clip_denoised=clip)
      math_helpers.close(respaced, golden[f"{name}_latents"], rtol=1e-5)


def test_reconstruction_error_falls_as_the_steps_grow():
  """Encode then decode Gaussian data x_0 ~ N(m, s^2) with its exact noise prediction over T =
  1000: the error is the ODE's discretisation error, which falls as the steps grow."""
  m, s = math_helpers.MU, math_helpers.S
  sched = math_helpers.linear_schedule()
  abar = jnp.asarray(math_helpers.linear_coefficients()["abar"], jnp.float32)

  def exact_eps(x, t):
    ab = abar[t].reshape(-1, 1, 1, 1)
    return jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * m) / (ab * s**2 + 1 - ab)

  x = jnp.asarray(m + s * np.random.default_rng(0).standard_normal((64, 2, 2, 1)), jnp.float32)
  errors = []
  for num_steps in (5, 20, 100, 1000):
    kw = dict(num_steps=num_steps, mean_type="eps", var_type="fixedlarge", clip_denoised=False)
    latents = jax.jit(lambda x_, kw=kw: inversion.ddim_reverse_sample_loop(
        sched, exact_eps, x_, **kw))(x)
    back = jax.jit(lambda z, kw=kw: samplers.ddim_sample_loop(
        sched, exact_eps, None, x.shape, x_init=z, **kw))(latents)
    errors.append(float(jnp.sqrt(jnp.mean((back - x) ** 2))))
  assert all(a > b for a, b in zip(errors, errors[1:])), errors
  assert errors[-1] < 0.1 * errors[0] and errors[-1] < 1e-2, errors


def test_decoding_from_the_drawn_noise_is_sampling(sched):
  """x_init = each example's own x_T gives DDIM's samples bit for bit, and with eta 0 the keys
  are not needed."""
  keys = jax.random.split(jax.random.key(4), SHAPE[0])
  kw = dict(num_steps=6, mean_type="eps", var_type="fixedlarge")
  sampled = samplers.ddim_sample_loop(sched, jax_toy, keys, SHAPE, **kw)
  x_T = common.initial_noise(keys, SHAPE, sched)
  for given_keys in (keys, None):
    np.testing.assert_array_equal(
        np.asarray(samplers.ddim_sample_loop(sched, jax_toy, given_keys, SHAPE, x_init=x_T,
                                             **kw)), np.asarray(sampled))


def test_errors(sched):
  x = jnp.zeros(SHAPE)
  kw = dict(mean_type="eps", var_type="fixedlarge")
  with pytest.raises(ValueError, match="one of num_steps and timesteps"):
    inversion.ddim_reverse_sample_loop(sched, jax_toy, x, **kw)
  with pytest.raises(ValueError, match="one of num_steps and timesteps"):
    inversion.ddim_reverse_sample_loop(sched, jax_toy, x, num_steps=4, timesteps=[0, 1], **kw)
  with pytest.raises(ValueError, match=r"num_steps must be in \[1, T=40\]"):
    inversion.ddim_reverse_sample_loop(sched, jax_toy, x, num_steps=41, **kw)
  with pytest.raises(ValueError, match="ascending, distinct integers"):
    inversion.ddim_reverse_sample_loop(sched, jax_toy, x, timesteps=[3, 1], **kw)
  with pytest.raises(ValueError, match="Unknown mean_type|mean_type"):
    inversion.ddim_reverse_sample_loop(sched, jax_toy, x, num_steps=3, mean_type="noise",
                                       var_type="fixedlarge")
  with pytest.raises(ValueError, match="draws noise: give one key per example"):
    samplers.ddim_sample_loop(sched, jax_toy, None, SHAPE, num_steps=3, eta=0.5, x_init=x, **kw)
  with pytest.raises(ValueError, match=r"x_init has shape \(3, 4, 4, 2\); give it the samples' "
                                       r"shape \(3, 4, 4, 1\)"):
    samplers.ddim_sample_loop(sched, jax_toy, None, SHAPE[:3] + (1,), num_steps=3, x_init=x,
                              **kw)
