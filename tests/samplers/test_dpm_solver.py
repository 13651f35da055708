"""DPM-Solver(++) against float64 NumPy written here from the papers' formulas, against the exact
probability-flow solution for Gaussian data, and against DDIM.

Gaussian data x_0 ~ N(mu, s^2) per dimension has an exact denoiser:
E[x_0 | x_t] = mu + alpha s^2 / (alpha^2 s^2 + sigma^2) (x_t - alpha mu), and its probability-flow
ODE is the linear map x_t - alpha_t mu = sqrt(v_t / v_T) (x_T - alpha_T mu), v = alpha^2 s^2 +
sigma^2, which the solvers should approach at their order as the steps double.
"""
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.core import prng
from diffusion_jax.core import schedules
from diffusion_jax import parallel
from diffusion_jax import samplers
from diffusion_jax.samplers import dpm_solver
from tests.math_helpers import GAUSSIAN_SHAPE, MU, S, gaussian_model

SHAPE = GAUSSIAN_SHAPE


def numpy_solver(vp, x_T, times, order, algorithm, lower_order_final=True):
  """Multistep DPM-Solver(++) in float64, written from the papers' update rules (the
  reference's 'dpmsolver' form of the second-order step), with the exact Gaussian model."""
  def model(x, t):
    alpha = np.exp(vp.log_alpha_at(t))
    sigma = np.sqrt(1 - alpha**2)
    x0 = MU + alpha * S**2 / (alpha**2 * S**2 + sigma**2) * (x - alpha * MU)
    return x0 if algorithm == "dpmsolver++" else (x - alpha * x0) / sigma

  lam = lambda t: vp.lambda_at(t)
  alpha = lambda t: np.exp(vp.log_alpha_at(t))
  sigma = lambda t: np.sqrt(1 - alpha(t) ** 2)
  steps = len(times) - 1
  x, ms, ts = x_T, [model(x_T, times[0])], [times[0]]
  for step in range(1, steps + 1):
    s, t = ts[-1], times[step]
    k = step if step < order else (
        min(order, steps + 1 - step) if lower_order_final and steps < 10 else order)
    h = lam(t) - lam(s)
    if algorithm == "dpmsolver++":
      base = sigma(t) / sigma(s) * x
      phi1 = np.expm1(-h)
      phi2 = phi1 / h + 1
      phi3 = phi2 / h - 0.5
      w0, w1, w2 = -alpha(t) * phi1, alpha(t) * phi2, -alpha(t) * phi3
      half = -0.5 * alpha(t) * phi1
    else:
      base = alpha(t) / alpha(s) * x
      phi1 = np.expm1(h)
      phi2 = phi1 / h - 1
      phi3 = phi2 / h - 0.5
      w0, w1, w2 = -sigma(t) * phi1, -sigma(t) * phi2, -sigma(t) * phi3
      half = -0.5 * sigma(t) * phi1
    if k == 1:
      x = base + w0 * ms[-1]
    elif k == 2:
      r0 = (lam(ts[-1]) - lam(ts[-2])) / h
      x = base + w0 * ms[-1] + half * (ms[-1] - ms[-2]) / r0
    else:
      r0 = (lam(ts[-1]) - lam(ts[-2])) / h
      r1 = (lam(ts[-2]) - lam(ts[-3])) / h
      d1_0 = (ms[-1] - ms[-2]) / r0
      d1_1 = (ms[-2] - ms[-3]) / r1
      d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
      d2 = (d1_0 - d1_1) / (r0 + r1)
      x = base + w0 * ms[-1] + w1 * d1 + w2 * d2
    ts.append(t)
    if step < steps:
      ms.append(model(x, t))
  return x


def exact_flow(vp, x_T, t_end):
  def var(t):
    alpha = np.exp(vp.log_alpha_at(t))
    return alpha**2 * S**2 + 1 - alpha**2
  alpha_T, alpha_end = np.exp(vp.log_alpha_at(1.0)), np.exp(vp.log_alpha_at(t_end))
  return alpha_end * MU + np.sqrt(var(t_end) / var(1.0)) * (x_T - alpha_T * MU)


def _x_T(sched, keys):
  return np.asarray(prng.normal_each(prng.fold_in_each(keys, sched.base_num_timesteps),
                                     SHAPE[1:]), np.float64)


@pytest.fixture(scope="module")
def keys():
  return prng.example_keys(jax.random.key(0), np.arange(SHAPE[0]))


@pytest.mark.parametrize("algorithm", dpm_solver.ALGORITHMS)
@pytest.mark.parametrize("order,steps,grid", [(1, 7, "time_uniform"), (2, 6, "logSNR"),
                                              (3, 7, "time_uniform"), (3, 12, "logSNR"),
                                              (2, 15, "time_uniform")])
def test_each_update_matches_the_papers_formulas(keys, algorithm, order, steps, grid):
  """The scan with its precomputed coefficients equals the step-by-step float64 loop, warm-up
  and lower-order final steps included (steps < 10 and >= 10)."""
  sched = schedules.make_schedule("linear", num_diffusion_timesteps=1000)
  vp = dpm_solver.discrete_vp(sched)
  mean_type = "xstart" if algorithm == "dpmsolver++" else "eps"
  with jax.enable_x64(True):
    got = np.asarray(dpm_solver.solve(
        sched, gaussian_model(vp, vp.num_steps, mean_type=mean_type), keys, SHAPE,
        num_steps=steps, order=order, algorithm=algorithm, grid=grid, mean_type=mean_type,
        dtype=jnp.float64))
  want = numpy_solver(vp, _x_T(sched, keys), dpm_solver.time_grid(vp, steps, grid), order,
                      algorithm)
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("algorithm", dpm_solver.ALGORITHMS)
def test_a_v_model_solves_as_the_eps_and_x0_models_do(keys, algorithm):
  """The same exact model predicting v (x_0 = alpha x - sigma v, eps = sigma x + alpha v) gives
  the samples of its eps and x_0 forms (float64)."""
  sched = schedules.make_schedule("linear", num_diffusion_timesteps=1000)
  vp = dpm_solver.discrete_vp(sched)
  with jax.enable_x64(True):
    got = {mean_type: np.asarray(dpm_solver.solve(
        sched, gaussian_model(vp, vp.num_steps, mean_type=mean_type), keys, SHAPE,
        num_steps=12, order=3, algorithm=algorithm, grid="logSNR", mean_type=mean_type,
        dtype=jnp.float64)) for mean_type in ("eps", "xstart", "v")}
  np.testing.assert_allclose(got["v"], got["eps"], rtol=1e-9, atol=1e-11)
  np.testing.assert_allclose(got["v"], got["xstart"], rtol=1e-9, atol=1e-11)


def test_error_falls_at_the_solvers_order(keys):
  """Against the exact flow of Gaussian data (float64, logSNR grid): doubling the steps from 20
  to 40 to 80 divides the error by 2^order for orders 1 and 2 (measured rates 0.96-0.98 and
  1.89-1.98). Order 3 falls at rate 2 only (2.43, 2.15): as in the reference, its first two
  steps are of order 1 and 2 while the history fills, and the first step's O(h^2) error stays in
  the result; its error is still 0.36-0.58 of order 2's."""
  sched = schedules.make_schedule("linear", num_diffusion_timesteps=1000)
  vp = dpm_solver.discrete_vp(sched)
  x_T = _x_T(sched, keys)
  want = exact_flow(vp, x_T, 1.0 / vp.num_steps)
  errors = {}
  with jax.enable_x64(True):
    for order in (1, 2, 3):
      errors[order] = np.array([np.abs(np.asarray(dpm_solver.solve(
          sched, gaussian_model(vp, vp.num_steps), keys, SHAPE, num_steps=steps, order=order,
          grid="logSNR", dtype=jnp.float64)) - want).max() for steps in (20, 40, 80)])
  rates = {order: np.log2(e[:-1] / e[1:]) for order, e in errors.items()}
  assert np.all(rates[1] > 0.8) and np.all(rates[2] > 1.7) and np.all(rates[3] > 1.8), rates
  assert np.all(errors[3] < 0.7 * errors[2]) and np.all(errors[2] < 0.2 * errors[1]), errors
  assert errors[3][-1] < 1e-3, errors


@pytest.mark.parametrize("steps", (10, 20))
def test_first_order_is_deterministic_ddim_on_the_same_grid(keys, steps):
  """T = 101: the uniform grid of 10 or 20 steps lands on timesteps 100, 90, ... (or 95, ...),
  where DDIM (eta 0) takes the same steps; DDIM's output is then the x_0 prediction at 0."""
  sched = schedules.make_schedule("linear", num_diffusion_timesteps=101)
  vp = dpm_solver.discrete_vp(sched)
  assert vp.num_steps == 101

  def model_fn(x, t):  # any network: a smooth nonlinear stand-in
    tt = jnp.reshape(t, (-1, 1, 1, 1)) / 100.0
    return 0.5 * jnp.sin(2 * x) + 0.3 * tt - 0.2 * x * tt

  with jax.enable_x64(True):
    ddim = samplers.ddim_sample_loop(sched, model_fn, keys, SHAPE,
                                     timesteps=np.arange(0, 101, 100 // steps), eta=0.0,
                                     mean_type="eps", var_type="fixedlarge", clip_denoised=False)
    for algorithm in dpm_solver.ALGORITHMS:
      x = dpm_solver.solve(sched, model_fn, keys, SHAPE, num_steps=steps, order=1,
                           algorithm=algorithm, dtype=jnp.float64)
      eps = model_fn(x, jnp.zeros((SHAPE[0],)))
      alpha_bar = float(sched.alphas_cumprod[0])
      x0 = (x - math.sqrt(1 - alpha_bar) * eps) / math.sqrt(alpha_bar)
      # DDIM runs in float32 (its coefficients and x_T): equal to its rounding.
      np.testing.assert_allclose(np.asarray(x0), np.asarray(ddim), rtol=2e-5, atol=2e-5)


def test_the_cosine_schedules_last_steps_are_dropped_as_the_reference_does():
  sched = schedules.make_schedule("cosine", num_diffusion_timesteps=1000)
  vp = dpm_solver.discrete_vp(sched)
  log_alpha = 0.5 * np.cumsum(np.log1p(-np.asarray(sched.betas, np.float64)))
  lam = log_alpha - 0.5 * np.log1p(-np.exp(2 * log_alpha))
  assert vp.num_steps == int(np.sum(lam >= -5.1)) < 1000
  assert vp.lambda_at(1.0) >= -5.1
  np.testing.assert_allclose(vp.t, np.arange(1, vp.num_steps + 1) / vp.num_steps)
  # The logSNR grid is uniform in lambda and lands back on it.
  times = dpm_solver.time_grid(vp, 8, "logSNR")
  np.testing.assert_allclose(np.diff(vp.lambda_at(times)),
                             (vp.lambda_at(times[-1]) - vp.lambda_at(times[0])) / 8, rtol=1e-6)


def test_samples_do_not_depend_on_the_device_count():
  sched = schedules.make_schedule("linear", num_diffusion_timesteps=100)
  vp = dpm_solver.discrete_vp(sched)
  fn = lambda params, k: dpm_solver.solve(sched, gaussian_model(vp, vp.num_steps), k,
                                          (k.shape[0],) + SHAPE[1:], num_steps=5, order=3)
  out = {}
  for n in (1, 8):
    mesh = parallel.make_mesh(jax.devices()[:n])
    out[n] = np.asarray(parallel.batch_map(fn, mesh)(
        parallel.replicate(np.zeros(()), mesh), parallel.sharded_example_keys(
            0, prng.RunStream.SAMPLE, np.arange(8), mesh)))
  np.testing.assert_allclose(out[1], out[8], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(algorithm="dpm"), r"unknown DPM-Solver algorithm 'dpm'; allowed: dpmsolver\+\+"),
    (dict(order=4), r"order 4 is not one of \(1, 2, 3\)"),
    (dict(grid="quadratic"), r"unknown grid 'quadratic'; allowed: time_uniform, logSNR"),
    (dict(num_steps=101), r"steps 101 must be in 1..T = 100"),
    (dict(num_steps=2, order=3), r"order 3 needs at least 3 steps"),
    (dict(mean_type="xprev"), r"mean_type 'eps', 'xstart' or 'v'\), got mean_type 'xprev'"),
])
def test_bad_settings_are_refused(kwargs, match):
  settings = dict(algorithm="dpmsolver++", order=2, grid="time_uniform", num_steps=10,
                  num_timesteps=100, mean_type="eps")
  settings.update(kwargs)
  with pytest.raises(ValueError, match=match):
    dpm_solver.check_solver(**settings)


# The reference's values on the cosine schedule: tests/golden/make_dpm_solver_golden.py writes
# them, running LuChengTHU/dpm-solver's dpm_solver_pytorch.py on `toy_eps` for each case.
GOLDEN_PATH = pathlib.Path(__file__).resolve().parents[1] / "golden" / "dpm_solver_cosine.npz"
# (algorithm, order, grid, steps): fewer than 10 steps, so the last steps lower the order.
GOLDEN_CASES = [("dpmsolver++", 2, "time_uniform", 6), ("dpmsolver++", 2, "logSNR", 6),
                ("dpmsolver", 2, "time_uniform", 6), ("dpmsolver", 2, "logSNR", 6),
                ("dpmsolver", 3, "time_uniform", 7), ("dpmsolver", 3, "logSNR", 7)]


def golden_name(algorithm, order, grid, steps):
  return f"{algorithm.replace('++', 'pp')}_order{order}_{grid}_{steps}"


def toy_eps(x, label):
  """A toy noise model linear in x and in its label s = label / 1000, for NumPy, torch and JAX
  arrays: eps(x, s) = (0.6 + 0.3 s) x + 0.2 s - 0.1."""
  s = (label / 1000.0).reshape((-1,) + (1,) * (len(x.shape) - 1))
  return (0.6 + 0.3 * s) * x + 0.2 * s - 0.1


@pytest.mark.parametrize("algorithm,order,grid,steps", GOLDEN_CASES)
def test_the_reference_solver_on_the_cosine_schedule(keys, algorithm, order, grid, steps):
  """LuChengTHU/dpm-solver's PyTorch solver (float64, a toy noise model linear in x and in its
  label; tests/golden/make_dpm_solver_golden.py) on the cosine schedule, which drops 4 of its
  1000 steps (N = 996): the network sees the reference's labels (t - 1/N) 1000, the first
  998.996 (not (t - 1/N) N = 995), and the samples agree. Tolerances: the reference builds its
  time_uniform grid in float32 (torch.linspace), so its labels there are off by up to 1e-4 of
  1000, and our schedule keeps log(1 - beta) in float32 (relative 1e-7 per step, summed)."""
  golden = np.load(GOLDEN_PATH)
  sched = schedules.make_schedule("cosine", num_diffusion_timesteps=1000)
  vp = dpm_solver.discrete_vp(sched)
  assert vp.num_steps == 996
  name = golden_name(algorithm, order, grid, steps)
  labels = vp.labels(dpm_solver.time_grid(vp, steps, grid)[:-1])
  np.testing.assert_allclose(labels, golden[name + "_labels"], rtol=0, atol=2e-3)
  np.testing.assert_allclose(labels[0], 1000 * (1 - 1 / 996), rtol=1e-12)
  np.testing.assert_allclose(_x_T(sched, keys), golden["x_T"], rtol=0, atol=0)
  with jax.enable_x64(True):
    got = np.asarray(dpm_solver.solve(
        sched, toy_eps, keys, SHAPE, num_steps=steps, order=order,
        algorithm=algorithm, grid=grid, dtype=jnp.float64))
  np.testing.assert_allclose(got, golden[name], rtol=1e-5, atol=1e-5)


def test_labels_run_to_t_times_one_minus_one_over_n_and_are_rescaled_as_every_call(keys):
  """A schedule of T = 200 that drops 2 steps (the digits' linear 1e-4..0.1): the labels run from
  200 (1 - 1/198) down, the last of a time-uniform grid's is 0; with rescale_timesteps the model
  sees them times 1000 / 200 (the scan run eagerly to record them)."""
  for rescale in (False, True):
    sched = schedules.make_schedule("linear", beta_end=0.1, num_diffusion_timesteps=200,
                                    rescale_timesteps=rescale)
    vp = dpm_solver.discrete_vp(sched)
    assert (vp.num_steps, vp.num_timesteps) == (198, 200)
    labels = vp.labels(dpm_solver.time_grid(vp, 4, "time_uniform"))
    np.testing.assert_allclose(labels[[0, -1]], [200 * (1 - 1 / 198), 0.0], atol=1e-12)
    seen = []

    def model_fn(x, t):
      seen.append(np.asarray(t))
      return jnp.zeros_like(x)

    with jax.disable_jit():
      dpm_solver.solve(sched, model_fn, keys, SHAPE, num_steps=4, grid="time_uniform")
    np.testing.assert_allclose(np.array(seen), np.repeat(labels[:-1, None], SHAPE[0], 1) *
                               (5.0 if rescale else 1.0), rtol=1e-6)
