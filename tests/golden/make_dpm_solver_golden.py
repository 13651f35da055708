"""Regenerates tests/golden/dpm_solver_cosine.npz: what LuChengTHU/dpm-solver's PyTorch solver
gives on the cosine schedule (T = 1000, whose last 4 steps it drops), for
tests/samplers/test_dpm_solver.py.

    git clone https://github.com/LuChengTHU/dpm-solver /tmp/dpm-solver
    git -C /tmp/dpm-solver checkout 52bc3fbcd5de56d60917b826b15d2b69460fc2fa
    python tests/golden/make_dpm_solver_golden.py /tmp/dpm-solver

It imports `dpm_solver_pytorch.py` from that folder (the reference's code is not part of this
repository) and needs torch (the test extra). The reference runs in float64 on the test's cases
(`GOLDEN_CASES`) with its toy noise model (`toy_eps`, linear in x and in its label). x_T is every
sampler's draw for examples 0..3 of `jax.random.key(0)` (stored too). For each case the file
holds the samples and the labels the model was called with, in order.
"""
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

SHAPE = (4, 2, 2, 1)


def main(reference_dir):
  from tests import conftest  # noqa: F401  # the tests' CPU devices, before JAX starts
  import jax
  import torch

  from diffusion_jax.core import prng
  from diffusion_jax.core import schedules
  from diffusion_jax.samplers import common
  from tests.samplers import test_dpm_solver as tests

  sys.path.insert(0, str(pathlib.Path(reference_dir).resolve()))
  import dpm_solver_pytorch as reference  # pylint: disable=import-outside-toplevel

  betas = schedules.get_beta_schedule("cosine", beta_start=1e-4, beta_end=0.02,
                                      num_diffusion_timesteps=1000)
  sched = schedules.Schedule.from_betas(betas)
  keys = prng.example_keys(jax.random.key(0), np.arange(SHAPE[0]))
  x_T = np.asarray(common.initial_noise(keys, SHAPE, sched), np.float64)
  values = {"x_T": x_T}
  for algorithm, order, grid, steps in tests.GOLDEN_CASES:
    ns = reference.NoiseScheduleVP("discrete", betas=torch.tensor(betas, dtype=torch.float64),
                                   dtype=torch.float64)
    seen = []

    def model(x, t_input):
      seen.append(t_input.numpy().copy())
      return tests.toy_eps(x, t_input)

    model_fn = reference.model_wrapper(model, ns, model_type="noise")
    solver = reference.DPM_Solver(model_fn, ns, algorithm_type=algorithm)
    x = solver.sample(torch.tensor(x_T), steps=steps, order=order, skip_type=grid,
                      method="multistep", lower_order_final=True)
    name = tests.golden_name(algorithm, order, grid, steps)
    values[name] = x.numpy()
    values[name + "_labels"] = np.array([s[0] for s in seen])
    print(f"{name}: N = {ns.total_N}, labels {values[name + '_labels'].round(3).tolist()}")
  np.savez_compressed(tests.GOLDEN_PATH, **values)
  print(f"wrote {tests.GOLDEN_PATH}")


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit(__doc__)
  main(sys.argv[1])
