"""The training loop: restore or create the state, then step, log, checkpoint and sample
until `train.num_steps`, on every device of every host.

The step itself is `train_step.py`'s; the model, schedule and optimizer come from `build`;
batches from `input_pipeline`; checkpoints from `checkpoints`; stopping from `stopping`.

Differences from the original (`diffusion_tf/tpu_utils/tpu_utils.py`, `diffusion_tf/utils.py`):
  * Gradient clipping: the original clips each TPU core's gradient to grad_clip / num_cores
    before the cross-core sum; here the global norm of the mean gradient (over all devices and
    micro-batches) is clipped to `optim.grad_clip`. The reported `grad_norm` is that norm, before
    clipping.
  * EMA: decay 0 on the very first update (the original uses 1e-10, so the EMA starts as the
    parameters after step 1), `optim.ema_decay` afterwards, no bias correction; as there.
  * Learning rate: linear warmup from 0 over `optim.warmup_steps`, then constant; as there.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time

import jax
import ml_collections
import numpy as np
from etils import epath

from diffusion_jax import build
from diffusion_jax import checkpoints
from diffusion_jax import config_checks
from diffusion_jax import images as images_lib
from diffusion_jax import input_pipeline
from diffusion_jax import outputs
from diffusion_jax import parallel
from diffusion_jax import prng
from diffusion_jax import stopping
from diffusion_jax import train_step
from diffusion_jax import workdir_lock
from diffusion_jax.models import unet
from diffusion_jax.progress import format_duration


# ----------------------------------------------------------------------------------------------
# The loop.

@dataclasses.dataclass
class _Pending:
  """Per-step metrics not yet brought to the host (fetching each step would stall)."""
  steps: list = dataclasses.field(default_factory=list)
  metrics: list = dataclasses.field(default_factory=list)

  def add(self, step, metrics):
    self.steps.append(step)
    self.metrics.append(metrics)

  def drain(self):
    values = parallel.fetch(self.metrics)
    out = list(zip(self.steps, values))
    self.steps, self.metrics = [], []
    return out


def _set_compile_cache(config) -> None:
  cache_dir = config.train.compile_cache_dir
  if cache_dir and not jax.config.jax_compilation_cache_dir:
    cache_dir = os.path.expanduser(cache_dir)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       devices=None) -> train_step.TrainState:
  """Trains until `train.num_steps`, resuming from WORKDIR/checkpoints when possible.

  Args:
    config: the training config (configs/*.py).
    workdir: where checkpoints, metrics, TensorBoard logs and sample grids go (local or gs://).
    devices: the devices to use (default: all devices of all hosts).

  Returns:
    the final train state.

  Raises:
    ConfigError (a ValueError) / PermissionError: a config or workdir problem, before anything
      compiles.
    WorkdirBusyError: another run holds the workdir (`workdir_lock`), before anything compiles.
    FloatingPointError: the loss became non-finite (the last good checkpoint is kept).
    checkpoints.SaveError: a checkpoint could not be written, e.g. on a full disk (the older
      checkpoints are kept).

  SIGTERM or SIGINT (Ctrl-C) stops the run after the current step with a checkpoint; before the
  first step (while restoring or compiling) it stops without one. A second SIGINT aborts. With
  several processes, a signal to any of them or the time limit passing on any clock stops all
  at the same step, the next multiple of `train.stop_check_every`; a lost process ends the
  others with status `parallel.LOST_PROCESS_EXIT_CODE` after `train.lost_process_timeout_s`.
  """
  mesh = parallel.make_mesh(devices)
  config_checks.check_training(config, mesh.devices.size)  # before the watchdog starts, too
  outputs.check_workdir(workdir)
  lock = workdir_lock.hold_for_run(workdir, is_main=jax.process_index() == 0,
                                   multi_process=jax.process_count() > 1)
  try:
    with stopping.StopRequest(config, epath.Path(workdir) / "checkpoints") as stop:
      return _train(config, workdir, mesh, stop)
  finally:
    if lock is not None:
      lock.release()


def _train(config, workdir, mesh, stop: stopping.StopRequest) -> train_step.TrainState:
  """`train_and_evaluate` with the workdir locked and its stop request installed."""
  num_devices = mesh.devices.size
  _set_compile_cache(config)
  is_main = jax.process_index() == 0
  workdir_path = epath.Path(workdir)
  global_batch = config.train.batch_size
  num_steps = config.train.num_steps
  num_classes = build.num_classes(config)

  model = build.make_model(config)
  sched = build.make_schedule(config)
  optimizer = build.make_optimizer(config)
  source = input_pipeline.make_source(config.data)
  ckpt = checkpoints.Checkpointer(str(workdir_path / "checkpoints"),
                                  keep=config.train.keep_checkpoints)

  abstract = train_step.abstract_state(config, model, optimizer, mesh)
  restored, start_step = ckpt.restore_latest(abstract.to_dict())
  if restored is not None:
    state = train_step.TrainState(**restored)
    print(f"Resumed from {ckpt.directory}/{start_step}", flush=True)
  else:
    state = train_step.create_state(config, model, optimizer, mesh)
  if is_main:
    print(f"{num_devices} devices on {jax.process_count()} host(s); global batch "
          f"{global_batch}; {unet.count_params(state.params):,} parameters; "
          f"{len(source):,} training images; steps {start_step} -> {num_steps}", flush=True)

  def stopped_before_training() -> bool:
    if not stop.should_stop(start_step):
      return False
    ckpt.close()
    if is_main:
      print(f"Stopped by {stop.reason} before the first step; nothing new to save", flush=True)
    return True

  if stopped_before_training():
    return state
  rng = train_step.train_key(config, mesh)
  p_train_step = train_step.make_train_step(config, model, sched, optimizer, mesh)
  if start_step < num_steps:
    # Compiled now rather than on the first call, so that a stop requested while it compiles
    # (minutes for the large models) ends the run before any step.
    size, channels = config.data.image_size, config.data.channels
    batch_spec = {"image": jax.ShapeDtypeStruct((global_batch, size, size, channels), np.uint8,
                                                sharding=parallel.batch_sharding(mesh))}
    if num_classes:
      batch_spec["label"] = jax.ShapeDtypeStruct((global_batch,), np.int32,
                                                 sharding=parallel.batch_sharding(mesh))
    p_train_step = p_train_step.lower(state, batch_spec, rng).compile()
    if stopped_before_training():
      return state
  sample_fn = (build.make_sample_fn(config, model, sched, mesh, **build.sampler_kwargs(config))
               if config.train.sample_every else None)
  log = outputs.MetricsLog(workdir, enabled=is_main)
  config_dict = json.loads(config.to_json_best_effort())
  lr_fn = build.learning_rate_schedule(config)

  rows = parallel.host_rows(mesh, global_batch)
  batches = input_pipeline.BatchIterator(
      source, seed=config.seed, start_step=start_step, global_batch=global_batch, rows=rows,
      random_flip=config.data.random_flip, num_workers=config.data.num_workers,
      prefetch=config.data.prefetch, num_classes=num_classes)
  pending = _Pending()
  last_saved = start_step if restored is not None else None
  t_start = time.time()
  t_window, steps_window = time.time(), 0
  profile = contextlib.ExitStack()  # holds the jax.profiler trace while one is recorded
  profile_end = config.train.profile_start + config.train.profile_steps
  step = start_step

  def check_finite_and_log(current_step):
    nonlocal t_window, steps_window
    drained = pending.drain()
    for s, m in drained:
      if not all(np.isfinite(v) for v in m.values()):
        where = (f"the last good checkpoint is {ckpt.directory}/{last_saved}"
                 if last_saved is not None else "no checkpoint was written")
        raise FloatingPointError(
            f"non-finite loss or parameters at step {s} (loss={m['loss']}, grad_norm="
            f"{m['grad_norm']}, param_norm={m['param_norm']}); "
            f"stopped, {where}. Lower optim.lr, lengthen optim.warmup_steps or set "
            f"optim.grad_clip, then restart (it resumes from that checkpoint)")
    if not drained:
      return
    now = time.time()
    steps_per_s = steps_window / max(now - t_window, 1e-9)
    t_window, steps_window = now, 0
    s, m = drained[-1]
    values = dict(m, learning_rate=float(lr_fn(s)), steps_per_sec=steps_per_s,
                  images_per_sec=steps_per_s * global_batch)
    log.scalars(s + 1, values)
    if is_main:
      eta = (num_steps - current_step) / max(steps_per_s, 1e-9)
      if config.train.time_limit_s > 0:
        eta = min(eta, config.train.time_limit_s - (now - t_start))
      print(f"step {s + 1}/{num_steps}  loss {m['loss']:.4f}  grad_norm {m['grad_norm']:.3f}  "
            f"{steps_per_s:.2f} steps/s  {steps_per_s * global_batch:.1f} images/s  "
            f"ETA {format_duration(eta)}  (elapsed {format_duration(now - t_start)})",
            flush=True)

  try:
    while step < num_steps:
      if step == config.train.profile_start and is_main:
        profile.enter_context(jax.profiler.trace(str(workdir_path / "profile")))
      batch_step, local = next(batches)
      assert batch_step == step, (batch_step, step)
      # Each step is one named step in the trace viewer (and in TensorBoard's profile plugin).
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = jax.tree_util.tree_map(
            lambda rows_: parallel.global_batch(rows_, mesh, global_batch), local)
        state, metrics = p_train_step(state, batch, rng)
      pending.add(step, metrics)
      step += 1
      steps_window += 1
      if step == profile_end and is_main:
        jax.block_until_ready(state)
        profile.close()  # stops the trace and writes it

      over_time = (config.train.time_limit_s > 0
                   and time.time() - t_start > config.train.time_limit_s)
      stop_now = stop.should_stop(step, over_time=over_time,
                                  every=config.train.stop_check_every)
      last = step == num_steps or stop_now
      if step % config.train.log_every == 0 or last:
        check_finite_and_log(step)
      ckpt.check_for_errors()  # stops at the first step after a failed background save
      if step % config.train.checkpoint_every == 0 or last:
        check_finite_and_log(step)
        ckpt.save(step, state.to_dict(), config_dict)
        last_saved = step
      if sample_fn is not None and (step % config.train.sample_every == 0 or last):
        write_samples(config, sample_fn, state.ema_params, mesh, step, workdir_path, log)
      if stop_now:
        if is_main:
          print(f"Stopping at step {step} ({stop.reason}); checkpoint saved", flush=True)
        break
  finally:
    profile.close()
    batches.close()
    ckpt.close()
    log.close()
  return state


def write_samples(config, sample_fn, ema_params, mesh, step, workdir_path, log) -> np.ndarray:
  """Samples `sample.num_samples` images with the EMA weights; writes samples/grid_<step>.png."""
  n = config.sample.num_samples
  padded = parallel.round_up_to_devices(n, mesh)
  # Sample i's key depends only on i: the grid is the same whatever the number of devices (the
  # padding rows are dropped).
  keys = prng.sharded_example_keys(config.seed, prng.RunStream.GRID, np.arange(padded), mesh)
  labels = build.sample_labels(config, np.arange(padded), mesh)
  t0 = time.time()
  images = parallel.fetch(sample_fn(ema_params, keys, *labels))[:n]
  grid = images_lib.image_grid(images_lib.to_uint8(images))
  if jax.process_index() == 0:
    path = workdir_path / "samples" / f"grid_{step}.png"
    outputs.write_atomically(path, images_lib.encode_png(
        grid, upscale=images_lib.grid_upscale(config.data.image_size)))
    log.image(step, "samples/ema", grid)
    log.flush()
    print(f"Wrote {path} ({n} EMA samples in {time.time() - t0:.1f} s)", flush=True)
  return images
