"""Regenerates tests/golden/inception_fid_seeded.npz from pytorch-fid's own FID Inception.

The test does not need torch; this script does. Run it in a throwaway environment:

    python3 -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch==2.14.1 torchvision==0.29.1 pytorch-fid==0.3.0 numpy
    /tmp/torchenv/bin/python tests/golden/make_inception_golden.py

Nothing is downloaded: pytorch-fid's weight loader is replaced by one that returns weights drawn
from a NumPy seed (`seeded_state_dict`), and pytorch-fid loads them with a strict
`load_state_dict`, so the key list and shapes are checked against its own model.
tests/evaluation/test_metrics.py draws the same weights with NumPy alone (from the key list and shapes of
the Flax model), runs the Flax network, and compares with the values stored here.

Stored: the sorted torch keys, a checksum of the drawn weights, the input images (three 64x64,
one 299x299, uint8), pytorch-fid's pool_3 features, logits with and without the fc bias, the
float32-vs-float64 spread of torch itself, and a small bilinear-resize case.
Regenerate only when the reference changes, and say why in the commit.
"""
import pathlib

import numpy as np

GOLDEN_PATH = pathlib.Path(__file__).resolve().parent / "inception_fid_seeded.npz"
PARAM_SEED = 20151205
INPUT_SEED = 6726825
NUM_SMALL, SMALL_SIZE, BIG_SIZE = 3, 64, 299
RESIZE_IN_SHAPE = (2, 13, 17, 3)  # NHWC
RESIZE_OUT_SIZES = ((5, 40), (40, 5), (13, 17), (26, 34))


def seeded_state_dict(torch_shapes, seed: int = PARAM_SEED):
  """Deterministic float32 FID-Inception weights of a sensible scale, in torch layout.

  Conv kernels ~ N(0, 2/fan_in) (He: keeps ReLU activations O(1) through ~95 layers), BN
  gamma ~ 1 + 0.1 N, beta and running_mean ~ 0.1 N, running_var ~ U(0.8, 1.2), fc weight
  ~ N(0, 1/2048), fc bias ~ 0.1 N. Drawn in sorted-key order, so the values depend only on
  the seed, the names and the shapes.

  Args:
    torch_shapes: mapping torch state_dict key -> shape (without num_batches_tracked).
    seed: NumPy seed.

  Returns:
    dict key -> float32 NumPy array in torch layout.
  """
  rng = np.random.default_rng(seed)
  out = {}
  for key in sorted(torch_shapes):
    shape = tuple(torch_shapes[key])
    if key.endswith("conv.weight"):
      value = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
    elif key.endswith("bn.weight"):
      value = 1.0 + 0.1 * rng.standard_normal(shape)
    elif key.endswith("bn.running_var"):
      value = rng.uniform(0.8, 1.2, shape)
    elif key == "fc.weight":
      value = rng.standard_normal(shape) / np.sqrt(shape[1])
    elif key.endswith(("bn.bias", "bn.running_mean", "fc.bias")):
      value = 0.1 * rng.standard_normal(shape)
    else:
      raise KeyError(f"no rule for {key!r}")
    out[key] = value.astype(np.float32)
  return out


def weights_checksum(state_dict) -> np.ndarray:
  """[sum, sum of squares] over all weights in float64: detects a changed NumPy stream."""
  values = [np.asarray(state_dict[k], np.float64).ravel() for k in sorted(state_dict)]
  flat = np.concatenate(values)
  return np.array([flat.sum(), np.square(flat).sum()])


def golden_images():
  """(small uint8 [3, 64, 64, 3], big uint8 [1, 299, 299, 3]): smooth gradients plus noise."""
  rng = np.random.default_rng(INPUT_SEED)

  def make(n, size):
    grid = np.linspace(0.0, 1.0, size)
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1, 3))
    freq = rng.uniform(1, 6, (n, 1, 1, 3))
    ramp = grid[None, :, None, None] + 2 * grid[None, None, :, None]
    smooth = 0.5 + 0.4 * np.sin(freq * ramp * np.pi + phase)
    noisy = 255.0 * smooth + rng.normal(0.0, 25.0, (n, size, size, 3))
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)

  return make(NUM_SMALL, SMALL_SIZE), make(1, BIG_SIZE)


def resize_input():
  """float32 NHWC values in [0, 1] for the stand-alone resize comparison."""
  return np.random.default_rng(INPUT_SEED + 1).uniform(0, 1, RESIZE_IN_SHAPE).astype(np.float32)


def _main():
  import torch
  import torch.nn.functional as F
  import torchvision
  import pytorch_fid
  from pytorch_fid import inception as fid_inception

  torch.set_num_threads(max(1, torch.get_num_threads()))
  # torchvision's Inception3 has the same state_dict keys and shapes as pytorch-fid's patched
  # model (the FID blocks subclass torchvision's and only change `forward`).
  template = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None,
                                             init_weights=False)
  shapes = {k: tuple(v.shape) for k, v in template.state_dict().items()
            if not k.endswith("num_batches_tracked")}
  weights = seeded_state_dict(shapes)
  torch_weights = {k: torch.from_numpy(v) for k, v in weights.items()}
  for k, v in template.state_dict().items():
    if k.endswith("num_batches_tracked"):
      torch_weights[k] = v.clone()

  def fake_loader(url, progress=True, **kwargs):
    del progress, kwargs
    assert url == fid_inception.FID_WEIGHTS_URL, url
    return dict(torch_weights)

  fid_inception.load_state_dict_from_url = fake_loader
  model = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]],
                                    resize_input=True, normalize_input=True,
                                    use_fid_inception=True).eval()
  fc = fid_inception.fid_inception_v3().fc.eval()  # the same seeded weights

  small, big = golden_images()

  def run(images, dtype):
    model.to(dtype)
    fc.to(dtype)
    # pytorch-fid's dataset path: ToTensor (uint8 / 255), NCHW.
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(dtype) / 255.0
    with torch.no_grad():
      pool = model(x)[0][:, :, 0, 0]
      logits_fc = fc(pool)
      logits_unbiased = pool @ fc.weight.T
    return [t.to(torch.float64).numpy() for t in (pool, logits_fc, logits_unbiased)]

  outs32 = [np.concatenate(z) for z in zip(run(small, torch.float32), run(big, torch.float32))]
  outs64 = [np.concatenate(z) for z in zip(run(small, torch.float64), run(big, torch.float64))]
  pool32, logits_fc32, logits_unbiased32 = outs32
  spread = {name: float(np.abs(a - b).max() / np.abs(b).max())
            for name, a, b in zip(("pool", "logits_fc", "logits_unbiased"), outs32, outs64)}

  resize_x = resize_input()
  resized = {}
  for h, w in RESIZE_OUT_SIZES:
    x = torch.from_numpy(resize_x).permute(0, 3, 1, 2)
    y = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    resized[f"resize_{h}x{w}"] = y.permute(0, 2, 3, 1).numpy()

  np.savez_compressed(
      GOLDEN_PATH,
      torch_keys=np.array(sorted(weights)),
      weights_checksum=weights_checksum(weights),
      images_small=small,
      image_big=big,
      pool=pool32.astype(np.float32),
      logits_fc=logits_fc32.astype(np.float32),
      logits_unbiased=logits_unbiased32.astype(np.float32),
      torch_f32_vs_f64=np.array([spread["pool"], spread["logits_fc"],
                                 spread["logits_unbiased"]]),
      resize_input=resize_x,
      **resized,
      versions=np.array([torch.__version__, torchvision.__version__,
                         pytorch_fid.__version__]),
  )
  print("pool mean/std/max", pool32.mean(), pool32.std(), pool32.max())
  print("logits std", logits_fc32.std(), "torch float32 vs float64 (max abs / max):", spread)
  print("wrote", GOLDEN_PATH, GOLDEN_PATH.stat().st_size, "bytes")


if __name__ == "__main__":
  _main()
