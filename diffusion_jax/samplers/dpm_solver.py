"""DPM-Solver and DPM-Solver++ (Lu et al. 2022, arXiv 2206.00927 and 2211.01095): multistep
solvers of the diffusion ODE for our discrete-time schedules, as the reference
(LuChengTHU/dpm-solver, `NoiseScheduleVP('discrete')` and `DPM_Solver.sample(method=
'multistep')`) defines them.

The discrete schedule becomes a continuous one (`continuous.discrete_vp`): log alpha_t (alpha_t =
sqrt(alpha_bar)) is interpolated linearly between t_n = (n + 1) / N, n = 0 .. N - 1; steps at the
end whose half log-SNR lambda = log alpha - log sigma falls below -5.1 are dropped first (the
reference's guard for schedules such as the cosine one, whose last alpha_bar are ~0), N counting
the steps kept. The ODE is solved from t = 1 to t = 1/N on a grid uniform in t (`time_uniform`)
or in lambda (`logSNR`); the network sees the continuous time as the timestep (t - 1/N) T, T the
trained schedule's length (a float; the reference's (t - 1/N) 1000 for T = 1000, so labels run to
T (1 - 1/N) when steps are dropped), then rescaled as every model call is
(`Schedule.model_timesteps`).

Every coefficient depends only on the schedule and the grid, so they are computed once in float64
on the host: each step is x <- a x + b0 m_i + b1 m_{i-1} + b2 m_{i-2}, with m the data
prediction x_0 (`dpmsolver++`) or the noise prediction eps (`dpmsolver`) of the network at the
step's start, and the scan carries the last two. The first steps use the orders the history
allows; with fewer than 10 steps the last ones lower the order again (`lower_order_final`).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.core import diffusion
from diffusion_jax.core import prng
from diffusion_jax.core.schedules import Schedule
from diffusion_jax.samplers import common
from diffusion_jax.samplers import continuous
from diffusion_jax.samplers import registry

ALGORITHMS = ("dpmsolver++", "dpmsolver")
GRIDS = ("time_uniform", "logSNR")
ORDERS = (1, 2, 3)
CLIPPED_LAMBDA = -5.1  # the reference's floor on the half log-SNR of the steps kept
# Below this many steps the last steps lower the order (the reference's `steps < 10`).
LOWER_ORDER_FINAL_BELOW = 10


def discrete_vp(sched: Schedule) -> continuous.DiscreteVP:
  """The solver's continuous-time view of a (not respaced) schedule: the last steps of half
  log-SNR below `CLIPPED_LAMBDA` dropped, as the reference does."""
  return continuous.discrete_vp(sched, min_lambda=CLIPPED_LAMBDA)


def time_grid(vp: continuous.DiscreteVP, num_steps: int, grid: str,
              t_start: float = 1.0) -> np.ndarray:
  """The num_steps + 1 times from t_start (default 1) down to t = 1/N, uniform in t or in
  lambda."""
  t_end = 1.0 / vp.num_steps
  if grid == "time_uniform":
    return np.linspace(t_start, t_end, num_steps + 1)
  if grid == "logSNR":
    lams = np.linspace(vp.lambda_at(t_start), vp.lambda_at(t_end), num_steps + 1)
    return vp.time_of_lambda(lams)
  raise ValueError(f"unknown grid {grid!r}; allowed: {', '.join(GRIDS)}")


def step_orders(num_steps: int, order: int, lower_order_final: bool = True) -> np.ndarray:
  """The order of each of the num_steps steps: 1, 2, ... while the history fills, then `order`;
  with fewer than 10 steps, min(order, steps left) at the end."""
  orders = []
  for step in range(1, num_steps + 1):
    if step < order:
      orders.append(step)
    elif lower_order_final and num_steps < LOWER_ORDER_FINAL_BELOW:
      orders.append(min(order, num_steps + 1 - step))
    else:
      orders.append(order)
  return np.asarray(orders)


def update_coefficients(vp: continuous.DiscreteVP, times: np.ndarray, orders: np.ndarray,
                        algorithm: str) -> tuple[np.ndarray, np.ndarray]:
  """The multistep updates x_{i+1} = a_i x_i + sum_j b_ij m_{i-j} from times[i] to times[i+1].

  Args:
    vp: the continuous-time schedule.
    times: the grid, [steps + 1].
    orders: each step's order, [steps].
    algorithm: 'dpmsolver++' (m = x_0 predictions) or 'dpmsolver' (m = noise predictions).

  Returns:
    (a [steps], b [steps, 3]), float64; b[:, j] multiplies the model value j steps back.
  """
  lam = vp.lambda_at(times)
  log_alpha = vp.log_alpha_at(times)
  sigma = vp.sigma_at(times)
  steps = len(times) - 1
  a, b = np.zeros(steps), np.zeros((steps, 3))
  plus = algorithm == "dpmsolver++"
  for i in range(steps):
    h = lam[i + 1] - lam[i]
    alpha_next = np.exp(log_alpha[i + 1])
    if plus:
      a[i] = sigma[i + 1] / sigma[i]
      phi1 = np.expm1(-h)
      scale = alpha_next          # x <- a x - scale (phi1 m + ...)
    else:
      a[i] = np.exp(log_alpha[i + 1] - log_alpha[i])
      phi1 = np.expm1(h)
      scale = sigma[i + 1]
    order = orders[i]
    if order == 1:
      b[i, 0] = -scale * phi1
    elif order == 2:
      # D1 = (m_i - m_{i-1}) / r0, r0 = h_prev / h; x <- ... - 0.5 scale phi1 D1.
      r0 = (lam[i] - lam[i - 1]) / h
      b[i, 0] = -scale * phi1 * (1.0 + 0.5 / r0)
      b[i, 1] = scale * phi1 * 0.5 / r0
    else:
      r0 = (lam[i] - lam[i - 1]) / h
      r1 = (lam[i - 1] - lam[i - 2]) / h
      if plus:  # x <- a x - scale phi1 m_i + scale phi2 D1 - scale phi3 D2
        phi2 = phi1 / h + 1.0
        phi3 = phi2 / h - 0.5
        c1, c2 = scale * phi2, -scale * phi3
      else:  # x <- a x - scale phi1 m_i - scale phi2 D1 - scale phi3 D2
        phi2 = phi1 / h - 1.0
        phi3 = phi2 / h - 0.5
        c1, c2 = -scale * phi2, -scale * phi3
      # D1_0 = (m_i - m_{i-1}) / r0, D1_1 = (m_{i-1} - m_{i-2}) / r1,
      # D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1).
      d10 = np.array([1.0, -1.0, 0.0]) / r0
      d11 = np.array([0.0, 1.0, -1.0]) / r1
      d1 = d10 + r0 / (r0 + r1) * (d10 - d11)
      d2 = (d10 - d11) / (r0 + r1)
      b[i] = np.array([-scale * phi1, 0.0, 0.0]) + c1 * d1 + c2 * d2
  return a, b


def check_solver(algorithm: str, order: int, grid: str, num_steps: int, num_timesteps: int,
                 mean_type: str) -> None:
  """Raises ValueError, saying what to set, for settings the solver cannot run."""
  if algorithm not in ALGORITHMS:
    raise ValueError(f"unknown DPM-Solver algorithm {algorithm!r}; allowed: "
                     f"{', '.join(ALGORITHMS)}")
  if order not in ORDERS:
    raise ValueError(f"DPM-Solver order {order!r} is not one of {ORDERS}")
  if grid not in GRIDS:
    raise ValueError(f"unknown grid {grid!r}; allowed: {', '.join(GRIDS)}")
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"DPM-Solver steps {num_steps} must be in 1..T = {num_timesteps}")
  if num_steps < order:
    raise ValueError(f"DPM-Solver of order {order} needs at least {order} steps, got "
                     f"{num_steps}")
  continuous.check_mean_type(mean_type, "DPM-Solver")


def solve(sched: Schedule, model_fn: Callable, keys, shape, *, num_steps: int, order: int = 2,
          algorithm: str = "dpmsolver++", grid: str = "time_uniform", mean_type: str = "eps",
          var_type: str = "fixedlarge", clip_denoised: bool = False,
          dynamic_threshold: float = 0.0, lower_order_final: bool = True,
          dtype=jnp.float32, x_init=None, start: int | None = None, record_every: int = 0):
  """Samples by multistep DPM-Solver(++) from x_T (drawn per example as every sampler does).

  Args:
    sched: the trained (not respaced) schedule.
    model_fn: model_fn(x [B, ...], timesteps [B] float) -> network output.
    keys: one key per example, [B].
    shape: the samples' shape [B, ...].
    num_steps: network calls (steps of the solver).
    order: 1, 2 or 3.
    algorithm: 'dpmsolver++' or 'dpmsolver'.
    grid: 'time_uniform' or 'logSNR'.
    mean_type, var_type: what the network predicts (a learned variance's channels are unused).
    clip_denoised: dpmsolver++ only: clip each x_0 prediction to [-1, 1].
    dynamic_threshold: dpmsolver++ only: or clip it by dynamic thresholding at this percentile
      (`diffusion.clip_xstart`); 0 = to [-1, 1].
    lower_order_final: lower the order of the last steps when num_steps < 10.
    dtype: the solver's arithmetic (float64 for reference runs under jax.enable_x64); x_T is
      the float32 draw of every sampler, cast.
    x_init: x [B, ...] at the trained timestep `start` to solve from; default: each example's
      x_T, at t = 1.
    start: the trained timestep n of x_init, solved from its time t_n = (n + 1) / N (t = 1 for
      a step the solver dropped); None: t = 1.
    record_every: > 0: also keep the x_0 prediction of every record_every-th step counted back
      from the last (`common.prediction_slots`; for 'dpmsolver' the x_0 its noise prediction
      implies, unclipped).

  Returns:
    the samples at t = 1/N (the noise level of timestep 0), [B, ...]; with record_every,
    (samples, x0_preds [B, N, ...], noisiest first).
  """
  check_solver(algorithm, order, grid, num_steps, sched.num_timesteps, mean_type)
  vp = discrete_vp(sched)
  t_start = 1.0 if start is None else float(vp.t[min(int(start), vp.num_steps - 1)])
  if not t_start > vp.t[0]:
    raise ValueError(f"DPM-Solver cannot start at timestep {start}, the end of its time range; "
                     f"start above 0")
  times = time_grid(vp, num_steps, grid, t_start)
  a, b = update_coefficients(vp, times, step_orders(num_steps, order, lower_order_final),
                             algorithm)
  labels = vp.labels(times[:-1])
  alpha, sigma = np.exp(vp.log_alpha_at(times[:-1])), vp.sigma_at(times[:-1])
  if x_init is None:
    x_init = prng.normal_each(prng.fold_in_each(keys, sched.base_num_timesteps), shape[1:])
  x_init = x_init.astype(dtype)
  batch = shape[0]
  data_prediction = algorithm == "dpmsolver++"
  slots = (common.prediction_slots(num_steps, record_every) if record_every
           else np.zeros(num_steps, np.int32))

  def step(carry, xs):
    x, m_prev1, m_prev2, preds = carry
    label, alpha_i, sigma_i, a_i, b_i, slot = xs
    t_model = sched.model_timesteps(jnp.full((batch,), label, dtype))
    out, _ = diffusion.split_model_output(model_fn(x, t_model), x.shape, var_type=var_type)
    out = out.astype(x.dtype)
    if data_prediction:
      m = continuous.xstart_from_output(out, x, alpha_i, sigma_i, mean_type=mean_type)
      m = diffusion.clip_xstart(m, clip_denoised=clip_denoised,
                                dynamic_threshold=dynamic_threshold)
    else:
      m = continuous.eps_from_output(out, x, alpha_i, sigma_i, mean_type=mean_type)
    if preds is not None:
      x0 = m if data_prediction else continuous.xstart_from_output(out, x, alpha_i, sigma_i,
                                                                   mean_type=mean_type)
      preds = common.keep_prediction(preds, slot, x0)
    x = a_i * x + b_i[0] * m + b_i[1] * m_prev1 + b_i[2] * m_prev2
    return (x, m, m_prev1, preds), None

  dtype = x_init.dtype
  xs = tuple(jnp.asarray(v, dtype) for v in (labels, alpha, sigma, a, b)) + (jnp.asarray(slots),)
  zeros = jnp.zeros_like(x_init)
  preds = common.empty_predictions(x_init, num_steps // record_every) if record_every else None
  (x, _, _, preds), _ = jax.lax.scan(step, (x_init, zeros, zeros, preds), xs)
  return (x, preds) if record_every else x


# --- As samplers by name -----------------------------------------------------------------------

ORDER = registry.Setting("solver_order", 2, "int", choices=ORDERS, note="DPM-Solver's order")
GRID = registry.Setting("solver_grid", "time_uniform", "str", choices=GRIDS,
                        note="DPM-Solver's time grid")


def _entry(algorithm: str) -> registry.SamplerEntry:
  """DPM-Solver with one algorithm as a sampler: num_steps network calls of `solver_order` on
  `solver_grid`, on its own continuous-time grid (so no respacing)."""

  def run_all(sched, model_fn, keys, shape, *, num_steps, clip_denoised, dynamic_threshold,
              mean_type, var_type, solver_order, solver_grid, **start_and_record):
    return solve(sched, model_fn, keys, shape, num_steps=num_steps, order=solver_order,
                 algorithm=algorithm, grid=solver_grid, mean_type=mean_type, var_type=var_type,
                 clip_denoised=clip_denoised, dynamic_threshold=dynamic_threshold,
                 **start_and_record)

  def run(sched, model_fn, keys, shape, *, num_steps, clip_denoised, dynamic_threshold,
          mean_type, var_type, solver_order, solver_grid):
    return run_all(sched, model_fn, keys, shape, num_steps=num_steps, clip_denoised=clip_denoised,
                   dynamic_threshold=dynamic_threshold, mean_type=mean_type, var_type=var_type,
                   solver_order=solver_order, solver_grid=solver_grid)

  def check(field, *, count, num_timesteps, mean_type, solver_order, solver_grid):
    try:
      check_solver(algorithm, solver_order, solver_grid, count, num_timesteps, mean_type)
    except ValueError as e:
      raise ValueError(f"{e}: set {field('solver_order')}, {field('solver_grid')} or "
                       f"{field('num_steps')}, or another {field('sampler')}") from None

  what = "x_0" if algorithm == "dpmsolver++" else "noise"
  return registry.SamplerEntry(
      name=algorithm, run=run, settings=(ORDER, GRID), check=check,
      **registry.capabilities(run_all),
      deterministic=lambda solver_order, solver_grid: True,
      tag=lambda solver_order, solver_grid: [f"order{solver_order}_{solver_grid}"],
      visits_timesteps=False, clips=algorithm == "dpmsolver++",
      summary=f"Lu et al.'s {algorithm}, multistep on the {what} predictions")


ENTRIES = tuple(_entry(algorithm) for algorithm in ALGORITHMS)
