"""The DDPM U-Net (Ho, Jain, Abbeel 2020) in Flax, parameter for parameter.

Mirrors `diffusion_tf/models/unet.py` and `diffusion_tf/nn.py` of the authors' TensorFlow code:
same layers, same initialisation, same parameter count (35,746,307 for CIFAR-10), and module
names chosen so every TF variable maps onto one of our parameters (`models.tf_names`).

Compute dtype: with `dtype=jnp.bfloat16` activations and matmuls/convs run in bf16 while the
parameters stay float32; GroupNorm statistics, the timestep sinusoid and the attention softmax are
computed in float32, and the output is always float32.

In training, dropout masks come from one key per example (`example_dropout`), so the model runs
on the whole batch at once.
"""
from __future__ import annotations

import math
import zlib
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import layers
from diffusion_jax.models import registry
from diffusion_jax.utils.settings import Setting

__all__ = [
    "UNet",
    "ResBlock",
    "AttnBlock",
    "get_timestep_embedding",
    "space_to_depth",
    "depth_to_space",
    "check_config",
    "summary",
    "ARCHITECTURE",
]

_GN_GROUPS = 32
_GN_EPS = 1e-6
# The original's `init_scale=0.` is turned into 1e-10 by `nn.default_init`: tiny, not zero, so
# the residual branches and the output start (almost) switched off yet still receive gradients.
_ZERO_SCALE = 1e-10


def _init(scale: float = 1.0):
  # TF's variance_scaling and JAX's agree on fans: a [in, out] matrix has fan_in=in,
  # fan_out=out; a [kh, kw, in, out] kernel multiplies both by kh*kw. The original's `nin`
  # (1x1 layers) stores a [in, out] matrix, which our Dense kernels reproduce exactly.
  return nn.initializers.variance_scaling(scale, "fan_avg", "uniform")


def _dense(features: int, name: str, dtype: Any, scale: float = 1.0) -> nn.Dense:
  return nn.Dense(features, kernel_init=_init(scale), bias_init=nn.initializers.zeros,
                  dtype=dtype, param_dtype=jnp.float32, name=name)


def _conv3x3(features: int, name: str, dtype: Any, scale: float = 1.0,
             stride: int = 1) -> nn.Conv:
  # TF 'SAME' for a 3x3 kernel: (1, 1) at stride 1; at stride 2 on an even size the total pad
  # is 1 and TF puts it all at the bottom/right. Written out so nothing depends on how a
  # library spells 'SAME'.
  padding = ((1, 1), (1, 1)) if stride == 1 else ((0, 1), (0, 1))
  return nn.Conv(features, (3, 3), strides=(stride, stride), padding=padding,
                 kernel_init=_init(scale), bias_init=nn.initializers.zeros,
                 dtype=dtype, param_dtype=jnp.float32, name=name)


def _group_norm(name: str, dtype: Any) -> nn.GroupNorm:
  # Two-pass variance, as tf.nn.moments in the original; flax promotes the statistics to
  # float32 even when the activations are bf16.
  return nn.GroupNorm(num_groups=_GN_GROUPS, epsilon=_GN_EPS, use_fast_variance=False,
                      dtype=dtype, param_dtype=jnp.float32, name=name)


def get_timestep_embedding(t_B: jax.Array, dim: int, dtype: Any = jnp.float32) -> jax.Array:
  """Sinusoidal timestep embedding of the original (tensor2tensor flavour).

  Args:
    t_B: timesteps, shape [B], integer or float.
    dim: embedding size (the U-Net's `ch`); odd sizes get one zero column.
    dtype: compute dtype; promoted to at least float32 because t * freq reaches ~1000 rad,
      where bf16 would lose the phase entirely.

  Returns:
    [B, dim] array: [sin(t f_i), cos(t f_i)] with f_i = exp(-ln(10000) i / (dim/2 - 1)).
  """
  if t_B.ndim != 1:
    raise ValueError(f"timesteps must have shape [B], got {t_B.shape}")
  half = dim // 2
  if half < 2:
    raise ValueError(f"timestep embedding size must be >= 4, got {dim}")
  dtype = jnp.promote_types(dtype, jnp.float32)
  freqs_F = jnp.exp(jnp.arange(half, dtype=dtype) * (-math.log(10000.0) / (half - 1)))
  args_BxF = t_B.astype(dtype)[:, None] * freqs_F[None, :]
  emb_BxD = jnp.concatenate([jnp.sin(args_BxF), jnp.cos(args_BxF)], axis=1)
  if dim % 2 == 1:
    emb_BxD = jnp.pad(emb_BxD, ((0, 0), (0, 1)))
  return emb_BxD


def space_to_depth(x_BxHxWxC: jax.Array, block_size: int) -> jax.Array:
  """`tf.nn.space_to_depth` (NHWC): depth index is (dy * block_size + dx) * C + c.

  Args:
    x_BxHxWxC: input with H and W divisible by block_size.
    block_size: side of the square blocks folded into channels.

  Returns:
    [B, H/bs, W/bs, bs*bs*C] array.
  """
  if block_size == 1:
    return x_BxHxWxC
  b, h, w, c = x_BxHxWxC.shape
  bs = block_size
  x = x_BxHxWxC.reshape(b, h // bs, bs, w // bs, bs, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // bs, w // bs, bs * bs * c)


def depth_to_space(x_BxHxWxD: jax.Array, block_size: int) -> jax.Array:
  """`tf.nn.depth_to_space` (NHWC), the inverse of `space_to_depth`.

  Args:
    x_BxHxWxD: input with D divisible by block_size**2.
    block_size: side of the square blocks unfolded from channels.

  Returns:
    [B, H*bs, W*bs, D/(bs*bs)] array.
  """
  if block_size == 1:
    return x_BxHxWxD
  b, h, w, d = x_BxHxWxD.shape
  bs = block_size
  c = d // (bs * bs)
  x = x_BxHxWxD.reshape(b, h, w, bs, bs, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * bs, w * bs, c)


class ResBlock(nn.Module):
  """Residual block: GN-swish-conv, + projected temb, GN-swish-dropout-conv, 1x1 shortcut."""
  out_ch: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC, temb_BxT, train: bool, dropout_keys_B=None):
    h = nn.swish(_group_norm("norm1", self.dtype)(x_BxHxWxC))
    h = _conv3x3(self.out_ch, "conv1", self.dtype)(h)
    h = h + _dense(self.out_ch, "temb_proj", self.dtype)(nn.swish(temb_BxT))[:, None, None, :]
    h = nn.swish(_group_norm("norm2", self.dtype)(h))
    if train and self.dropout > 0 and dropout_keys_B is not None:
      # Example b's mask comes from its own key folded with this block's name, so it does not
      # depend on the batch size or on how the batch is split over devices.
      site = zlib.crc32("/".join(self.scope.path).encode()) & 0x7FFFFFFF
      h = layers.example_dropout(h, self.dropout, dropout_keys_B, site)
    else:
      h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = _conv3x3(self.out_ch, "conv2", self.dtype, scale=_ZERO_SCALE)(h)
    x = x_BxHxWxC
    if x.shape[-1] != self.out_ch:
      # The original's `nin_shortcut`: a 1x1 layer stored as an [in, out] matrix.
      x = _dense(self.out_ch, "nin_shortcut", self.dtype)(x)
    return x.astype(h.dtype) + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all H*W positions, residual."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC):
    b, hh, ww, c = x_BxHxWxC.shape
    h = _group_norm("norm", self.dtype)(x_BxHxWxC)
    q_BxNxC = _dense(c, "q", self.dtype)(h).reshape(b, hh * ww, c)
    k_BxNxC = _dense(c, "k", self.dtype)(h).reshape(b, hh * ww, c)
    v_BxNxC = _dense(c, "v", self.dtype)(h).reshape(b, hh * ww, c)
    logits_BxNxN = jnp.einsum("bic,bjc->bij", q_BxNxC, k_BxNxC) * (c ** -0.5)
    # Softmax in (at least) float32: bf16 exp/sum over hundreds of keys shifts the weights.
    softmax_dtype = jnp.promote_types(logits_BxNxN.dtype, jnp.float32)
    w_BxNxN = jax.nn.softmax(logits_BxNxN.astype(softmax_dtype), axis=-1)
    w_BxNxN = w_BxNxN.astype(v_BxNxC.dtype)
    h = jnp.einsum("bij,bjc->bic", w_BxNxN, v_BxNxC).reshape(b, hh, ww, c)
    h = _dense(c, "proj_out", self.dtype, scale=_ZERO_SCALE)(h)
    return x_BxHxWxC.astype(h.dtype) + h


class _TimestepEmbed(nn.Module):
  ch: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, t_B):
    temb = get_timestep_embedding(t_B, self.ch, self.dtype)
    temb = _dense(4 * self.ch, "dense0", self.dtype)(temb)
    return _dense(4 * self.ch, "dense1", self.dtype)(nn.swish(temb))


class _Resample(nn.Module):
  """`downsample` (3x3 stride-2 conv) or `upsample` (nearest 2x, then 3x3 conv)."""
  up: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC):
    c = x_BxHxWxC.shape[-1]
    if self.up:
      # TF's nearest resize with align_corners=True at exactly 2x picks source index
      # round(i (n-1) / (2n-1)) = i // 2, i.e. a plain repeat.
      x = jnp.repeat(jnp.repeat(x_BxHxWxC, 2, axis=1), 2, axis=2)
      return _conv3x3(c, "conv", self.dtype)(x)
    return _conv3x3(c, "conv", self.dtype, stride=2)(x_BxHxWxC)


def _res_block_cls(remat: bool):
  # `train` (argument 3, counting self) is a Python bool and must stay static under remat;
  # the dropout keys (argument 4) are traced.
  return nn.remat(ResBlock, static_argnums=(3,)) if remat else ResBlock


class _Level(nn.Module):
  """One resolution: res blocks (with attention at `attn_resolutions`), then a resample.

  Going down (`up=False`) it returns every block's output and the downsampled one, the skip
  connections; going up it concatenates one skip (popped from the end of `skips`) before each
  of its num_res_blocks + 1 blocks and returns the upsampled output.
  """
  out_ch: int
  num_res_blocks: int
  attn_resolutions: tuple[int, ...]
  resample: bool
  dropout: float
  dtype: Any
  remat: bool
  up: bool

  @nn.compact
  def __call__(self, h, temb, train: bool, keys, skips: list | None = None):
    block_cls = _res_block_cls(self.remat)
    outputs = []
    for i in range(self.num_res_blocks + int(self.up)):
      if self.up:
        h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
      h = block_cls(self.out_ch, self.dropout, self.dtype, name=f"block_{i}")(h, temb, train,
                                                                            keys)
      if h.shape[1] in self.attn_resolutions:
        h = AttnBlock(self.dtype, name=f"attn_{i}")(h)
      outputs.append(h)
    if self.resample:
      h = _Resample(up=self.up, dtype=self.dtype,
                    name="upsample" if self.up else "downsample")(h)
      outputs.append(h)
    return h if self.up else outputs


class _Middle(nn.Module):
  dropout: float
  dtype: Any
  remat: bool

  @nn.compact
  def __call__(self, h, temb, train: bool, keys):
    block_cls = _res_block_cls(self.remat)
    c = h.shape[-1]
    h = block_cls(c, self.dropout, self.dtype, name="block_1")(h, temb, train, keys)
    h = AttnBlock(self.dtype, name="attn_1")(h)
    return block_cls(c, self.dropout, self.dtype, name="block_2")(h, temb, train, keys)


def check_config(*, image_size: int, ch_mult: Sequence[int], attn_resolutions: Sequence[int],
                 block_size: int = 1, ch: int = 128) -> None:
  """Raises ValueError for U-Net settings the original cannot run; call before compiling.

  Args:
    image_size: input height and width in pixels.
    ch_mult: per-level channel multipliers (one level per entry).
    attn_resolutions: feature-map sizes (after space-to-depth) that get attention.
    block_size: space-to-depth factor applied to the input.
    ch: the model's base width; every level's width ch * mult must split into
      32 GroupNorm groups.
  """
  ch_mult = tuple(ch_mult)
  if not ch_mult:
    raise ValueError("ch_mult must have at least one level")
  if block_size < 1:
    raise ValueError(f"block_size must be >= 1, got {block_size}")
  factor = 2 ** (len(ch_mult) - 1) * block_size
  if image_size <= 0 or image_size % factor:
    raise ValueError(
        f"image_size {image_size} is not divisible by the total downsampling factor {factor} "
        f"(2**(len(ch_mult)-1) * block_size = 2**{len(ch_mult) - 1} * {block_size}); "
        f"use an image size that is a multiple of {factor}, fewer levels in ch_mult, or a "
        f"smaller block_size")
  base = image_size // block_size
  reached = [base // 2 ** i for i in range(len(ch_mult))]
  unreached = sorted(set(attn_resolutions) - set(reached))
  if unreached:
    raise ValueError(
        f"attn_resolutions {tuple(attn_resolutions)} contains {tuple(unreached)}, which the "
        f"model never reaches: with image_size {image_size}, block_size {block_size} and "
        f"{len(ch_mult)} levels its feature maps are {tuple(reached)}; pick attention "
        f"resolutions from those")
  bad = [ch * m for m in ch_mult if (ch * m) % _GN_GROUPS]
  if ch < 4 or bad:
    raise ValueError(
        f"ch={ch} with ch_mult {ch_mult} gives widths {tuple(bad)} that do not "
        f"split into {_GN_GROUPS} GroupNorm groups; use ch (and ch * mult) a multiple of "
        f"{_GN_GROUPS}")


class UNet(nn.Module):
  """The DDPM U-Net (`diffusion_tf/models/unet.py: model`), including the LSUN scripts'
  optional space-to-depth wrapper (`block_size`).

  Attributes:
    ch: base width; also the timestep sinusoid size (the embedding MLP is 4 * ch wide).
    ch_mult: width multiplier per resolution level.
    num_res_blocks: ResBlocks per level on the way down (one more on the way up).
    attn_resolutions: feature-map sizes at which ResBlocks are followed by attention.
    dropout: dropout rate inside ResBlocks, active only when called with train=True.
    out_ch: output channels (C for a fixed variance, 2C for a learned one).
    dtype: compute dtype; parameters are always float32.
    remat: recompute ResBlock activations in the backward pass to save memory.
    block_size: space-to-depth factor on the input (depth-to-space on the output).
  """
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.0
  out_ch: int = 3
  dtype: Any = jnp.float32
  remat: bool = False
  block_size: int = 1

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, t_B: jax.Array, train: bool = False,
               dropout_keys_B: jax.Array | None = None) -> jax.Array:
    """Predicts the network output for noisy images at timesteps t.

    Args:
      x_BxHxWxC: images, [B, H, W, C].
      t_B: integer (or float) timesteps, [B].
      train: enables dropout. Its masks come from `dropout_keys_B` when given, else from
        rngs={'dropout': key} (needed then when dropout > 0).
      dropout_keys_B: optional PRNG keys, one per example: example b's masks depend only on
        its key, whatever the batch it is in (the training step uses this so that results
        do not change with the number of devices).

    Returns:
      [B, H, W, out_ch], float32 (float64 only if dtype is float64).
    """
    b, height, width, _ = x_BxHxWxC.shape
    if t_B.shape != (b,):
      raise ValueError(f"t must have shape [{b}], got {t_B.shape}")
    for size in {height, width}:
      check_config(image_size=size, ch_mult=self.ch_mult,
                   attn_resolutions=self.attn_resolutions, block_size=self.block_size,
                   ch=self.ch)
    attn_res = tuple(self.attn_resolutions)
    n_levels = len(self.ch_mult)
    x = space_to_depth(x_BxHxWxC, self.block_size)

    temb = _TimestepEmbed(self.ch, self.dtype, name="temb")(t_B)

    hs = [_conv3x3(self.ch, "conv_in", self.dtype)(x)]
    for i, mult in enumerate(self.ch_mult):
      hs += _Level(self.ch * mult, self.num_res_blocks, attn_res, i != n_levels - 1,
                   self.dropout, self.dtype, self.remat, up=False, name=f"down_{i}")(
                       hs[-1], temb, train, dropout_keys_B)

    h = _Middle(self.dropout, self.dtype, self.remat, name="mid")(hs[-1], temb, train,
                                                                  dropout_keys_B)

    for i in reversed(range(n_levels)):
      h = _Level(self.ch * self.ch_mult[i], self.num_res_blocks, attn_res, i != 0,
                 self.dropout, self.dtype, self.remat, up=True, name=f"up_{i}")(
                     h, temb, train, dropout_keys_B, hs)
    assert not hs, "every skip connection must be consumed"

    h = nn.swish(_group_norm("norm_out", self.dtype)(h))
    h = _conv3x3(self.out_ch * self.block_size ** 2, "conv_out", self.dtype,
                 scale=_ZERO_SCALE)(h)
    # float32 out whatever the compute dtype (float64 stays float64, for reference runs).
    out_dtype = jnp.promote_types(self.dtype, jnp.float32)
    return depth_to_space(h.astype(out_dtype), self.block_size)


# ----------------------------------------------------------------------------------------------
# The parameter table.

def _param_shapes(model: UNet, image_size: int, channels: int):
  x = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  variables = jax.eval_shape(lambda k, x, t: model.init(k, x, t, train=False),
                             jax.random.key(0), x, t)
  return variables["params"]


def summary(model: UNet, image_size: int, channels: int) -> str:
  """Parameter-count table per top-level block, without compiling anything.

  Args:
    model: the U-Net to describe.
    image_size: input height and width.
    channels: input channels.

  Returns:
    a multi-line table ending with the line `total params: N` (N comma-formatted).
  """
  params = _param_shapes(model, image_size, channels)
  n_levels = len(model.ch_mult)
  order = (["conv_in", "temb"] + [f"down_{i}" for i in range(n_levels)] + ["mid"]
           + [f"up_{i}" for i in reversed(range(n_levels))] + ["norm_out", "conv_out"])
  assert set(order) == set(params), sorted(set(order) ^ set(params))
  return layers.param_table(params, order)


def _check(field, *, image_size: int, channels: int, ch: int, ch_mult: Sequence[int],
           attn_resolutions: Sequence[int], block_size: int, **_) -> None:
  del field, channels
  check_config(image_size=image_size, ch_mult=ch_mult, attn_resolutions=attn_resolutions,
               block_size=block_size, ch=ch)


# model.architecture 'ddpm': the original's U-Net, with its TF checkpoints' names.
ARCHITECTURE = registry.Architecture(
    name="ddpm", title="DDPM's U-Net", build=UNet,
    settings=(Setting("block_size", 1, "int", 1,
                      note="space-to-depth factor of the input; 1 = none"),),
    check=_check, summary=summary, name_maps={"diffusers": "diffusion_jax.models.diffusers_names",
                                             "tf": "diffusion_jax.models.tf_names"},
    summary_line="the original's U-Net (Ho et al. 2020), with the LSUN scripts' space-to-depth")
