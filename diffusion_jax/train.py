"""DDPM training on every device of every host: state, step, loop.

The step is one pure per-device function, `train_step`, mapped over the 1-D `data` mesh with
`jax.shard_map`, compiled once with the state donated. Every random number of an example (its
timestep, its noise, its dropout masks) comes from the run's key folded with the step and then
with the example's row in the global batch, so 1 device and 8 compute the same losses.

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

import dataclasses
import json
import math
import os
import signal
import sys
import time

import jax
import ml_collections
import numpy as np
from etils import epath

from diffusion_jax import checkpoints
from diffusion_jax import config_checks
from diffusion_jax import diffusion
from diffusion_jax import input_pipeline
from diffusion_jax import parallel
from diffusion_jax import workdir_lock
from diffusion_jax.progress import format_duration
from diffusion_jax.models import unet
# The pure step pieces live in train_step.py (importable without TensorFlow); re-exported here.
from diffusion_jax.train_step import (  # pylint: disable=unused-import
    DTYPES, TrainState, _DROPOUT_STREAM, _NOISE_STREAM, _T_STREAM, abstract_state,
    create_state, diffusion_kwargs, example_keys, init_state, learning_rate_schedule, loss_fn,
    make_model, make_optimizer, make_sample_fn, make_schedule, make_train_step, train_rng,
    train_step)

# Folded into key(seed) for the in-training sample grids (2 is the training steps' key,
# `train_rng`; evaluate.py uses 11-14).
_GRID_STREAM = 3


# ----------------------------------------------------------------------------------------------
# Checks before anything compiles.

def validate_config(config: ml_collections.ConfigDict, num_devices: int,
                    workdir: str | None = None) -> None:
  """Raises ConfigError (a ValueError) or PermissionError with what to change, before anything
  compiles: every number's type and range (`config_checks.RULES`), then the dataset, the
  diffusion types, the U-Net's geometry and the batch split, each problem reported at once."""
  config_checks.check(config, mode="train")
  problems = []

  def collect(check, *args, **kwargs):
    try:
      check(*args, **kwargs)
    except ValueError as e:
      problems.append(str(e))

  collect(input_pipeline.check_data_config, config.data)
  collect(diffusion.check_types, **diffusion_kwargs(config))
  if config.model.dtype not in DTYPES:
    problems.append(f"model.dtype {config.model.dtype!r} is not one of {tuple(DTYPES)}: set "
                    f"--config.model.dtype={' or '.join(DTYPES)}")
  collect(_check_unet, config)
  collect(parallel.check_batch_size, config.train.batch_size, num_devices,
          config.optim.grad_accum_steps)
  config_checks.raise_if_any(problems)
  if workdir is not None:
    check_workdir(workdir)


def _check_unet(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError unless the config's U-Net fits its image size."""
  unet.check_config(image_size=config.data.image_size, ch_mult=tuple(config.model.ch_mult),
                    attn_resolutions=tuple(config.model.attn_resolutions),
                    block_size=config.model.block_size, ch=config.model.ch)


def check_workdir(workdir: str) -> None:
  """Raises PermissionError unless a file can be created in `workdir` (made if missing)."""
  path = epath.Path(workdir)
  probe = path / f".write_test_{os.getpid()}"
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe.write_text("ok")
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except
    raise PermissionError(f"cannot write to --workdir {workdir!r} ({type(e).__name__}: {e}); "
                          f"pass a directory you can write to") from e



# ----------------------------------------------------------------------------------------------
# Output: console, TensorBoard, metrics.jsonl, PNG grids.

def image_grid(images_NxHxWxC: np.ndarray, pad: int = 2, cols: int | None = None) -> np.ndarray:
  """uint8 images -> one uint8 grid image, `pad` black pixels apart, filled row by row.

  `cols` images per row; by default as square as possible.
  """
  n, h, w, c = images_NxHxWxC.shape
  cols = int(math.ceil(math.sqrt(n))) if cols is None else cols
  rows = int(math.ceil(n / cols))
  grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.uint8)
  for i, image in enumerate(images_NxHxWxC):
    r, col = divmod(i, cols)
    top, left = pad + r * (h + pad), pad + col * (w + pad)
    grid[top:top + h, left:left + w] = image
  return grid


def to_uint8(images) -> np.ndarray:
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(
      np.uint8)


def save_png(image_HxWxC: np.ndarray, path: epath.Path, upscale: int = 1) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  pil = Image.fromarray(image_HxWxC[..., 0] if image_HxWxC.shape[-1] == 1 else image_HxWxC)
  if upscale > 1:
    pil = pil.resize((pil.width * upscale, pil.height * upscale), Image.Resampling.NEAREST)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("wb") as f:
    pil.save(f, format="PNG")


class _EventWriter:
  """TensorBoard scalars and images written with the `tensorboard` package alone.

  Used when clu's writer is unavailable (clu.metric_writers imports TensorFlow).
  """

  def __init__(self, logdir: str):
    from tensorboard.summary.writer import event_file_writer  # pylint: disable=g-import-not-at-top
    epath.Path(logdir).mkdir(parents=True, exist_ok=True)
    self._writer = event_file_writer.EventFileWriter(logdir)

  def _add(self, step, values):
    from tensorboard.compat.proto import event_pb2, summary_pb2  # pylint: disable=g-import-not-at-top
    self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                           summary=summary_pb2.Summary(value=values)))

  def write_scalars(self, step, scalars):
    from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top
    self._add(step, [summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                     for k, v in scalars.items()])

  def write_images(self, step, images):
    import io  # pylint: disable=g-import-not-at-top
    from PIL import Image  # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top
    values = []
    for tag, image in images.items():
      image = np.asarray(image)
      if image.ndim == 4:
        image = image[0]
      buf = io.BytesIO()
      Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
      values.append(summary_pb2.Summary.Value(tag=tag, image=summary_pb2.Summary.Image(
          height=image.shape[0], width=image.shape[1], colorspace=image.shape[-1],
          encoded_image_string=buf.getvalue())))
    self._add(step, values)

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


class MetricsLog:
  """TensorBoard (clu when it can be imported) plus WORKDIR/metrics.jsonl; process 0 only."""

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    self._writer = None
    if not enabled:
      return
    logdir = str(epath.Path(workdir) / "tensorboard")
    try:
      from clu import metric_writers  # pylint: disable=g-import-not-at-top
      self._writer = metric_writers.SummaryWriter(logdir)
    except ImportError:
      self._writer = _EventWriter(logdir)
    self._jsonl = epath.Path(workdir) / "metrics.jsonl"

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._writer.write_scalars(step, values)
    with self._jsonl.open("a") as f:
      f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in values.items()}}) + "\n")

  def image(self, step: int, tag: str, image_HxWxC: np.ndarray) -> None:
    if self.enabled:
      self._writer.write_images(step, {tag: image_HxWxC[None]})

  def flush(self) -> None:
    if self.enabled:
      self._writer.flush()

  def close(self) -> None:
    if self.enabled:
      self._writer.close()


# ----------------------------------------------------------------------------------------------
# The loop.

class _StopRequest:
  """Turns SIGTERM and SIGINT (Ctrl-C) into a request to stop after the current step, agreed on
  by every process; a second SIGINT aborts at once, as users expect of Ctrl-C.

  In a multi-process run it also watches the other processes (`parallel.PeerWatchdog`): when
  one is lost, this process prints which one and the last checkpoint, and exits with status
  `parallel.LOST_PROCESS_EXIT_CODE` rather than wait in a collective for the runtime's abort.

  Args:
    config: the training config (the `train.heartbeat_every_s` and
      `train.lost_process_timeout_s` of the watchdog); None: no watchdog.
    checkpoint_dir: where the run's checkpoints go, named when a process is lost.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, config: ml_collections.ConfigDict | None = None,
               checkpoint_dir: epath.Path | None = None):
    self.signal_name: str | None = None  # the first signal this process received
    self._agreed_reason: str | None = None
    self._previous = {}
    self._checkpoint_dir = checkpoint_dir
    self._watchdog = None
    if config is not None:
      self._watchdog = parallel.PeerWatchdog(
          timeout_s=config.train.lost_process_timeout_s,
          every_s=config.train.heartbeat_every_s, on_lost=self._lost)

  @property
  def requested(self) -> bool:
    return self.signal_name is not None

  @property
  def reason(self) -> str:
    """Why the run stops: this process's signal, the time limit, preemption or another's."""
    return self.signal_name or self._agreed_reason or "a stop request to another process"

  def __enter__(self):
    for signum in self.SIGNALS:
      try:
        previous = signal.signal(signum, self._handle)
      except ValueError:  # not the main thread (e.g. some notebook kernels): no handler.
        continue
      if previous is signal.SIG_IGN:  # e.g. SIGINT of a background job: keep ignoring it
        signal.signal(signum, previous)
        continue
      self._previous[signum] = signal.SIG_DFL if previous is None else previous
    if self._watchdog is not None:
      self._watchdog.start()
    return self

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    self.signal_name = self.signal_name or name
    again = ""
    if signum == signal.SIGINT:
      signal.signal(signum, self._previous[signum])  # the next Ctrl-C is not caught here
      again = "; press Ctrl-C again to abort without saving"
    # os.write, not print: the handler may run in the middle of a print to the same stream.
    os.write(2, f"{name} received: stopping before the next step{again}\n".encode())

  def _lost(self, process_index: int, why: str) -> None:
    """Ends this process: another one of the run is gone (runs in the watchdog thread)."""
    where = "there is no complete checkpoint yet (a restart begins at step 0)"
    if self._checkpoint_dir is not None:
      try:
        steps = checkpoints.complete_steps(self._checkpoint_dir)
      except Exception:  # pylint: disable=broad-except  # e.g. storage unreachable
        steps = None
      if steps is None:
        where = f"could not list {self._checkpoint_dir}"
      elif steps:
        where = (f"the last checkpoint is step {max(steps)}, "
                 f"{self._checkpoint_dir / str(max(steps))}")
    code = parallel.LOST_PROCESS_EXIT_CODE
    message = (f"error: process {process_index} of {jax.process_count()} is lost ({why}); "
               f"{where}. Process {jax.process_index()} exits with status {code}: start "
               f"every process of the run again to resume (launch/supervise.sh does)\n")
    # os.write, not print: the main thread may hold the stream's lock, stuck in a collective.
    os.write(2, message.encode())
    os._exit(code)

  def __exit__(self, exc_type, *exc):
    if self._watchdog is not None:
      if exc_type is not None and exc_type is not KeyboardInterrupt:
        # An error may come from a collective with a lost process: wait for the watchdog's
        # word, so that it is reported as such (and the runtime's abort does not come first).
        self._watchdog.confirm_peers()
      self._watchdog.close(failed=exc_type is not None)
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}

  def should_stop(self, step: int, *, over_time: bool = False, every: int = 1) -> bool:
    """Whether every process stops after `step`; the same answer on each of them.

    Args:
      step: the number of steps done.
      over_time: this process's clock says the time limit has passed.
      every: with several processes, agree (one collective, which waits for the steps
        dispatched so far) only when `step` is a multiple of this; a preemption notice is
        agreed on at every step without a collective.

    Returns:
      True if any process received SIGTERM/SIGINT or saw the time limit pass (as of the last
      agreement), or the runtime's preemption notice falls on this step.
    """
    if jax.process_count() == 1:
      if over_time and not self.requested:
        self._agreed_reason = "time limit"
      return self.requested or over_time
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    try:
      if multihost_utils.reached_preemption_sync_point(step):
        self._agreed_reason = "preemption notice"
        return True
    except Exception:  # pylint: disable=broad-except  # no preemption service
      pass
    if step % every:
      return False
    # Every process must agree: stop when any of them was asked to or is over time.
    flags = multihost_utils.process_allgather(np.asarray([self.requested, over_time]))
    requested, over = np.asarray(flags).reshape(-1, 2).any(axis=0)
    if over and not self.requested:
      self._agreed_reason = "time limit"
    return bool(requested or over)


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
                       devices=None) -> TrainState:
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
  validate_config(config, mesh.devices.size, workdir)  # before the watchdog starts, too
  lock = workdir_lock.hold_for_run(workdir, is_main=jax.process_index() == 0,
                                   multi_process=jax.process_count() > 1)
  try:
    with _StopRequest(config, epath.Path(workdir) / "checkpoints") as stop:
      return _train(config, workdir, mesh, stop)
  finally:
    if lock is not None:
      lock.release()


def _train(config, workdir, mesh, stop: _StopRequest) -> TrainState:
  """`train_and_evaluate` with the workdir locked and its stop request installed."""
  num_devices = mesh.devices.size
  _set_compile_cache(config)
  is_main = jax.process_index() == 0
  workdir_path = epath.Path(workdir)
  global_batch = config.train.batch_size
  num_steps = config.train.num_steps

  model = make_model(config)
  sched = make_schedule(config)
  optimizer = make_optimizer(config)
  source = input_pipeline.make_source(config.data)
  ckpt = checkpoints.Checkpointer(str(workdir_path / "checkpoints"),
                                  keep=config.train.keep_checkpoints)

  abstract = abstract_state(config, model, optimizer, mesh)
  restored, start_step = ckpt.restore_latest(abstract.to_dict())
  if restored is not None:
    state = TrainState(**restored)
    print(f"Resumed from {ckpt.directory}/{start_step}", flush=True)
  else:
    state = create_state(config, model, optimizer, mesh)
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
  rng = parallel.replicate(train_rng(config), mesh)
  p_train_step = make_train_step(config, model, sched, optimizer, mesh)
  if start_step < num_steps:
    # Compiled now rather than on the first call, so that a stop requested while it compiles
    # (minutes for the large models) ends the run before any step.
    size, channels = config.data.image_size, config.data.channels
    images_spec = jax.ShapeDtypeStruct((global_batch, size, size, channels), np.uint8,
                                       sharding=parallel.batch_sharding(mesh))
    p_train_step = p_train_step.lower(state, images_spec, rng).compile()
    if stopped_before_training():
      return state
  sample_fn = make_sample_fn(config, model, sched, mesh) if config.train.sample_every else None
  log = MetricsLog(workdir, enabled=is_main)
  config_dict = json.loads(config.to_json_best_effort())
  lr_fn = learning_rate_schedule(config)

  rows = parallel.host_rows(mesh, global_batch)
  batches = input_pipeline.BatchIterator(
      source, seed=config.seed, start_step=start_step, global_batch=global_batch, rows=rows,
      random_flip=config.data.random_flip, num_workers=config.data.num_workers,
      prefetch=config.data.prefetch)
  pending = _Pending()
  last_saved = start_step if restored is not None else None
  t_start = time.time()
  t_window, steps_window = time.time(), 0
  profiling = False
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
        jax.profiler.start_trace(str(workdir_path / "profile"))
        profiling = True
      batch_step, local = next(batches)
      assert batch_step == step, (batch_step, step)
      images = parallel.global_batch(local, mesh, global_batch)
      state, metrics = p_train_step(state, images, rng)
      pending.add(step, metrics)
      step += 1
      steps_window += 1
      if profiling and step >= config.train.profile_start + config.train.profile_steps:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        profiling = False

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
    if profiling:
      jax.profiler.stop_trace()
    batches.close()
    ckpt.close()
    log.close()
  return state


def write_samples(config, sample_fn, ema_params, mesh, step, workdir_path, log) -> np.ndarray:
  """Samples `sample.num_samples` images with the EMA weights; writes samples/grid_<step>.png."""
  num_devices = mesh.devices.size
  n = config.sample.num_samples
  padded = -(-n // num_devices) * num_devices
  # Sample i's key depends only on i, as in `--mode sample`: the grid is the same whatever the
  # number of devices (the padding rows are dropped).
  keys = parallel.sharded_index_keys(config.seed, _GRID_STREAM, np.arange(padded), mesh)
  t0 = time.time()
  images = parallel.fetch(sample_fn(ema_params, keys))[:n]
  grid = image_grid(to_uint8(images))
  if jax.process_index() == 0:
    upscale = max(1, 128 // config.data.image_size)
    save_png(grid, workdir_path / "samples" / f"grid_{step}.png", upscale=upscale)
    log.image(step, "samples/ema", grid)
    log.flush()
    print(f"Wrote {workdir_path / 'samples' / f'grid_{step}.png'} ({n} EMA samples in "
          f"{time.time() - t0:.1f} s)", flush=True)
  return images


def summary(config: ml_collections.ConfigDict) -> str:
  """The U-Net's parameter table (no compile); ends with `total params: N`."""
  config_checks.check(config, mode="summary")
  try:
    _check_unet(config)
  except ValueError as e:
    raise config_checks.ConfigError(str(e)) from e
  return unet.summary(make_model(config), config.data.image_size, config.data.channels)
