"""Regenerates tests/golden/distill_reference.npz: the per-example progressive-distillation loss
of google-research's diffusion_distillation (Salimans & Ho 2022), for
tests/training/test_distill_reference.py.

    git clone --filter=blob:none --sparse https://github.com/google-research/google-research \
        /tmp/google-research
    git -C /tmp/google-research sparse-checkout set diffusion_distillation
    git -C /tmp/google-research checkout 1d4d2f1aa6f2883a790d2ae46a6ee8ab150d8f31
    mkdir -p /tmp/distill_reference/diffusion_distillation
    cp /tmp/google-research/diffusion_distillation/diffusion_distillation/{dpm,utils}.py \
        /tmp/distill_reference/diffusion_distillation/
    touch /tmp/distill_reference/diffusion_distillation/__init__.py
    python tests/golden/make_distill_golden.py /tmp/distill_reference

It imports `diffusion_distillation.dpm` and `.utils` from that folder (the reference's code is not
part of this repository). Both files run as they are (dpm.py as of commit 1d4d2f1a, utils.py
unchanged since 30adf0ec); the one change is the package's `__init__.py`, left empty: the
original imports its checkpoints, config, datasets and model modules (TensorFlow, data sets),
which `dpm.Model.training_losses` does not use. utils.py needs absl, flax and Pillow at import.

For each case of `GOLDEN_CASES` (mean type, N) the reference's `Model.training_losses` runs in
float64 (jax.enable_x64), eagerly, with its distillation branch (`target_model_fn` the teacher),
logvar_type 'fixed_large', mean_loss_weight_type 'snr_trunc' and num_steps N, on x uniform in
[-1, 1] and the key `jax.random.PRNGKey(case index)`. Its `logsnr_schedule_fn(u)` is our
schedule's continuous-time view (`continuous.discrete_vp`) written in jnp: log alpha interpolated
linearly between the trained times (n + 1) / T, logsnr = 2 lambda = 2 log alpha -
log(1 - alpha^2), and +inf at u = 0 (alpha 1, sigma 0). Its networks receive the log-SNR; they
are the test's `toy_output` at alpha = sqrt(sigmoid(logsnr)).

Stored per case: x, the per-example loss, and what the reference drew and used: i (0-based, its
u = (i + 1) / N), the noise eps, the log-SNR at u, u - 1/2N and u - 1/N (as its schedule function
was called), and the z_u its student saw. i and eps are drawn again here from the same key in the
reference's order (its `utils.RngGen`: the noise first, then i), and checked against the recorded
calls: the times its schedule function was first given are (i + 1) / N, and its student's z_u is
its `diffusion_forward` of x and that noise, bit for bit.
"""
import importlib
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main(reference_dir):
  importlib.import_module("tests.conftest")  # the tests' CPU devices, before JAX starts
  import jax
  import jax.numpy as jnp

  from diffusion_jax.samplers import continuous
  from tests.training import test_distill_reference as tests

  sys.path.insert(0, str(pathlib.Path(reference_dir).resolve()))
  from diffusion_distillation import dpm  # pylint: disable=import-outside-toplevel
  from diffusion_distillation import utils  # pylint: disable=import-outside-toplevel

  vp = continuous.discrete_vp(tests.make_sched())
  values = {}
  with jax.enable_x64(True):
    t_table, log_alpha_table = jnp.asarray(vp.t), jnp.asarray(vp.log_alpha)

    for index, (mean_type, num_steps) in enumerate(tests.GOLDEN_CASES):
      times, logsnrs, inputs = [], [], {"teacher": [], "student": []}

      def logsnr_schedule_fn(u):
        log_alpha = jnp.interp(u, t_table, log_alpha_table)
        logsnr = jnp.where(u > 0, 2.0 * log_alpha - jnp.log(-jnp.expm1(2.0 * log_alpha)),
                           jnp.inf)
        times.append(np.asarray(u))
        logsnrs.append(np.asarray(logsnr))
        return logsnr

      def network(name):
        def fn(z, logsnr):
          inputs[name].append(np.asarray(z))
          return tests.toy_output(name, z, jnp.sqrt(jax.nn.sigmoid(logsnr)))
        return fn

      model = dpm.Model(network("student"), mean_type=tests.REFERENCE_MEAN_TYPE[mean_type],
                        logvar_type="fixed_large", logvar_coeff=0.0,
                        target_model_fn=network("teacher"))
      x = jnp.asarray(np.random.default_rng(index).uniform(-1.0, 1.0, tests.SHAPE))
      key = jax.random.PRNGKey(index)
      loss = model.training_losses(x=x, rng=key, logsnr_schedule_fn=logsnr_schedule_fn,
                                   num_steps=num_steps, mean_loss_weight_type="snr_trunc")
      loss = np.asarray(loss["loss"])

      # What it drew, in its order.
      rng = utils.RngGen(key)
      eps = jax.random.normal(next(rng), shape=x.shape, dtype=x.dtype)
      i = jax.random.randint(next(rng), shape=(x.shape[0],), minval=0, maxval=num_steps)
      u = np.asarray((i + 1).astype(x.dtype) / num_steps)
      np.testing.assert_array_equal(times[0], u)
      assert len(times) == 3 and len(inputs["teacher"]) == 2 and len(inputs["student"]) == 1
      forward = dpm.diffusion_forward(x=x, logsnr=utils.broadcast_from_left(
          jnp.asarray(logsnrs[0]), x.shape))
      z = np.asarray(forward["mean"] + forward["std"] * eps)
      np.testing.assert_array_equal(inputs["student"][0], z)
      np.testing.assert_array_equal(inputs["teacher"][0], z)
      if num_steps <= 5:
        assert set(np.asarray(i).tolist()) == set(range(num_steps)), "not every grid time drawn"

      name = tests.golden_name(mean_type, num_steps)
      values.update({
          name + "_x": np.asarray(x), name + "_eps": np.asarray(eps),
          name + "_i": np.asarray(i, np.int64), name + "_loss": loss,
          name + "_logsnr": logsnrs[0], name + "_logsnr_mid": logsnrs[1],
          name + "_logsnr_s": logsnrs[2], name + "_z": z})
      print(f"{name}: i {np.bincount(np.asarray(i), minlength=num_steps).tolist()}, "
            f"loss {loss.min():.4g} .. {loss.max():.4g}")
  np.savez_compressed(tests.GOLDEN_PATH, **values)
  print(f"wrote {tests.GOLDEN_PATH}")


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit(__doc__)
  main(sys.argv[1])
