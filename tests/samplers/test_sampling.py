"""Samplers against NumPy step-by-step references, across devices, and on Gaussian data."""
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffusion_jax.core import diffusion
from diffusion_jax.core import schedules
from diffusion_jax import samplers
from tests import reference

STEPS = 40
BETAS = np.linspace(1e-3, 0.3, STEPS)
SHAPE = (8, 3, 3, 2)


@pytest.fixture(scope="module")
def sched():
  return schedules.Schedule.from_betas(BETAS)


@pytest.fixture(scope="module")
def ref():
  return reference.coefficients(BETAS)


def toy_model(var_type="fixedlarge"):
  """A smooth stand-in for a network, for JAX and NumPy inputs alike."""
  def model_fn(x, t):
    xp = jnp if isinstance(x, jax.Array) else np
    tt = xp.reshape(t / STEPS, (-1,) + (1,) * (x.ndim - 1))
    mean_part = 0.5 * x + 0.2 * tt * xp.cos(2 * x)
    if var_type == "learned":
      return xp.concatenate([mean_part, -3.0 - tt + 0.1 * x], axis=-1)
    if var_type == "learned_range":  # v of about -1.2..1.2: beyond the range at both ends
      return xp.concatenate([mean_part, 1.2 * xp.tanh(x) * (1 - tt) + 0.5 * tt], axis=-1)
    return mean_part
  return model_fn


def keys_for(n, seed=0):
  return jax.random.split(jax.random.key(seed), n)


def noise_np(keys, data, shape):
  """The noise the samplers draw for each example: normal(fold_in(key, data))."""
  return np.stack([np.asarray(jax.random.normal(jax.random.fold_in(k, data), shape))
                   for k in keys]).astype(np.float64)


def ancestral_np(ref, model_fn, x, timesteps, keys, mean_type, var_type, clip=True,
                 on_step=None, threshold=0.0):
  for t_int in timesteps:
    t = np.full(x.shape[0], t_int)
    mean, logvar, x0_pred = reference.p_mean_variance(ref, model_fn(x, t), x, t, mean_type,
                                                      var_type, clip, threshold)
    if on_step is not None:
      on_step(t_int, x0_pred)
    z = noise_np(keys, t_int, x.shape[1:])
    x = mean + (t_int > 0) * np.exp(0.5 * logvar) * z
  return x


@pytest.mark.parametrize("mean_type, var_type", [("eps", "fixedlarge"), ("xstart", "fixedsmall"),
                                                 ("xprev", "learned"), ("eps", "learned")])
def test_p_sample_loop_matches_numpy(sched, ref, mean_type, var_type):
  model_fn = toy_model(var_type)
  keys = keys_for(SHAPE[0])
  got = jax.jit(lambda s, k: samplers.p_sample_loop(
      s, model_fn, k, SHAPE, mean_type=mean_type, var_type=var_type))(sched, keys)
  x_init = noise_np(keys, STEPS, SHAPE[1:])
  want = ancestral_np(ref, model_fn, x_init, range(STEPS - 1, -1, -1), keys, mean_type, var_type)
  # 40 steps of float32 arithmetic on O(1) values; clipping bounds the x0 predictions.
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-4)


def test_p_sample_adds_no_noise_at_t0(sched):
  x = jnp.ones((2, 2, 2, 1)) * 0.3
  noise = jnp.ones_like(x) * 5.0
  model_fn = toy_model()
  t = jnp.array([0, 1])
  sample, _ = samplers.p_sample(sched, model_fn, x, t, noise, mean_type="eps",
                                var_type="fixedlarge")
  out = diffusion.p_mean_variance(sched, model_fn(x, t), x, t, mean_type="eps",
                                  var_type="fixedlarge", clip_denoised=True)
  np.testing.assert_allclose(np.asarray(sample[0]), np.asarray(out.mean[0]), rtol=1e-6)
  assert float(jnp.abs(sample[1] - out.mean[1]).min()) > 0.1


def test_samples_do_not_depend_on_the_batch(sched):
  """Each example's sample depends only on its own key."""
  model_fn = toy_model()
  keys = keys_for(SHAPE[0])
  run = jax.jit(lambda k: samplers.p_sample_loop(sched, model_fn, k, (k.shape[0],) + SHAPE[1:],
                                                 mean_type="eps", var_type="fixedlarge"))
  full = run(keys)
  alone = jnp.concatenate([run(keys[i:i + 1]) for i in (2, 5)])
  np.testing.assert_allclose(np.asarray(full[jnp.array([2, 5])]), np.asarray(alone), atol=1e-6)


def test_one_and_eight_devices_agree(sched):
  devices = jax.devices()
  assert len(devices) == 8
  model_fn = toy_model("learned")
  n = 16
  keys = keys_for(n, seed=3)
  shape = (n,) + SHAPE[1:]
  x_data = jax.random.uniform(jax.random.key(9), shape, minval=-1, maxval=1)

  def everything(k, x):
    local = (k.shape[0],) + shape[1:]
    kwargs = dict(mean_type="eps", var_type="learned")
    _, progressive = samplers.p_sample_loop_progressive(sched, model_fn, k, local,
                                                        include_xstartpred_freq=9, **kwargs)
    _, trajectory = samplers.p_sample_loop_trajectory(sched, model_fn, k, local,
                                                      repeat_noise_steps=3,
                                                      shared_key=jax.random.key(1), **kwargs)
    return (samplers.p_sample_loop(sched, model_fn, k, local, **kwargs),
            # Ancestral sampling over 10 of the 40 steps, on the respaced schedule.
            samplers.sample("ancestral", sched, model_fn, k, local, num_steps=10, **kwargs),
            samplers.ddim_sample_loop(sched, model_fn, k, local, num_steps=10, eta=0.5,
                                      **kwargs),
            diffusion.calc_bpd_loop(sched, model_fn, x, k, **kwargs).total_bpd,
            progressive,
            jnp.moveaxis(trajectory, 0, 1),  # batch first, to split over devices
            samplers.interpolate(sched, model_fn, x, -0.5 * x, 0.3, 7, k, **kwargs))

  results = []
  for mesh_devices in (devices[:1], devices):
    mesh = Mesh(np.array(mesh_devices), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    fn = jax.jit(jax.shard_map(everything, mesh=mesh, in_specs=(P("data"), P("data")),
                               out_specs=P("data")))
    out = fn(jax.device_put(keys, sharding), jax.device_put(x_data, sharding))
    if len(mesh_devices) == 8:
      assert len(out[0].sharding.device_set) == 8
    results.append([np.asarray(o) for o in out])
  for one, eight in zip(*results):
    np.testing.assert_allclose(one, eight, rtol=1e-5, atol=1e-6)


def test_progressive_records_x0_predictions(sched, ref):
  freq = 7
  model_fn = toy_model()
  keys = keys_for(SHAPE[0], seed=4)
  x0, preds = jax.jit(lambda k: samplers.p_sample_loop_progressive(
      sched, model_fn, k, SHAPE, mean_type="eps", var_type="fixedlarge",
      include_xstartpred_freq=freq))(keys)
  num_recorded = STEPS // freq
  assert preds.shape == (SHAPE[0], num_recorded) + SHAPE[1:]
  recorded = {}
  want = ancestral_np(ref, model_fn, noise_np(keys, STEPS, SHAPE[1:]),
                      range(STEPS - 1, -1, -1), keys, "eps", "fixedlarge",
                      on_step=lambda t, p: recorded.__setitem__(t, p))
  np.testing.assert_allclose(np.asarray(x0), want, atol=2e-4)
  for i in range(num_recorded):
    np.testing.assert_allclose(np.asarray(preds[:, i]), recorded[i * freq], atol=2e-4)
  # The prediction at t = 0 is the sample itself (no noise is added there).
  np.testing.assert_allclose(np.asarray(preds[:, 0]), np.asarray(x0), atol=1e-6)


def test_trajectory_shares_noise_for_the_first_steps(sched):
  model_fn = toy_model()
  keys = keys_for(SHAPE[0], seed=5)
  k_shared = 6
  times, images = jax.jit(lambda k: samplers.p_sample_loop_trajectory(
      sched, model_fn, k, SHAPE, mean_type="eps", var_type="fixedlarge",
      repeat_noise_steps=k_shared, shared_key=jax.random.key(42)))(keys)
  assert images.shape == (STEPS + 1,) + SHAPE
  np.testing.assert_array_equal(np.asarray(times), np.arange(STEPS - 1, -2, -1))
  spread = np.asarray(jnp.std(images, axis=1).max(axis=(1, 2, 3)))
  assert np.all(spread[:k_shared + 1] == 0)  # x_T and the first k steps: one trajectory
  assert np.all(spread[k_shared + 1:] > 1e-3)  # then it branches

  _, independent = samplers.p_sample_loop_trajectory(sched, model_fn, keys, SHAPE,
                                                     mean_type="eps", var_type="fixedlarge")
  final = samplers.p_sample_loop(sched, model_fn, keys, SHAPE, mean_type="eps",
                                 var_type="fixedlarge")
  np.testing.assert_allclose(np.asarray(independent[-1]), np.asarray(final), atol=1e-6)
  with pytest.raises(ValueError, match="needs shared_key"):
    samplers.p_sample_loop_trajectory(sched, model_fn, keys, SHAPE, mean_type="eps",
                                      var_type="fixedlarge", repeat_noise_steps=2)


def test_interpolate_matches_numpy(sched, ref):
  model_fn = toy_model()
  n = 4
  shape = (n,) + SHAPE[1:]
  keys = keys_for(n, seed=6)
  rng = np.random.default_rng(0)
  x1, x2 = rng.uniform(-1, 1, size=(2,) + shape)
  lam = np.array([0.0, 0.25, 0.5, 1.0])
  t_mix = 12
  got = samplers.interpolate(sched, model_fn, jnp.asarray(x1, jnp.float32),
                             jnp.asarray(x2, jnp.float32), jnp.asarray(lam), t_mix, keys,
                             mean_type="eps", var_type="fixedlarge")
  t = np.full(n, t_mix)
  xt1 = reference.q_sample(ref, x1, t, noise_np(keys, STEPS + 1, shape[1:]))
  xt2 = reference.q_sample(ref, x2, t, noise_np(keys, STEPS + 2, shape[1:]))
  lam_b = lam.reshape(-1, 1, 1, 1)
  want = ancestral_np(ref, model_fn, (1 - lam_b) * xt1 + lam_b * xt2, range(t_mix, -1, -1),
                      keys, "eps", "fixedlarge")
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-4)
  with pytest.raises(ValueError, match=r"t must be in \[0, 40\)"):
    samplers.interpolate(sched, model_fn, jnp.asarray(x1), jnp.asarray(x2), 0.5, STEPS, keys,
                         mean_type="eps", var_type="fixedlarge")


def ddim_np(ref, model_fn, keys, shape, visited, eta, mean_type, var_type, threshold=0.0):
  x = noise_np(keys, STEPS, shape[1:])
  for i, t_int in enumerate(visited):
    s_int = visited[i + 1] if i + 1 < len(visited) else -1
    t = np.full(shape[0], t_int)
    out = model_fn(x, t)
    if var_type in diffusion.LEARNED_VAR_TYPES:
      out = out[..., :shape[-1]]
    _, _, x0 = reference.p_mean_variance(ref, out, x, t, mean_type, "fixedsmall", True,
                                         threshold)
    a_t = ref["abar"][t_int]
    a_s = ref["abar"][s_int] if s_int >= 0 else 1.0
    eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
    sigma = eta * math.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))
    x = (math.sqrt(a_s) * x0 + math.sqrt(max(1 - a_s - sigma**2, 0.0)) * eps
         + sigma * noise_np(keys, t_int, shape[1:]))
  return x


@pytest.mark.parametrize("eta, mean_type, var_type", [(0.0, "eps", "fixedlarge"),
                                                      (1.0, "xstart", "learned")])
def test_ddim_matches_numpy(sched, ref, eta, mean_type, var_type):
  model_fn = toy_model(var_type)
  keys = keys_for(SHAPE[0], seed=7)
  num_steps = 9
  visited = samplers.ddim_timesteps(STEPS, num_steps)
  assert visited[0] == 0 and visited[-1] == STEPS - 1 and len(set(visited)) == num_steps
  got = samplers.ddim_sample_loop(sched, model_fn, keys, SHAPE, num_steps=num_steps, eta=eta,
                                  mean_type=mean_type, var_type=var_type)
  want = ddim_np(ref, model_fn, keys, SHAPE, list(visited[::-1]), eta, mean_type, var_type)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-4)


def _wide_model(x, t):
  """A network whose x_0 predictions reach well beyond [-1, 1] (eps = -2 x)."""
  del t
  return -2.0 * x


@pytest.mark.parametrize("sampler, threshold", [("ddim", 90.0), ("ancestral", 99.5),
                                                ("ddim", 100.0)])
def test_dynamic_thresholding_matches_numpy(sched, ref, sampler, threshold):
  keys = keys_for(SHAPE[0], seed=8)
  got = samplers.sample(sampler, sched, _wide_model, keys, SHAPE, mean_type="eps",
                        var_type="fixedlarge", dynamic_threshold=threshold,
                        num_steps=0 if sampler == "ancestral" else 9)
  x_init = noise_np(keys, STEPS, SHAPE[1:])
  if sampler == "ddim":
    visited = list(samplers.visited_timesteps(STEPS, 9)[::-1])
    want = ddim_np(ref, _wide_model, keys, SHAPE, visited, 0.0, "eps", "fixedlarge", threshold)
    plain = ddim_np(ref, _wide_model, keys, SHAPE, visited, 0.0, "eps", "fixedlarge")
  else:
    want = ancestral_np(ref, _wide_model, x_init, range(STEPS - 1, -1, -1), keys, "eps",
                        "fixedlarge", threshold=threshold)
    plain = ancestral_np(ref, _wide_model, x_init, range(STEPS - 1, -1, -1), keys, "eps",
                         "fixedlarge")
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-4)
  # Thresholding is not the plain clip here: these predictions go beyond [-1, 1].
  assert np.abs(want - plain).max() > 1e-2


def test_ddim_with_eta_one_and_every_step_is_ancestral_sampling(sched):
  """Song et al.: eta = 1 over all T steps is DDPM with the posterior variance (fixedsmall)."""
  model_fn = toy_model()
  keys = keys_for(SHAPE[0], seed=8)
  ddim = samplers.ddim_sample_loop(sched, model_fn, keys, SHAPE, num_steps=STEPS, eta=1.0,
                                   mean_type="eps", var_type="fixedsmall")
  ddpm = samplers.p_sample_loop(sched, model_fn, keys, SHAPE, mean_type="eps",
                                var_type="fixedsmall")
  np.testing.assert_allclose(np.asarray(ddim), np.asarray(ddpm), atol=2e-4)


def linear_gaussian_moments(steps):
  """Mean and variance of a chain x <- a x + c + sigma z from x ~ N(0, 1), in float64."""
  mean, var = 0.0, 1.0
  for a, c, sigma in steps:
    mean, var = a * mean + c, a * a * var + sigma * sigma
  return mean, var


@pytest.mark.parametrize("sampler", ["ancestral_fixedlarge", "ancestral_fixedsmall",
                                     "ddim_eta0"])
def test_samplers_reproduce_gaussian_data(sampler):
  """With E[eps | x_t] of x_0 ~ N(m, s^2), the samplers reproduce the data's mean and variance.

  The sampled moments are checked against the float64 moments of the same linear-Gaussian chain
  (within 5 standard errors), and those against (m, s^2) (the sampler's own approximation error,
  which is small for T = 1000).
  """
  m, s, T = 0.2, 0.4, 1000
  betas = np.linspace(1e-4, 0.02, T)
  sched = schedules.Schedule.from_betas(betas)
  ref = reference.coefficients(betas)
  abar = jnp.asarray(ref["abar"], jnp.float32)

  def exact_eps(x, t):
    ab = abar[t].reshape(-1, 1, 1, 1)
    return jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * m) / (ab * s**2 + 1 - ab)

  n = 8192
  shape = (n, 2, 2, 1)
  keys = keys_for(n, seed=10)
  ab = ref["abar"]
  chain = []
  if sampler.startswith("ancestral"):
    var_type = sampler.split("_")[1]
    x = jax.jit(lambda k: samplers.p_sample_loop(sched, exact_eps, k, shape, mean_type="eps",
                                                 var_type=var_type, clip_denoised=False))(keys)
    logvar = ref["fixedlarge_logvar"] if var_type == "fixedlarge" else ref["post_logvar"]
    for t in range(T - 1, -1, -1):
      # x0_pred = (x - sqrt(1-ab) eps_hat) / sqrt(ab), eps_hat = g (x - sqrt(ab) m): linear in x.
      g = math.sqrt(1 - ab[t]) / (ab[t] * s**2 + 1 - ab[t])
      a0 = (1 - math.sqrt(1 - ab[t]) * g) / math.sqrt(ab[t])
      c0 = math.sqrt(1 - ab[t]) * g * m
      chain.append((ref["coef1"][t] * a0 + ref["coef2"][t], ref["coef1"][t] * c0,
                    math.exp(0.5 * logvar[t]) if t > 0 else 0.0))
  else:
    num_steps = 250  # deterministic DDIM: variance ratio 0.87 at 50 steps, 0.97 at 250, 0.99 at T
    x = jax.jit(lambda k: samplers.ddim_sample_loop(
        sched, exact_eps, k, shape, num_steps=num_steps, eta=0.0, mean_type="eps",
        var_type="fixedlarge", clip_denoised=False))(keys)
    visited = list(samplers.ddim_timesteps(T, num_steps)[::-1])
    for i, t in enumerate(visited):
      a_s = ab[visited[i + 1]] if i + 1 < len(visited) else 1.0
      g = math.sqrt(1 - ab[t]) / (ab[t] * s**2 + 1 - ab[t])
      a0 = (1 - math.sqrt(1 - ab[t]) * g) / math.sqrt(ab[t])
      c0 = math.sqrt(1 - ab[t]) * g * m
      # eps recomputed from x0_pred: (x - sqrt(ab) x0_pred) / sqrt(1 - ab)
      ae = (1 - math.sqrt(ab[t]) * a0) / math.sqrt(1 - ab[t])
      ce = -math.sqrt(ab[t]) * c0 / math.sqrt(1 - ab[t])
      chain.append((math.sqrt(a_s) * a0 + math.sqrt(1 - a_s) * ae,
                    math.sqrt(a_s) * c0 + math.sqrt(1 - a_s) * ce, 0.0))
  chain_mean, chain_var = linear_gaussian_moments(chain)
  samples = np.asarray(x, np.float64).ravel()  # 4 i.i.d. dimensions per example
  count = samples.size
  assert abs(samples.mean() - chain_mean) < 5 * math.sqrt(chain_var / count)
  assert abs(samples.var() - chain_var) < 5 * math.sqrt(2 / count) * chain_var
  # The chain itself reproduces the data distribution closely.
  assert abs(chain_mean - m) < 0.01
  assert abs(chain_var / s**2 - 1) < 0.05


def test_sampler_errors(sched):
  model_fn = toy_model()
  keys = keys_for(4)
  with pytest.raises(ValueError, match="need one key per example: 4 keys for shape"):
    samplers.p_sample_loop(sched, model_fn, keys, SHAPE, mean_type="eps", var_type="fixedlarge")
  with pytest.raises(ValueError, match="include_xstartpred_freq must be in"):
    samplers.p_sample_loop_progressive(sched, model_fn, keys, (4, 2, 2, 1), mean_type="eps",
                                       var_type="fixedlarge", include_xstartpred_freq=0)
  with pytest.raises(ValueError, match=r"num_steps must be in \[1, T=40\]"):
    samplers.ddim_sample_loop(sched, model_fn, keys, (4, 2, 2, 1), num_steps=41,
                              mean_type="eps", var_type="fixedlarge")
  with pytest.raises(ValueError, match="mean_type='velocity' must be one of"):
    samplers.ddim_sample_loop(sched, model_fn, keys, (4, 2, 2, 1), num_steps=4,
                              mean_type="velocity", var_type="fixedlarge")
  with pytest.raises(ValueError, match=r"keys must be a key array \[B\]"):
    samplers.p_sample_loop(sched, model_fn, jnp.zeros((4,), jnp.uint32), (4, 2, 2, 1),
                           mean_type="eps", var_type="fixedlarge")


# --- Samplers by name --------------------------------------------------------------------------

@pytest.mark.parametrize("name, num_steps, eta, clip, direct", [
    ("ancestral", 0, 0.0, True, lambda s, m, k, kw: samplers.p_sample_loop(s, m, k, SHAPE, **kw)),
    ("ancestral", STEPS, 0.0, False,
     lambda s, m, k, kw: samplers.p_sample_loop(s, m, k, SHAPE, **kw)),
    ("ddim", 0, 0.0, True, lambda s, m, k, kw: samplers.ddim_sample_loop(
        s, m, k, SHAPE, num_steps=STEPS, eta=0.0, **kw)),
    ("ddim", 7, 0.5, False, lambda s, m, k, kw: samplers.ddim_sample_loop(
        s, m, k, SHAPE, num_steps=7, eta=0.5, **kw)),
], ids=["ancestral", "ancestral_T_unclipped", "ddim_all", "ddim_7_eta"])
def test_sample_dispatches_to_the_direct_functions_bit_for_bit(sched, name, num_steps, eta, clip,
                                                               direct):
  model_fn = toy_model("learned")
  keys = keys_for(SHAPE[0], seed=9)
  kw = dict(mean_type="eps", var_type="learned", clip_denoised=clip)
  got = samplers.sample(name, sched, model_fn, keys, SHAPE, num_steps=num_steps, eta=eta, **kw)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(direct(sched, model_fn, keys, kw)))


def test_every_registered_sampler_runs_on_one_contract():
  """The run function of each entry takes the samples' arguments, then its steps and exactly its
  own settings, keyword-only."""
  assert {"ancestral", "ddim", "dpmsolver++", "heun"} <= set(samplers.names())
  for name in samplers.names():
    entry = samplers.get(name)
    params = inspect.signature(entry.run).parameters
    steps = "timesteps" if entry.visits_timesteps else "num_steps"
    assert list(params)[:4] == ["sched", "model_fn", "keys", "shape"], name
    keywords = {p for p in params if params[p].kind == inspect.Parameter.KEYWORD_ONLY}
    assert keywords == ({steps, "clip_denoised", "dynamic_threshold", "mean_type", "var_type"}
                        | {s.name for s in entry.settings}), name


@pytest.mark.parametrize("sampler, num_steps, eta, respacing", [
    ("ancestral", 0, 0.0, ""), ("ancestral", STEPS, 0.0, ""), ("ancestral", 5, 0.0, ""),
    ("ancestral", 2, 0.0, ""), ("ancestral", 0, 0.0, "ddim10"), ("ancestral", 0, 0.0, "3,4"),
    ("ddim", 0, 0.0, ""), ("ddim", 1, 0.0, ""), ("ddim", STEPS, 1.0, ""), ("ddim", 5, 0.3, ""),
    ("ddim", 0, 0.0, "1"), ("ddim", 0, 0.5, "ddim8"),
])
def test_check_accepts(sampler, num_steps, eta, respacing):
  samplers.check(sampler, dict(num_steps=num_steps, eta=eta, respacing=respacing), STEPS)


@pytest.mark.parametrize("sampler, num_steps, eta, match", [
    ("plms", 0, 0.0, r"unknown sampler 'plms': set sample.sampler to one of 'ancestral', 'ddim'"),
    ("ancestral", 1, 0.0, r"sampler 'ancestral' needs at least 2 steps, got 1: set "
                          r"sample.num_steps or sample.respacing to keep more, or another "
                          r"sample.sampler"),
    ("ancestral", -1, 0.0, r"sample.num_steps=-1 must be in 0..40 \(0 = all T\): set "
                           r"sample.num_steps to one of 0..40"),
    ("ancestral", 0, 0.5, r"sample.eta=0.5 is a setting of sampler 'ddim' \(DDIM's noise scale"
                          r".*\), which 'ancestral' does not use: set sample.eta=0.0, or "
                          r"sample.sampler='ddim'"),
    ("ddim", STEPS + 1, 0.0, r"sample.num_steps=41 must be in 0..40 .*set sample.num_steps to "
                             r"one of 0..40"),
    ("ddim", -1, 0.0, r"sample.num_steps=-1 must be in 0..40"),
    ("ddim", 4, -0.5, r"sample.eta=-0.5 must be >= 0 \(DDIM's noise scale.*set sample.eta to "
                      r"0 or more"),
    ("ddim", 4, float("nan"), r"sample.eta=nan must be a finite number"),
    ("ddim", 4.0, 0.0, r"sample.num_steps=4.0 must be an integer"),
    ("ddim", True, 0.0, r"sample.num_steps=True must be an integer"),
    ("ddim", 4, "0", r"sample.eta='0' must be a finite number"),
    ("dpmsolver++", 0, 0.5, r"sample.eta=0.5 is a setting of sampler 'ddim'.*which 'dpmsolver\+\+'"
                            r" does not use: set sample.eta=0.0"),
])
def test_check_says_what_to_set(sampler, num_steps, eta, match):
  with pytest.raises(ValueError, match=match):
    samplers.check(sampler, dict(num_steps=num_steps, eta=eta), STEPS)


@pytest.mark.parametrize("settings, match", [
    (dict(solver_order=3), r"sample.solver_order=3 is a setting of sampler 'dpmsolver\+\+' or "
                           r"'dpmsolver' \(DPM-Solver's order\), which 'ddim' does not use: set "
                           r"sample.solver_order=2, or sample.sampler='dpmsolver\+\+'"),
    (dict(solver_grid="logSNR"), r"sample.solver_grid='logSNR' is a setting of sampler"),
    (dict(clip_denoised="yes"), r"sample.clip_denoised='yes' must be True or False"),
])
def test_check_refuses_other_samplers_settings_and_bad_types(settings, match):
  with pytest.raises(ValueError, match=match):
    samplers.check("ddim", settings, STEPS)


@pytest.mark.parametrize("num_steps, respacing, match", [
    (5, "ddim10", r"sample.respacing='ddim10' and sample.num_steps=5 both choose the timesteps: "
                  r"set sample.num_steps=0 to use the respacing, or sample.respacing=''"),
    (0, "41", r"keeps 41 steps, more than T=40: set sample.respacing to a spec such as"),
    (0, "ddim 5x", r"does not parse.*set sample.respacing to a spec"),
    (0, "ddim30", r"no integer stride keeps exactly 30"),
    (0, "1", r"sampler 'ancestral' needs at least 2 steps, got 1"),
    (0, 50, r"sample.respacing=50 must be a string"),
])
def test_check_refuses_respacing(num_steps, respacing, match):
  with pytest.raises(ValueError, match=match):
    samplers.check("ancestral", dict(num_steps=num_steps, respacing=respacing), STEPS)


def test_check_names_flags_with_a_prefix():
  with pytest.raises(ValueError, match=r"set --config.sample.num_steps or "
                                       r"--config.sample.respacing to keep more, or another "
                                       r"--config.sample.sampler"):
    samplers.check("ancestral", dict(num_steps=1), STEPS, flag_prefix="--config.")


def test_sample_checks_before_sampling(sched):
  keys = keys_for(4)
  with pytest.raises(ValueError, match="needs at least 2 steps"):
    samplers.sample("ancestral", sched, toy_model(), keys, (4, 2, 2, 1), num_steps=1,
                    mean_type="eps", var_type="fixedlarge")
  with pytest.raises(ValueError, match="more than T=40"):
    samplers.sample("ddim", sched, toy_model(), keys, (4, 2, 2, 1), respacing="50",
                    mean_type="eps", var_type="fixedlarge")
  with pytest.raises(ValueError, match="unknown sampler"):
    samplers.sample("DDIM", sched, toy_model(), keys, (4, 2, 2, 1), mean_type="eps",
                    var_type="fixedlarge")
  with pytest.raises(TypeError, match=r"unknown sampler settings \['order'\]"):
    samplers.sample("dpmsolver++", sched, toy_model(), keys, (4, 2, 2, 1), num_steps=4,
                    order=3, mean_type="eps", var_type="fixedlarge")


def overshooting_model(x, t):
  """An x_0 prediction mostly outside [-1, 1] (its fixed point is 3): clipping changes it."""
  del t
  return 1.5 + 0.5 * x


def test_progressive_honours_clip_denoised(sched, ref):
  freq = 10
  keys = keys_for(4, seed=10)
  shape = (4,) + SHAPE[1:]

  def run(**kw):
    return jax.jit(lambda k: samplers.p_sample_loop_progressive(
        sched, overshooting_model, k, shape, mean_type="xstart", var_type="fixedsmall",
        include_xstartpred_freq=freq, **kw))(keys)

  default_x0, default_preds = run()
  clipped_x0, clipped_preds = run(clip_denoised=True)
  x0, preds = run(clip_denoised=False)
  np.testing.assert_array_equal(np.asarray(clipped_x0), np.asarray(default_x0))
  np.testing.assert_array_equal(np.asarray(clipped_preds), np.asarray(default_preds))
  assert np.abs(np.asarray(clipped_preds)).max() <= 1.0
  assert np.abs(np.asarray(preds)).max() > 1.5
  recorded = {}
  for clip, got_x0, got_preds in ((True, clipped_x0, clipped_preds), (False, x0, preds)):
    want = ancestral_np(ref, overshooting_model, noise_np(keys, STEPS, shape[1:]),
                        range(STEPS - 1, -1, -1), keys, "xstart", "fixedsmall", clip=clip,
                        on_step=lambda t, p: recorded.__setitem__(t, p))
    np.testing.assert_allclose(np.asarray(got_x0), want, atol=2e-4)
    for i in range(STEPS // freq):
      np.testing.assert_allclose(np.asarray(got_preds[:, i]), recorded[i * freq], atol=2e-4)


def test_interpolate_honours_clip_denoised(sched, ref):
  n = 4
  shape = (n,) + SHAPE[1:]
  keys = keys_for(n, seed=11)
  x1, x2 = np.random.default_rng(1).uniform(-1, 1, size=(2,) + shape)
  lam = np.array([0.0, 0.3, 0.6, 1.0])
  t_mix = 9

  def run(**kw):
    return samplers.interpolate(sched, overshooting_model, jnp.asarray(x1, jnp.float32),
                                jnp.asarray(x2, jnp.float32), jnp.asarray(lam), t_mix, keys,
                                mean_type="xstart", var_type="fixedsmall", **kw)

  default = run()
  np.testing.assert_array_equal(np.asarray(run(clip_denoised=True)), np.asarray(default))
  unclipped = run(clip_denoised=False)
  assert np.abs(np.asarray(unclipped) - np.asarray(default)).max() > 0.1
  t = np.full(n, t_mix)
  xt1 = reference.q_sample(ref, x1, t, noise_np(keys, STEPS + 1, shape[1:]))
  xt2 = reference.q_sample(ref, x2, t, noise_np(keys, STEPS + 2, shape[1:]))
  lam_b = lam.reshape(-1, 1, 1, 1)
  for clip, got in ((True, default), (False, unclipped)):
    want = ancestral_np(ref, overshooting_model, (1 - lam_b) * xt1 + lam_b * xt2,
                        range(t_mix, -1, -1), keys, "xstart", "fixedsmall", clip=clip)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-4)


# --- Respaced sampling -------------------------------------------------------------------------

@pytest.mark.parametrize("spec, mean_type, var_type", [
    ("ddim8", "eps", "fixedlarge"), ("10", "xstart", "fixedsmall"), ("3,4", "eps", "learned"),
    ("ddim10", "eps", "learned_range"), ("5,0,5", "xprev", "learned_range"),
])
def test_respaced_ancestral_matches_numpy(sched, spec, mean_type, var_type):
  """Ancestral sampling over the kept steps is the chain of the respaced float64 coefficients;
  the model sees the original timesteps; x_T and each step's noise are keyed by the original
  T and t."""
  kept = schedules.space_timesteps(STEPS, spec)
  ref = reference.coefficients(reference.respaced_betas(BETAS, kept))
  model_fn = toy_model(var_type)
  keys = keys_for(SHAPE[0], seed=12)
  got = samplers.sample("ancestral", sched, model_fn, keys, SHAPE, respacing=spec,
                        mean_type=mean_type, var_type=var_type)
  x = noise_np(keys, STEPS, SHAPE[1:])
  for i in range(len(kept) - 1, -1, -1):
    t = np.full(SHAPE[0], i)
    mean, logvar, _ = reference.p_mean_variance(ref, model_fn(x, np.full(SHAPE[0], kept[i])), x,
                                                t, mean_type, var_type, True)
    x = mean + (i > 0) * np.exp(0.5 * logvar) * noise_np(keys, kept[i], SHAPE[1:])
  np.testing.assert_allclose(np.asarray(got), x, atol=2e-4)


def test_integer_steps_respace_ancestral_and_keep_ddim_spacing(sched):
  """An integer step count is the DDIM spacing for both samplers: ancestral sampling runs on the
  schedule respaced to `ddim_timesteps`, DDIM visits them (as before respacing existed)."""
  model_fn = toy_model("learned_range")
  keys = keys_for(SHAPE[0], seed=13)
  kw = dict(mean_type="eps", var_type="learned_range", clip_denoised=True)
  kept = samplers.ddim_timesteps(STEPS, 9)
  got = samplers.sample("ancestral", sched, model_fn, keys, SHAPE, num_steps=9, **kw)
  want = samplers.p_sample_loop(schedules.respace(sched, kept), model_fn, keys, SHAPE, **kw)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # DDIM with a spec visits its kept steps on the full schedule.
  got = samplers.sample("ddim", sched, model_fn, keys, SHAPE, respacing="3,4", eta=0.5, **kw)
  want = samplers.ddim_sample_loop(sched, model_fn, keys, SHAPE, eta=0.5,
                                   timesteps=schedules.space_timesteps(STEPS, "3,4"), **kw)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_respaced_ancestral_reproduces_gaussian_data():
  """With the exact model of x_0 ~ N(m, s^2) (E[eps | x_t], and for learned_range the v giving
  the true Var[x_s | x_t] = beta_tilde + coef1^2 Var[x_0 | x_t]), ancestral sampling over 25 of
  T = 1000 steps reproduces the data's mean and variance; the fixed variances do not at 25 steps
  (too narrow with beta_tilde, too wide with beta), which is why Improved DDPM learns it.

  Samples are checked against the float64 moments of their own linear-Gaussian chain (5
  standard errors), and those against (m, s^2).
  """
  m, s, T, spec = 0.2, 0.4, 1000, "25"
  betas = np.linspace(1e-4, 0.02, T)
  sched = schedules.Schedule.from_betas(betas)
  kept = schedules.space_timesteps(T, spec)
  ref = reference.coefficients(reference.respaced_betas(betas, kept))
  ab = ref["abar"]
  x0_var = s**2 * (1 - ab) / (ab * s**2 + 1 - ab)  # Var[x_0 | x_t] at each kept step
  true_logvar = np.log(ref["post_var"] + ref["coef1"] ** 2 * x0_var)
  low, high = ref["post_logvar"], np.log(ref["betas"])
  v_at_original = np.zeros(T)
  v_at_original[kept] = 2 * (true_logvar - low) / (high - low) - 1
  abar_full = jnp.asarray(reference.coefficients(betas)["abar"], jnp.float32)
  n = 8192
  shape = (n, 2, 2, 1)
  keys = keys_for(n, seed=14)
  errors = {}
  for var_type in ("fixedsmall", "fixedlarge", "learned_range"):

    def exact_model(x, t_model, var_type=var_type):  # called with the original timesteps
      a = abar_full[t_model].reshape(-1, 1, 1, 1)
      eps = jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * m) / (a * s**2 + 1 - a)
      if var_type != "learned_range":
        return eps
      v = jnp.asarray(v_at_original, jnp.float32)[t_model].reshape(-1, 1, 1, 1)
      return jnp.concatenate([eps, jnp.broadcast_to(v, x.shape)], -1)

    x = jax.jit(lambda k: samplers.sample(
        "ancestral", sched, exact_model, k, shape, respacing=spec, mean_type="eps",
        var_type=var_type, clip_denoised=False))(keys)
    logvar = {"fixedsmall": ref["post_logvar"], "fixedlarge": ref["fixedlarge_logvar"],
              "learned_range": true_logvar}[var_type]
    chain = []
    for i in range(len(kept) - 1, -1, -1):
      g = math.sqrt(1 - ab[i]) / (ab[i] * s**2 + 1 - ab[i])
      a0 = (1 - math.sqrt(1 - ab[i]) * g) / math.sqrt(ab[i])
      c0 = math.sqrt(1 - ab[i]) * g * m
      chain.append((ref["coef1"][i] * a0 + ref["coef2"][i], ref["coef1"][i] * c0,
                    math.exp(0.5 * logvar[i]) if i > 0 else 0.0))
    chain_mean, chain_var = linear_gaussian_moments(chain)
    samples = np.asarray(x, np.float64).ravel()
    count = samples.size
    assert abs(samples.mean() - chain_mean) < 5 * math.sqrt(chain_var / count), var_type
    assert abs(samples.var() - chain_var) < 5 * math.sqrt(2 / count) * chain_var, var_type
    assert abs(chain_mean - m) < 0.01, var_type
    errors[var_type] = chain_var / s**2 - 1
  # The exact variance makes the 25-step chain exact up to its last, noiseless step.
  assert abs(errors["learned_range"]) < 0.02, errors
  assert errors["fixedsmall"] < -0.1 and errors["fixedlarge"] > 0.1, errors
