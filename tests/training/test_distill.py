"""Progressive distillation: Algorithm 2's target against float64 NumPy, the student step that
lands on the teacher's two, the checks before compiling, and whole runs that resume mid-round
and do not depend on the device count."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.config import build
from diffusion_jax.config import checks as config_checks
from diffusion_jax.config import config_lib
from diffusion_jax.core import prng
from diffusion_jax.core import schedules
from diffusion_jax.samplers import continuous
from diffusion_jax.samplers import ddim_continuous
from diffusion_jax.training import checkpoints
from diffusion_jax.training import distill
from tests import checkpoint_fixtures

T = 40


def _sched():
  betas = schedules.get_beta_schedule("linear", beta_start=1e-4, beta_end=0.1,
                                      num_diffusion_timesteps=T)
  return schedules.Schedule.from_betas(betas)


def _np_teacher(x, label):
  """The teacher's output (v), a smooth function of (x, label), float64 NumPy."""
  return np.sin(0.9 * x + 0.02 * label[:, None, None, None]) + 0.2 * x


def _jax_teacher(x, t):
  return jnp.sin(0.9 * x + 0.02 * t[:, None, None, None]) + 0.2 * x


def _np_alpha_sigma(log_alphas, u):
  log_alpha = np.interp(u, np.arange(1, T + 1) / T,
                        0.5 * np.cumsum(np.asarray(log_alphas, np.float64)))
  alpha = np.where(u > 0, np.exp(log_alpha), 1.0)
  return alpha, np.sqrt(np.maximum(1.0 - alpha ** 2, 0.0))


def _np_algorithm2(log_alphas, z, i, num_steps):
  """Salimans & Ho's Algorithm 2 for a v teacher, written out in float64 NumPy: two DDIM steps
  of the teacher from u = i/N to u - 0.5/N and u - 1/N, then the x_0 that one step from z_u
  would need to land on the same point. Returns (x~, z_s)."""
  u = i / num_steps
  t_points = [u, u - 0.5 / num_steps, u - 1.0 / num_steps]
  alpha, sigma = zip(*[_np_alpha_sigma(log_alphas, p) for p in t_points])
  bc = lambda a: a[:, None, None, None]
  x = z
  for k in range(2):
    v = _np_teacher(x, t_points[k] * T - 1.0)
    x0 = bc(alpha[k]) * x - bc(sigma[k]) * v
    eps = bc(sigma[k]) * x + bc(alpha[k]) * v
    x = bc(alpha[k + 1]) * x0 + bc(sigma[k + 1]) * eps
  ratio = bc(sigma[2] / sigma[0])
  return (x - ratio * z) / (bc(alpha[2]) - ratio * bc(alpha[0])), x


def _inputs(num_steps, batch=6, seed=0):
  rng = np.random.default_rng(seed)
  i = np.concatenate([[1, num_steps], rng.integers(1, num_steps + 1, batch - 2)])
  return rng.standard_normal((batch, 4, 4, 1)), i


@pytest.mark.parametrize("num_steps", [2, 5, 16])
def test_target_is_algorithm_2_in_float64(num_steps):
  sched = _sched()
  z, i = _inputs(num_steps)
  with jax.enable_x64(True):
    tables = {k: jnp.asarray(v) for k, v in distill.grid_tables(sched, num_steps).items()}
    got, got_zs = distill.target(_jax_teacher, sched, jnp.asarray(z), jnp.asarray(i), tables,
                                 mean_type="v", var_type="fixedlarge")
  want, want_zs = _np_algorithm2(sched.log_alphas, z, i, num_steps)
  np.testing.assert_allclose(np.asarray(got_zs), want_zs, rtol=0, atol=1e-10)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-10)
  # At i = 1 the teacher's second step ends at u = 0: the target is its x_0 itself.
  assert np.all(np.isfinite(np.asarray(got)))


@pytest.mark.parametrize("num_steps", [3, 8])
def test_one_student_step_with_the_target_lands_on_the_teachers_two(num_steps):
  """A student whose x_0 prediction at z_u is the target, stepping once to u - 1/N by DDIM,
  reaches the teacher's two-step result (float64)."""
  sched = _sched()
  z, i = _inputs(num_steps, seed=1)
  with jax.enable_x64(True):
    tables = {k: jnp.asarray(v) for k, v in distill.grid_tables(sched, num_steps).items()}
    x_target, z_s = distill.target(_jax_teacher, sched, jnp.asarray(z), jnp.asarray(i), tables,
                                   mean_type="v", var_type="fixedlarge")
    student = lambda x, t: x_target  # an x_0-predicting student that outputs the target
    bc = lambda a: a.reshape(-1, 1, 1, 1)
    x0, eps = ddim_continuous.predict(student, sched, jnp.asarray(z), tables["label"][2 * i],
                                      tables["alpha"][2 * i], tables["sigma"][2 * i],
                                      mean_type="xstart", var_type="fixedlarge")
    landed = ddim_continuous.step(x0, eps, bc(tables["alpha"][2 * i - 2]),
                                  bc(tables["sigma"][2 * i - 2]))
  np.testing.assert_allclose(np.asarray(landed), np.asarray(z_s), rtol=0, atol=1e-10)


def test_round_steps_halve_or_say_what_to_set():
  assert distill.round_steps(64, 4) == [64, 32, 16, 8, 4]
  assert distill.round_steps(6, 6) == [6]
  with pytest.raises(ValueError, match=r"not reached by halving.*64, 32, 16, 8, 4, 2, 1"):
    distill.round_steps(64, 3)


# ---- whole runs on the digits (tiny) ------------------------------------------------------------

def _config(teacher: str, **distill_settings):
  config = config_lib.load_config("configs/digits.py:mean_type=v")
  config.diffusion.num_timesteps = 20
  config.train.update(dict(batch_size=8, log_every=2, checkpoint_every=2, keep_checkpoints=10,
                           sample_every=0, compile_cache_dir=""))
  config.data.num_workers = 1
  config.distill.update(dict(teacher=teacher, start_steps=4, end_steps=2, steps_per_round=4,
                             lr=1e-3))
  config.distill.update(distill_settings)
  return config


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("teacher")
  checkpoint_fixtures.randomized_checkpoint(_config(""), workdir, 100)
  return workdir


def _params(workdir, step):
  return checkpoints.restore_params(os.fspath(workdir / "checkpoints"), step, ema=False)[0]


def _metrics(workdir) -> dict:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {row["step"]: row for row in rows if "grad_norm" in row}


def _assert_same(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_runs_resume_exactly_and_do_not_depend_on_the_devices(teacher, tmp_path):
  config = _config(str(teacher))
  # As the training step's test: Adam's eps keeps the comparison about the gradient (not the
  # sign of float32 noise in a near-zero one), no clipping.
  config.optim.eps, config.optim.grad_clip = 1e-4, 0.0
  one = tmp_path / "one"
  distill.run(config, str(one), devices=jax.devices()[:1])
  eight = tmp_path / "eight"
  distill.run(config, str(eight), devices=jax.devices()[:8])
  for step in (2, 4, 6, 8):
    # Summed over the devices in another order: float32 rounding, not another computation.
    for x, y in zip(jax.tree_util.tree_leaves(_params(one, step)),
                    jax.tree_util.tree_leaves(_params(eight, step)), strict=True):
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
  # The gradient's norm and the loss at every logged step (the mean over the whole batch).
  logged = [_metrics(w) for w in (one, eight)]
  assert sorted(logged[0]) == [2, 4, 6, 8]
  for step in logged[0]:
    for name in ("loss", "grad_norm", "x_mse"):
      np.testing.assert_allclose(logged[1][step][name], logged[0][step][name], rtol=1e-4)
  # Each round's last checkpoint says how its student samples.
  for step, steps in ((4, 4), (8, 2)):
    saved = checkpoints.read_config(eight / "checkpoints", step)
    assert (saved["sample"]["sampler"], saved["sample"]["num_steps"]) == (
        "ddim_continuous", steps)
  # The student changed, and round 2's teacher is round 1's student.
  assert not all(np.array_equal(x, y) for x, y in zip(
      jax.tree_util.tree_leaves(_params(eight, 4)),
      jax.tree_util.tree_leaves(checkpoints.restore_params(
          os.fspath(teacher / "checkpoints"), 100)[0])))
  # Resumed mid-round (from step 6, round 2) and at a round's start (step 4): the same bits.
  for keep in (6, 4):
    resumed = tmp_path / f"resumed{keep}"
    shutil.copytree(eight, resumed)
    for step in (2, 4, 6, 8):
      if step > keep:
        shutil.rmtree(resumed / "checkpoints" / str(step))
    distill.run(config, str(resumed), devices=jax.devices()[:8])
    _assert_same(_params(resumed, 8), _params(eight, 8))


def test_refusals_before_compiling(teacher, tmp_path):
  def problems(config):
    with pytest.raises(config_checks.ConfigError) as e:
      distill.check(config, 1)
    return str(e.value)

  assert "distill.teacher is not set" in problems(_config(""))
  assert "has no checkpoint" in problems(_config(str(tmp_path / "nowhere"))) or \
      "no checkpoint" in problems(_config(str(tmp_path / "nowhere")))
  other = _config(str(teacher))
  other.model.ch = 64
  assert "model.ch=64, but the teacher" in problems(other)
  other = _config(str(teacher))
  other.diffusion.beta_end = 0.02
  assert "--config.diffusion.beta_end=0.1" in problems(other)
  assert "not reached by halving" in problems(_config(str(teacher), end_steps=3))
  assert "at most 10" in problems(_config(str(teacher), start_steps=16, end_steps=2))
  xprev_dir = tmp_path / "xprev"
  checkpoint_fixtures.randomized_checkpoint(
      config_lib.apply_overrides(_config(""), {"diffusion.mean_type": "xprev"}), xprev_dir, 1)
  xprev = _config(str(xprev_dir))
  xprev.diffusion.mean_type = "xprev"
  assert "x_(t-1)" in problems(xprev)
  distill.check(_config(str(teacher)), 1)  # and a good config passes


def test_loss_is_the_weighted_x0_error_of_the_student(teacher):
  """`distill_loss` on the tiny U-Net: the truncated-SNR-weighted mean of the student's x_0
  error against Algorithm 2's target, recomputed with the same network's outputs in NumPy."""
  config = _config(str(teacher))
  model = build.make_model(config)
  sched = build.make_schedule(config)
  params = checkpoints.restore_params(os.fspath(teacher / "checkpoints"), 100)[0]
  num_steps = 4
  tables = {k: jnp.asarray(v, jnp.float32) for k, v in distill.grid_tables(sched,
                                                                           num_steps).items()}
  images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 1)).astype(np.uint8)
  keys = prng.example_keys(jax.random.key(1), np.arange(5))
  student = jax.tree_util.tree_map(lambda p: p * 0.9, params)
  state = distill.DistillState(step=0, params=student, ema_params=student, opt_state=None,
                               teacher=params)
  loss, aux = distill.distill_loss(student, {"image": images}, keys, state, model=model,
                                   teacher_model=model, sched=sched, tables=tables,
                                   num_steps=num_steps, mean_type="v", var_type="fixedlarge")
  i = np.asarray(aux["t"])
  assert set(i) <= set(range(1, num_steps + 1))
  net = lambda p, x, label: np.asarray(model.apply(
      {"params": p}, jnp.asarray(x, jnp.float32), jnp.asarray(label, jnp.float32)), np.float64)
  vp = continuous.discrete_vp(sched)
  x = images.astype(np.float64) / 127.5 - 1.0
  noise = np.asarray(prng.normal_each(prng.fold_in_each(keys, prng.ExampleStream.NOISE),
                                      x.shape[1:]), np.float64)
  u = i / num_steps
  alpha, sigma, labels = ddim_continuous.levels(vp, u)
  bc = lambda a: np.asarray(a)[:, None, None, None]
  z = bc(alpha) * x + bc(sigma) * noise
  cur = z
  for k in (0, 1):
    uk, un = u - k * 0.5 / num_steps, u - (k + 1) * 0.5 / num_steps
    ak, sk, lk = ddim_continuous.levels(vp, uk)
    an, sn, _ = ddim_continuous.levels(vp, un)
    v = net(params, cur, lk)
    x0 = bc(ak) * cur - bc(sk) * v
    eps = bc(sk) * cur + bc(ak) * v
    cur = bc(an) * x0 + bc(sn) * eps
  a_s, s_s, _ = ddim_continuous.levels(vp, u - 1.0 / num_steps)
  ratio = bc(s_s / sigma)
  x_target = (cur - ratio * z) / (bc(a_s) - ratio * bc(alpha))
  x0_student = bc(alpha) * z - bc(sigma) * net(student, z, labels)
  weight = np.maximum(alpha ** 2 / sigma ** 2, 1.0)
  want = np.mean(weight * np.mean((x0_student - x_target) ** 2, axis=(1, 2, 3)))
  # float32 network and arithmetic against float64 NumPy: the weights reach ~1e3 at u = 1/N.
  np.testing.assert_allclose(float(loss), want, rtol=2e-4)
