"""Training: end to end under mocked CIFAR-10, exact resume, 1 vs 8 devices, errors."""

import copy
import functools

import jax
import numpy as np
import optax
import pytest

from diffusion_jax.config import build
from diffusion_jax.config import checks as config_checks
from diffusion_jax.config import config_lib
from diffusion_jax.data import images as images_lib
from diffusion_jax.data import input_pipeline
from diffusion_jax import parallel
from diffusion_jax.training import checkpoints
from diffusion_jax.training import loop as train
from diffusion_jax.training import step as train_step
from diffusion_jax.utils import outputs
from tests import helpers

NUM_EXAMPLES = 32


def load_config(name="test", arg=None):
  return config_lib.load_config(f"configs/{name}.py" + (f":{arg}" if arg else ""))


def mock_cifar():
  return helpers.mock_cifar(NUM_EXAMPLES)


def run(config, workdir, devices=None):
  with mock_cifar():
    return train.train_and_evaluate(config, str(workdir), devices=devices)


def assert_trees_equal(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# The tests marked slow compile and run whole training steps or training runs.
@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """8 steps without interruption (checkpoints at 4 and 8)."""
  config = load_config()
  config.train.num_steps = 8
  config.train.checkpoint_every = 4
  workdir = tmp_path_factory.mktemp("straight")
  state = run(config, workdir)
  return config, workdir, jax.device_get(state.to_dict())


@pytest.mark.slow
def test_end_to_end_writes_checkpoints_and_metrics(straight):
  config, workdir, state = straight
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                if p.name.isdigit()) == [4, 8]
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 4
  assert {"loss", "grad_norm", "param_norm", "learning_rate", "steps_per_sec",
          "images_per_sec"} <= set(__import__("json").loads(lines[-1]))
  assert int(state["step"]) == 8
  assert list((workdir / "tensorboard").iterdir())
  ckpt_dir = workdir / "checkpoints"
  saved = checkpoints.read_config(ckpt_dir, checkpoints.select_step(ckpt_dir))
  assert saved["model"]["ch"] == config.model.ch


@pytest.mark.slow
def test_exact_resume_with_the_loss_history(tmp_path):
  """An importance-sampled run stopped and resumed equals the run without the stop, history
  included: it is saved in the checkpoint and restored exactly."""
  config = _importance_config()
  config.train.num_steps = 9
  config.train.checkpoint_every = 5
  config.model.dropout = 0.0
  want = jax.device_get(run(config, tmp_path / "straight").to_dict())
  assert int(np.asarray(want["loss_history"]["counts"]).min()) == 10
  config.train.num_steps = 5
  run(config, tmp_path / "resumed")
  config.train.num_steps = 9
  got = jax.device_get(run(config, tmp_path / "resumed").to_dict())
  for key in ("params", "ema_params", "opt_state", "loss_history"):
    assert_trees_equal(got[key], want[key])


@pytest.mark.slow
def test_exact_resume_after_interruption(straight, tmp_path):
  config, _, want = straight
  # Interrupted run: stops after 6 steps with checkpoints at 4 and 6 ("killed" at step 6
  # before its next checkpoint), then restarted to step 8.
  config = load_config()
  config.train.num_steps = 6
  config.train.checkpoint_every = 4
  run(config, tmp_path)
  # Drop the final checkpoint to mimic a kill right after step 6: the restart resumes at 4.
  checkpoints_dir = tmp_path / "checkpoints"
  assert sorted(int(p.name) for p in checkpoints_dir.iterdir() if p.name.isdigit()) == [4, 6]
  import shutil
  shutil.rmtree(checkpoints_dir / "6")
  config.train.num_steps = 8
  got = jax.device_get(run(config, tmp_path).to_dict())
  assert_trees_equal(got["params"], want["params"])
  assert_trees_equal(got["ema_params"], want["ema_params"])
  assert_trees_equal(got["opt_state"], want["opt_state"])


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back(straight, tmp_path, capsys):
  config, workdir, _ = straight
  import shutil
  shutil.copytree(workdir / "checkpoints", tmp_path / "checkpoints")
  for path in (tmp_path / "checkpoints" / "8" / "state").rglob("*"):
    if path.is_file():
      path.write_bytes(b"garbage")
  model, optimizer = build.make_model(config), build.make_optimizer(config)
  abstract = train_step.abstract_state(config, model, optimizer, parallel.make_mesh())
  ckpt = checkpoints.Checkpointer(str(tmp_path / "checkpoints"))
  state, step = ckpt.restore_latest(abstract.to_dict())
  assert step == 4 and int(state["step"]) == 4
  assert "step 8" in capsys.readouterr().out
  assert (tmp_path / "checkpoints" / "8.corrupt").exists()  # reported, moved aside, kept


@pytest.mark.slow
def test_changed_parameter_shapes_are_refused(straight):
  _, workdir, _ = straight
  config = load_config()
  config.model.ch = 64
  model, optimizer = build.make_model(config), build.make_optimizer(config)
  abstract = train_step.abstract_state(config, model, optimizer, parallel.make_mesh())
  ckpt = checkpoints.Checkpointer(str(workdir / "checkpoints"))
  with pytest.raises(ValueError, match="parameter shapes"):
    ckpt.restore_latest(abstract.to_dict())


def _fixed_batch(config, batch_size):
  """{'image'} (+ 'label' for a class-conditional config) of step 0."""
  with mock_cifar():
    source = input_pipeline.make_source(config.data)
    return input_pipeline.load_batch(source, seed=0, step=0, global_batch=batch_size,
                                     rows=slice(0, batch_size), random_flip=True,
                                     num_classes=build.num_classes(config))


_run_steps = helpers.run_steps


def _np_history_update(losses, counts, pairs, size=10):
  for t, loss in pairs:  # Improved DDPM's rule, pair by pair in row order
    if counts[t] == size:
      losses[t] = np.append(losses[t, 1:], loss)
    else:
      losses[t, counts[t]] = loss
      counts[t] += 1


def _reference_steps(config, images, num_steps):
  """The same steps computed plainly on one device, without shard_map: the gradient of the
  mean loss over the whole batch, its global norm in float64, then optax's update. With
  importance-sampled timesteps, the loss history is kept in NumPy from each step's (t, loss)
  pairs in row order. Returns (params, metrics per step, (history losses, counts) or None)."""
  model, sched = build.make_model(config), build.make_schedule(config)
  optimizer = build.make_optimizer(config)
  params = train_step.init_state(config, model, optimizer,
                            jax.random.fold_in(jax.random.key(config.seed), 1)).params
  opt_state = optimizer.init(params)
  # The streams written out, independently of prng.py: TRAIN = 2, then the step, then the row.
  rng = jax.random.fold_in(jax.random.key(config.seed), 2)
  loss_and_grad = jax.jit(jax.value_and_grad(functools.partial(
      train_step.loss_fn, model=model, sched=sched, diffusion_kw=build.diffusion_kwargs(config)),
      has_aux=True))
  T = config.diffusion.num_timesteps
  importance = config.diffusion.timestep_sampler == "loss_second_moment"
  losses_np, counts_np = np.zeros((T, 10), np.float32), np.zeros(T, int)
  positions = np.arange(images["image"].shape[0])
  history = []
  for step in range(num_steps):
    keys = jax.vmap(lambda p: jax.random.fold_in(jax.random.fold_in(rng, step), p))(positions)
    loss_history = (dict(losses=jax.numpy.asarray(losses_np),
                         counts=jax.numpy.asarray(counts_np, jax.numpy.int32))
                    if importance else None)
    (loss, aux), grads = loss_and_grad(params, images, keys, loss_history)
    _np_history_update(losses_np, counts_np, zip(np.asarray(aux["t"]), np.asarray(aux["losses"])))
    norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2)
                       for g in jax.tree_util.tree_leaves(grads)))
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    history.append(dict(loss=float(loss), grad_norm=float(norm)))
  return jax.device_get(params), history, (losses_np, counts_np) if importance else None


NUM_STEPS = 6


@pytest.fixture(scope="module")
def clipped_reference():
  """A config whose gradient clip lies inside the range of its steps' gradient norms, so it
  acts on some steps and not others, with the plain single-device run of it."""
  config = load_config()
  images = _fixed_batch(config, 8)
  # Some gradients are zero in exact arithmetic (attention key biases; biases in front of a
  # GroupNorm of one channel per group), and Adam's division by sqrt(v) + eps turns their float
  # rounding, which depends on the summation order, into full-size updates when eps is 1e-8.
  # eps = 1e-4 (below typical |g| ~ 1e-3) keeps the comparison about the gradient itself.
  config.optim.eps = 1e-4
  config.optim.grad_clip = 0.0
  _, unclipped, _ = _reference_steps(config, images, NUM_STEPS)
  config.optim.grad_clip = float(np.median([h["grad_norm"] for h in unclipped]))
  params, history, _ = _reference_steps(config, images, NUM_STEPS)
  norms = np.array([h["grad_norm"] for h in history])
  assert np.any(norms > config.optim.grad_clip * 1.01), (norms, config.optim.grad_clip)
  assert np.any(norms < config.optim.grad_clip * 0.99), (norms, config.optim.grad_clip)
  return config, images, params, history


def _assert_matches_reference(got, want):
  (params, history), (want_params, want_history) = got, want
  for h, w in zip(history, want_history, strict=True):
    np.testing.assert_allclose(h["loss"], w["loss"], rtol=1e-5)
    np.testing.assert_allclose(h["grad_norm"], w["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(want_params),
                  strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("num_devices,grad_accum_steps", [(1, 1), (2, 1), (8, 1), (2, 2),
                                                          (1, 4)])
def test_steps_on_any_device_count_equal_the_global_batch_gradient(
    clipped_reference, num_devices, grad_accum_steps):
  """Loss, gradient norm and parameters over several steps (clipping active on some) equal the
  plain single-device computation, for 1, 2 and 8 devices and with micro-batches."""
  config, images, params, history = clipped_reference
  config = copy.deepcopy(config)
  config.optim.grad_accum_steps = grad_accum_steps
  got = _run_steps(config, jax.devices()[:num_devices], images, NUM_STEPS)[:2]
  _assert_matches_reference(got, (params, history))


# --- Importance-sampled timesteps --------------------------------------------------------------

IMPORTANCE_STEPS = 9


def _importance_config():
  """learned_range + hybrid with importance-sampled timesteps over T = 5, so that the history is
  full (10 losses of each t) after 7 steps of 8 examples and the last steps draw by importance."""
  config = load_config("test", "var_type=learned_range,loss_type=hybrid")
  config.diffusion.timestep_sampler = "loss_second_moment"
  config.diffusion.num_timesteps = 5
  config.optim.eps = 1e-4  # as in clipped_reference
  config.optim.grad_clip = 0.0
  return config


@pytest.fixture(scope="module")
def importance_reference():
  """The plain steps of `_importance_config` and their final loss history."""
  config = _importance_config()
  images = _fixed_batch(config, 8)
  params, history, loss_history = _reference_steps(config, images, IMPORTANCE_STEPS)
  assert np.all(loss_history[1] == 10)  # warmed up before the last steps
  return config, images, (params, history), loss_history


@pytest.mark.slow
@pytest.mark.parametrize("num_devices,grad_accum_steps", [(1, 1), (8, 1), (2, 2)])
def test_importance_sampling_on_any_device_count(importance_reference, num_devices,
                                                 grad_accum_steps):
  """With importance-sampled timesteps, 1, 8 and 2 devices (with micro-batches) give the plain
  computation's losses, gradient norms and parameters, and every device holds the history the
  global batch's (t, loss) pairs give in row order."""
  config, images, want, (want_losses, want_counts) = importance_reference
  config = copy.deepcopy(config)
  config.optim.grad_accum_steps = grad_accum_steps
  params, history, loss_history = _run_steps(config, jax.devices()[:num_devices], images,
                                             IMPORTANCE_STEPS)
  assert {"mse", "vb"} <= set(history[-1])
  _assert_matches_reference((params, history), want)
  np.testing.assert_array_equal(np.asarray(loss_history["counts"]), want_counts)
  np.testing.assert_allclose(np.asarray(loss_history["losses"]), want_losses, rtol=1e-5)
  # Replicated: every device's copy is the same.
  copies = [np.asarray(s.data) for s in loss_history["losses"].addressable_shards]
  assert len(copies) == num_devices and all(np.array_equal(c, copies[0]) for c in copies)


@pytest.mark.slow
def test_loss_falls_on_a_fixed_batch():
  config = load_config()
  config.model.dropout = 0.0
  config.optim.lr = 3e-3
  images = _fixed_batch(config, 8)
  _, history, _ = _run_steps(config, jax.devices(), images, 40)
  losses = [h["loss"] for h in history]
  assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5]), losses


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(straight, tmp_path, capsys):
  import shutil
  _, workdir, _ = straight
  shutil.copytree(workdir / "checkpoints", tmp_path / "checkpoints")
  shutil.rmtree(tmp_path / "checkpoints" / "8")
  config = load_config()
  config.train.num_steps = 8
  config.train.checkpoint_every = 1
  config.optim.lr = 1e38  # a valid value whose updates overflow the parameter norm
  with pytest.raises(FloatingPointError, match=r"non-finite .* at step 4.*checkpoints/4"):
    run(config, tmp_path)
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                if p.name.isdigit()) == [4]


@pytest.mark.parametrize("field,value,match", [
    ("data.dataset", "mnist", "allowed: cifar10"),
    ("data.channels", 1, "has 3 channels: set --config.data.channels=3"),
    ("diffusion.mean_type", "velocity", "mean_type"),
    ("diffusion.var_type", "big", "var_type"),
    ("diffusion.loss_type", "l1", "loss_type"),
    ("train.batch_size", 12, "not divisible by the number of devices"),
    ("data.image_size", 9, "image_size 9"),
    ("model.attn_resolutions", (3,), "never reaches"),
    ("model.dtype", "float16", "model.dtype"),
])
def test_config_errors_before_compiling(field, value, match):
  config = load_config()
  section, key = field.split(".")
  config[section][key] = value
  with pytest.raises(ValueError, match=match):
    config_checks.check_training(config, 8)


@pytest.mark.parametrize("field,value", [
    ("optim.lr", 0.0), ("optim.lr", -1.0), ("train.checkpoint_every", 0),
    ("train.log_every", 0), ("optim.grad_accum_steps", 0), ("train.keep_checkpoints", 0),
])
def test_bad_values_stop_training_before_anything_runs(field, value, tmp_path):
  config = load_config()
  section, key = field.split(".")
  config[section][key] = value
  with pytest.raises(config_checks.ConfigError, match=f"{field}={value} must be"):
    run(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_digits_demo_trains_a_fixed_step_budget_and_samples_what_a_cpu_can():
  """The demo's default depends on no clock: the same number of steps on every machine."""
  config = load_config("digits")
  assert config.train.time_limit_s == 0 and config.train.num_steps == 12_000
  assert config.data.split == "train"
  assert config.eval.num_samples <= 1000 and config.eval.interp_t < config.diffusion.num_timesteps
  limited = load_config("digits", "time_limit_s=60,num_steps=500")
  assert limited.train.time_limit_s == 60.0 and limited.train.num_steps == 500


def test_learned_variance_needs_kl():
  config = load_config()
  config.diffusion.var_type = "learned"
  with pytest.raises(ValueError):
    config_checks.check_training(config, 8)


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(PermissionError, match="cannot write to --workdir"):
    outputs.check_workdir(str(blocker / "run"))


def test_image_grid():
  images = np.full((5, 4, 4, 1), 255, np.uint8)
  grid = images_lib.image_grid(images, pad=1)
  assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 1)
  assert grid.sum() == 5 * 16 * 255


def test_bfloat16_compute_keeps_float32_weights_and_full_size_state_shapes():
  config = load_config()
  config.model.dtype = "bfloat16"
  mesh = parallel.make_mesh()
  model, sched = build.make_model(config), build.make_schedule(config)
  optimizer = build.make_optimizer(config)
  abstract = train_step.abstract_state(config, model, optimizer, mesh)
  step_fn = train_step.make_train_step(config, model, sched, optimizer, mesh)
  images = {"image": jax.ShapeDtypeStruct((8, 8, 8, 3), np.uint8)}
  rng = jax.eval_shape(lambda: jax.random.key(0))
  new_state, metrics = jax.eval_shape(step_fn, abstract, images, rng)  # traces, no compile
  assert {x.dtype for x in jax.tree_util.tree_leaves(new_state.params)} == {np.dtype("float32")}
  assert metrics["loss"].dtype == np.float32
  cifar = load_config("cifar10")
  model, optimizer = build.make_model(cifar), build.make_optimizer(cifar)
  full = train_step.abstract_state(cifar, model, optimizer, mesh)
  from diffusion_jax.models import layers
  assert layers.count_params(full.params) == layers.count_params(full.ema_params) == 35_746_307


@pytest.mark.slow
def test_resuming_with_another_timestep_sampler_is_refused_and_keeps_the_checkpoint(tmp_path):
  """A checkpoint with a loss history resumes only with importance sampling, and one without it
  only without: either way the error says what to set, and the checkpoint stays in place."""
  config = _importance_config()
  mesh = parallel.make_mesh()
  for trained, resumed in (("loss_second_moment", "uniform"), ("uniform", "loss_second_moment")):
    # The checkpoint a run of `trained` writes at step 2 (its state's layout is what matters).
    config.diffusion.timestep_sampler = trained
    state = train_step.create_state(config, build.make_model(config),
                                    build.make_optimizer(config), mesh)
    saver = checkpoints.Checkpointer(str(tmp_path / trained / "checkpoints"), async_save=False)
    saver.save(2, state.replace(step=state.step + 2).to_dict(), config.to_dict())
    saver.close()
    config.diffusion.timestep_sampler = resumed
    config.train.num_steps = 4
    with pytest.raises(checkpoints.ShapeMismatchError,
                       match=f"set --config.diffusion.timestep_sampler={trained} to resume"):
      run(config, tmp_path / trained)
    checkpoints_dir = tmp_path / trained / "checkpoints"
    assert (checkpoints_dir / "2").is_dir() and not list(checkpoints_dir.glob("*.corrupt"))



class _SteppingClock:
  """`time` for train.py whose clock moves 4 s at each read: progress lines fall due within a
  few steps, whatever the machine's speed."""

  def __init__(self):
    self.now = 1000.0

  def time(self):
    self.now += 4.0
    return self.now


@pytest.mark.slow
def test_progress_lines_come_every_10_s_not_only_every_log_every_steps(tmp_path, capsys,
                                                                       monkeypatch):
  config = load_config()
  config.train.log_every = 100
  config.train.checkpoint_every = 100
  monkeypatch.setattr(train, "time", _SteppingClock())
  run(config, tmp_path)
  out = capsys.readouterr().out
  assert "Compiling the training step ...\nCompiled the training step in " in out
  lines = [line for line in out.splitlines() if line.startswith("step ")]
  # The first step, then every 10 s (of this clock), then the last: more than the last alone.
  assert len(lines) >= 3, out
  assert lines[0].startswith("step 1/6  loss ") and lines[-1].startswith("step 6/6  loss ")
  for line in lines:
    assert " steps/s " in line and " images/s  ETA " in line
  # Metrics are still logged every log_every steps (and at the end) only.
  assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
