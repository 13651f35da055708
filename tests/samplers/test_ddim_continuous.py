"""DDIM on the uniform continuous-time grid against a float64 NumPy version of its steps."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import samplers
from diffusion_jax.core import prng
from diffusion_jax.core import schedules
from diffusion_jax.samplers import ddim_continuous

T = 50


def _sched(name="linear"):
  betas = schedules.get_beta_schedule(name, beta_start=1e-4, beta_end=0.1, num_diffusion_timesteps=T)
  return schedules.Schedule.from_betas(betas)


def _np_output(x, label, mean_type):
  """A network's output, any smooth function of (x, label) (NumPy, float64)."""
  return np.tanh(0.7 * x + 0.01 * label[:, None, None, None]) - 0.1 * x


def _jax_model(mean_type):
  return lambda x, t: jnp.tanh(0.7 * x + 0.01 * t[:, None, None, None]) - 0.1 * x


def _np_levels(log_alphas, u):
  """alpha, sigma at times u from each step's log(1 - beta): log sqrt(alpha_bar) interpolated
  linearly between u_n = (n + 1) / T, alpha 1 and sigma 0 at u = 0; the label u T - 1."""
  log_alpha = 0.5 * np.cumsum(np.asarray(log_alphas, np.float64))
  grid = np.arange(1, T + 1) / T
  out_alpha, out_sigma = [], []
  for v in u:
    if v == 0:
      out_alpha.append(1.0)
      out_sigma.append(0.0)
      continue
    la = np.interp(v, grid, log_alpha)
    out_alpha.append(np.exp(la))
    out_sigma.append(np.sqrt(1.0 - np.exp(2 * la)))
  return np.array(out_alpha), np.array(out_sigma), np.asarray(u) * T - 1.0


def _np_sample(log_alphas, x, num_steps, mean_type, clip):
  u = np.arange(num_steps + 1) / num_steps
  alpha, sigma, labels = _np_levels(log_alphas, u)
  for i in range(num_steps, 0, -1):
    out = _np_output(x, np.full(x.shape[0], labels[i]), mean_type)
    a, s = alpha[i], sigma[i]
    if mean_type == "eps":
      x0 = (x - s * out) / a
    elif mean_type == "xstart":
      x0 = out
    else:
      x0 = a * x - s * out
    if clip:
      x0 = np.clip(x0, -1, 1)
    eps = (x - a * x0) / s
    x = alpha[i - 1] * x0 + sigma[i - 1] * eps
  return x


@pytest.mark.parametrize("num_steps", [1, 4, 7, T])
def test_grids_nest_and_reach_zero(num_steps):
  coarse, fine = ddim_continuous.times(num_steps), ddim_continuous.times(2 * num_steps)
  np.testing.assert_array_equal(fine[::2], coarse)
  assert coarse[0] == 0 and coarse[-1] == 1


@pytest.mark.parametrize("mean_type,clip,num_steps", [
    ("eps", False, 6), ("v", True, 6), ("xstart", False, 3), ("eps", True, T)])
def test_sampler_is_the_float64_numpy_steps(mean_type, clip, num_steps):
  sched = _sched()
  keys = prng.example_keys(jax.random.key(3), np.arange(4))
  shape = (4, 3, 3, 1)
  with jax.enable_x64(True):
    got = ddim_continuous.sample(sched, _jax_model(mean_type), keys, shape,
                                 num_steps=num_steps, mean_type=mean_type, clip_denoised=clip,
                                 dtype=jnp.float64)
    x_T = np.asarray(prng.normal_each(prng.fold_in_each(keys, T), shape[1:]), np.float64)
  # The schedule keeps log(1 - beta) per step (to float32's precision): the reference starts
  # from those, so the comparison is of the steps' float64 algebra.
  want = _np_sample(sched.log_alphas, x_T, num_steps, mean_type, clip)
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-10)


def test_all_T_steps_are_ddim_over_the_trained_steps():
  """N = T visits exactly the trained timesteps 0 .. T-1 with integer labels: DDIM (eta 0)."""
  sched = _sched("cosine")
  keys = prng.example_keys(jax.random.key(0), np.arange(4))
  shape = (4, 3, 3, 1)
  model = _jax_model("eps")
  got = samplers.sample("ddim_continuous", sched, model, keys, shape, mean_type="eps",
                        var_type="fixedlarge", num_steps=T)
  want = samplers.sample("ddim", sched, model, keys, shape, mean_type="eps",
                         var_type="fixedlarge", num_steps=T, eta=0.0)
  # float32 arithmetic along two routes to the same numbers over 50 steps.
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-4)


def test_refusals_say_what_to_set():
  with pytest.raises(ValueError, match="num_steps"):
    samplers.check("ddim_continuous", {"num_steps": 0, "respacing": "ddim10"}, T)
  with pytest.raises(ValueError, match=r"mean_type"):
    samplers.check("ddim_continuous", {"num_steps": 4}, T, mean_type="xprev")
  assert samplers.tag({"sampler": "ddim_continuous", "num_steps": 4}, T) == "_ddim_continuous4"
