"""Beta schedules and the precomputed coefficients against float64 NumPy."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from diffusion_jax.core import diffusion
from diffusion_jax.core import schedules
from tests import reference

T = 1000


@pytest.mark.parametrize("kind", ["quad", "linear", "warmup10", "warmup50", "const", "jsd",
                                  "cosine"])
def test_beta_schedules_match_formulas(kind):
  betas = schedules.get_beta_schedule(kind, beta_start=1e-4, beta_end=0.02,
                                      num_diffusion_timesteps=T)
  assert betas.dtype == np.float64 and betas.shape == (T,)
  # Both sides are float64; only summation order differs.
  np.testing.assert_allclose(betas, reference.beta_schedule(kind, 1e-4, 0.02, T), rtol=1e-12)


def test_cosine_betas_are_capped():
  betas = schedules.get_beta_schedule("cosine", beta_start=0, beta_end=0,
                                      num_diffusion_timesteps=T)
  assert betas.max() == 0.999 and betas.min() > 0
  assert np.all(np.diff(betas) >= 0)


@pytest.mark.parametrize("kind", ["linear", "cosine", "quad"])
@pytest.mark.parametrize("rule", ["repeat_first", "floor"])
def test_schedule_coefficients(kind, rule):
  betas = schedules.get_beta_schedule(kind, beta_start=1e-4, beta_end=0.02,
                                      num_diffusion_timesteps=T)
  sched = schedules.Schedule.from_betas(betas, posterior_logvar=rule)
  ref = reference.coefficients(betas, rule)
  # Stored as float32: relative rounding 6e-8; 1e-6 leaves room for the float64 formulas'
  # different evaluation order (cumprod over 1000 terms).
  rtol = 1e-6
  for ours, theirs in [
      (sched.betas, ref["betas"]),
      (sched.alphas_cumprod, ref["abar"]),
      (sched.alphas_cumprod_prev, ref["abar_prev"]),
      (sched.sqrt_alphas_cumprod, np.sqrt(ref["abar"])),
      (sched.sqrt_one_minus_alphas_cumprod, np.sqrt(1 - ref["abar"])),
      (sched.log_one_minus_alphas_cumprod, np.log(1 - ref["abar"])),
      (sched.sqrt_recip_alphas_cumprod, 1 / np.sqrt(ref["abar"])),
      (sched.sqrt_recipm1_alphas_cumprod, np.sqrt((1 - ref["abar"]) / ref["abar"])),
      (sched.posterior_variance, ref["post_var"]),
      (sched.posterior_log_variance_clipped, ref["post_logvar"]),
      (sched.posterior_mean_coef1, ref["coef1"]),
      (sched.posterior_mean_coef2, ref["coef2"]),
      (sched.fixedlarge_log_variance, ref["fixedlarge_logvar"]),
  ]:
    assert ours.dtype == jnp.float32 and ours.shape == (T,)
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=rtol, atol=1e-30)
  if rule == "floor":
    assert float(sched.posterior_log_variance_clipped[0]) == pytest.approx(math.log(1e-20))
  else:
    assert sched.posterior_log_variance_clipped[0] == sched.posterior_log_variance_clipped[1]


def test_paper_values_for_the_cifar10_schedule():
  sched = schedules.make_schedule("linear", beta_start=1e-4, beta_end=0.02,
                                  num_diffusion_timesteps=1000)
  # Paper: q(x_T | x_0) = N(0.00635 x_0, 0.99995 I).
  assert float(sched.sqrt_alphas_cumprod[-1]) == pytest.approx(0.00635, abs=5e-6)
  assert float(1 - sched.alphas_cumprod[-1]) == pytest.approx(0.99995, abs=1e-5)
  # L_T is about 1e-5 bits/dim for data spread over [-1, 1].
  x0 = jax.random.uniform(jax.random.key(0), (16, 32, 32, 3), minval=-1, maxval=1)
  prior = diffusion.prior_bpd(sched, x0)
  assert prior.shape == (16,)
  assert 3e-6 < float(prior.mean()) < 3e-5
  np.testing.assert_allclose(np.asarray(prior), reference.prior_bpd(
      reference.coefficients(np.linspace(1e-4, 0.02, 1000)), np.asarray(x0, np.float64)),
      rtol=1e-3)  # the KL is a difference of O(1) float32 terms giving 1e-5: ~1e-7 absolute


def test_schedule_is_a_pytree_for_jit_vmap_and_shard_map():
  sched = schedules.make_schedule(num_diffusion_timesteps=10)
  leaves = jax.tree_util.tree_leaves(sched)
  # Every array is a leaf; the timestep map (None unless respaced) and the static settings are not.
  arrays = [f.name for f in dataclasses_fields(sched)
            if isinstance(getattr(sched, f.name), jax.Array)]
  assert len(leaves) == len(arrays) == len(dataclasses_fields(sched)) - 4
  respaced = schedules.respace(sched, np.array([0, 4, 9]))
  assert len(jax.tree_util.tree_leaves(respaced)) == len(arrays) + 1
  total = jax.jit(lambda s: s.betas.sum() + s.num_timesteps)(sched)
  assert float(total) == pytest.approx(float(np.sum(np.asarray(sched.betas))) + 10, rel=1e-6)
  # vmap over a stack of schedules.
  other = schedules.make_schedule("const", beta_end=0.05, num_diffusion_timesteps=10)
  stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), sched, other)
  ends = jax.vmap(lambda s: s.betas[-1])(stacked)
  np.testing.assert_allclose(np.asarray(ends), [0.02, 0.05], rtol=1e-6)
  # As a replicated argument of shard_map over all devices.
  mesh = Mesh(np.array(jax.devices()), ("data",))
  x = jnp.ones((len(jax.devices()) * 2, 3))
  t = jnp.zeros((x.shape[0],), jnp.int32) + 9
  f = jax.shard_map(lambda s, x_, t_: diffusion.q_mean_variance(s, x_, t_)[0], mesh=mesh,
                    in_specs=(P(), P("data"), P("data")), out_specs=P("data"))
  np.testing.assert_allclose(np.asarray(f(sched, x, t)),
                             np.full(x.shape, float(sched.sqrt_alphas_cumprod[9])), rtol=1e-6)


def dataclasses_fields(obj):
  import dataclasses
  return dataclasses.fields(obj)


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="cubic", beta_start=1e-4, beta_end=0.02, num_diffusion_timesteps=10),
     "Unknown beta schedule 'cubic'; choose one of quad, linear"),
    (dict(kind="linear", beta_start=0.0, beta_end=0.02, num_diffusion_timesteps=10),
     r"every beta must lie in \(0, 1\]"),
    (dict(kind="const", beta_start=1e-4, beta_end=1.5, num_diffusion_timesteps=10),
     r"every beta must lie in \(0, 1\]"),
    (dict(kind="linear", beta_start=1e-4, beta_end=0.02, num_diffusion_timesteps=1),
     "at least 2"),
    (dict(kind="linear", beta_start=1e-4, beta_end=0.02, num_diffusion_timesteps=10.0),
     "must be an int"),
])
def test_get_beta_schedule_errors(kwargs, match):
  kind = kwargs.pop("kind")
  with pytest.raises(ValueError, match=match):
    schedules.get_beta_schedule(kind, **kwargs)


def test_from_betas_errors():
  with pytest.raises(ValueError, match=r"1-D array \[T\]"):
    schedules.Schedule.from_betas(np.full((2, 5), 0.01))
  with pytest.raises(ValueError, match=r"every beta must lie in \(0, 1\]"):
    schedules.Schedule.from_betas(np.array([0.01, 0.02, np.nan]))
  with pytest.raises(ValueError, match="choose one of repeat_first, floor"):
    schedules.Schedule.from_betas(np.full(5, 0.01), posterior_logvar="v3")


# Kept timesteps as Improved DDPM's `space_timesteps` returns them (run on that code for these
# specs): uneven sections, a section of 0, half-way roundings (to even), and the ddim stride.
SPACED = {
    (11, "3,4"): [0, 2, 5, 6, 7, 9, 10],
    (100, "10"): [0, 11, 22, 33, 44, 55, 66, 77, 88, 99],
    (20, "5,0,3"): [0, 2, 3, 4, 6, 14, 16, 19],
    (7, "2,2,2"): [0, 2, 3, 4, 5, 6],
    (200, "7,1"): [0, 16, 33, 50, 66, 82, 99, 100],
    (1000, "1"): [0],
}


@pytest.mark.parametrize("num_timesteps, spec", sorted(SPACED))
def test_space_timesteps_as_the_reference(num_timesteps, spec):
  np.testing.assert_array_equal(schedules.space_timesteps(num_timesteps, spec),
                                SPACED[num_timesteps, spec])


def test_space_timesteps_long_specs():
  assert schedules.space_timesteps(1000, "ddim50").tolist() == list(range(0, 1000, 20))
  assert schedules.space_timesteps(4000, "ddim100").tolist() == list(range(0, 4000, 40))
  # One section: the evenly spaced count is round(i (T - 1) / (K - 1)), as the sampler's spacing.
  for T, count in ((1000, 50), (4000, 250), (200, 25), (1000, 1000)):
    want = [round(i * (T - 1) / (count - 1)) for i in range(count)]
    assert schedules.space_timesteps(T, str(count)).tolist() == want
  sections = schedules.space_timesteps(1000, "10,20,30")
  assert len(sections) == 60
  assert [int(np.sum((sections >= lo) & (sections < lo + 334 - (lo > 0))))
          for lo in (0, 334, 667)] == [10, 20, 30]


@pytest.mark.parametrize("spec, message", [
    ("", "non-empty string"), ("fifty", "does not parse"), ("10,x", "does not parse"),
    ("ddim", "does not parse"), ("1001", "more than T=1000"), ("ddim2000", "asks for 2000"),
    ("ddim600", "no integer stride"), ("0", "at least one step"), ("10,-1", "count >= 0"),
    ("400,400,200", "section 0 has 334 steps"),
])
def test_space_timesteps_refuses(spec, message):
  with pytest.raises(ValueError, match=message):
    schedules.space_timesteps(1000, spec)


@pytest.mark.parametrize("kind, rule", [("linear", "repeat_first"), ("cosine", "floor")])
def test_respace_against_float64(kind, rule):
  """The respaced schedule's coefficients are those of betas 1 - abar(kept_i) / abar(kept_i-1),
  which give the original's alpha_bar at every kept step."""
  T = 1000
  betas = reference.beta_schedule(kind, 1e-4, 0.02, T)
  sched = schedules.Schedule.from_betas(betas, posterior_logvar=rule)
  kept = schedules.space_timesteps(T, "10,20,30")
  respaced = schedules.respace(sched, kept)
  want = reference.coefficients(reference.respaced_betas(betas, kept), rule)
  assert respaced.num_timesteps == 60 and respaced.base_num_timesteps == T
  assert respaced.posterior_logvar == rule
  np.testing.assert_array_equal(np.asarray(respaced.timestep_map), kept)
  np.testing.assert_allclose(np.asarray(respaced.alphas_cumprod), reference.coefficients(
      betas)["abar"][kept], rtol=2e-6)
  # float32 storage of float64 values computed from the float32 betas (relative ~1e-7).
  for ours, theirs in (("betas", "betas"), ("posterior_variance", "post_var"),
                       ("posterior_log_variance_clipped", "post_logvar"),
                       ("posterior_mean_coef1", "coef1"), ("posterior_mean_coef2", "coef2"),
                       ("fixedlarge_log_variance", "fixedlarge_logvar")):
    np.testing.assert_allclose(np.asarray(getattr(respaced, ours), np.float64), want[theirs],
                               rtol=2e-5, atol=1e-30, err_msg=ours)
  np.testing.assert_allclose(np.asarray(respaced.log_betas), np.log(want["betas"]), rtol=1e-6)
  # Respacing a respaced schedule maps to the first one's original timesteps.
  twice = schedules.respace(respaced, np.array([0, 30, 59]))
  np.testing.assert_array_equal(np.asarray(twice.timestep_map), kept[[0, 30, 59]])
  np.testing.assert_allclose(np.asarray(twice.alphas_cumprod),
                             reference.coefficients(betas)["abar"][kept[[0, 30, 59]]], rtol=2e-6)


def test_respace_refuses():
  sched = schedules.make_schedule(num_diffusion_timesteps=10)
  for bad in ([3, 2], [0, 10], [-1, 2], [], [0.5, 2]):
    with pytest.raises(ValueError, match="timesteps must be"):
      schedules.respace(sched, np.asarray(bad))
  # One kept step makes no schedule (its posterior needs a second step), as with betas.
  with pytest.raises(ValueError, match="at least 2 timesteps, got 1"):
    schedules.respace(sched, np.array([3]))
  with pytest.raises(ValueError, match="concrete schedule"):
    jax.jit(lambda s: schedules.respace(s, np.array([0, 5])).betas)(sched)
