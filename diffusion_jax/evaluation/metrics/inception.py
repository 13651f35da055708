"""The FID Inception V3 in Flax: the network behind FID and the Inception Score.

This is the network of pytorch-fid's `fid_inception_v3()`, itself a port of the TF graph
`inception-2015-12-05` (`classify_image_graph_def.pb`) that the TTUR FID code and the improved-GAN
Inception Score code run. It differs from torchvision's Inception V3 in three places, all kept:
  * the 3x3 average pools inside the A, C and first E blocks ignore padded zeros
    (TF's `avg_pool` with SAME padding divides by the number of real pixels);
  * the last E block (`Mixed_7c`) pools its branch with a 3x3 *max* pool;
  * the classifier has 1008 outputs.
BatchNorm runs in inference mode with eps 1e-3; convolutions have no bias.

Input convention: images `[B, H, W, 3]`, RGB, as uint8 or float in [0, 255] (what samplers dump
and datasets store). `preprocess_images` reproduces pytorch-fid's preprocessing exactly: scale
to [0, 1], resize to 299x299 with bilinear interpolation, align_corners=False and no antialiasing
(`F.interpolate(..., mode='bilinear', align_corners=False)`), then map to [-1, 1].

Weights: pytorch-fid's converted TF weights,
    https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
Convert once (needs torch only for this step):
    python -m diffusion_jax.tools.convert_inception \
        --torch_weights pt_inception-2015-12-05-6726825d.pth --out inception_fid.npz
and load with `load_inception_params("inception_fid.npz")` (NumPy only).

Parameter names follow the torch state_dict one to one: the module path is the dotted torch
prefix, and the leaf is renamed (`torch_to_flax_name`):
    X.conv.weight [O, I, kh, kw]  -> params/X/conv/kernel [kh, kw, I, O]
    X.bn.weight / X.bn.bias       -> params/X/bn/scale / params/X/bn/bias
    X.bn.running_mean / _var      -> batch_stats/X/bn/mean / batch_stats/X/bn/var
    fc.weight [K, D] / fc.bias    -> params/fc/kernel [D, K] / params/fc/bias
(`num_batches_tracked` buffers carry no information at inference and are dropped.)
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util

from diffusion_jax.utils import outputs

__all__ = [
    "FID_WEIGHTS_URL",
    "INCEPTION_SIZE",
    "POOL_DIM",
    "NUM_CLASSES",
    "InceptionV3",
    "preprocess_images",
    "resize_bilinear",
    "bilinear_resize_matrix",
    "Classifier",
    "logits_from_pool",
    "inception_apply",
    "make_feature_fn",
    "load_inception_params",
    "save_inception_params",
    "torch_to_flax_name",
    "flax_to_torch_name",
    "torch_state_dict_to_variables",
]

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
INCEPTION_SIZE = 299
POOL_DIM = 2048
NUM_CLASSES = 1008
_BN_EPS = 1e-3

PrecisionLike = Any


# ------------------------------------------------------------------------------ preprocessing

def bilinear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """Interpolation matrix of torch's bilinear resize (align_corners=False, no antialias).

  torch's CPU kernel (float input, sizes given) works in float32: scale = in/out rounded to
  float32, source = scale * (dst + 0.5) - 0.5 clamped at 0, neighbour clamped at the last
  pixel, weights lambda and 1 - lambda. Here the source coordinate is computed exactly from
  that float32 scale (in float64, where the product and the subtraction are exact) and rounded
  to float32 once, as a fused multiply-add does. torch 2.14.1's outputs stored in
  tests/golden agree with this to the float32 rounding of the outputs (< 1e-7); rounding the
  product and the difference separately, as unfused float32 code does, moves the coordinate by
  up to one float32 ulp (~2e-6 for 32 -> 299) and left 6e-7 there. Against the real-valued
  formula the weights differ by at most (2 * in_size + 1) * 2**-24 (the float32 scale and the
  one rounding of the coordinate). Unlike `jax.image.resize`, nothing widens the kernel when
  shrinking.

  Args:
    in_size: input length along the axis.
    out_size: output length along the axis.

  Returns:
    float32 [out_size, in_size], rows summing to 1.
  """
  scale = np.float64(np.float32(in_size) / np.float32(out_size))
  dst = np.arange(out_size, dtype=np.float64)
  # The float32 scale has 24 significant bits and dst + 0.5 at most 21 (out_size < 2**20), so
  # the float64 product and the subtraction are exact: the cast to float32 is the one rounding.
  src = np.maximum((scale * (dst + 0.5) - 0.5).astype(np.float32), np.float32(0.0))
  lo = src.astype(np.int64)  # src >= 0, so truncation is floor
  hi = np.where(lo < in_size - 1, lo + 1, lo)
  lam_hi = np.clip(src - lo.astype(np.float32), 0.0, 1.0).astype(np.float32)
  lam_lo = (np.float32(1.0) - lam_hi).astype(np.float32)
  weights = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  np.add.at(weights, (rows, lo), lam_lo)
  np.add.at(weights, (rows, hi), lam_hi)
  return weights


def resize_bilinear(x_BxHxWxC: jax.Array, height: int, width: int,
                    precision: PrecisionLike = jax.lax.Precision.HIGHEST) -> jax.Array:
  """Bilinear resize matching `F.interpolate(mode='bilinear', align_corners=False)`.

  Two small matmuls with constant interpolation matrices: exact, shape-static, and fast on
  accelerators. `precision` defaults to HIGHEST because TPU matmuls otherwise round to bf16.

  Args:
    x_BxHxWxC: float images.
    height: output height.
    width: output width.
    precision: matmul precision.

  Returns:
    float32 [B, height, width, C].
  """
  x_BxHxWxC = jnp.asarray(x_BxHxWxC, jnp.float32)
  in_h, in_w = x_BxHxWxC.shape[1], x_BxHxWxC.shape[2]
  if (in_h, in_w) == (height, width):
    return x_BxHxWxC  # torch's weights are the identity here; skip the matmuls
  rows_OxH = jnp.asarray(bilinear_resize_matrix(in_h, height))
  cols_PxW = jnp.asarray(bilinear_resize_matrix(in_w, width))
  x_BxOxWxC = jnp.einsum("oh,bhwc->bowc", rows_OxH, x_BxHxWxC, precision=precision)
  return jnp.einsum("pw,bowc->bopc", cols_PxW, x_BxOxWxC, precision=precision)


def preprocess_images(images_BxHxWx3: jax.Array, size: int = INCEPTION_SIZE,
                      precision: PrecisionLike = jax.lax.Precision.HIGHEST) -> jax.Array:
  """pytorch-fid's preprocessing: [0, 255] -> [0, 1] -> bilinear resize -> [-1, 1].

  Args:
    images_BxHxWx3: uint8 or float RGB images in [0, 255].
    size: side of the square network input.
    precision: matmul precision of the resize.

  Returns:
    float32 [B, size, size, 3] in [-1, 1].
  """
  if images_BxHxWx3.ndim != 4 or images_BxHxWx3.shape[-1] != 3:
    raise ValueError(f"expected images [B, H, W, 3], got shape {images_BxHxWx3.shape}")
  x = jnp.asarray(images_BxHxWx3).astype(jnp.float32) / 255.0
  x = resize_bilinear(x, size, size, precision=precision)
  return 2.0 * x - 1.0


# ------------------------------------------------------------------------------------ network

class BasicConv2d(nn.Module):
  """Conv (no bias) -> BatchNorm (inference, eps 1e-3) -> ReLU, torch's `BasicConv2d`."""
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: tuple[int, int] = (0, 0)
  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, self.kernel_size, strides=self.strides,
                padding=[(p, p) for p in self.padding], use_bias=False,
                precision=self.precision, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=_BN_EPS, name="bn")(x)
    return nn.relu(x)


def _pool_3x3_same(x, kind: str):
  # TF's SAME pooling: averages ignore the padding, maxima never pick it (pads with -inf).
  if kind == "avg":
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                       count_include_pad=False)
  if kind == "max":
    return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
  raise ValueError(f"unknown pool kind {kind!r}; expected 'avg' or 'max'")


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  """35x35 block (Mixed_5b/c/d): 1x1, 5x5, double 3x3, pooled 1x1 branches."""
  pool_features: int
  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b1 = conv(64, (1, 1), name="branch1x1")(x)
    b5 = conv(48, (1, 1), name="branch5x5_1")(x)
    b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = conv(self.pool_features, (1, 1), name="branch_pool")(_pool_3x3_same(x, "avg"))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """35 -> 17 reduction (Mixed_6a)."""
  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b3 = conv(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
    bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = conv(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """17x17 block (Mixed_6b..6e) with factorised 7x7 convolutions."""
  channels_7x7: int
  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    c7 = self.channels_7x7
    b1 = conv(192, (1, 1), name="branch1x1")(x)
    b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
    b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = conv(192, (1, 1), name="branch_pool")(_pool_3x3_same(x, "avg"))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """17 -> 8 reduction (Mixed_7a)."""
  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b3 = conv(192, (1, 1), name="branch3x3_1")(x)
    b3 = conv(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
    b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = conv(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """8x8 block (Mixed_7b with an average pool, Mixed_7c with a max pool)."""
  pool: str = "avg"
  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b1 = conv(320, (1, 1), name="branch1x1")(x)
    b3 = conv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([
        conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
        conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
    ], axis=-1)
    bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([
        conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
        conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
    ], axis=-1)
    bp = conv(192, (1, 1), name="branch_pool")(_pool_3x3_same(x, self.pool))
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """pytorch-fid's FID Inception V3 on preprocessed inputs.

  Attributes:
    num_classes: classifier outputs (1008 in the FID graph).
    fc_bias: add the classifier bias to the logits. The improved-GAN Inception Score code
      multiplies pool_3 by the `softmax/logits/MatMul` weights only, without the bias, so the
      default False reproduces its scores; True gives torch's `fc(pool)`.
    precision: conv/matmul precision. HIGHEST by default: FID is sensitive to small feature
      changes, and TPU convolutions otherwise run single-pass bf16.
  """
  num_classes: int = NUM_CLASSES
  fc_bias: bool = False
  precision: PrecisionLike = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x_Bx299x299x3: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Runs the network.

    Args:
      x_Bx299x299x3: float images in [-1, 1] (see `preprocess_images`).

    Returns:
      (pool_Bx2048, logits_BxK): the pool_3 features and the classifier logits, float32.
    """
    conv = functools.partial(BasicConv2d, precision=self.precision)
    x = conv(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x_Bx299x299x3)
    x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_s2(x)
    for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
      x = InceptionA(pool_features, precision=self.precision, name=name)(x)
    x = InceptionB(precision=self.precision, name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160),
                     ("Mixed_6e", 192)):
      x = InceptionC(c7, precision=self.precision, name=name)(x)
    x = InceptionD(precision=self.precision, name="Mixed_7a")(x)
    x = InceptionE("avg", precision=self.precision, name="Mixed_7b")(x)
    x = InceptionE("max", precision=self.precision, name="Mixed_7c")(x)
    pool_Bx2048 = jnp.mean(x, axis=(1, 2))
    logits_BxK = Classifier(self.num_classes, add_bias=self.fc_bias,
                            precision=self.precision, name="fc")(pool_Bx2048)
    return pool_Bx2048, logits_BxK


class Classifier(nn.Module):
  """The final fc layer; the bias is always a parameter but only added when asked."""
  features: int
  add_bias: bool = False
  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, pool_BxD):
    kernel_DxK = self.param("kernel", nn.initializers.lecun_normal(),
                            (pool_BxD.shape[-1], self.features))
    bias_K = self.param("bias", nn.initializers.zeros, (self.features,))
    logits_BxK = jnp.dot(pool_BxD, kernel_DxK, precision=self.precision)
    return logits_BxK + bias_K[None, :] if self.add_bias else logits_BxK


def logits_from_pool(variables: Mapping[str, Any], pool_BxD: jax.Array, *,
                     fc_bias: bool = False,
                     precision: PrecisionLike = jax.lax.Precision.HIGHEST) -> jax.Array:
  """The classifier head alone, on pool_3 features.

  Args:
    variables: the full Inception variables (only params/fc is read).
    pool_BxD: pool_3 features.
    fc_bias: add the fc bias (see `InceptionV3.fc_bias`).
    precision: matmul precision.

  Returns:
    logits_BxK float32.
  """
  head = Classifier(variables["params"]["fc"]["bias"].shape[0], add_bias=fc_bias,
                    precision=precision)
  return head.apply({"params": variables["params"]["fc"]}, pool_BxD)


def inception_apply(variables: Mapping[str, Any], images_BxHxWxC: jax.Array, *,
                    model: InceptionV3 | None = None,
                    size: int = INCEPTION_SIZE) -> tuple[jax.Array, jax.Array]:
  """Preprocess and run the network: a pure per-batch function (jit / shard_map friendly).

  Args:
    variables: {'params': ..., 'batch_stats': ...} from `load_inception_params`.
    images_BxHxWxC: uint8 or float images in [0, 255], any size, RGB or grayscale (C = 1 is
      repeated to 3 channels).
    model: the module (default `InceptionV3()`).
    size: the side the images are resized to (pytorch-fid: 299).

  Returns:
    (pool_Bx2048, logits_BxK) float32.
  """
  model = InceptionV3() if model is None else model
  if images_BxHxWxC.shape[-1] == 1:
    images_BxHxWxC = jnp.repeat(images_BxHxWxC, 3, axis=-1)
  x = preprocess_images(images_BxHxWxC, size=size, precision=model.precision)
  return model.apply(variables, x)


FeatureFn = Callable[[np.ndarray | Iterable[np.ndarray]], tuple[np.ndarray, np.ndarray]]


def make_feature_fn(params: Mapping[str, Any], batch_size: int, *,
                    model: InceptionV3 | None = None) -> FeatureFn:
  """Batched feature extractor that compiles the network once per input image size.

  Every batch is padded to `batch_size` (padding rows are dropped afterwards), so a ragged
  last batch does not trigger a second compile. The variables are passed as a jit argument,
  not closed over, so the 24M weights do not become constants of the compiled program.

  Args:
    params: the variables dict {'params', 'batch_stats'} from `load_inception_params`.
    batch_size: images per network call.
    model: the module (default `InceptionV3()`).

  Returns:
    `features(images)` taking one array [N, H, W, 3] or an iterable of such arrays (e.g. a
    stream of sample batches) and returning NumPy (pool_Nx2048, logits_NxK) float32.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  model = InceptionV3() if model is None else model
  variables = jax.device_put(params)
  apply_fn = jax.jit(functools.partial(inception_apply, model=model))

  def run_batches(images_NxHxWx3):
    images_NxHxWx3 = np.asarray(images_NxHxWx3)
    num = images_NxHxWx3.shape[0]
    for start in range(0, num, batch_size):
      chunk = images_NxHxWx3[start:start + batch_size]
      valid = chunk.shape[0]
      if valid < batch_size:
        pad = np.zeros((batch_size - valid,) + chunk.shape[1:], chunk.dtype)
        chunk = np.concatenate([chunk, pad], axis=0)
      pool, logits = apply_fn(variables, chunk)
      yield np.asarray(pool)[:valid], np.asarray(logits)[:valid]

  def features(images):
    if isinstance(images, (np.ndarray, jax.Array)):
      images = [images]
    outputs = [out for chunk in images for out in run_batches(chunk)]
    if not outputs:
      return (np.zeros((0, POOL_DIM), np.float32),
              np.zeros((0, model.num_classes), np.float32))
    pools, logits = zip(*outputs)
    return np.concatenate(pools, axis=0), np.concatenate(logits, axis=0)

  return features


# ------------------------------------------------------------------------------------ weights

_TORCH_TO_FLAX_LEAF = {
    ("conv", "weight"): ("params", "kernel"),
    ("bn", "weight"): ("params", "scale"),
    ("bn", "bias"): ("params", "bias"),
    ("bn", "running_mean"): ("batch_stats", "mean"),
    ("bn", "running_var"): ("batch_stats", "var"),
    ("fc", "weight"): ("params", "kernel"),
    ("fc", "bias"): ("params", "bias"),
}
_FLAX_TO_TORCH_LEAF = {(col, layer, leaf): (layer, torch_leaf)
                       for (layer, torch_leaf), (col, leaf) in _TORCH_TO_FLAX_LEAF.items()}


def torch_to_flax_name(key: str) -> tuple[str, ...] | None:
  """Maps a torch state_dict key to its Flax variable path.

  Args:
    key: e.g. 'Mixed_5b.branch1x1.conv.weight'.

  Returns:
    e.g. ('params', 'Mixed_5b', 'branch1x1', 'conv', 'kernel'), or None for the
    `num_batches_tracked` counters, which inference does not use.
  """
  parts = tuple(key.split("."))
  if parts[-1] == "num_batches_tracked":
    return None
  mapped = _TORCH_TO_FLAX_LEAF.get(parts[-2:])
  if mapped is None:
    raise KeyError(f"no Flax counterpart for torch key {key!r}")
  collection, leaf = mapped
  return (collection,) + parts[:-1] + (leaf,)


def flax_to_torch_name(path: tuple[str, ...]) -> str:
  """Inverse of `torch_to_flax_name`: ('params', 'fc', 'kernel') -> 'fc.weight'."""
  collection, *modules, leaf = path
  mapped = _FLAX_TO_TORCH_LEAF.get((collection, modules[-1], leaf))
  if mapped is None:
    raise KeyError(f"no torch counterpart for Flax path {path!r}")
  return ".".join(modules[:-1] + list(mapped))


def _to_flax_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel" and value.ndim == 4:
    return np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO
  if path[-1] == "kernel" and value.ndim == 2:
    return value.T  # [out, in] -> [in, out]
  return value


def torch_state_dict_to_variables(state_dict: Mapping[str, np.ndarray]) -> dict:
  """Converts a torch-layout state_dict of NumPy arrays into Flax variables.

  Args:
    state_dict: torch key -> array in torch layout (conv OIHW, linear [out, in]).

  Returns:
    {'params': ..., 'batch_stats': ...} nested dicts of float32 NumPy arrays.
  """
  flat = {}
  for key, value in state_dict.items():
    path = torch_to_flax_name(key)
    if path is not None:
      flat[path] = np.ascontiguousarray(_to_flax_layout(path, np.asarray(value)),
                                        dtype=np.float32)
  return traverse_util.unflatten_dict(flat)


def save_inception_params(path: str | os.PathLike, variables: Mapping[str, Any]) -> None:
  """Writes variables as a flat .npz with '/'-joined Flax paths as keys.

  Args:
    path: the .npz to write, local or gs:// (parents made).
    variables: {'params': ..., 'batch_stats': ...} nested dicts of arrays.
  """
  flat = traverse_util.flatten_dict(variables)
  outputs.write_npz(path, **{"/".join(k): np.asarray(v, np.float32) for k, v in flat.items()})


def _missing_weights_message(path) -> str:
  return (f"Inception weights not found at {os.fspath(path)!r}. Download pytorch-fid's FID "
          f"Inception weights from\n  {FID_WEIGHTS_URL}\nand convert them once (needs torch):\n"
          "  python -m diffusion_jax.tools.convert_inception "
          "--torch_weights pt_inception-2015-12-05-6726825d.pth --out inception_fid.npz")


def load_inception_params(path: str | os.PathLike) -> dict:
  """Loads converted FID Inception weights (see the module docstring); NumPy only.

  Args:
    path: the .npz written by `convert_inception`, local or gs://.

  Returns:
    {'params': ..., 'batch_stats': ...} nested dicts of float32 NumPy arrays.

  Raises:
    FileNotFoundError: with the download URL and conversion command.
  """
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(_missing_weights_message(path))
  with path.open("rb") as f, np.load(f) as data:
    flat = {tuple(k.split("/")): np.asarray(data[k], np.float32) for k in data.files}
  return traverse_util.unflatten_dict(flat)
