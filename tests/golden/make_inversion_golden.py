"""Regenerates tests/golden/ddim_inversion.npz: what openai/improved-diffusion's DDIM inversion
and DDIM sampling give, for tests/samplers/test_inversion.py.

    git clone https://github.com/openai/improved-diffusion /tmp/improved-diffusion
    git -C /tmp/improved-diffusion checkout 1bc7bbbdc414d83d4abf2ad8cc1446dc36c4e4d5
    python tests/golden/make_inversion_golden.py /tmp/improved-diffusion

It imports `improved_diffusion` from that folder (the reference's code is not part of this
repository) and needs torch (the test extra). The reference has the step,
`GaussianDiffusion.ddim_reverse_sample`, and no loop of its own: the loop here calls it at every
entry of the (spaced) diffusion in order, from the images, as its inversions are run. The
decoding is its `ddim_sample_loop` (eta 0) from those latents. Everything runs in float64: the
reference reads its coefficients through `_extract_into_tensor`, which casts them to float32, and
is given a float64 version of it here. The model is the test's `toy_eps` (an analytic function of
x and the original timestep), over the reference's 'linear' schedule for T = 40, for each of the
test's `GOLDEN_CASES` (all steps, or a `SpacedDiffusion` of a respacing spec).
"""
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main(reference_dir):
  import torch

  from tests.samplers import test_inversion as tests

  sys.path.insert(0, str(pathlib.Path(reference_dir).resolve()))
  from improved_diffusion import gaussian_diffusion as gd  # pylint: disable=import-outside-toplevel
  from improved_diffusion import respace  # pylint: disable=import-outside-toplevel

  def extract_float64(arr, timesteps, broadcast_shape):
    values = torch.from_numpy(np.asarray(arr, np.float64))[timesteps]
    return values.reshape((-1,) + (1,) * (len(broadcast_shape) - 1)).expand(broadcast_shape)

  gd._extract_into_tensor = extract_float64  # pylint: disable=protected-access

  betas = gd.get_named_beta_schedule("linear", tests.T)
  np.testing.assert_allclose(betas, tests.BETAS, rtol=1e-15)
  x_start = tests.x_start(0)
  values = {"x_start": x_start}

  def model(x, t):
    return tests.toy_eps(x, t.double(), torch)

  for name, spec, clip in tests.GOLDEN_CASES:
    kept = respace.space_timesteps(tests.T, spec) if spec else range(tests.T)
    diffusion = respace.SpacedDiffusion(
        use_timesteps=kept, betas=betas, model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=gd.ModelVarType.FIXED_LARGE, loss_type=gd.LossType.MSE,
        rescale_timesteps=False)
    x = torch.tensor(x_start, dtype=torch.float64)
    with torch.no_grad():
      for i in range(diffusion.num_timesteps):
        t = torch.full((x.shape[0],), i, dtype=torch.long)
        x = diffusion.ddim_reverse_sample(model, x, t, clip_denoised=clip, eta=0.0)["sample"]
      decoded = diffusion.ddim_sample_loop(model, tuple(x.shape), noise=x, clip_denoised=clip,
                                           device="cpu", eta=0.0)
    values[f"{name}_latents"] = x.numpy()
    values[f"{name}_decoded"] = decoded.numpy()
    print(f"{name}: {len(list(kept))} steps, latents |x| <= {x.abs().max():.3f}, "
          f"reconstruction max error {np.abs(decoded.numpy() - x_start).max():.3g}")
  return tests.GOLDEN_PATH, values


if __name__ == "__main__":
  if len(sys.argv) == 2:
    path, golden = main(sys.argv[1])
    np.savez_compressed(path, **golden)
    print(f"wrote {path}")
  else:
    sys.exit(__doc__)
