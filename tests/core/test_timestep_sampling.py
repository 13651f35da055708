"""The importance sampler of timesteps against a float64 NumPy version of its rules."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.core import timestep_sampling as ts

T = 6
K = ts.HISTORY_PER_TERM


def np_update(losses, counts, pairs):
  """Improved DDPM's rule, one pair at a time: append while a timestep has fewer than K losses,
  then drop the oldest."""
  losses, counts = losses.copy(), counts.copy()
  for t, loss in pairs:
    if counts[t] == K:
      losses[t] = np.append(losses[t, 1:], loss)
    else:
      losses[t, counts[t]] = loss
      counts[t] += 1
  return losses, counts


def np_probabilities(losses, counts, uniform=0.001):
  if not np.all(counts == K):
    return np.full(len(counts), 1 / len(counts))
  w = np.sqrt(np.mean(np.asarray(losses, np.float64) ** 2, axis=-1))
  return (1 - uniform) * w / w.sum() + uniform / len(w)


def full_history(seed=0):
  rng = np.random.default_rng(seed)
  # Loss scales that differ by orders of magnitude across t, as the bound's terms do.
  scale = np.array([30.0, 3.0, 1.0, 0.3, 0.1, 0.01])
  return rng.uniform(0.5, 1.5, size=(T, K)) * scale[:, None], np.full(T, K)


def as_history(losses, counts):
  return ts.LossHistory(jnp.asarray(losses, jnp.float32), jnp.asarray(counts, jnp.int32))


def test_update_follows_the_rule_in_order():
  rng = np.random.default_rng(1)
  # Timesteps repeat within the batch, some reach K and shift, one (5) never appears.
  t = rng.choice(5, size=80, p=[0.5, 0.2, 0.15, 0.1, 0.05])
  losses = rng.standard_normal(80).astype(np.float32)
  want = np_update(np.zeros((T, K)), np.zeros(T, int), zip(t, losses))
  history = ts.init_history(T)
  for chunk in np.array_split(np.arange(80), 3):  # three batches, one after the other
    history = jax.jit(ts.update)(history, jnp.asarray(t[chunk]), jnp.asarray(losses[chunk]))
  np.testing.assert_array_equal(np.asarray(history.counts), want[1])
  np.testing.assert_array_equal(np.asarray(history.losses), want[0].astype(np.float32))
  assert want[1][0] == K and want[1][5] == 0  # the case of shifting and of an empty row
  with pytest.raises(ValueError, match=r"both have shape \[N\]"):
    ts.update(history, jnp.zeros(3, jnp.int32), jnp.zeros(4))


def test_probabilities_uniform_until_warm_then_second_moment():
  losses, counts = full_history()
  np.testing.assert_allclose(np.asarray(ts.probabilities(as_history(losses, counts))),
                             np_probabilities(losses, counts), rtol=1e-6)
  counts[3] = K - 1  # one timestep short of a full history: still uniform
  np.testing.assert_allclose(np.asarray(ts.probabilities(as_history(losses, counts))),
                             np.full(T, 1 / T), rtol=1e-7)
  # Every loss 0: no preference (the formula would divide by zero).
  np.testing.assert_allclose(np.asarray(ts.probabilities(as_history(0 * losses, np.full(T, K)))),
                             np.full(T, 1 / T), rtol=1e-7)


def test_draws_and_weights():
  losses, counts = full_history(2)
  history = as_history(losses, counts)
  p = np_probabilities(losses, counts)
  n = 40_000
  keys = jax.random.split(jax.random.key(3), n)
  t, weights = jax.jit(ts.draw)(keys, history)
  t = np.asarray(t)
  assert t.dtype == np.int32 and t.min() >= 0 and t.max() < T
  np.testing.assert_allclose(np.asarray(weights), 1 / (T * p[t]), rtol=1e-5)
  # Frequencies within 5 standard errors of p; the 0.001 floor keeps the rarest t drawn.
  freq = np.bincount(t, minlength=T) / n
  assert np.all(np.abs(freq - p) < 5 * np.sqrt(p * (1 - p) / n) + 1e-12), (freq, p)
  # The weighted mean of the losses estimates their uniform mean (importance sampling).
  row_mean = losses.mean(axis=1)
  estimate = np.mean(np.asarray(weights) * row_mean[t])
  assert estimate == pytest.approx(row_mean.mean(), rel=0.03)
  # Each draw depends on its own key only.
  t_part, w_part = ts.draw(keys[100:103], history)
  np.testing.assert_array_equal(np.asarray(t_part), t[100:103])
  np.testing.assert_array_equal(np.asarray(w_part), np.asarray(weights)[100:103])


def test_unknown_sampler():
  ts.check_timestep_sampler("uniform")
  with pytest.raises(ValueError, match="choose one of uniform, loss_second_moment"):
    ts.check_timestep_sampler("importance")
