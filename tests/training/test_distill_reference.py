"""Progressive distillation's target and loss against the reference implementation's own output:
google-research diffusion_distillation's `dpm.Model.training_losses` (teacher set, 'snr_trunc'
weighting, 'fixed_large' variance), run in float64 by tests/golden/make_distill_golden.py on our
schedule's continuous-time view, with toy teacher and student networks.

The reference draws per example i in 0 .. N-1 (its grid time u = (i + 1) / N, our i + 1) and the
noise, feeds its networks the log-SNR and weights the student's x_0 error by max(SNR, 1) through
max(x_mse, eps_mse); ours finds alpha, sigma and the network's float label at the grid's times
j / 2N in `distill.grid_tables` and weights max(alpha^2 / sigma^2, 1) x_mse. The toy networks
depend on the noise level only through alpha, so both sides call one function: the reference's
through sqrt(sigmoid(logsnr)), ours through alpha at the label's time u = (label + 1) / T.
"""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.core import schedules
from diffusion_jax.samplers import continuous
from diffusion_jax.samplers import ddim_continuous
from diffusion_jax.training import distill

T = 40
GOLDEN_PATH = pathlib.Path(__file__).resolve().parents[1] / "golden" / "distill_reference.npz"
# (mean_type, N): N = 1 is the reference's i == 0 branch only (the teacher's second step ends at
# u = 0, the target is its x_0); N = 5 a grid whose times are not binary fractions; N = 20 the
# finest, whose teacher visits every trained step.
GOLDEN_CASES = [("v", 4), ("v", 1), ("v", 5), ("v", 20), ("xstart", 4), ("xstart", 1),
                ("eps", 4), ("eps", 1)]
# Our mean types as the reference names them.
REFERENCE_MEAN_TYPE = {"v": "v", "xstart": "x", "eps": "eps"}
SHAPE = (16, 4, 4, 1)


def make_sched():
  """The digits-like schedule: T = 40 linear betas 1e-4 .. 0.1."""
  betas = schedules.get_beta_schedule("linear", beta_start=1e-4, beta_end=0.1,
                                      num_diffusion_timesteps=T)
  return schedules.Schedule.from_betas(betas)


def golden_name(mean_type, num_steps):
  return f"{mean_type}_n{num_steps}"


def toy_output(network, z, alpha):
  """The toy networks' output (v, x_0 or eps, as the case says) at z [B, ...] whose signal level
  is alpha [B]: a smooth function of both, the student a little off the teacher (JAX arrays)."""
  a = alpha.reshape((-1,) + (1,) * (z.ndim - 1))
  out = jnp.sin(0.9 * z + 1.5 * a) + 0.3 * a * z
  if network == "student":
    out = out + 0.1 * jnp.cos(1.7 * z - a)
  return out


def our_network(network, vp):
  """The toy network as our samplers call it: f(x, label [B] float), with alpha at the label's
  time of the continuous view (`continuous.DiscreteVP.labels` inverted)."""
  def fn(x, label):
    u = (label + 1.0) / vp.num_timesteps
    alpha = jnp.exp(jnp.interp(u, jnp.asarray(vp.t), jnp.asarray(vp.log_alpha)))
    return toy_output(network, x, alpha)
  return fn


@pytest.mark.parametrize("mean_type,num_steps", GOLDEN_CASES)
def test_target_and_loss_are_the_references(mean_type, num_steps):
  """Per example, max(SNR_u, 1) times the student's x_0 error against `distill.target` equals the
  reference's loss. What the reference used is checked on the way: its grid time is our 2i-th
  point of the 2N grid, its log-SNR at u, u - 1/2N and u - 1/N is ours (2 lambda; +inf at 0), and
  its z_u is ours from the same x and noise.

  Tolerance: both sides are float64 on the same log alpha table; they differ only in how each
  quantity is formed (alpha = sqrt(sigmoid(logsnr)) against exp(log alpha), sigma_s / sigma_u as
  exp(softplus differences), max(x_mse, eps_mse) against max(SNR, 1) x_mse), each a few ulps; the
  target's (z_s - r z_u) / (alpha_s - r alpha_u) cancels a little of that. Measured agreement is
  below 1e-13 relative; 1e-11 leaves room for another BLAS or libm, while a wrong grid index,
  weight or step would be off by percents."""
  golden = np.load(GOLDEN_PATH)
  name = golden_name(mean_type, num_steps)
  x, eps, ref_i = golden[name + "_x"], golden[name + "_eps"], golden[name + "_i"]
  sched = make_sched()
  vp = continuous.discrete_vp(sched)
  i = ref_i + 1  # our grid index: u = i / N
  assert np.all((i >= 1) & (i <= num_steps))
  with jax.enable_x64(True):
    tables = {k: jnp.asarray(v) for k, v in distill.grid_tables(sched, num_steps).items()}
    alpha, sigma = (np.asarray(tables[k])[2 * i] for k in ("alpha", "sigma"))
    # The reference's log-SNR at u, u - 1/2N, u - 1/N.
    for j, key in ((2 * i, "logsnr"), (2 * i - 1, "logsnr_mid"), (2 * i - 2, "logsnr_s")):
      a, s = np.asarray(tables["alpha"])[j], np.asarray(tables["sigma"])[j]
      with np.errstate(divide="ignore"):
        ours = np.where(s > 0, 2.0 * np.log(a / np.where(s > 0, s, 1.0)), np.inf)
      np.testing.assert_allclose(ours, golden[name + "_" + key], rtol=1e-12, atol=1e-12)
    bc = lambda v: v.reshape((-1,) + (1,) * (x.ndim - 1))
    z = bc(alpha) * x + bc(sigma) * eps
    np.testing.assert_allclose(z, golden[name + "_z"], rtol=1e-13, atol=1e-13)
    z = jnp.asarray(z)
    x_target, _ = distill.target(our_network("teacher", vp), sched, z, jnp.asarray(i), tables,
                                 mean_type=mean_type, var_type="fixedlarge")
    x0, _ = ddim_continuous.predict(our_network("student", vp), sched, z,
                                    tables["label"][2 * i], tables["alpha"][2 * i],
                                    tables["sigma"][2 * i], mean_type=mean_type,
                                    var_type="fixedlarge")
    x_mse = np.mean(np.square(np.asarray(x0) - np.asarray(x_target)), axis=(1, 2, 3))
  assert x0.dtype == x_target.dtype == jnp.float64
  loss = np.maximum(np.square(alpha / sigma), 1.0) * x_mse
  want = golden[name + "_loss"]
  assert np.all(want > 0)
  np.testing.assert_allclose(loss, want, rtol=1e-11, atol=0)
