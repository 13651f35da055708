"""Regenerates tests/golden/karras_edm.npz: what NVlabs/edm's samplers give, for
tests/samplers/test_karras.py.

    git clone https://github.com/NVlabs/edm /tmp/edm
    git -C /tmp/edm checkout 008a4e5316c8e3bfe61a62f874bddba254295afb
    python tests/golden/make_karras_golden.py /tmp/edm

It imports `generate.py` from that folder (the reference's code is not part of this repository;
it needs torch, click and Pillow) and runs `edm_sampler` (Heun, deterministic and stochastic) and
`ablation_sampler(solver='euler', discretization='edm', schedule='linear', scaling='none')`
(Euler) in float64 on the test's cases (`GOLDEN_CASES`), with a toy network: the exact denoiser
of the test's Gaussian data, on the noise levels of the digits' schedule (linear 1e-4..0.1,
T = 200). Its `round_sigma` rounds to the nearest of the schedule's levels for the 'round' cases
and is the identity for 'interpolate'. The latents are every sampler's x_T for examples 0..3 of
`jax.random.key(0)`, and the noise the samplers add is fixed (seeded NumPy draws, one per step),
both stored with the samples.
"""
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main(reference_dir):
  from tests import conftest  # noqa: F401  # the tests' CPU devices, before JAX starts
  import torch

  from tests.samplers import test_karras as tests

  sys.path.insert(0, str(pathlib.Path(reference_dir).resolve()))
  import generate as reference  # pylint: disable=import-outside-toplevel

  levels = tests.golden_levels()

  class ToyNet:
    """The exact denoiser of N(MU, S^2) data in EDM's form."""

    def __init__(self, rounds):
      self.sigma_min, self.sigma_max, self.rounds = float(levels[0]), float(levels[-1]), rounds

    def round_sigma(self, sigma):
      sigma = torch.as_tensor(sigma, dtype=torch.float64)
      if not self.rounds:
        return sigma
      index = (sigma.reshape(-1, 1) - torch.tensor(levels)).abs().argmin(dim=1)
      return torch.tensor(levels)[index].reshape(sigma.shape)

    def __call__(self, x, sigma, class_labels=None):
      sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1)
      return tests.MU + tests.S**2 / (tests.S**2 + sigma**2) * (x - tests.MU)

  latents = tests.golden_latents()
  values = {"latents": latents}
  for case in tests.GOLDEN_CASES:
    name, method, labels, n, kwargs = case
    noise = np.random.default_rng(len(values)).standard_normal((n,) + latents.shape)
    draws = iter(torch.tensor(noise))
    net = ToyNet(labels == "round")
    sampler_kwargs = dict(
        num_steps=n, rho=kwargs.get("rho", 7.0),
        sigma_min=kwargs.get("sigma_min") or net.sigma_min,
        sigma_max=kwargs.get("sigma_max") or net.sigma_max,
        S_churn=kwargs.get("s_churn", 0.0), S_min=kwargs.get("s_tmin", 0.0),
        S_max=kwargs.get("s_tmax", float("inf")), S_noise=kwargs.get("s_noise", 1.0))
    randn_like = lambda x: next(draws)
    if method == "euler":
      x = reference.ablation_sampler(net, torch.tensor(latents), randn_like=randn_like,
                                     solver="euler", discretization="edm", schedule="linear",
                                     scaling="none", **sampler_kwargs)
    else:
      x = reference.edm_sampler(net, torch.tensor(latents), randn_like=randn_like,
                                **sampler_kwargs)
    values[name] = x.numpy()
    values[name + "_noise"] = noise
    print(f"{name}: {x.numpy().ravel()[:4].round(5).tolist()}")
  np.savez_compressed(tests.GOLDEN_PATH, **values)
  print(f"wrote {tests.GOLDEN_PATH}")


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) == 2 else sys.exit(__doc__))
