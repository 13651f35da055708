"""The pure pieces of a DDPM training step: model, schedule, optimizer, state, step, sampler.

Imports only jax, flax, optax, ml_collections, numpy and the package's math modules (no
TensorFlow, no data pipeline, no checkpointing), so benchmarks and other drivers can build the
exact step that `train.py` runs on a machine with nothing but the JAX stack installed.

The step is one pure per-device function, `train_step`, mapped over the 1-D `data` mesh with
`jax.shard_map`, compiled once with the state donated. Every random number of an example (its
timestep, its noise, its dropout masks) comes from the run's key folded with the step and then
with the example's row in the global batch, so 1 device and 8 compute the same losses.
"""
from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from diffusion_jax import diffusion
from diffusion_jax import parallel
from diffusion_jax import sampling
from diffusion_jax import schedules
from diffusion_jax.models import unet

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Streams folded into each example's key.
_T_STREAM, _NOISE_STREAM, _DROPOUT_STREAM = 0, 1, 2


@flax.struct.dataclass
class TrainState:
  """Everything a step changes. `step` counts completed updates (int32 scalar)."""
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any

  def to_dict(self) -> dict[str, Any]:
    return dict(step=self.step, params=self.params, ema_params=self.ema_params,
                opt_state=self.opt_state)


# ----------------------------------------------------------------------------------------------
# Building blocks from the config.

def make_model(config: ml_collections.ConfigDict) -> unet.UNet:
  """The U-Net the config describes (2C outputs for a learned variance)."""
  m = config.model
  channels = config.data.channels
  out_ch = 2 * channels if config.diffusion.var_type == "learned" else channels
  return unet.UNet(ch=m.ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
                   attn_resolutions=tuple(m.attn_resolutions), dropout=m.dropout,
                   out_ch=out_ch, dtype=DTYPES[m.dtype], remat=m.remat,
                   block_size=m.block_size)


def make_schedule(config: ml_collections.ConfigDict) -> schedules.Schedule:
  d = config.diffusion
  betas = schedules.get_beta_schedule(d.beta_schedule, beta_start=d.beta_start,
                                      beta_end=d.beta_end,
                                      num_diffusion_timesteps=d.num_timesteps)
  return schedules.Schedule.from_betas(betas)


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 to `optim.lr` over `optim.warmup_steps`, then constant."""
  o = config.optim
  if o.warmup_steps <= 0:
    return optax.constant_schedule(o.lr)
  return optax.linear_schedule(0.0, o.lr, o.warmup_steps)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam with warmup, after clipping the mean gradient's global norm."""
  o = config.optim
  adam = optax.adam(learning_rate_schedule(config), b1=o.b1, b2=o.b2, eps=o.eps)
  if o.grad_clip and o.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(o.grad_clip), adam)
  return adam


def diffusion_kwargs(config: ml_collections.ConfigDict) -> dict[str, str]:
  d = config.diffusion
  return dict(mean_type=d.mean_type, var_type=d.var_type, loss_type=d.loss_type)


# ----------------------------------------------------------------------------------------------
# The state and the step.

def init_state(config, model, optimizer, key) -> TrainState:
  """A fresh train state (parameters drawn from `key`); EMA starts equal to the parameters."""
  size, channels = config.data.image_size, config.data.channels
  x = jnp.zeros((1, size, size, channels), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  params = model.init({"params": key}, x, t, train=False)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree_util.tree_map(jnp.asarray, params),
                    opt_state=optimizer.init(params))


def example_keys(rng, step, positions):
  """One key per example: the run's key folded with the step, then with the global row."""
  step_key = jax.random.fold_in(rng, step)
  return jax.vmap(lambda p: jax.random.fold_in(step_key, p))(positions)


def loss_fn(params, images_BxHxWxC, keys_B, *, model, sched, diffusion_kw):
  """Mean training loss of a batch whose randomness comes from per-example keys."""
  x_start = images_BxHxWxC.astype(jnp.float32) / 127.5 - 1.0
  num_timesteps = sched.num_timesteps
  t_B = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, _T_STREAM), (), 0,
                                              num_timesteps))(keys_B)
  noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, _NOISE_STREAM),
                                               x_start.shape[1:]))(keys_B)
  if model.dropout > 0:
    dropout_keys = jax.vmap(lambda k: jax.random.fold_in(k, _DROPOUT_STREAM))(keys_B)

    def model_fn(x_t, t):
      return model.apply({"params": params}, x_t, t, train=True, dropout_keys_B=dropout_keys)
  else:
    def model_fn(x_t, t):
      return model.apply({"params": params}, x_t, t, train=True)
  losses = diffusion.training_losses(sched, model_fn, x_start, t_B, noise, **diffusion_kw)
  return jnp.mean(losses)


def train_step(state: TrainState, images_BxHxWxC, rng, *, model, sched, optimizer,
               diffusion_kw, ema_decay: float, grad_accum_steps: int = 1):
  """One update, run on each device for its rows of the global batch (inside shard_map).

  Args:
    state: the replicated train state.
    images_BxHxWxC: this device's uint8 rows of the global batch.
    rng: the run's key as raw uint32 key data [2], replicated.
    model, sched, optimizer, diffusion_kw: fixed parts (bound with functools.partial).
    ema_decay: EMA decay after the first step.
    grad_accum_steps: split the rows into this many micro-batches, summing gradients.

  Returns:
    (new state, metrics dict of replicated scalars).
  """
  local_batch = images_BxHxWxC.shape[0]
  first_row = jax.lax.axis_index(parallel.DATA_AXIS) * local_batch
  positions = first_row + jnp.arange(local_batch)
  keys = example_keys(jax.random.wrap_key_data(rng), state.step, positions)
  grad_fn = jax.value_and_grad(functools.partial(loss_fn, model=model, sched=sched,
                                                 diffusion_kw=diffusion_kw))
  # Differentiate with respect to a per-device ('varying') copy of the replicated parameters.
  # The gradient with respect to the replicated (unvarying) parameters themselves would come
  # back already summed over the mesh (the transpose of their implicit broadcast), N times the
  # mean; the local gradient is averaged explicitly, once per step, below.
  local_params = jax.lax.pcast(state.params, (parallel.DATA_AXIS,), to="varying")
  if grad_accum_steps == 1:
    loss, grads = grad_fn(local_params, images_BxHxWxC, keys)
  else:
    micro = local_batch // grad_accum_steps
    images = images_BxHxWxC.reshape((grad_accum_steps, micro) + images_BxHxWxC.shape[1:])
    keys = keys.reshape((grad_accum_steps, micro))

    def accumulate(carry, xs):
      loss_i, grads_i = grad_fn(local_params, *xs)
      return jax.tree_util.tree_map(jnp.add, carry, (loss_i, grads_i)), None

    # The sums differ per device until the pmean below, hence 'varying' along the mesh axis.
    zeros = jax.lax.pcast((jnp.zeros((), jnp.float32),
                           jax.tree_util.tree_map(jnp.zeros_like, state.params)),
                          (parallel.DATA_AXIS,), to="varying")
    (loss, grads), _ = jax.lax.scan(accumulate, zeros, (images, keys))
    loss, grads = jax.tree_util.tree_map(lambda x: x / grad_accum_steps, (loss, grads))

  # Every device holds the same number of rows, so the mean of the local means is the mean
  # over the global batch.
  loss, grads = jax.lax.pmean((loss, grads), parallel.DATA_AXIS)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = jnp.where(state.step == 0, 0.0, ema_decay).astype(jnp.float32)
  ema_params = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p,
                                      state.ema_params, params)
  new_state = TrainState(step=state.step + 1, params=params, ema_params=ema_params,
                         opt_state=opt_state)
  metrics = dict(loss=loss, grad_norm=grad_norm, param_norm=optax.tree.norm(params))
  return new_state, metrics


def make_train_step(config, model, sched, optimizer, mesh):
  """`train_step` mapped over the mesh and jitted, with the state donated.

  Returns:
    f(state, images [global_batch, H, W, C] uint8 split over `data`, rng uint32 [2])
    -> (state, metrics).
  """
  step = functools.partial(train_step, model=model, sched=sched, optimizer=optimizer,
                           diffusion_kw=diffusion_kwargs(config),
                           ema_decay=config.optim.ema_decay,
                           grad_accum_steps=config.optim.grad_accum_steps)
  mapped = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(parallel.DATA_AXIS), P()),
                         out_specs=(P(), P()))
  return jax.jit(mapped, donate_argnums=(0,))


def make_sample_fn(config, model, sched, mesh, *, ddim_steps: int | None = None,
                   eta: float = 0.0):
  """Jitted f(params, keys [n]) -> images [n, H, W, C] in [-1, 1], keys split over `data`.

  Args:
    config, model, sched, mesh: what to sample from, and over which devices.
    ddim_steps: DDIM over this many timesteps when > 0, ancestral sampling over all T when 0;
      default: `config.sample.ddim_steps`.
    eta: DDIM's noise scale (0 = deterministic).
  """
  d = config.diffusion
  size, channels = config.data.image_size, config.data.channels
  ddim_steps = config.sample.ddim_steps if ddim_steps is None else ddim_steps
  clip = config.sample.clip_denoised

  def sample(params, keys):
    def model_fn(x, t):
      return model.apply({"params": params}, x, t, train=False)
    shape = (keys.shape[0], size, size, channels)
    if ddim_steps > 0:
      return sampling.ddim_sample_loop(sched, model_fn, keys, shape, num_steps=ddim_steps,
                                       eta=eta, mean_type=d.mean_type, var_type=d.var_type,
                                       clip_denoised=clip)
    return sampling.p_sample_loop(sched, model_fn, keys, shape, mean_type=d.mean_type,
                                  var_type=d.var_type, clip_denoised=clip)

  mapped = jax.shard_map(sample, mesh=mesh, in_specs=(P(), P(parallel.DATA_AXIS)),
                         out_specs=P(parallel.DATA_AXIS))
  return jax.jit(mapped)


def abstract_state(config, model, optimizer, mesh) -> TrainState:
  """The train state's shapes and (replicated) shardings, without computing anything."""
  shapes = jax.eval_shape(functools.partial(init_state, config, model, optimizer),
                          jax.random.key(0))
  sharding = parallel.replicated_sharding(mesh)
  return jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def create_state(config, model, optimizer, mesh) -> TrainState:
  """Initial state from `config.seed`, computed once and replicated on the mesh."""
  init = jax.jit(functools.partial(init_state, config, model, optimizer),
                 out_shardings=parallel.replicated_sharding(mesh))
  return init(jax.random.fold_in(jax.random.key(config.seed), 1))


def train_rng(config) -> np.ndarray:
  """The run's step key as raw uint32 data (folded with the step inside the step)."""
  return np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.key(config.seed), 2)))
