"""Regenerates the U-Net golden values in tests/golden/unet_tiny.npz.

    python tests/golden/make_unet_golden.py

Weights come from a NumPy RNG walking the sorted parameter paths (not from `model.init`), so
the file pins down the forward computation itself. The reference output is computed in float64
(from the float32-rounded weights and inputs); the float32 error against it is printed and
stored, and tests/models/test_unet.py bounds the float32 model against the float64 reference.
Regenerate only when the model's intended computation changes, and say why in the commit.
"""
import pathlib

import jax
import numpy as np
from flax import traverse_util

GOLDEN_PATH = pathlib.Path(__file__).resolve().parent / "unet_tiny.npz"
# ch=64, not 32: with 32 channels each GroupNorm group is one channel, which erases any
# per-channel constant such as the timestep projection, and the test would not see it.
GOLDEN_CONFIG = dict(ch=64, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                     dropout=0.1, out_ch=6)
IMAGE_SIZE = 16
CHANNELS = 3
BATCH = 2
PARAM_SEED = 20200619
INPUT_SEED = 7


def numpy_params(param_shapes, seed: int = PARAM_SEED):
  """Deterministic float32 weights of a sensible scale for a params tree of shapes.

  Kernels ~ N(0, 1/fan_in) so activations stay O(1) (the real 1e-10 inits would hide most of
  the network); GroupNorm gamma ~ 1 + 0.1 N(0, 1); every bias and beta ~ 0.1 N(0, 1).
  Draws happen in sorted-path order so the values depend only on the seed and the names.

  Args:
    param_shapes: nested dict of arrays or ShapeDtypeStructs (`variables['params']`).
    seed: NumPy seed.

  Returns:
    nested dict of float32 NumPy arrays with the same structure.
  """
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(param_shapes)
  out = {}
  for path in sorted(flat, key="/".join):
    shape = tuple(flat[path].shape)
    leaf = path[-1]
    if leaf == "kernel":
      fan_in = int(np.prod(shape[:-1]))
      value = rng.standard_normal(shape) / np.sqrt(fan_in)
    elif leaf == "scale":
      value = 1.0 + 0.1 * rng.standard_normal(shape)
    else:
      value = 0.1 * rng.standard_normal(shape)
    out[path] = value.astype(np.float32)
  return traverse_util.unflatten_dict(out)


def golden_inputs():
  """The fixed input batch: (x float32 [B, S, S, C] in [-1, 1], t int32 [B])."""
  rng = np.random.default_rng(INPUT_SEED)
  x = rng.uniform(-1.0, 1.0, (BATCH, IMAGE_SIZE, IMAGE_SIZE, CHANNELS)).astype(np.float32)
  t = np.array([3, 871], dtype=np.int32)
  return x, t


def _main():
  jax.config.update("jax_enable_x64", True)
  import jax.numpy as jnp

  from diffusion_jax.models.unet import UNet

  x, t = golden_inputs()
  model32 = UNet(**GOLDEN_CONFIG)
  shapes = jax.eval_shape(lambda k: model32.init(k, jnp.asarray(x), jnp.asarray(t)),
                          jax.random.key(0))["params"]
  params = numpy_params(shapes)
  params64 = jax.tree_util.tree_map(lambda p: p.astype(np.float64), params)

  model64 = UNet(**GOLDEN_CONFIG, dtype=jnp.float64)
  out64 = np.asarray(model64.apply({"params": params64}, jnp.asarray(x, jnp.float64),
                                   jnp.asarray(t), train=False))
  out32 = np.asarray(model32.apply({"params": params}, jnp.asarray(x), jnp.asarray(t),
                                   train=False))
  assert out64.dtype == np.float64 and out32.dtype == np.float32
  scale = float(np.max(np.abs(out64)))
  err32 = float(np.max(np.abs(out32 - out64))) / scale
  np.savez_compressed(GOLDEN_PATH, x=x, t=t, out=out64, float32_max_rel_err=err32)
  print(f"wrote {GOLDEN_PATH}: out {out64.shape}, max|out| {scale:.4g}, "
        f"float32 max abs error / max|out| = {err32:.3g}")


if __name__ == "__main__":
  _main()
