"""The training step: the state it changes and one pure per-device update.

`train_step` runs on each device for its rows of the global batch (under `jax.shard_map` over
the 1-D `data` mesh), compiled once with the state donated by `make_train_step`. Every random
number of an example (its timestep, its noise, its dropout masks) comes from the run's training
key folded with the step and then with the example's row in the global batch
(`prng.example_keys`), so 1 device and 8 compute the same losses. Imports no TensorFlow, data
pipeline or checkpointing (`bench` builds this exact step with the JAX stack alone).
"""
from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import PartitionSpec as P

from diffusion_jax.config import build
from diffusion_jax.core import diffusion
from diffusion_jax.core import prng
from diffusion_jax.core import timestep_sampling
from diffusion_jax.data import images
from diffusion_jax import parallel


@flax.struct.dataclass
class TrainState:
  """Everything a step changes. `step` counts completed updates (int32 scalar).

  `loss_history` is the importance sampler's history of each timestep's last losses
  (`timestep_sampling.LossHistory` as a dict) with diffusion.timestep_sampler
  'loss_second_moment', else None (and absent from checkpoints).
  """
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  loss_history: Any = None

  def to_dict(self) -> dict[str, Any]:
    out = dict(step=self.step, params=self.params, ema_params=self.ema_params,
               opt_state=self.opt_state)
    if self.loss_history is not None:
      out["loss_history"] = self.loss_history
    return out


def init_state(config, model, optimizer, key) -> TrainState:
  """A fresh train state (parameters drawn from `key`); EMA starts equal to the parameters."""
  params = build.init_params(config, model, key)
  history = None
  timestep_sampling.check_timestep_sampler(config.diffusion.timestep_sampler)
  if config.diffusion.timestep_sampler == "loss_second_moment":
    history = timestep_sampling.init_history(config.diffusion.num_timesteps)._asdict()
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree_util.tree_map(jnp.asarray, params),
                    opt_state=optimizer.init(params), loss_history=history)


def drop_labels(labels_B, keys_B, p_uncond: float, null_label: int) -> jax.Array:
  """Classifier-free guidance's training labels: each example's label replaced by the null
  class with probability p_uncond, drawn from the example's own key (so the same examples are
  dropped whatever the device count)."""
  drop_keys = prng.fold_in_each(keys_B, prng.ExampleStream.LABEL_DROP)
  drop_B = jax.vmap(lambda k: jax.random.bernoulli(k, p_uncond))(drop_keys)
  return jnp.where(drop_B, jnp.asarray(null_label, labels_B.dtype), labels_B)


def loss_fn(params, batch, keys_B, loss_history, *, model, sched, diffusion_kw,
            p_uncond: float = 0.0):
  """Mean training loss of a batch whose randomness comes from per-example keys.

  Args:
    params: the U-Net's parameters.
    batch: {'image': uint8 [B, H, W, C]} and, for a class-conditional model, 'label' int32 [B].
    keys_B: one typed key per example.
    loss_history: the importance sampler's history (a dict), or None to draw t uniformly.
    model, sched, diffusion_kw: fixed parts.
    p_uncond: the probability that an example's label is replaced by the model's null class
      (label num_classes; `drop_labels`); 0 for none.

  Returns:
    (the mean of the (importance-weighted) losses, aux): aux holds 't' and 'losses' [B] (the
    unweighted per-example losses) and the batch means of the loss's terms ('mse', 'vb').
  """
  x_start = images.to_float(batch["image"])
  num_timesteps = sched.num_timesteps
  timestep_keys = prng.fold_in_each(keys_B, prng.ExampleStream.TIMESTEP)
  if loss_history is None:
    t_B = jax.vmap(lambda k: jax.random.randint(k, (), 0, num_timesteps))(timestep_keys)
    weights_B = None
  else:
    t_B, weights_B = timestep_sampling.draw(
        timestep_keys, timestep_sampling.LossHistory(**loss_history))
  noise = prng.normal_each(prng.fold_in_each(keys_B, prng.ExampleStream.NOISE),
                           x_start.shape[1:])
  labels_B = batch.get("label")
  if p_uncond > 0:
    labels_B = drop_labels(labels_B, keys_B, p_uncond, model.num_classes)
  model_kw = build.label_kwargs(labels_B)
  if model.dropout > 0:
    model_kw["dropout_keys_B"] = prng.fold_in_each(keys_B, prng.ExampleStream.DROPOUT)

  def model_fn(x_t, t):
    return model.apply({"params": params}, x_t, t, train=True, **model_kw)
  terms = diffusion.training_losses(sched, model_fn, x_start, t_B, noise, **diffusion_kw)
  losses = terms["loss"]
  loss = jnp.mean(losses if weights_B is None else losses * weights_B)
  aux = dict(t=t_B, losses=jax.lax.stop_gradient(losses),
             terms={name: jax.lax.stop_gradient(jnp.mean(value))
                    for name, value in terms.items() if name != "loss"})
  return loss, aux


def train_step(state, batch, rng, *, loss, optimizer, ema_decay: float, term_names,
               grad_accum_steps: int = 1):
  """One update, run on each device for its rows of the global batch (inside shard_map).

  Args:
    state: the replicated train state (a `TrainState`, or a state with the same fields and
      more, which the step carries over unchanged).
    batch: this device's rows of the global batch: {'image': uint8 [B, H, W, C]} and, for a
      class-conditional model, 'label' int32 [B].
    rng: the run's training key (`prng.run_key(seed, RunStream.TRAIN)`), replicated.
    loss: loss(params, batch, keys_B, state) -> (mean loss, aux), aux as `loss_fn`'s: 't' and
      'losses' [B] and the batch means of the loss's terms ('terms', named `term_names`).
    optimizer: the optax optimizer of `state.opt_state`.
    ema_decay: EMA decay after the first step.
    term_names: the names of the loss's terms.
    grad_accum_steps: split the rows into this many micro-batches, summing gradients.

  Returns:
    (new state, metrics dict of replicated scalars: loss, grad_norm, param_norm and the
    loss's terms, e.g. mse and/or vb, as batch means).
  """
  local_batch = batch["image"].shape[0]
  first_row = jax.lax.axis_index(parallel.DATA_AXIS) * local_batch
  positions = first_row + jnp.arange(local_batch)
  keys = prng.example_keys(jax.random.fold_in(rng, state.step), positions)
  grad_fn = jax.value_and_grad(loss, has_aux=True)
  # Differentiate with respect to a per-device ('varying') copy of the replicated parameters.
  # The gradient with respect to the replicated (unvarying) parameters themselves would come
  # back already summed over the mesh (the transpose of their implicit broadcast), N times the
  # mean; the local gradient is averaged explicitly, once per step, below.
  local_params = jax.lax.pcast(state.params, (parallel.DATA_AXIS,), to="varying")
  history = state.loss_history
  if grad_accum_steps == 1:
    (loss_value, aux), grads = grad_fn(local_params, batch, keys, state)
    terms, t_B, losses_B = aux["terms"], aux["t"], aux["losses"]
  else:
    micro = local_batch // grad_accum_steps
    micro_batches = jax.tree_util.tree_map(
        lambda x: x.reshape((grad_accum_steps, micro) + x.shape[1:]), batch)
    keys = keys.reshape((grad_accum_steps, micro))

    def accumulate(carry, xs):
      (loss_i, aux_i), grads_i = grad_fn(local_params, *xs, state)
      carry = jax.tree_util.tree_map(jnp.add, carry, (loss_i, grads_i, aux_i["terms"]))
      return carry, (aux_i["t"], aux_i["losses"])

    # The sums differ per device until the pmean below, hence 'varying' along the mesh axis.
    zeros = jax.lax.pcast((jnp.zeros((), jnp.float32),
                           jax.tree_util.tree_map(jnp.zeros_like, state.params),
                           {name: jnp.zeros((), jnp.float32) for name in term_names}),
                          (parallel.DATA_AXIS,), to="varying")
    (loss_value, grads, terms), (t_B, losses_B) = jax.lax.scan(accumulate, zeros,
                                                                (micro_batches, keys))
    loss_value, grads, terms = jax.tree_util.tree_map(lambda x: x / grad_accum_steps,
                                                      (loss_value, grads, terms))
    # Micro-batches are consecutive rows: back to this device's row order.
    t_B, losses_B = t_B.reshape(local_batch), losses_B.reshape(local_batch)

  # Every device holds the same number of rows, so the mean of the local means is the mean
  # over the global batch.
  loss_value, grads, terms = jax.lax.pmean((loss_value, grads, terms), parallel.DATA_AXIS)
  if history is not None:
    # Every device takes the whole global batch's pairs, in row order: one history everywhere.
    # Each device writes its rows into zeros and the sum gathers them (exactly: one nonzero
    # term per entry), as a value that is the same on every device, like the state.
    global_batch = local_batch * jax.lax.axis_size(parallel.DATA_AXIS)
    gather = lambda x: jax.lax.psum(jnp.zeros((global_batch,), x.dtype).at[positions].set(x),
                                    parallel.DATA_AXIS)
    all_t, all_losses = gather(t_B), gather(losses_B)
    history = timestep_sampling.update(timestep_sampling.LossHistory(**history), all_t,
                                       all_losses)._asdict()
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = jnp.where(state.step == 0, 0.0, ema_decay).astype(jnp.float32)
  ema_params = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p,
                                      state.ema_params, params)
  new_state = state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                            opt_state=opt_state, loss_history=history)
  metrics = dict(loss=loss_value, grad_norm=grad_norm, param_norm=optax.tree.norm(params), **terms)
  return new_state, metrics


def make_train_step(config, model, sched, optimizer, mesh):
  """`train_step` mapped over the mesh and jitted, with the state donated.

  Returns:
    f(state, batch, the training key) -> (state, metrics), where batch is {'image': uint8
    [global_batch, H, W, C]} (+ 'label' int32 [global_batch] for a class-conditional model)
    split over `data`.
  """
  diffusion_kw = build.diffusion_kwargs(config)
  loss = functools.partial(loss_fn, model=model, sched=sched, diffusion_kw=diffusion_kw,
                           p_uncond=float(config.model.p_uncond))
  step = functools.partial(
      train_step, loss=lambda params, batch, keys, state: loss(params, batch, keys,
                                                                state.loss_history),
      optimizer=optimizer, ema_decay=config.optim.ema_decay,
      term_names=diffusion.LOSS_TERMS[diffusion_kw["loss_type"]],
      grad_accum_steps=config.optim.grad_accum_steps)
  return over_mesh(step, mesh)


def over_mesh(step, mesh):
  """A per-device step f(state, batch, rng) -> (state, metrics) mapped over the `data` axis of
  `mesh` (state, key and metrics replicated, the batch split) and jitted, the state donated."""
  mapped = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(parallel.DATA_AXIS), P()),
                         out_specs=(P(), P()))
  return jax.jit(mapped, donate_argnums=(0,))


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
  return init(prng.run_key(config.seed, prng.RunStream.INIT))


def train_key(config: ml_collections.ConfigDict, mesh) -> jax.Array:
  """The run's training key, replicated on the mesh (folded with the step inside the step)."""
  return parallel.replicated_key(prng.run_key(config.seed, prng.RunStream.TRAIN), mesh)
