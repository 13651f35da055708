"""Progressive distillation (Salimans & Ho 2022, Algorithm 2): a student that samples in a few
steps of deterministic DDIM, trained to take one step where its teacher took two.

`--mode distill` reads the teacher from `distill.teacher` (a workdir), starts the student from it
and runs rounds r = 0, 1, ...: round r trains on the grid of N_r = distill.start_steps / 2^r
steps uniform in continuous time (`samplers.ddim_continuous`), with the previous round's student
as its teacher, until N_r = distill.end_steps. Each example of a step draws a grid time u = i/N
(i in 1 .. N) and its noise, and the teacher's two DDIM steps from z_u = alpha_u x + sigma_u eps
to u - 1/2N and u - 1/N (unclipped, in float32 whatever the compute dtype) give z_s; the target
is the x_0 from which one student step would land on z_s,

    x~ = (z_s - (sigma_s / sigma_u) z_u) / (alpha_s - (sigma_s / sigma_u) alpha_u),

and the loss is the student's x_0 error weighted by max(SNR_u, 1) ("truncated SNR"). Each round
has a fresh optimizer state and a learning rate decayed linearly from distill.lr to 0.

The run is training's: the same data, batch split, per-example keys (folded with the step and
the row, so 1 device and 8 give the same numbers), checkpoints (the state holds the round's
teacher, so a run resumes mid-round exactly), stop requests and workdir lock. Every checkpoint
saves the config its student samples with (sample.sampler 'ddim_continuous', sample.num_steps
N_r), so `--mode sample` and `Sampler` need no flags; each round's last checkpoint is kept.
"""
from __future__ import annotations

import copy
import functools
import json
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from diffusion_jax.config import build
from diffusion_jax.config import checks as config_checks
from diffusion_jax.config import config_lib
from diffusion_jax.config import programs
from diffusion_jax.core import diffusion
from diffusion_jax.core import prng
from diffusion_jax.data import images
from diffusion_jax.data import input_pipeline
from diffusion_jax import parallel
from diffusion_jax import samplers
from diffusion_jax.samplers import continuous
from diffusion_jax.samplers import ddim_continuous
from diffusion_jax.training import checkpoints
from diffusion_jax.training import loop
from diffusion_jax.training import step as step_lib
from diffusion_jax.utils import outputs

SAMPLER = ddim_continuous.NAME
# What the student may set differently from its teacher: compute, not the function.
_MODEL_FREE = ("dropout", "dtype", "remat")
# The diffusion fields that define the function the teacher learned.
_DIFFUSION_SAME = ("beta_schedule", "beta_start", "beta_end", "num_timesteps", "mean_type",
                   "var_type", "rescale_timesteps")
_DATA_SAME = ("image_size", "channels")
_EPS_WARNING = ("the teacher predicts the noise (diffusion.mean_type='eps'): Salimans & Ho found "
                "eps students unstable at few steps (their x_0 follows from eps / sqrt(SNR), "
                "which blows up at low SNR); v or x_0 teachers are what the paper distils")


@flax.struct.dataclass
class DistillState:
  """A training state plus the round's teacher parameters (frozen; saved so a round resumes
  exactly). `loss_history` is always None (timesteps come from the grid)."""
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  teacher: Any
  loss_history: Any = None

  def to_dict(self) -> dict[str, Any]:
    return dict(step=self.step, params=self.params, ema_params=self.ema_params,
                opt_state=self.opt_state, teacher=self.teacher)


# ----------------------------------------------------------------------------------------------
# The rounds.

def round_steps(start_steps: int, end_steps: int) -> list[int]:
  """The students' step counts, round by round: start_steps halved down to end_steps."""
  chain = [start_steps]
  while chain[-1] % 2 == 0:
    chain.append(chain[-1] // 2)
  if end_steps not in chain:
    reachable = ", ".join(map(str, chain))
    raise ValueError(f"distill.end_steps={end_steps} is not reached by halving "
                     f"distill.start_steps={start_steps} (which gives {reachable}): set "
                     f"--config.distill.end_steps to one of these, or distill.start_steps to "
                     f"{end_steps} times a power of 2")
  return chain[:chain.index(end_steps) + 1]


def round_of(step: int, steps_per_round: int) -> int:
  """The round that global step `step` (0-based, the update about to be made) belongs to."""
  return step // steps_per_round


def student_config(config: ml_collections.ConfigDict, num_steps: int) -> ml_collections.ConfigDict:
  """`config` as a student of `num_steps` steps samples: sample.sampler 'ddim_continuous' with
  sample.num_steps, the rest of the sample section at its defaults (saved with its
  checkpoints)."""
  out = copy.deepcopy(config)
  with out.unlocked():
    for name, value in samplers.default_settings().items():
      out.sample[name] = value
    out.sample.sampler = SAMPLER
    out.sample.num_steps = num_steps
  return out


# ----------------------------------------------------------------------------------------------
# Checks before anything compiles.

def _normal(value):
  return json.loads(json.dumps(value.to_dict() if isinstance(value, ml_collections.ConfigDict)
                               else value))


def teacher_problems(config, teacher_config) -> list[str]:
  """Why `teacher_config` (the teacher's saved config) cannot teach a student of `config`:
  another network, schedule or output type, images of another size, an xprev teacher."""
  out = []
  pairs = ([("model", n) for n in config.model if n not in _MODEL_FREE] +
           [("diffusion", n) for n in _DIFFUSION_SAME] + [("data", n) for n in _DATA_SAME])
  for section, name in pairs:
    mine = _normal(config[section].get(name))
    theirs = _normal(teacher_config[section].get(name)) if section in teacher_config else None
    if mine != theirs:
      out.append(f"{section}.{name}={mine!r}, but the teacher ({config.distill.teacher}) has "
                 f"{theirs!r}: the student is the teacher's network on the teacher's schedule; "
                 f"set --config.{section}.{name}={theirs!r}")
  mean_type = teacher_config["diffusion"]["mean_type"]
  if mean_type == "xprev":
    out.append("the teacher predicts x_(t-1) (diffusion.mean_type='xprev'), which gives no x_0 "
               "and noise between its trained steps: distil a model of 'eps', 'xstart' or 'v'")
  return out


def problems(config) -> list[str]:
  """What --mode distill cannot do with `config` beyond each field's rule: no teacher, a
  teacher it cannot read or use, step counts not reached by halving or finer than T."""
  d = config.distill
  out = []
  try:
    round_steps(d.start_steps, d.end_steps)
  except ValueError as e:
    out.append(str(e))
  num_timesteps = config.diffusion.num_timesteps
  if 2 * d.start_steps > num_timesteps:
    out.append(f"distill.start_steps={d.start_steps}: the first teacher takes twice as many "
               f"steps, {2 * d.start_steps}, more than the T = {num_timesteps} trained steps: "
               f"set --config.distill.start_steps to at most {num_timesteps // 2}")
  if not d.teacher:
    return out + ["distill.teacher is not set: give the workdir of the model to distil, "
                  "--config.distill.teacher=DIR"]
  try:
    teacher = read_teacher_config(config)
  except (FileNotFoundError, ValueError) as e:
    return out + [f"distill.teacher={d.teacher!r}: {e}"]
  return out + teacher_problems(config, teacher)


def read_teacher_config(config) -> ml_collections.ConfigDict:
  """The config saved with the teacher's checkpoint (in today's layout)."""
  directory = outputs.resolve(config.distill.teacher) / "checkpoints"
  step = checkpoints.select_step(directory, config.distill.teacher_step or None)
  return config_lib.upgrade(checkpoints.read_config(directory, step))[0]


def check(config, num_devices: int) -> None:
  """Raises ConfigError with every problem of a distillation run on `num_devices` devices."""
  config_checks.check_training(config, num_devices, mode="distill", more=(problems,))


# ----------------------------------------------------------------------------------------------
# One step.

def grid_tables(sched, num_steps: int) -> dict[str, np.ndarray]:
  """alpha, sigma and the label at the 2N + 1 times j / 2N of the teacher's grid (float64)."""
  vp = continuous.discrete_vp(sched)
  alpha, sigma, labels = ddim_continuous.levels(vp, ddim_continuous.times(2 * num_steps))
  return dict(alpha=alpha, sigma=sigma, label=labels)


def target(teacher_fn, sched, z, i, tables, *, mean_type: str, var_type: str):
  """Algorithm 2's x_0 target of examples at grid times u = i / N.

  Args:
    teacher_fn: the teacher network, teacher_fn(x, labels [B] float) -> output.
    sched: the schedule.
    z: z_u [B, ...] (float32 or float64).
    i: int [B] in 1 .. N.
    tables: `grid_tables(sched, N)` (as arrays of z's dtype; they hold the grid).
    mean_type, var_type: the teacher's output types.

  Returns:
    (x~ [B, ...], z_s [B, ...] the teacher's two-step result at u - 1/N).
  """
  at = lambda j, name: diffusion.extract(tables[name], j, z.shape)
  z_mid = z
  for j in (2 * i, 2 * i - 1):
    x0, eps = ddim_continuous.predict(teacher_fn, sched, z_mid, tables["label"][j],
                                      tables["alpha"][j], tables["sigma"][j],
                                      mean_type=mean_type, var_type=var_type)
    z_mid = ddim_continuous.step(x0, eps, at(j - 1, "alpha"), at(j - 1, "sigma"))
  z_s = z_mid
  t, s = 2 * i, 2 * i - 2
  ratio = at(s, "sigma") / at(t, "sigma")
  x_target = (z_s - ratio * z) / (at(s, "alpha") - ratio * at(t, "alpha"))
  return x_target, z_s


def distill_loss(params, batch, keys_B, state, *, model, teacher_model, sched, tables,
                 num_steps: int, mean_type: str, var_type: str, p_uncond: float = 0.0):
  """The mean truncated-SNR-weighted x_0 loss of a batch (`step.loss_fn`'s contract).

  Args:
    params: the student's parameters.
    batch: {'image': uint8 [B, H, W, C]} (+ 'label' int32 [B]).
    keys_B: one key per example (the grid time from its TIMESTEP stream, the noise from NOISE,
      dropout and label dropping as training's).
    state: the `DistillState` (its `teacher` parameters).
    model, teacher_model: the student's module and the teacher's (float32 compute).
    sched: the schedule; tables: `grid_tables` as float32 arrays; num_steps: N.
    mean_type, var_type: the output types; p_uncond: a guided model's label dropout (the same
      labels go to teacher and student).
  """
  x = images.to_float(batch["image"])
  i = jax.vmap(lambda k: jax.random.randint(k, (), 1, num_steps + 1))(
      prng.fold_in_each(keys_B, prng.ExampleStream.TIMESTEP))
  noise = prng.normal_each(prng.fold_in_each(keys_B, prng.ExampleStream.NOISE), x.shape[1:])
  labels_B = batch.get("label")
  if p_uncond > 0:
    labels_B = step_lib.drop_labels(labels_B, keys_B, p_uncond, model.num_classes)
  label_kw = build.label_kwargs(labels_B)
  student_kw = dict(label_kw)
  if model.dropout > 0:
    student_kw["dropout_keys_B"] = prng.fold_in_each(keys_B, prng.ExampleStream.DROPOUT)
  # The example's grid time u = i / N is entry 2i of the teacher's grid of 2N.
  alpha_B, sigma_B, label_B = (tables[name][2 * i] for name in ("alpha", "sigma", "label"))
  z = (diffusion.extract(tables["alpha"], 2 * i, x.shape) * x
       + diffusion.extract(tables["sigma"], 2 * i, x.shape) * noise)

  def teacher_fn(x_, t_):
    return teacher_model.apply({"params": state.teacher}, x_, t_, train=False, **label_kw)

  def student_fn(x_, t_):
    return model.apply({"params": params}, x_, t_, train=True, **student_kw)

  x_target, _ = target(teacher_fn, sched, z, i, tables, mean_type=mean_type, var_type=var_type)
  x_target = jax.lax.stop_gradient(x_target)
  x0, _ = ddim_continuous.predict(student_fn, sched, z, label_B, alpha_B, sigma_B,
                                  mean_type=mean_type, var_type=var_type)
  x_mse = jnp.mean(jnp.square(x0.astype(jnp.float32) - x_target), axis=tuple(range(1, x.ndim)))
  snr = jnp.square(alpha_B / sigma_B)
  losses = jnp.maximum(snr, 1.0) * x_mse
  aux = dict(t=i, losses=jax.lax.stop_gradient(losses),
             terms=dict(x_mse=jax.lax.stop_gradient(jnp.mean(x_mse))))
  return jnp.mean(losses), aux


def round_schedule(config) -> optax.Schedule:
  """A round's learning rate: distill.lr decayed linearly to 0 over distill.steps_per_round."""
  d = config.distill
  return optax.linear_schedule(d.lr, 0.0, d.steps_per_round)


def make_step(config, model, teacher_model, sched, optimizer, mesh, num_steps: int):
  """One distillation update over the mesh for students of `num_steps` steps, jitted with the
  state donated: f(state, batch, key) -> (state, metrics)."""
  tables = {k: jnp.asarray(v, jnp.float32) for k, v in grid_tables(sched, num_steps).items()}
  loss = functools.partial(
      distill_loss, model=model, teacher_model=teacher_model, sched=sched, tables=tables,
      num_steps=num_steps, mean_type=config.diffusion.mean_type,
      var_type=config.diffusion.var_type, p_uncond=float(config.model.p_uncond))
  step = functools.partial(step_lib.train_step, loss=loss, optimizer=optimizer,
                           ema_decay=config.distill.ema_decay, term_names=("x_mse",),
                           grad_accum_steps=config.optim.grad_accum_steps)
  return step_lib.over_mesh(step, mesh)


def new_round(state: DistillState, optimizer, mesh) -> DistillState:
  """The state at a round's start: teacher, student and its EMA all the previous round's
  student (its EMA weights), a fresh optimizer state."""
  start = state.ema_params
  fresh = jax.jit(optimizer.init, out_shardings=parallel.replicated_sharding(mesh))(start)
  # Three buffers: the step donates the state, and a buffer cannot be donated twice.
  copy_of = lambda tree: jax.tree_util.tree_map(lambda x: x.copy(), tree)
  return DistillState(step=state.step, params=copy_of(start), ema_params=copy_of(start),
                      opt_state=fresh, teacher=start)


# ----------------------------------------------------------------------------------------------
# The run.

def run(config: ml_collections.ConfigDict, workdir: str, devices=None) -> DistillState | None:
  """--mode distill: every round from the first not finished in WORKDIR/checkpoints.

  Returns:
    the last state (None when stopped before one existed).

  Raises:
    ConfigError: before anything compiles (`check`).
  """
  return loop.run_in_workdir(config, workdir, _distill, devices=devices, check=check)


def _distill(config, workdir, mesh, stop) -> DistillState | None:
  loop.set_compile_cache(config)
  is_main = jax.process_index() == 0
  d = config.distill
  counts = round_steps(d.start_steps, d.end_steps)
  per_round = d.steps_per_round
  total = per_round * len(counts)
  if is_main and config.diffusion.mean_type == "eps":
    print(f"Warning: {_EPS_WARNING}", flush=True)
  model = build.make_model(config)
  teacher_model = build.make_model(_float32(config))
  sched = build.make_schedule(config)
  schedule = round_schedule(config)
  optimizer = build.make_optimizer(config, schedule)
  source = input_pipeline.make_source(config.data)
  # Each round's last checkpoint is kept; `loop.steps` closes the one it is given.
  checkpointer = lambda: checkpoints.Checkpointer(
      f"{workdir}/checkpoints", keep=config.train.keep_checkpoints, keep_period=per_round)
  ckpt = checkpointer()
  try:
    abstract = _abstract_state(config, model, optimizer, mesh)
    restored, step = ckpt.restore_latest(abstract.to_dict())
    if restored is not None:
      state = DistillState(**restored)
      print(f"Resumed from {ckpt.directory}/{step}", flush=True)
    else:
      state, step = _from_teacher(config, optimizer, mesh), 0
  except BaseException:
    ckpt.close()
    raise
  ckpt.close()
  if is_main:
    print(f"Distilling {config.distill.teacher} in {len(counts)} rounds of {per_round} steps "
          f"(students of {', '.join(map(str, counts))} steps); step {step} of {total}",
          flush=True)
  rng = parallel.replicated_key(prng.run_key(config.seed, prng.RunStream.DISTILL), mesh)
  batch_spec = loop.batch_spec(config, mesh)
  t_start = time.time()
  while step < total:
    r = round_of(step, per_round)
    if step % per_round == 0 and step > 0:
      state = new_round(state, optimizer, mesh)
    num_steps = counts[r]
    saved = student_config(config, num_steps)
    if is_main:
      print(f"Round {r + 1} of {len(counts)}: {2 * num_steps} teacher steps -> {num_steps}",
            flush=True)
    p_step = loop.compiled(f"the distillation step ({num_steps} steps)",
                           make_step(config, model, teacher_model, sched, optimizer, mesh,
                                     num_steps), state, batch_spec, rng, is_main=is_main)
    sample_fn = None
    if config.train.sample_every:
      sample_fn = loop.compiled(
          f"the sampler of the grids ({num_steps} steps)",
          programs.make_sample_fn(saved, model, sched, mesh, **build.sampler_kwargs(saved)),
          state.ema_params, *loop.grid_inputs(saved, mesh), is_main=is_main)
    end = (r + 1) * per_round
    state = loop.steps(
        config, outputs.resolve(workdir), mesh, stop, state=state, start_step=step,
        restored=step > 0, source=source, ckpt=checkpointer(), p_train_step=p_step, rng=rng,
        sample_fn=sample_fn, end_step=end, saved_config=saved,
        lr_fn=lambda s: float(schedule(s % per_round)), t_start=t_start,
        label=f"distill {num_steps}")
    step = int(jax.device_get(state.step))
    if step < end:  # stopped
      break
  return state


def _abstract_state(config, model, optimizer, mesh) -> DistillState:
  train = step_lib.abstract_state(config, model, optimizer, mesh)
  return DistillState(step=train.step, params=train.params, ema_params=train.ema_params,
                      opt_state=train.opt_state, teacher=train.params)


def _from_teacher(config, optimizer, mesh) -> DistillState:
  """Round 0's state: the teacher's EMA weights as teacher and student, a fresh optimizer."""
  directory = outputs.resolve(config.distill.teacher) / "checkpoints"
  params, got = checkpoints.restore_params(str(directory), config.distill.teacher_step or None)
  if jax.process_index() == 0:
    print(f"Teacher: the EMA parameters of step {got} from {directory}", flush=True)
  params = parallel.replicate(params, mesh)
  return new_round(DistillState(step=parallel.replicate(np.zeros((), np.int32), mesh),
                                params=params, ema_params=params, opt_state=None,
                                teacher=params), optimizer, mesh)


def _float32(config) -> ml_collections.ConfigDict:
  """`config` with the network computing in float32 (the teacher's targets)."""
  out = copy.deepcopy(config)
  with out.unlocked():
    out.model.dtype = "float32"
  return out
