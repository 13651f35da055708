"""The training loop: restore or create the state, then step, log, checkpoint and sample
until `train.num_steps`, on every device of every host.

The step itself is `training.step`'s; the model, schedule and optimizer come from `build`;
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

from diffusion_jax.config import build
from diffusion_jax.config import programs
from diffusion_jax.config import checks as config_checks
from diffusion_jax.core import prng
from diffusion_jax.data import images as images_lib
from diffusion_jax.data import input_pipeline
from diffusion_jax.models import layers
from diffusion_jax import parallel
from diffusion_jax.training import checkpoints
from diffusion_jax.training import step as train_step
from diffusion_jax.training import stopping
from diffusion_jax.training import workdir_lock
from diffusion_jax.utils import outputs
from diffusion_jax.utils import progress as progress_lib


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


def set_compile_cache(config) -> None:
  cache_dir = config.train.compile_cache_dir
  if cache_dir and not jax.config.jax_compilation_cache_dir:
    cache_dir = os.path.expanduser(cache_dir)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       devices=None) -> train_step.TrainState | None:
  """Trains until `train.num_steps`, resuming from WORKDIR/checkpoints when possible.

  Args:
    config: the training config (configs/*.py).
    workdir: where checkpoints, metrics, TensorBoard logs and sample grids go (local or gs://).
    devices: the devices to use (default: all devices of all hosts).

  Returns:
    the final train state; None when stopped before it was created or restored.

  Raises:
    ConfigError (a ValueError) / PermissionError: a config or workdir problem, before anything
      compiles.
    WorkdirBusyError: another run holds the workdir (`workdir_lock`), before anything compiles.
    FloatingPointError: the loss became non-finite (the last good checkpoint is kept).
    checkpoints.SaveError: a checkpoint could not be written, e.g. on a full disk (the older
      checkpoints are kept).

  SIGTERM or SIGINT (Ctrl-C) stops the run after the current step with a checkpoint and no
  sample grid (as the time limit does); during start-up (`stopping.START_UP_STAGES`: loading
  the data, restoring, compiling) it stops before the first step without one. A second SIGINT
  aborts. With several processes, a signal to any of them or the time limit passing on any
  clock stops all at the same step, the next multiple of `train.stop_check_every`; a lost
  process ends the others with status `parallel.LOST_PROCESS_EXIT_CODE` after
  `train.lost_process_timeout_s`.
  """
  return run_in_workdir(config, workdir, _train, devices=devices)


def run_in_workdir(config: ml_collections.ConfigDict, workdir: str, body, *, devices=None,
                   check=config_checks.check_training):
  """What every run that trains in a workdir does around its work: `check(config, number of
  devices)` and the workdir's checks, before anything compiles (and before the watchdog
  starts), then `body(config, absolute workdir, mesh, stop request)` with the workdir locked
  (`workdir_lock`) and SIGTERM / SIGINT turned into a stop request (`stopping.StopRequest`).
  Returns what `body` returns."""
  # Absolute from here on: orbax refuses relative paths, and a change of directory must not
  # move the run's files.
  workdir = str(outputs.resolve(workdir))
  mesh = parallel.make_mesh(devices)
  check(config, mesh.devices.size)
  outputs.check_workdir(workdir)
  lock = workdir_lock.hold_for_run(workdir, is_main=jax.process_index() == 0,
                                   multi_process=jax.process_count() > 1)
  try:
    with stopping.StopRequest(config, epath.Path(workdir) / "checkpoints") as stop:
      return body(config, workdir, mesh, stop)
  finally:
    if lock is not None:
      lock.release()


# Each progress line (about every 10 s, and every `train.log_every` steps).
_TRAIN_LINE = ("step {n}/{total}  {values}  {rate_noinv:.2f} steps/s  {images_per_s:.1f} "
               "images/s  ETA {remaining}  (elapsed {elapsed})")


def compiled(what: str, jitted, *args, is_main: bool):
  """`jitted` compiled for `args` now rather than at its first call, so that a stop requested
  meanwhile (minutes for the large models) ends the run before any step, and the first call
  does not pause training; says so on process 0, as it may take a while."""
  if is_main:
    print(f"Compiling {what} ...", flush=True)
  t0 = time.time()
  compiled = jitted.lower(*args).compile()
  if is_main:
    print(f"Compiled {what} in {time.time() - t0:.1f} s", flush=True)
  return compiled


def _train(config, workdir, mesh,
           stop: stopping.StopRequest) -> train_step.TrainState | None:
  """`train_and_evaluate` with the workdir locked and its stop request installed."""
  num_devices = mesh.devices.size
  set_compile_cache(config)
  is_main = jax.process_index() == 0
  workdir_path = epath.Path(workdir)
  global_batch = config.train.batch_size
  num_steps = config.train.num_steps
  cleanup = contextlib.ExitStack()  # what start-up has opened, closed however the run ends
  state, start_step = None, 0

  def stopped_before(stage: str | None) -> bool:
    """Checks the stop request before a start-up stage (None: before the first step), then
    announces the stage."""
    if stop.should_stop(start_step):
      if is_main:
        print(f"Stopped by {stop.reason} before the first step; nothing new to save",
              flush=True)
      return True
    if stage is not None:
      stopping.begin_stage(stage)
    return False

  with cleanup:
    model = build.make_model(config)
    sched = build.make_schedule(config)
    optimizer = build.make_optimizer(config)
    if stopped_before("data"):
      return state
    source = input_pipeline.make_source(config.data)

    if stopped_before("model"):
      return state
    ckpt = checkpoints.Checkpointer(str(workdir_path / "checkpoints"),
                                    keep=config.train.keep_checkpoints)
    cleanup.callback(ckpt.close)
    abstract = train_step.abstract_state(config, model, optimizer, mesh)
    restored, start_step = ckpt.restore_latest(abstract.to_dict())
    if restored is not None:
      state = train_step.TrainState(**restored)
      print(f"Resumed from {ckpt.directory}/{start_step}", flush=True)
    else:
      state = train_step.create_state(config, model, optimizer, mesh)
    if is_main:
      print(f"{num_devices} devices on {jax.process_count()} host(s); global batch "
            f"{global_batch}; {layers.count_params(state.params):,} parameters; "
            f"{len(source):,} training images; steps {start_step} -> {num_steps}", flush=True)
    if start_step >= num_steps:
      return state

    if stopped_before("compile_step"):
      return state
    rng = train_step.train_key(config, mesh)
    p_train_step = compiled(
        "the training step", train_step.make_train_step(config, model, sched, optimizer, mesh),
        state, batch_spec(config, mesh), rng, is_main=is_main)

    sample_fn = None
    if config.train.sample_every:
      if stopped_before("compile_sampler"):
        return state
      sample_fn = compiled(
          f"the sampler of the training grids ({config.sample.num_samples} samples)",
          programs.make_sample_fn(config, model, sched, mesh, **build.sampler_kwargs(config)),
          state.ema_params, *grid_inputs(config, mesh), is_main=is_main)

    if stopped_before(None):
      return state
    cleanup.pop_all()  # from here on, the loop's own `finally` closes the checkpointer
  return steps(config, workdir_path, mesh, stop, state=state, start_step=start_step,
               restored=restored is not None, source=source, ckpt=ckpt,
               p_train_step=p_train_step, rng=rng, sample_fn=sample_fn)


def batch_spec(config, mesh) -> dict:
  """The shapes and shardings of a step's global batch: {'image': uint8 [train.batch_size, H,
  W, C]} (+ 'label' int32 [train.batch_size] for a class-conditional model), split over `data`."""
  size, channels, batch = config.data.image_size, config.data.channels, config.train.batch_size
  spec = {"image": jax.ShapeDtypeStruct((batch, size, size, channels), np.uint8,
                                        sharding=parallel.batch_sharding(mesh))}
  if build.num_classes(config):
    spec["label"] = jax.ShapeDtypeStruct((batch,), np.int32,
                                         sharding=parallel.batch_sharding(mesh))
  return spec


def steps(config, workdir_path, mesh, stop, *, state, start_step, restored, source, ckpt,
          p_train_step, rng, sample_fn, end_step=None, saved_config=None, lr_fn=None,
          t_start=None, label="train"):
  """Steps from `start_step` to `end_step` (default `train.num_steps`) or a stop: logs,
  checkpoints (each with `saved_config`, default `config`), grids; `lr_fn(step)` is the
  learning rate logged (default the config's schedule), `t_start` when the run's time limit
  started (default now). Closes `ckpt`."""
  is_main = jax.process_index() == 0
  global_batch = config.train.batch_size
  num_steps = config.train.num_steps if end_step is None else end_step
  log = outputs.MetricsLog(str(workdir_path), enabled=is_main)
  config_dict = json.loads((config if saved_config is None else saved_config
                            ).to_json_best_effort())
  lr_fn = build.learning_rate_schedule(config) if lr_fn is None else lr_fn

  rows = parallel.host_rows(mesh, global_batch)
  batches = input_pipeline.BatchIterator(
      source, seed=config.seed, start_step=start_step, global_batch=global_batch, rows=rows,
      random_flip=config.data.random_flip, num_workers=config.data.num_workers,
      prefetch=config.data.prefetch, num_classes=build.num_classes(config))
  pending = _Pending()
  last_saved = start_step if restored else None
  t_start = time.time() if t_start is None else t_start
  t_window, steps_window = time.time(), 0
  # time.time (not the default monotonic clock): the time limit is measured with it too.
  progress = progress_lib.Progress(
      label, num_steps, unit="steps", initial=start_step, every_s=10.0,
      time_limit_s=config.train.time_limit_s, line_format=_TRAIN_LINE, clock=time.time)
  profile = contextlib.ExitStack()  # holds the jax.profiler trace while one is recorded
  profile_end = config.train.profile_start + config.train.profile_steps
  step = start_step

  def check_finite_and_log(current_step) -> dict | None:
    """Brings the pending metrics to the host, checks them, logs the last; returns it."""
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
      return None
    now = time.time()
    steps_per_s = steps_window / max(now - t_window, 1e-9)
    t_window, steps_window = now, 0
    s, m = drained[-1]
    log.scalars(s + 1, dict(m, learning_rate=float(lr_fn(s)), steps_per_sec=steps_per_s,
                            images_per_sec=steps_per_s * global_batch))
    return m

  def show_progress(latest, force: bool) -> None:
    """A progress line (or the live bar's values) with the latest metrics when one is due;
    fetched only then, when none are at hand (fetching waits for the steps in flight)."""
    due = force or progress.due(step)
    if not due:
      progress.update(step, due=False)
      return
    if latest is None:
      latest = parallel.fetch(pending.metrics[-1])
    progress.update(step, f"loss {latest['loss']:.4f}  grad_norm {latest['grad_norm']:.3f}",
                    due=True, force=force, images_per_s=progress.rate(step) * global_batch)

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
      latest = None
      log_now = step % config.train.log_every == 0 or last
      if log_now:
        latest = check_finite_and_log(step)
      show_progress(latest, force=log_now)
      ckpt.check_for_errors()  # stops at the first step after a failed background save
      if step % config.train.checkpoint_every == 0 or last:
        check_finite_and_log(step)
        ckpt.save(step, state.to_dict(), config_dict)
        last_saved = step
      if stop_now:
        # No grid: after a preemption notice the grace period is for the checkpoint.
        progress.close()
        if is_main:
          print(f"Stopping at step {step} ({stop.reason}); checkpoint saved", flush=True)
        break
      if sample_fn is not None and (step % config.train.sample_every == 0 or last):
        write_samples(config, sample_fn, state.ema_params, mesh, step, workdir_path, log)
  finally:
    progress.close()
    profile.close()
    batches.close()
    ckpt.close()
    log.close()
  return state


def grid_inputs(config, mesh) -> tuple:
  """The keys (and labels) of the `sample.num_samples` samples of each training grid, padded
  to a multiple of the devices; sample i's key depends only on i, so the grid is the same
  whatever the number of devices (the padding rows are dropped)."""
  padded = parallel.round_up_to_devices(config.sample.num_samples, mesh)
  keys = parallel.sharded_example_keys(config.seed, prng.RunStream.GRID, np.arange(padded), mesh)
  return (keys, *programs.sample_labels(config, np.arange(padded), mesh))


def write_samples(config, sample_fn, ema_params, mesh, step, workdir_path, log) -> np.ndarray:
  """Samples `sample.num_samples` images with the EMA weights; writes samples/grid_<step>.png."""
  n = config.sample.num_samples
  t0 = time.time()
  images = parallel.fetch(sample_fn(ema_params, *grid_inputs(config, mesh)))[:n]
  grid = images_lib.image_grid(images_lib.to_uint8(images),
                               labels=build.default_labels(config, np.arange(n)))
  if jax.process_index() == 0:
    path = workdir_path / "samples" / f"grid_{step}.png"
    outputs.write_atomically(path, images_lib.encode_png(
        grid, upscale=images_lib.grid_upscale(config.data.image_size)))
    log.image(step, "samples/ema", grid)
    log.flush()
    progress_lib.write(f"Wrote {path} ({n} EMA samples in {time.time() - t0:.1f} s)")
  return images
