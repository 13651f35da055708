"""How the timestep of each training example is drawn: uniformly, or by importance.

`loss_second_moment` (Nichol & Dhariwal 2021) keeps the last `HISTORY_PER_TERM` losses of every
timestep. Until every t has that many it draws t uniformly; then with probability
p_t = (1 - UNIFORM_PROB) sqrt(E[L_t^2]) / sum_s sqrt(E[L_s^2]) + UNIFORM_PROB / T, and weights
each example's loss by 1 / (T p_t), so the objective's mean is unchanged while its variance
falls (the bound's terms differ by orders of magnitude across t).

Pure functions over a `LossHistory`, which is part of the train state: the draws come from the
per-example keys, and the history is updated from the whole global batch's (t, loss) pairs in
the batch's order, so every device holds the same history and any number of devices trains
identically.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

TIMESTEP_SAMPLERS = ("uniform", "loss_second_moment")
HISTORY_PER_TERM = 10
UNIFORM_PROB = 0.001


def check_timestep_sampler(name: str) -> None:
  """Raises ValueError for a name not in `TIMESTEP_SAMPLERS`."""
  if name not in TIMESTEP_SAMPLERS:
    raise ValueError(f"Unknown timestep_sampler {name!r}; choose one of "
                     f"{', '.join(TIMESTEP_SAMPLERS)}.")


class LossHistory(NamedTuple):
  """The last losses of every timestep: losses[t, :counts[t]], oldest first."""
  losses: jax.Array   # float32 [T, HISTORY_PER_TERM]
  counts: jax.Array   # int32 [T], at most HISTORY_PER_TERM


def init_history(num_timesteps: int) -> LossHistory:
  """An empty history for T timesteps."""
  return LossHistory(losses=jnp.zeros((num_timesteps, HISTORY_PER_TERM), jnp.float32),
                     counts=jnp.zeros((num_timesteps,), jnp.int32))


def probabilities(history: LossHistory) -> jax.Array:
  """p_t of the next draws [T]: uniform until every t holds a full history, then in proportion
  to the root mean square of its losses, mixed with UNIFORM_PROB of the uniform distribution."""
  num_timesteps = history.counts.shape[0]
  warmed_up = jnp.all(history.counts == HISTORY_PER_TERM)
  rms = jnp.sqrt(jnp.mean(jnp.square(history.losses), axis=-1))
  # A history of zeros (every loss exactly 0) has no preference: fall back to uniform.
  total = jnp.sum(rms)
  learned = ((1.0 - UNIFORM_PROB) * rms / jnp.where(total > 0, total, 1.0)
             + UNIFORM_PROB / num_timesteps)
  uniform = jnp.full((num_timesteps,), 1.0 / num_timesteps, jnp.float32)
  return jnp.where(warmed_up & (total > 0), learned, uniform)


def draw(keys, history: LossHistory) -> tuple[jax.Array, jax.Array]:
  """One timestep per key, and the weight of its loss.

  Args:
    keys: typed keys [B], one per example (used whole: fold a stream in first).
    history: the loss history.

  Returns:
    (t int32 [B], weights float32 [B] = 1 / (T p_t)).
  """
  probs = probabilities(history)
  num_timesteps = probs.shape[0]
  t = jax.vmap(lambda key: jax.random.choice(key, num_timesteps, p=probs))(keys).astype(jnp.int32)
  return t, 1.0 / (num_timesteps * jnp.take(probs, t))


def update(history: LossHistory, t, losses) -> LossHistory:
  """The history after the (t, loss) pairs, taken in order.

  A timestep with a full history drops its oldest loss; one with fewer adds the loss after the
  last.

  Args:
    history: the loss history.
    t: int [N] timesteps.
    losses: [N] the unweighted losses at them.

  Returns:
    The updated history.
  """
  t = jnp.asarray(t, jnp.int32)
  losses = jnp.asarray(losses, jnp.float32)
  if t.shape != losses.shape or t.ndim != 1:
    raise ValueError(f"t and losses must both have shape [N], got {t.shape} and {losses.shape}")

  def one(hist: LossHistory, pair):
    t_i, loss = pair
    row, count = hist.losses[t_i], hist.counts[t_i]
    full = count == HISTORY_PER_TERM
    shifted = jnp.append(row[1:], loss)
    filled = row.at[jnp.minimum(count, HISTORY_PER_TERM - 1)].set(loss)
    new_row = jnp.where(full, shifted, filled)
    return LossHistory(hist.losses.at[t_i].set(new_row),
                       hist.counts.at[t_i].set(jnp.minimum(count + 1, HISTORY_PER_TERM))), None

  history, _ = jax.lax.scan(one, history, (t, losses))
  return history
