"""The forward/reverse process, the losses and the bound, against float64 NumPy (tests/reference.py).

Tolerances: JAX computes in float32 (relative rounding 6e-8 per operation). Most quantities are a
few operations on O(1) values, so 1e-5 relative to the largest magnitude involved is ~100x the
rounding; x_0 from eps at large t multiplies by 1/sqrt(alpha_bar) (up to ~160), which is why the
absolute tolerance scales with the largest term.
"""
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from diffusion_jax.core import diffusion
from diffusion_jax.core import likelihood
from diffusion_jax.core import schedules
from tests import math_helpers, reference
from tests.math_helpers import B, SHAPE, T, close, data, f32, model_output, normal, timesteps

MEAN_TYPES = diffusion.MEAN_TYPES
VAR_TYPES = diffusion.VAR_TYPES


@pytest.fixture(scope="module")
def sched():
  return math_helpers.linear_schedule()


@pytest.fixture(scope="module")
def ref():
  return math_helpers.linear_coefficients()


def test_q_functions(sched, ref):
  x0, t, noise = data(), timesteps(), normal(0)
  mean, var, logvar = diffusion.q_mean_variance(sched, f32(x0), jnp.asarray(t))
  ab = reference.bcast(ref["abar"], t, 4)
  close(mean, np.sqrt(ab) * x0)
  close(var, 1 - ab)
  close(logvar, np.log(1 - ab))
  assert var.shape == (B, 1, 1, 1)
  xt = diffusion.q_sample(sched, f32(x0), jnp.asarray(t), f32(noise))
  close(xt, reference.q_sample(ref, x0, t, noise))

  xt64 = reference.q_sample(ref, x0, t, noise)
  pm, pv, plv = diffusion.q_posterior_mean_variance(sched, f32(x0), f32(xt64), jnp.asarray(t))
  rm, rv, rlv = reference.q_posterior(ref, x0, xt64, t)
  close(pm, rm)
  close(pv, rv)
  close(plv, rlv)

  # x_0 = x_t / sqrt(abar) - ...: terms up to 1/sqrt(abar_T) ~ 157 times O(1) values.
  big = float(1 / np.sqrt(ref["abar"][-1]))
  close(diffusion.predict_xstart_from_eps(sched, f32(xt64), jnp.asarray(t), f32(noise)),
        reference.x0_from_eps(ref, xt64, t, noise), scale=big)
  # x_0 = (xprev - coef2 x_t) / coef1 with 1/coef1 up to ~8e3 at t = T-1: float32 rounding of
  # the input is amplified that much (the original computes this in float32 too).
  worst = float((1 / ref["coef1"]).max())
  close(diffusion.predict_xstart_from_xprev(sched, f32(xt64), jnp.asarray(t), f32(rm)),
        reference.x0_from_xprev(ref, xt64, t, rm), rtol=1e-6, scale=worst)
  # eps = (x_t / sqrt(abar) - x_0) / sqrt(1/abar - 1): at t = 0 the divisor is ~1e-2.
  close(diffusion.predict_eps_from_xstart(sched, f32(xt64), jnp.asarray(t), f32(x0)), noise,
        rtol=1e-6, scale=float(1 / ref["abar"][0] / np.sqrt(1 / ref["abar"][0] - 1)))


def test_posterior_round_trips(sched):
  """x_0 -> (eps, xprev) -> x_0 recovers x_0 (identities of the parameterizations)."""
  x0, t, noise = f32(data()), jnp.asarray(timesteps()), f32(normal(1))
  xt = diffusion.q_sample(sched, x0, t, noise)
  eps = diffusion.predict_eps_from_xstart(sched, xt, t, x0)
  close(eps, np.asarray(noise), rtol=2e-3)  # division by sqrt(1/abar - 1) ~ 1e-2 at t = 0
  xprev, _, _ = diffusion.q_posterior_mean_variance(sched, x0, xt, t)
  close(diffusion.predict_xstart_from_xprev(sched, xt, t, xprev), np.asarray(x0), rtol=1e-6,
        scale=float(np.asarray(1 / sched.posterior_mean_coef1).max()))


@pytest.mark.parametrize("mean_type, var_type, clip",
                         list(itertools.product(MEAN_TYPES, VAR_TYPES, [False, True])))
def test_p_mean_variance(sched, ref, mean_type, var_type, clip):
  x0, t, noise = data(1), timesteps(1), normal(2)
  xt = reference.q_sample(ref, x0, t, noise)
  out = model_output(xt, t, var_type)
  got = diffusion.p_mean_variance(sched, f32(out), f32(xt), jnp.asarray(t), mean_type=mean_type,
                                  var_type=var_type, clip_denoised=clip)
  mean, logvar, x0_pred = reference.p_mean_variance(ref, out, xt, t, mean_type, var_type, clip)
  for field in got:
    assert field.shape == SHAPE
  # xprev inverts coef1, which is ~1/160 at large t: x0 predictions carry ~1e2 x rounding.
  rtol = 1e-4 if mean_type == "xprev" and not clip else 1e-5
  close(got.pred_xstart, x0_pred, rtol=rtol)
  close(got.mean, mean, rtol=rtol)
  close(got.log_variance, logvar)
  # The variance itself is not clipped: fixedsmall's is 0 at t = 0, as in the original.
  want_variance = {"learned": np.exp(logvar), "learned_range": np.exp(logvar),
                   "fixedlarge": reference.bcast(ref["betas"], t, 4),
                   "fixedsmall": reference.bcast(ref["post_var"], t, 4)}[var_type]
  close(got.variance, np.broadcast_to(want_variance, SHAPE))
  if clip:
    assert float(jnp.abs(got.pred_xstart).max()) <= 1.0


def test_fixedlarge_and_fixedsmall_conventions(sched, ref):
  """fixedlarge's first log-variance is beta_tilde[1]; then log(beta). fixedsmall: log(beta_tilde)."""
  t = jnp.array([0, 1, 500, T - 1])
  x = jnp.zeros((4, 1, 1, 1))
  large = diffusion.p_mean_variance(sched, x, x, t, mean_type="eps", var_type="fixedlarge",
                                    clip_denoised=False)
  small = diffusion.p_mean_variance(sched, x, x, t, mean_type="eps", var_type="fixedsmall",
                                    clip_denoised=False)
  np.testing.assert_allclose(np.asarray(large.log_variance).ravel(),
                             np.log([ref["post_var"][1], ref["betas"][1], ref["betas"][500],
                                     ref["betas"][T - 1]]), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(small.log_variance).ravel(),
                             np.log(ref["post_var"][[1, 1, 500, T - 1]]), rtol=1e-6)


def test_normal_kl_and_decoder(ref):
  rng = np.random.default_rng(3)
  m1, m2 = rng.standard_normal((2, 50))
  lv1, lv2 = rng.uniform(-6, 1, size=(2, 50))
  close(likelihood.normal_kl(f32(m1), f32(lv1), f32(m2), f32(lv2)),
        reference.normal_kl(m1, lv1, m2, lv2))
  # The KL against itself is 0 and the closed form matches a numerical integral.
  assert float(jnp.abs(likelihood.normal_kl(f32(m1), f32(lv1), f32(m1), f32(lv1))).max()) < 1e-6
  grid = np.linspace(-12, 12, 200001)
  p = np.exp(-0.5 * (grid - 0.3) ** 2 / 0.5) / np.sqrt(2 * np.pi * 0.5)
  q = np.exp(-0.5 * (grid + 0.2) ** 2 / 1.7) / np.sqrt(2 * np.pi * 1.7)
  numeric = np.trapezoid(p * np.log(p / q), grid)
  assert float(likelihood.normal_kl(0.3, math.log(0.5), -0.2, math.log(1.7))) == pytest.approx(
      numeric, rel=1e-5)

  xs = np.linspace(-4, 4, 101)
  # The tanh approximation of the normal CDF is within 2e-4 of the exact one.
  np.testing.assert_allclose(np.asarray(likelihood.approx_standard_normal_cdf(f32(xs))),
                             special.ndtr(xs), atol=2e-4)

  x0 = data(4)
  means = x0 + 0.02 * normal(5)
  log_scales = rng.uniform(-6, -1, size=SHAPE)
  got = likelihood.discretized_gaussian_log_likelihood(f32(x0), means=f32(means),
                                                       log_scales=f32(log_scales))
  want = reference.discretized_ll(x0, means, log_scales)
  assert got.shape == SHAPE
  # A bin's probability is a difference of two float32 CDF values (absolute error ~6e-8), so for
  # bins of probability >= 1e-4 the log is good to ~6e-4; smaller ones hit float32's limits (the
  # original's too) and are checked by the floor below.
  resolved = want > math.log(1e-4)
  assert resolved.mean() > 0.8
  np.testing.assert_allclose(np.asarray(got)[resolved], want[resolved], atol=1e-3)
  # Edge bins reach to infinity: a mean far outside still gives probability ~1 at the edge.
  edge = likelihood.discretized_gaussian_log_likelihood(
      jnp.array([1.0, -1.0]), means=jnp.array([3.0, -3.0]), log_scales=jnp.array([-3.0, -3.0]))
  np.testing.assert_allclose(np.asarray(edge), [0.0, 0.0], atol=1e-6)
  # The floor at 1e-12 bounds the log-probability of a value far from the mean.
  far = likelihood.discretized_gaussian_log_likelihood(
      jnp.array([0.0]), means=jnp.array([0.9]), log_scales=jnp.array([-8.0]))
  assert float(far[0]) == pytest.approx(math.log(1e-12), rel=1e-5)


@pytest.mark.parametrize("mean_type, var_type",
                         list(itertools.product(MEAN_TYPES, VAR_TYPES)))
def test_vb_terms_and_training_losses(sched, ref, mean_type, var_type):
  x0, t, noise = data(6), timesteps(6), normal(7)
  model_fn = lambda x, t_: model_output(x, t_, var_type)
  xt = reference.q_sample(ref, x0, t, noise)
  terms, pred = diffusion.vb_terms_bpd(sched, f32(model_fn(xt, t)), f32(x0), f32(xt),
                                       jnp.asarray(t), mean_type=mean_type, var_type=var_type,
                                       clip_denoised=True)
  want_terms, want_pred = reference.vb_term(ref, model_fn(xt, t), x0, xt, t, mean_type,
                                            var_type, True)
  assert terms.shape == (B,)
  # learned_range's variance at t = 0 (example 0) is tiny (std ~0.01 against the stand-in's
  # x_0 error of ~0.1): most pixels' decoder bins lie in the tail that float32 cannot resolve
  # (test_normal_kl_and_decoder checks the decoder where it can, test_p_mean_variance that
  # log-variance), so that example is compared only for the other types.
  keep = slice(1, None) if var_type == "learned_range" else slice(None)
  close(terms[keep], want_terms[keep], rtol=2e-4)  # KLs of O(1e-3) from differences of O(1)
  close(pred, want_pred)

  learned = var_type in diffusion.LEARNED_VAR_TYPES
  for loss_type in diffusion.LOSS_TYPES:
    losses = lambda: diffusion.training_losses(
        sched, model_fn, f32(x0), jnp.asarray(t), f32(noise), mean_type=mean_type,
        var_type=var_type, loss_type=loss_type)
    if (loss_type == "mse") == learned and loss_type in ("mse", "hybrid"):
      with pytest.raises(ValueError, match=r"cannot train var_type=.* \(a learned variance\)"
                         if learned else r"^loss_type='hybrid' cannot train .*a fixed variance"):
        losses()
      continue
    got = losses()
    want = reference.training_loss(ref, model_fn(xt, t), x0, xt, t, noise, mean_type, var_type,
                                   loss_type)
    assert sorted(got) == sorted(want) == sorted(("loss",) + diffusion.LOSS_TERMS[loss_type])
    for name in want:
      assert got[name].shape == (B,)
      # The bound's terms: KLs of O(1e-3) from differences of O(1) terms; xprev's x_0 carries
      # ~1e2 x rounding (1 / coef1). rescaled_kl multiplies the term and its error by T.
      rtol = 2e-3 if mean_type == "xprev" else 2e-4
      close(got[name][keep], want[name][keep], rtol=rtol if name != "mse" else 1e-5,
            scale=max(1.0, float(np.abs(want[name][keep]).max())))


def test_original_256_setting_is_expressible():
  """eps prediction, mse loss, sampled with beta_tilde and the first file's log(max(var, 1e-20))."""
  betas = np.linspace(1e-4, 0.02, T)
  sched = schedules.Schedule.from_betas(betas, posterior_logvar="floor")
  ref = reference.coefficients(betas, "floor")
  t = jnp.array([0, 3, 999])
  x = jnp.full((3, 2, 2, 1), 0.5)
  out = diffusion.p_mean_variance(sched, x * 0.1, x, t, mean_type="eps", var_type="fixedsmall",
                                  clip_denoised=True)
  np.testing.assert_allclose(np.asarray(out.log_variance[:, 0, 0, 0]),
                             ref["post_logvar"][[0, 3, 999]], rtol=1e-6)
  assert float(out.log_variance[0, 0, 0, 0]) == pytest.approx(math.log(1e-20), rel=1e-6)


def test_bad_inputs_raise(sched):
  x = jnp.zeros((2, 4, 4, 3))
  t = jnp.zeros((2,), jnp.int32)
  with pytest.raises(ValueError, match="mean_type='noise' must be one of eps, xstart"):
    diffusion.p_mean_variance(sched, x, x, t, mean_type="noise", var_type="fixedlarge",
                              clip_denoised=True)
  with pytest.raises(ValueError, match="var_type='fixed' must be one of fixedlarge"):
    diffusion.p_mean_variance(sched, x, x, t, mean_type="eps", var_type="fixed",
                              clip_denoised=True)
  with pytest.raises(ValueError, match="loss_type='l1' must be one of mse, kl"):
    diffusion.training_losses(sched, lambda a, b: a, x, t, x, mean_type="eps",
                              var_type="fixedlarge", loss_type="l1")
  with pytest.raises(ValueError, match=r"must output \(2, 4, 4, 6\)"):
    diffusion.p_mean_variance(sched, x, x, t, mean_type="eps", var_type="learned",
                              clip_denoised=True)
  with pytest.raises(ValueError, match="must output the shape of x"):
    diffusion.p_mean_variance(sched, jnp.zeros((2, 4, 4, 6)), x, t, mean_type="eps",
                              var_type="fixedsmall", clip_denoised=True)
  with pytest.raises(ValueError, match=r"t must have shape \[B\] = \(2,\)"):
    diffusion.q_sample(sched, x, jnp.zeros((3,), jnp.int32), x)
  with pytest.raises(ValueError, match="shape mismatch"):
    diffusion.q_sample(sched, x, t, jnp.zeros((2, 4, 4, 1)))
  with pytest.raises(ValueError, match="one key per example"):
    diffusion.calc_bpd_loop(sched, lambda a, b: a, x, jax.random.split(jax.random.key(0), 3),
                            mean_type="eps", var_type="fixedlarge")


def test_jit_and_eager_agree(sched):
  x0, t, noise = f32(data(8)), jnp.asarray(timesteps(8)), f32(normal(9))
  fn = lambda s, a, b, c: diffusion.training_losses(
      s, lambda x, t_: model_output(x, t_, "learned"), a, b, c, mean_type="eps",
      var_type="learned", loss_type="kl")["loss"]
  np.testing.assert_allclose(np.asarray(jax.jit(fn)(sched, x0, t, noise)),
                             np.asarray(fn(sched, x0, t, noise)), rtol=1e-5, atol=1e-6)


def test_posterior_after_forward_matches_marginal(sched):
  """x_t ~ q(x_t|x_0), then x_{t-1} ~ q(x_{t-1}|x_t, x_0), is distributed as q(x_{t-1}|x_0)."""
  n = 200_000
  x0 = jnp.full((n, 1), 0.6)
  for t_int in (1, 40, 700):
    k1, k2 = jax.random.split(jax.random.key(t_int))
    t = jnp.full((n,), t_int, jnp.int32)
    xt = diffusion.q_sample(sched, x0, t, jax.random.normal(k1, x0.shape))
    mean, _, logvar = diffusion.q_posterior_mean_variance(sched, x0, xt, t)
    xprev = mean + jnp.exp(0.5 * logvar) * jax.random.normal(k2, x0.shape)
    want_mean, want_var, _ = diffusion.q_mean_variance(sched, x0[:1], t[:1] - 1)
    sample_mean, sample_var = float(xprev.mean()), float(xprev.var())
    want_mean, want_var = float(want_mean[0, 0]), float(want_var[0, 0])
    # 5 standard errors: the mean's is sqrt(var/n), the variance's sqrt(2/n) var.
    assert abs(sample_mean - want_mean) < 5 * math.sqrt(want_var / n)
    assert abs(sample_var - want_var) < 5 * math.sqrt(2 / n) * want_var


def test_calc_bpd_loop_matches_numpy():
  steps = 30
  betas = np.linspace(1e-3, 0.2, steps)
  sched = schedules.Schedule.from_betas(betas)
  ref = reference.coefficients(betas)
  x0 = data(10, (3, 2, 2, 3))
  keys = jax.random.split(jax.random.key(1), 3)
  model_fn = lambda x, t_: model_output(x, t_ * (T // steps), "fixedlarge")
  got = jax.jit(lambda s, x, k: diffusion.calc_bpd_loop(
      s, model_fn, x, k, mean_type="eps", var_type="fixedlarge"))(sched, f32(x0), keys)
  want_terms = np.zeros((3, steps))
  want_mse = np.zeros((3, steps))
  for t_int in range(steps):
    # The bound's noise for timestep t is drawn per example from fold_in(key, t).
    noise = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(k, t_int), (2, 2, 3)))
                      for k in keys]).astype(np.float64)
    t = np.full(3, t_int)
    xt = reference.q_sample(ref, x0, t, noise)
    terms, pred = reference.vb_term(ref, model_fn(xt, t), x0, xt, t, "eps", "fixedlarge", True)
    want_terms[:, t_int] = terms
    want_mse[:, t_int] = reference.flat_mean((pred - x0) ** 2)
  want_prior = reference.prior_bpd(ref, x0)
  assert got.terms_bpd.shape == (3, steps) and got.mse.shape == (3, steps)
  close(got.terms_bpd, want_terms, rtol=2e-4)
  close(got.mse, want_mse, rtol=1e-4)
  close(got.prior_bpd, want_prior, rtol=1e-4)
  close(got.total_bpd, want_terms.sum(1) + want_prior, rtol=2e-4)


def test_bound_for_gaussian_data_in_closed_form():
  """With the exact E[eps | x_t] of Gaussian data, the bound equals its float64 closed form and
  lies above the true NLL (the entropy) of the discretized data."""
  m, s, n = 0.1, 0.3, 512
  sched = schedules.make_schedule("linear", num_diffusion_timesteps=T)
  ref = reference.coefficients(np.linspace(1e-4, 0.02, T))
  rng = np.random.default_rng(11)
  x0 = np.clip(np.round((m + s * rng.standard_normal((n, 2, 2, 1))) * 127.5 + 127.5), 0, 255)
  x0 = x0 / 127.5 - 1.0
  abar = jnp.asarray(ref["abar"], jnp.float32)

  def exact_eps(x, t):
    ab = abar[t].reshape(-1, 1, 1, 1)
    return jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * m) / (ab * s**2 + 1 - ab)

  keys = jax.random.split(jax.random.key(2), n)
  got = jax.jit(lambda x, k: diffusion.calc_bpd_loop(
      sched, exact_eps, x, k, mean_type="eps", var_type="fixedlarge",
      clip_denoised=False))(f32(x0), keys)

  noise_all = jax.vmap(lambda k: jax.vmap(lambda t: jax.random.normal(
      jax.random.fold_in(k, t), (2, 2, 1)))(jnp.arange(T)))(keys)
  noise_all = np.asarray(noise_all, np.float64)  # [n, T, 2, 2, 1]
  total = reference.prior_bpd(ref, x0)
  for t_int in range(T):
    t = np.full(n, t_int)
    xt = reference.q_sample(ref, x0, t, noise_all[:, t_int])
    eps = reference.gaussian_data_eps(ref, m, s, xt, t)
    terms, _ = reference.vb_term(ref, eps, x0, xt, t, "eps", "fixedlarge", False)
    total = total + terms
  # Per-example totals of ~7 bits/dim summed over 1000 float32 terms: 1e-3 relative.
  close(got.total_bpd, total, rtol=1e-3)
  entropy = reference.discretized_gaussian_entropy_bits(m, s)
  bound = float(got.total_bpd.mean())
  stderr = float(got.total_bpd.std()) / math.sqrt(n)
  assert bound > entropy + 3 * stderr, (bound, entropy, stderr)
  assert bound < entropy + 1.0  # and it is a tight bound for the exact model


@pytest.mark.parametrize("var_type", diffusion.LEARNED_VAR_TYPES)
def test_hybrid_bound_trains_only_the_variance(sched, ref, var_type):
  """The hybrid loss's gradient with respect to the mean channels is the mse loss's alone; with
  respect to the variance channels it is the (T / 1000)-weighted bound term's."""
  x0, t, noise = data(12), timesteps(12), normal(13)
  xt = reference.q_sample(ref, x0, t, noise)
  output = f32(model_output(xt, t, var_type))

  def total(loss_type, out):
    terms = diffusion.training_losses(sched, lambda x, t_: out, f32(x0), jnp.asarray(t),
                                      f32(noise), mean_type="eps", var_type=var_type,
                                      loss_type=loss_type)
    return jnp.sum(terms["loss"])

  hybrid = np.asarray(jax.grad(functools.partial(total, "hybrid"))(output))
  # mse on the mean channels alone: its loss ignores the variance channels of a fixed variance.
  mse = np.asarray(jax.grad(lambda o: jnp.sum(diffusion.training_losses(
      sched, lambda x, t_: o, f32(x0), jnp.asarray(t), f32(noise), mean_type="eps",
      var_type="fixedlarge", loss_type="mse")["loss"]))(output[..., :3]))
  kl = np.asarray(jax.grad(functools.partial(total, "kl"))(output))
  assert np.abs(mse).max() > 0 and np.abs(kl[..., :3]).max() > 0  # both terms do pull the mean
  np.testing.assert_allclose(hybrid[..., :3], mse, rtol=1e-6, atol=1e-12)
  np.testing.assert_allclose(hybrid[..., 3:], kl[..., 3:] * T / 1000, rtol=1e-5,
                             atol=1e-6 * np.abs(kl[..., 3:]).max())
  assert np.abs(hybrid[..., 3:]).max() > 0


def test_hybrid_without_rescaling_adds_the_bound_term_unscaled():
  """rescale_learned_sigmas=False adds the bound's term as it is; the default scales it by
  T / 1000 (here T = 250: a quarter); the mse term is the same either way."""
  small = schedules.make_schedule("linear", num_diffusion_timesteps=250)
  x0, noise = f32(data(14)), f32(normal(15))
  t = jnp.asarray(np.random.default_rng(16).integers(0, 250, size=B))
  output = model_output(x0, t * 4, "learned_range")

  def terms(rescale):
    return diffusion.training_losses(small, lambda x, t_: output, x0, t, noise,
                                     mean_type="eps", var_type="learned_range",
                                     loss_type="hybrid", rescale_learned_sigmas=rescale)

  scaled, unscaled = terms(True), terms(False)
  assert np.all(np.asarray(unscaled["vb"]) > 0)
  np.testing.assert_allclose(scaled["vb"], unscaled["vb"] * 0.25, rtol=1e-6)
  np.testing.assert_array_equal(scaled["mse"], unscaled["mse"])
  np.testing.assert_allclose(unscaled["loss"], unscaled["mse"] + unscaled["vb"], rtol=1e-6)


def test_model_sees_original_and_rescaled_timesteps(ref):
  """A respaced schedule calls the model with the original timesteps; rescale_timesteps gives
  them times 1000 / T as floats."""
  betas = np.linspace(1e-4, 0.02, 400)
  seen = []

  def model_fn(x, t_model):
    seen.append(t_model)
    return jnp.zeros_like(x)

  x = jnp.zeros((3, 2, 2, 1))
  t = jnp.array([0, 1, 2])
  for rescale, want in ((False, np.array([0, 150, 399])), (True, np.array([0, 375.0, 997.5]))):
    sched = schedules.Schedule.from_betas(betas, rescale_timesteps=rescale)
    respaced = schedules.respace(sched, np.array([0, 150, 399]))
    seen.clear()
    diffusion.training_losses(respaced, model_fn, x, t, x, mean_type="eps", var_type="fixedlarge",
                              loss_type="mse")
    np.testing.assert_allclose(np.asarray(seen[0]), want)
    assert seen[0].dtype == (jnp.float32 if rescale else jnp.int32)
  # Unrespaced and unrescaled: the model gets t itself.
  seen.clear()
  diffusion.training_losses(schedules.Schedule.from_betas(betas), model_fn, x, t, x,
                            mean_type="eps", var_type="fixedlarge", loss_type="mse")
  assert seen[0] is t


@pytest.mark.parametrize("p", [50.0, 90.0, 99.5, 100.0])
def test_dynamic_thresholding_matches_numpy(p):
  rng = np.random.default_rng(3)
  # One example within [-1, 1] (s = 1: a plain clip), the others beyond it.
  x0 = rng.normal(size=(4, 5, 5, 3)) * np.array([0.3, 1.5, 3.0, 8.0]).reshape(4, 1, 1, 1)
  got = diffusion.clip_xstart(jnp.asarray(x0, jnp.float32), clip_denoised=True,
                              dynamic_threshold=p)
  want = reference.dynamic_threshold(x0, p)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(got)).max() <= 1.0 + 1e-6
  np.testing.assert_allclose(np.asarray(got)[0], np.clip(x0[0], -1, 1), atol=1e-6)
  plain = diffusion.clip_xstart(jnp.asarray(x0), clip_denoised=True)
  np.testing.assert_array_equal(np.asarray(plain), np.clip(np.asarray(jnp.asarray(x0)), -1, 1))


def test_dynamic_thresholding_refuses_what_it_cannot_do():
  x0 = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match=r"dynamic_threshold=101 must be a percentile in \(0, 100\]"):
    diffusion.clip_xstart(x0, clip_denoised=True, dynamic_threshold=101)
  with pytest.raises(ValueError, match="it needs clip_denoised=True"):
    diffusion.clip_xstart(x0, clip_denoised=False, dynamic_threshold=99.5)
  np.testing.assert_array_equal(diffusion.clip_xstart(x0 + 5, clip_denoised=False), x0 + 5)


def test_one_minus_alpha_bar_keeps_its_digits_near_t_0():
  """1 - alpha_bar_t from float64, not from float32 alpha_bar_t: on the cosine schedule at t = 0
  the latter is off by ~5e-4 of the value."""
  betas = schedules.get_beta_schedule("cosine", beta_start=0, beta_end=0,
                                      num_diffusion_timesteps=1000)
  sched = schedules.Schedule.from_betas(betas)
  want = 1.0 - np.cumprod(1.0 - np.asarray(betas, np.float64))
  t = jnp.array([0, 1, 10, 999])
  _, variance, log_variance = diffusion.q_mean_variance(sched, jnp.zeros((4, 1)), t)
  np.testing.assert_allclose(np.asarray(variance)[:, 0], want[[0, 1, 10, 999]], rtol=1e-6)
  np.testing.assert_allclose(np.exp(np.asarray(log_variance, np.float64))[:, 0],
                             want[[0, 1, 10, 999]], rtol=1e-5)
  float32_way = 1.0 - np.float32(np.cumprod(1.0 - np.asarray(betas, np.float64))[0])
  assert abs(float32_way / want[0] - 1) > 1e-4  # what the schedule's field avoids
