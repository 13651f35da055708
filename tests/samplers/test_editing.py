"""RePaint, SDEdit, interpolation through latents and what every sampler's entry gives them
(progressive runs, runs from given x at a timestep), against float64 NumPy loops of the papers'
formulas on an analytic model."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.core import prng
from diffusion_jax.core import schedules
from diffusion_jax import samplers
from diffusion_jax.samplers import common
from diffusion_jax.samplers import inversion
from diffusion_jax.samplers import registry
from diffusion_jax.samplers import repaint
from diffusion_jax.samplers import sdedit
from tests import math_helpers
from tests import reference

T = 20
BETAS = np.linspace(1e-3, 0.3, T)
SHAPE = (3, 4, 4, 1)
REF = reference.coefficients(BETAS)
TYPES = dict(mean_type="eps", var_type="fixedlarge")


def toy_eps(x, t, xp=np):
  """A fixed analytic noise prediction of x and the timestep t [B]."""
  tt = t.reshape(-1, 1, 1, 1) / T
  return 0.6 * x * xp.cos(3 * tt) + 0.3 * xp.sin(2 * x + 5 * tt) - 0.2 * tt


def jax_toy(x, t):
  return toy_eps(x, t.astype(jnp.float32), jnp)


@pytest.fixture(scope="module")
def sched():
  return schedules.Schedule.from_betas(BETAS)


def keys(n=SHAPE[0]):
  return prng.example_keys(jax.random.key(7), np.arange(n))


def normal(k, *folds):
  """The noise [B, ...] JAX draws from keys folded with `folds`, as float64."""
  for f in folds:
    k = prng.fold_in_each(k, f)
  return np.asarray(prng.normal_each(k, SHAPE[1:]), np.float64)


def p_sample_np(x, t, z, clip=True, ref=REF, visited=None):
  """Ho et al.'s step from entry t of the coefficients `ref`; the model sees visited[t] (the
  trained timestep of a respaced schedule's entry), or t."""
  tb = np.full(x.shape[0], t)
  model_t = np.full(x.shape[0], t if visited is None else visited[t], np.float64)
  mean, logvar, _ = reference.p_mean_variance(ref, toy_eps(x, model_t), x, tb, "eps",
                                              "fixedlarge", clip)
  return mean + (t > 0) * np.exp(0.5 * logvar) * z


# --- RePaint -----------------------------------------------------------------------------------

def test_jump_schedule_is_the_references():
  # get_schedule_jump(t_T=10, n_sample=1, jump_length=2, jump_n_sample=3) of andreas128/RePaint,
  # traced by hand: jump points 0, 2, 4, 6 (below 10 - 2), each gone up from twice.
  want = [9, 8, 7, 6, 7, 8, 7, 6, 7, 8, 7, 6, 5, 4, 5, 6, 5, 4, 5, 6, 5, 4, 3, 2, 3, 4, 3, 2, 3,
          4, 3, 2, 1, 0, 1, 2, 1, 0, 1, 2, 1, 0, -1]
  assert repaint.jump_schedule(10, 2, 3).tolist() == want
  assert repaint.jump_schedule(5, 10, 10).tolist() == [4, 3, 2, 1, 0, -1]  # no jump fits
  assert repaint.jump_schedule(6, 1, 1).tolist() == [5, 4, 3, 2, 1, 0, -1]
  levels = repaint.jump_schedule(250, 10, 10)  # the paper's: 24 jump points, 9 times 10 up
  assert np.all(np.abs(np.diff(levels)) == 1) and levels[0] == 249 and levels[-1] == -1
  assert np.sum(np.diff(levels) > 0) == 24 * 9 * 10
  with pytest.raises(ValueError, match=">= 1"):
    repaint.jump_schedule(10, 0, 2)


def repaint_np(x_known, mask, k, levels, clip=True, ref=REF, visited=None):
  """RePaint in float64 with the noises JAX draws: merge the known pixels from q(x_t | x_0)
  before every reverse step but the first, x_{t+1} = sqrt(1 - beta) x_t + sqrt(beta) z up
  (over the coefficients `ref`; a respaced schedule's model timesteps `visited`)."""
  step_keys = prng.fold_in_each(k, T + 1)
  x = normal(k, T)
  x_known = np.asarray(x_known, np.float64)
  for i, (a, b) in enumerate(zip(levels[:-1], levels[1:])):
    if b > a:
      beta = ref["betas"][b]
      x = math.sqrt(1 - beta) * x + math.sqrt(beta) * normal(step_keys, i, 2)
    else:
      if i > 0:
        known = reference.q_sample(ref, x_known, np.full(len(x), a), normal(step_keys, i, 1))
        x = mask * known + (1 - mask) * x
      x = p_sample_np(x, a, normal(step_keys, i, 0), clip, ref, visited)
  return mask * x_known + (1 - mask) * x


@pytest.mark.parametrize("jump_length, jump_n_sample, clip", [(3, 2, True), (1, 1, False),
                                                              (5, 3, True)])
def test_repaint_matches_numpy(sched, jump_length, jump_n_sample, clip):
  x0 = math_helpers.data(0, SHAPE)
  mask = np.zeros(SHAPE[:3] + (1,))
  mask[:, :2] = 1.0
  mask[1] = 1.0 - mask[1]  # each example its own mask
  got = jax.jit(lambda k: repaint.repaint(
      sched, jax_toy, k, jnp.asarray(x0), jnp.asarray(mask, jnp.float32),
      jump_length=jump_length, jump_n_sample=jump_n_sample, clip_denoised=clip, **TYPES))(keys())
  want = repaint_np(np.asarray(x0, np.float64), mask, keys(),
                    repaint.jump_schedule(T, jump_length, jump_n_sample), clip)
  math_helpers.close(got, want, rtol=1e-4)
  known = mask[..., 0] == 1  # the known pixels are the input's
  np.testing.assert_allclose(np.asarray(got)[known], x0[known], atol=1e-6)


def test_repaint_on_a_respaced_schedule_and_per_example(sched):
  x0 = math_helpers.data(1, SHAPE)
  mask = np.ones(SHAPE[:3] + (1,), np.float32)
  mask[:, :, 2:] = 0.0
  visited = samplers.visited_timesteps(T, 6)
  run = lambda k, x, m: repaint.repaint(sched, jax_toy, k, x, m, jump_length=2,
                                        jump_n_sample=2, timesteps=visited, **TYPES)
  got = np.asarray(jax.jit(run)(keys(), x0, mask))
  ref = reference.coefficients(reference.respaced_betas(BETAS, visited))
  x = repaint_np(x0, mask, keys(), repaint.jump_schedule(6, 2, 2), True, ref, visited)
  math_helpers.close(got, x, rtol=1e-4)
  # Each example depends on its own key only.
  one = np.asarray(jax.jit(run)(keys()[1:2], x0[1:2], mask[1:2]))
  np.testing.assert_allclose(one, got[1:2], atol=1e-5)


def test_repaint_refuses_a_mask_of_another_shape(sched):
  with pytest.raises(ValueError, match=r"mask of shape \(3, 4, 3, 1\)"):
    repaint.repaint(sched, jax_toy, keys(), jnp.zeros(SHAPE), jnp.ones((3, 4, 3, 1)),
                    jump_length=2, jump_n_sample=2, **TYPES)


# --- SDEdit and the mix ------------------------------------------------------------------------

def ddim_np(x, visited):
  """Deterministic DDIM in float64 from x at visited[-1] down to x_0."""
  for i in range(len(visited) - 1, -1, -1):
    t = visited[i]
    tb = np.full(x.shape[0], t)
    _, _, x0 = reference.p_mean_variance(REF, toy_eps(x, tb.astype(np.float64)), x, tb, "eps",
                                         "fixedlarge", True)
    eps = (x / math.sqrt(REF["abar"][t]) - x0) / math.sqrt(1 / REF["abar"][t] - 1)
    a_prev = REF["abar"][visited[i - 1]] if i > 0 else 1.0
    x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
  return x


@pytest.mark.parametrize("t, num_steps", [(12, 0), (12, 5), (19, 4), (3, 2)])
def test_sdedit_with_ddim_matches_numpy(sched, t, num_steps):
  x0 = math_helpers.data(2, SHAPE)
  got = jax.jit(lambda k: sdedit.sdedit(sched, jax_toy, k, x0, t=t, sampler="ddim",
                                        num_steps=num_steps, **TYPES))(keys())
  x_t = reference.q_sample(REF, np.asarray(x0, np.float64), np.full(3, t), normal(keys(), T + 1))
  visited = np.round(np.linspace(0, t, num_steps)).astype(int) if num_steps else np.arange(t + 1)
  math_helpers.close(got, ddim_np(x_t, visited), rtol=1e-4)


def test_sdedit_with_ancestral_is_the_chain_from_t(sched):
  x0 = math_helpers.data(3, SHAPE)
  got = jax.jit(lambda k: sdedit.sdedit(sched, jax_toy, k, x0, t=9, sampler="ancestral",
                                        **TYPES))(keys())
  x = reference.q_sample(REF, np.asarray(x0, np.float64), np.full(3, 9), normal(keys(), T + 1))
  for t in range(9, -1, -1):
    x = p_sample_np(x, t, normal(keys(), t))
  math_helpers.close(got, x, rtol=1e-4)


def test_the_mix_with_ancestral_is_the_originals_interpolation(sched):
  x1, x2 = math_helpers.data(4, SHAPE), math_helpers.data(5, SHAPE)
  lam = jnp.asarray([0.0, 0.3, 1.0])
  ours = jax.jit(lambda k: sdedit.mix_and_denoise(sched, jax_toy, k, x1, x2, lam, t=8,
                                                  sampler="ancestral", **TYPES))(keys())
  original = jax.jit(lambda k: samplers.interpolate(sched, jax_toy, x1, x2, lam, 8, k,
                                                    **TYPES))(keys())
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(original))


def test_slerp_matches_numpy():
  z1, z2 = math_helpers.normal(0, SHAPE), math_helpers.normal(1, SHAPE)
  lam = np.array([0.0, 0.25, 1.0])
  got = np.asarray(sdedit.slerp(jnp.asarray(z1), jnp.asarray(z2), jnp.asarray(lam)))
  for b in range(3):
    a, c = z1[b].ravel().astype(np.float64), z2[b].ravel().astype(np.float64)
    theta = math.acos(a @ c / np.linalg.norm(a) / np.linalg.norm(c))
    want = (math.sin((1 - lam[b]) * theta) * a + math.sin(lam[b] * theta) * c) / math.sin(theta)
    np.testing.assert_allclose(got[b].ravel(), want, rtol=1e-4, atol=1e-5)
  same = np.asarray(sdedit.slerp(jnp.asarray(z1), jnp.asarray(z1), 0.5))
  np.testing.assert_allclose(same, z1, rtol=1e-5)  # parallel: linear


def test_interpolation_through_latents_decodes_each_end(sched):
  x1, x2 = math_helpers.data(6, SHAPE), math_helpers.data(7, SHAPE)
  settings = dict(sampler="ddim", num_steps=6, **TYPES)
  ends = jax.jit(lambda k: inversion.interpolate_latents(
      sched, jax_toy, k, x1, x2, jnp.asarray([0.0, 1.0, 0.0]), **settings))(keys())
  visited = samplers.visited_timesteps(T, 6)
  for x, rows in ((x1, [0, 2]), (x2, [1])):
    z = inversion.ddim_reverse_sample_loop(sched, jax_toy, x, timesteps=visited, **TYPES)
    back = samplers.ddim_sample_loop(sched, jax_toy, None, x.shape, x_init=z,
                                     timesteps=visited, **TYPES)
    np.testing.assert_allclose(np.asarray(ends)[rows], np.asarray(back)[rows], atol=1e-5)
  with pytest.raises(ValueError, match="draws noise, so it cannot decode latents"):
    inversion.interpolate_latents(sched, jax_toy, keys(), x1, x2, 0.5, sampler="ancestral",
                                  **TYPES)


# --- What each entry gives them --------------------------------------------------------------

PACKAGE = ("ancestral", "ddim", "dpmsolver++", "dpmsolver", "heun", "euler", "karras_stochastic",
           "ddim_continuous")


def test_the_package_samplers_are_all_checked_here():
  assert set(PACKAGE) == set(samplers.names())


@pytest.mark.parametrize("name", PACKAGE)
def test_every_package_sampler_runs_progressive_and_from_given_x(sched, name):
  entry = samplers.get(name)
  assert entry.progressive is not None and entry.run_from is not None
  settings = dict(num_steps=7 if name in ("heun", "karras_stochastic") else 6)
  run = lambda fn, **kw: jax.jit(lambda k: fn(name, sched, jax_toy, k, SHAPE, **TYPES,
                                              **settings, **kw))(keys())
  plain = run(samplers.sample)
  x, preds = run(registry.progressive, every=2)
  np.testing.assert_array_equal(np.asarray(x), np.asarray(plain))
  assert preds.shape == (3, 3) + SHAPE[1:]
  if name in ("ancestral", "ddim", "heun", "euler", "ddim_continuous"):  # the last call's x_0
    np.testing.assert_allclose(np.asarray(preds[:, -1]), np.asarray(x), atol=1e-5)
  # From x_T at the top of its own steps: the plain run.
  x_T = common.initial_noise(keys(), SHAPE, sched)
  if name not in ("heun", "euler", "karras_stochastic"):  # these scale x_T by sigma_max
    from_x = jax.jit(lambda k: registry.sample_from(name, sched, jax_toy, k, x_T, start=None,
                                                    **TYPES, **settings))(keys())
    np.testing.assert_allclose(np.asarray(from_x), np.asarray(plain), atol=1e-5)
  # From a timestep: its steps spread over 0..start.
  mid = jax.jit(lambda k: registry.sample_from(name, sched, jax_toy, k, x_T * 0.5, start=10,
                                               **TYPES, **settings))(keys())
  assert mid.shape == SHAPE and np.all(np.isfinite(np.asarray(mid)))
  assert registry.is_deterministic(name, {}) == (name not in ("ancestral",
                                                              "karras_stochastic"))


def test_prediction_slots_count_back_from_the_last_call():
  np.testing.assert_array_equal(common.prediction_slots(7, 3), [-1, -1, -1, 0, -1, -1, 1])
  np.testing.assert_array_equal(common.prediction_slots(4, 1), [0, 1, 2, 3])
  with pytest.raises(ValueError, match="keep it in 1..4"):
    common.prediction_slots(4, 5)


def test_ancestral_progressive_is_the_originals(sched):
  x, preds = jax.jit(lambda k: registry.progressive("ancestral", sched, jax_toy, k, SHAPE,
                                                    every=5, **TYPES))(keys())
  x_orig, preds_orig = jax.jit(lambda k: samplers.p_sample_loop_progressive(
      sched, jax_toy, k, SHAPE, include_xstartpred_freq=5, **TYPES))(keys())
  np.testing.assert_array_equal(np.asarray(x), np.asarray(x_orig))
  np.testing.assert_array_equal(np.asarray(preds), np.asarray(preds_orig)[:, ::-1])


def test_starts_are_checked_with_what_to_set():
  for values, start, match in [
      ({"num_steps": 12}, 9, r"sample.num_steps=12 steps cannot fit in the 10 timesteps 0..9"),
      ({"respacing": "ddim5"}, 9, "does not keep 9"),
      ({}, 20, r"outside the schedule's timesteps 0..19"),
      ({}, 0, "needs at least 2 steps")]:
    with pytest.raises(ValueError, match=match):
      registry.check_start("ancestral", values, T, start, flag_prefix="--config.",
                           start_field="--config.eval.edit_t")
  registry.check_start("ddim", {"num_steps": 4}, T, 9)


def test_a_sampler_without_the_capabilities_is_refused_by_name(sched):
  entry = samplers.SamplerEntry(name="bare", run=samplers.get("ddim").run,
                                settings=samplers.get("ddim").settings)
  samplers.register(entry)
  try:
    for call, what in [
        (lambda: registry.progressive("bare", sched, jax_toy, keys(), SHAPE, every=1, **TYPES),
         "x_0 predictions along its run"),
        (lambda: sdedit.sdedit(sched, jax_toy, keys(), jnp.zeros(SHAPE), t=5, sampler="bare",
                               **TYPES), "a start from given images")]:
      with pytest.raises(ValueError, match=f"sampler 'bare' has no {what}.*: set sample.sampler "
                                           f"to one of 'ancestral', 'ddim'"):
        call()
    assert not registry.is_deterministic("bare", {})
  finally:
    samplers.unregister("bare")
