"""Regenerates tests/golden/iddpm_unet_tiny.npz: outputs of Improved DDPM's reference PyTorch
UNetModel (openai/improved-diffusion, `improved_diffusion/unet.py`) for tiny configs with
seeded weights, which tests/models/test_iddpm_unet.py compares our Flax U-Net against; and
tests/golden/iddpm_released_state_dicts.json: the names and shapes of the state dicts of the
seven released models (the reference's `create_model` with its README's flags), which
tests/tools/test_convert_torch.py matches against our configs for them.

Run it outside the project, in a throwaway environment with PyTorch and the reference's source
(nothing of either is committed):

    python3 -m venv /tmp/refenv && . /tmp/refenv/bin/activate
    pip install torch==2.13.0 numpy
    git clone https://github.com/openai/improved-diffusion /tmp/improved-diffusion
    python tests/golden/make_iddpm_golden.py /tmp/improved-diffusion

(the file was made with torch 2.13.0+cpu and the reference at commit 1bc7bbb). Every parameter,
including those the reference initializes to zero, is replaced by seeded values of a sensible
scale, so every layer shapes the output. The reference runs in float32: its timestep embedding
and GroupNorm compute in float32 whatever the model's dtype, so it has no float64 run.
"""
import json
import pathlib
import sys

import numpy as np

GOLDEN_PATH = pathlib.Path(__file__).resolve().parent / "iddpm_unet_tiny.npz"
RELEASED_PATH = pathlib.Path(__file__).resolve().parent / "iddpm_released_state_dicts.json"
# The README's model flags of each released checkpoint (the rest are create_model's defaults:
# 4 heads, attention at 16 and 8, scale-shift norm).
_UNCOND_64 = dict(image_size=64, num_channels=128, num_res_blocks=3, learn_sigma=True)
_LSUN = dict(image_size=256, num_channels=128, num_res_blocks=2, num_heads=1, learn_sigma=True,
             use_scale_shift_norm=False, attention_resolutions="16")
RELEASED = {
    "cifar10_uncond_50M_500K": dict(image_size=32, num_channels=128, num_res_blocks=3,
                                    learn_sigma=True, dropout=0.3),
    "cifar10_uncond_vlb_50M_500K": dict(image_size=32, num_channels=128, num_res_blocks=3,
                                        learn_sigma=True, dropout=0.3),
    "imagenet64_uncond_100M_1500K": _UNCOND_64,
    "imagenet64_uncond_vlb_100M_1500K": _UNCOND_64,
    "imagenet64_cond_270M_250K": dict(image_size=64, num_channels=192, num_res_blocks=3,
                                      learn_sigma=True, class_cond=True),
    "lsun_uncond_100M_1200K_bs128": _LSUN,
    "lsun_uncond_100M_2400K_bs64": _LSUN,
}
SEED = 20210218
# The reference's keyword arguments (attention_resolutions are downsampling rates) and the
# image size; together they cover several attention resolutions with several heads (and other
# heads on the way up), scale-shift norm on and off, class labels, a learned variance's 2C
# outputs, width changes (1x1 skip convolutions) and three levels.
CONFIGS = {
    "heads_scale_shift_classes": dict(
        kwargs=dict(in_channels=3, model_channels=64, out_channels=6, num_res_blocks=1,
                    attention_resolutions=(1, 2), dropout=0.0, channel_mult=(1, 2),
                    num_classes=5, num_heads=2, num_heads_upsample=4,
                    use_scale_shift_norm=True),
        image_size=16),
    "plain_three_levels": dict(
        kwargs=dict(in_channels=3, model_channels=32, out_channels=3, num_res_blocks=2,
                    attention_resolutions=(4,), dropout=0.0, channel_mult=(1, 2, 2),
                    num_classes=None, num_heads=1, use_scale_shift_norm=False),
        image_size=8),
}
BATCH = 3
# Integer and rescaled (fractional) timesteps, up to T = 4000's largest.
TIMESTEPS = np.array([0.0, 123.4, 3999.0], np.float32)


def seeded_state_dict(names_and_shapes, seed):
  """Every parameter drawn anew from NumPy's generator seeded with `seed`, in state dict order:
  weights N(0, 1/fan_in), norms' weights 1 + 0.1 N(0, 1), biases 0.1 N(0, 1), label embeddings
  N(0, 1). The test draws the same values from the stored names and shapes (the weights are
  not stored: they are most of the bytes)."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in names_and_shapes:
    shape = tuple(shape)
    if name.startswith("label_emb"):
      array = rng.standard_normal(shape)
    elif name.endswith("bias"):
      array = 0.1 * rng.standard_normal(shape)
    elif len(shape) == 1:
      array = 1.0 + 0.1 * rng.standard_normal(shape)
    else:
      array = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
    out[name] = array.astype(np.float32)
  return out


def main(reference_dir: str) -> None:
  sys.path.insert(0, reference_dir)
  import torch  # pylint: disable=g-import-not-at-top
  from improved_diffusion.unet import UNetModel  # pylint: disable=g-import-not-at-top

  arrays = {"timesteps": TIMESTEPS}
  for index, (key, spec) in enumerate(CONFIGS.items()):
    model = UNetModel(**spec["kwargs"])
    names_and_shapes = [(name, list(value.shape)) for name, value in model.state_dict().items()]
    state = seeded_state_dict(names_and_shapes, [SEED, index])
    rng = np.random.default_rng([SEED, index, 1])
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    model.eval()
    size, channels = spec["image_size"], spec["kwargs"]["in_channels"]
    x = rng.standard_normal((BATCH, channels, size, size)).astype(np.float32)
    classes = spec["kwargs"]["num_classes"]
    y = rng.integers(0, classes, BATCH) if classes else None
    with torch.no_grad():
      out = model(torch.from_numpy(x), torch.from_numpy(TIMESTEPS),
                  None if y is None else torch.from_numpy(y)).numpy()
    arrays[f"{key}/config"] = np.array(json.dumps(spec))
    arrays[f"{key}/state_dict"] = np.array(json.dumps(names_and_shapes))
    arrays[f"{key}/x"] = x
    if y is not None:
      arrays[f"{key}/y"] = y.astype(np.int64)
    arrays[f"{key}/out"] = out.astype(np.float32)
    print(f"{key}: {sum(v.size for v in state.values()):,} parameters, output scale "
          f"{np.abs(out).max():.3g}")
  np.savez_compressed(GOLDEN_PATH, **arrays)
  print(f"wrote {GOLDEN_PATH} ({GOLDEN_PATH.stat().st_size:,} bytes)")

  from improved_diffusion import script_util  # pylint: disable=g-import-not-at-top
  released = {}
  for name, flags in RELEASED.items():
    kwargs = {k: v for k, v in script_util.model_and_diffusion_defaults().items()
              if k in ("num_heads", "num_heads_upsample", "attention_resolutions", "dropout",
                       "learn_sigma", "class_cond", "use_checkpoint", "use_scale_shift_norm")}
    kwargs.update(flags)
    with torch.device("meta"):  # shapes only, no memory
      model = script_util.create_model(**kwargs)
    released[name] = {k: list(v.shape) for k, v in model.state_dict().items()}
  RELEASED_PATH.write_text(json.dumps(released, indent=0, sort_keys=True) + "\n")
  print(f"wrote {RELEASED_PATH} ({RELEASED_PATH.stat().st_size:,} bytes)")


if __name__ == "__main__":
  if len(sys.argv) != 2:
    raise SystemExit(f"usage: python {sys.argv[0]} PATH_TO_IMPROVED_DIFFUSION_CHECKOUT")
  main(sys.argv[1])
