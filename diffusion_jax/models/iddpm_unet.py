"""Improved DDPM's U-Net (Nichol and Dhariwal 2021) in Flax, output for output.

Mirrors `improved_diffusion/unet.py: UNetModel` of openai/improved-diffusion: DDPM's layout with
multi-head attention (at any set of resolutions), optional scale-shift norm (the timestep
embedding sets each block's GroupNorm scale and shift) and optional class conditioning (a label
embedding added to the timestep embedding). Where it differs from DDPM's U-Net (models/unet.py),
it follows the reference: the sinusoid is [cos, sin] with frequencies exp(-ln(10000) i / half),
GroupNorm's epsilon is 1e-5, the stride-2 convolution pads one pixel on every side, q, k and v
are one 1x1 layer split head by head, and the initialization is PyTorch's (weights and biases
uniform in +-1/sqrt(fan_in), the zero-initialized layers exactly zero, label embeddings
N(0, 1)).

Module names make the PyTorch state dict map one to one (`models.torch_names`): `input_blocks.3.0.in_layers.2.weight` is our
`input_blocks_3_0/in_layers_2/kernel` (numbered parts joined to the name before them).

Compute dtype, dropout and rematerialization work as in models/unet.py: bf16 activations with
float32 parameters, GroupNorm statistics, sinusoid and softmax; per-example dropout keys.
"""
from __future__ import annotations

import math
import re
import zlib
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import layers
from diffusion_jax.models import registry
from diffusion_jax.models import unet
from diffusion_jax.utils.settings import Setting

__all__ = ["IDDPMUNet", "timestep_embedding", "check_config", "attention_heads", "summary",
           "ARCHITECTURE"]

_GN_GROUPS = 32
_GN_EPS = 1e-5  # PyTorch's GroupNorm default, which the reference keeps


def _torch_bias_init(fan_in: int):
  """PyTorch's default bias: uniform in +-1/sqrt(fan_in) of the layer's weight."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


# PyTorch's default weight init (kaiming_uniform with a = sqrt(5)): uniform in +-1/sqrt(fan_in).
_TORCH_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _conv(features: int, fan_in: int, name: str, dtype: Any, *, kernel: int = 3,
          stride: int = 1, zero: bool = False) -> nn.Conv:
  # PyTorch's padding=1 for the 3x3 kernels, at stride 1 and 2 alike.
  pad = (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)),
                 kernel_init=nn.initializers.zeros if zero else _TORCH_KERNEL_INIT,
                 bias_init=nn.initializers.zeros if zero else _torch_bias_init(fan_in),
                 dtype=dtype, param_dtype=jnp.float32, name=name)


def _dense(features: int, fan_in: int, name: str, dtype: Any, zero: bool = False) -> nn.Dense:
  return nn.Dense(features, kernel_init=nn.initializers.zeros if zero else _TORCH_KERNEL_INIT,
                  bias_init=nn.initializers.zeros if zero else _torch_bias_init(fan_in),
                  dtype=dtype, param_dtype=jnp.float32, name=name)


def _group_norm(name: str, dtype: Any) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=_GN_GROUPS, epsilon=_GN_EPS, use_fast_variance=False,
                      dtype=dtype, param_dtype=jnp.float32, name=name)


def timestep_embedding(t_B: jax.Array, dim: int, dtype: Any = jnp.float32) -> jax.Array:
  """The reference's sinusoidal timestep embedding (`nn.timestep_embedding`).

  Args:
    t_B: timesteps [B], integer or float (rescaled timesteps are fractional).
    dim: embedding size; an odd size gets one zero column.
    dtype: compute dtype, promoted to at least float32 (the reference's): t * f reaches
      thousands of radians, whose phase bf16 would lose.

  Returns:
    [B, dim]: [cos(t f_i), sin(t f_i)], f_i = exp(-ln(10000) i / half), half = dim // 2.
  """
  if t_B.ndim != 1:
    raise ValueError(f"timesteps must have shape [B], got {t_B.shape}")
  dtype = jnp.promote_types(dtype, jnp.float32)
  half = dim // 2
  freqs_F = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=dtype) / half)
  args_BxF = t_B.astype(dtype)[:, None] * freqs_F[None, :]
  emb_BxD = jnp.concatenate([jnp.cos(args_BxF), jnp.sin(args_BxF)], axis=1)
  if dim % 2:
    emb_BxD = jnp.pad(emb_BxD, ((0, 0), (0, 1)))
  return emb_BxD


def attention_heads(width: int, *, num_heads: int, num_head_channels: int = -1,
                    num_heads_upsample: int = -1, up: bool = False) -> int:
  """Heads of an attention layer of `width` channels: width // num_head_channels when that is
  set, else num_heads (num_heads_upsample on the way up, when set)."""
  if num_head_channels > 0:
    return width // num_head_channels
  return num_heads_upsample if (up and num_heads_upsample > 0) else num_heads


class ResBlock(nn.Module):
  """in_layers (GN, SiLU, conv), emb_layers (SiLU, linear), out_layers (GN, [scale-shift], SiLU,
  dropout, zero conv), plus the input (through a 1x1 conv when the width changes)."""
  out_ch: int
  emb_ch: int
  dropout: float = 0.0
  scale_shift_norm: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC, emb_BxE, train: bool, dropout_keys_B=None):
    in_ch = x_BxHxWxC.shape[-1]
    h = nn.silu(_group_norm("in_layers_0", self.dtype)(x_BxHxWxC))
    h = _conv(self.out_ch, 9 * in_ch, "in_layers_2", self.dtype)(h)
    emb_out = _dense(2 * self.out_ch if self.scale_shift_norm else self.out_ch, self.emb_ch,
                     "emb_layers_1", self.dtype)(nn.silu(emb_BxE))[:, None, None, :]
    emb_out = emb_out.astype(h.dtype)
    norm = _group_norm("out_layers_0", self.dtype)
    if self.scale_shift_norm:
      scale, shift = jnp.split(emb_out, 2, axis=-1)
      h = nn.silu(norm(h) * (1 + scale) + shift)
    else:
      h = nn.silu(norm(h + emb_out))
    if train and self.dropout > 0 and dropout_keys_B is not None:
      site = zlib.crc32("/".join(self.scope.path).encode()) & 0x7FFFFFFF
      h = layers.example_dropout(h, self.dropout, dropout_keys_B, site)
    else:
      h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = _conv(self.out_ch, 9 * self.out_ch, "out_layers_3", self.dtype, zero=True)(h)
    x = x_BxHxWxC
    if in_ch != self.out_ch:
      x = _conv(self.out_ch, in_ch, "skip_connection", self.dtype, kernel=1)(x)
    return x.astype(h.dtype) + h


class AttentionBlock(nn.Module):
  """Multi-head self-attention over all H*W positions, residual. The 3C channels of the one qkv
  layer are split into heads first, then each head's into q, k and v (the reference's layout)."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC):
    b, hh, ww, c = x_BxHxWxC.shape
    heads = self.num_heads
    ch = c // heads
    h = _group_norm("norm", self.dtype)(x_BxHxWxC)
    qkv = _dense(3 * c, c, "qkv", self.dtype)(h).reshape(b, hh * ww, heads, 3 * ch)
    q_BxNxHxD, k_BxNxHxD, v_BxNxHxD = jnp.split(qkv, 3, axis=-1)
    # q and k each scaled by ch^-1/4 before the product, as the reference (for fp16 range).
    scale = ch ** -0.25
    logits = jnp.einsum("bthc,bshc->bhts", q_BxNxHxD * scale, k_BxNxHxD * scale)
    softmax_dtype = jnp.promote_types(logits.dtype, jnp.float32)
    weights = jax.nn.softmax(logits.astype(softmax_dtype), axis=-1).astype(v_BxNxHxD.dtype)
    out = jnp.einsum("bhts,bshc->bthc", weights, v_BxNxHxD).reshape(b, hh, ww, c)
    out = _dense(c, c, "proj_out", self.dtype, zero=True)(out)
    return x_BxHxWxC.astype(out.dtype) + out


class Downsample(nn.Module):
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC):
    c = x_BxHxWxC.shape[-1]
    return _conv(c, 9 * c, "op", self.dtype, stride=2)(x_BxHxWxC)


class Upsample(nn.Module):
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC):
    c = x_BxHxWxC.shape[-1]
    x = jnp.repeat(jnp.repeat(x_BxHxWxC, 2, axis=1), 2, axis=2)  # nearest, 2x
    return _conv(c, 9 * c, "conv", self.dtype)(x)


def check_config(*, image_size: int, ch: int, ch_mult: Sequence[int],
                 attn_resolutions: Sequence[int], num_heads: int = 1,
                 num_head_channels: int = -1, num_heads_upsample: int = -1,
                 num_classes: int = 0, null_class: bool = False) -> None:
  """Raises ValueError, saying what to set, for settings the U-Net cannot run; call before
  compiling. On top of DDPM's geometry checks (`unet.check_config`: image size, attention
  resolutions reached, GroupNorm widths): num_classes >= 0 (> 0 with a null class), and the
  heads of every attention layer split its width evenly (num_heads down and in the middle,
  num_heads_upsample on the way up, or num_head_channels everywhere)."""
  unet.check_config(image_size=image_size, ch_mult=ch_mult, attn_resolutions=attn_resolutions,
                    block_size=1, ch=ch)
  if num_classes < 0:
    raise ValueError(f"num_classes={num_classes}: use 0 (unconditional) or the number of classes")
  if null_class and not num_classes:
    raise ValueError("a null class (for classifier-free guidance) needs a class-conditional "
                     "model: set num_classes to the number of classes")
  for name, value in (("num_heads", num_heads), ("num_heads_upsample", num_heads_upsample),
                      ("num_head_channels", num_head_channels)):
    if value == 0 or value < -1 or (name == "num_heads" and value < 1):
      raise ValueError(f"{name}={value}: use a positive number"
                       + ("" if name == "num_heads" else " or -1 (unused)"))
  sizes = [image_size // 2 ** i for i in range(len(ch_mult))]
  # The levels' attention widths (the same on the way down and up) and the middle block's,
  # which always has attention but only with num_heads: the output blocks alone use
  # num_heads_upsample, so it need not divide a width that only the middle block has.
  level_widths = sorted({ch * m for m, s in zip(ch_mult, sizes) if s in attn_resolutions})
  widths = sorted(set(level_widths) | {ch * ch_mult[-1]})
  checks = [("num_head_channels", num_head_channels, widths)] if num_head_channels > 0 else [
      ("num_heads", num_heads, widths), ("num_heads_upsample", num_heads_upsample, level_widths)]
  for name, value, needed in checks:
    for width in needed:
      if value > 0 and width % value:
        also = (" or -1 to use num_heads" if name == "num_head_channels" else "")
        raise ValueError(
            f"{name}={value} does not divide the width {width} of an attention layer (the "
            f"widths it must divide: {tuple(needed)}); set --config.model.{name} to a divisor "
            f"of every one{also}")


class IDDPMUNet(nn.Module):
  """Improved DDPM's U-Net (`improved_diffusion/unet.py: UNetModel`). The defaults are the
  reference's CIFAR-10 model (52,546,438 parameters; its dropout is 0.3).

  Attributes:
    ch: base width (the reference's model_channels); the embeddings are 4 * ch wide.
    ch_mult: width multiplier per resolution level.
    num_res_blocks: ResBlocks per level on the way down (one more on the way up).
    attn_resolutions: feature-map sizes at which ResBlocks are followed by attention (the
      reference's attention_resolutions are downsampling rates: image_size // size).
    dropout: inside ResBlocks, with train=True.
    out_ch: output channels (2C for a learned variance).
    num_heads, num_head_channels, num_heads_upsample: the attention heads (`attention_heads`).
    scale_shift_norm: the timestep embedding gives each block's norm a scale and a shift.
    num_classes: > 0 for a class-conditional model (labels 0 .. num_classes - 1).
    null_class: one more label embedding, for label num_classes, "no class": classifier-free
      guidance's unconditional model (trained by replacing labels with it now and then).
    dtype: compute dtype; parameters are always float32.
    remat: recompute ResBlock activations in the backward pass.
  """
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 3
  attn_resolutions: Sequence[int] = (16, 8)
  dropout: float = 0.0
  out_ch: int = 6
  num_heads: int = 4
  num_head_channels: int = -1
  num_heads_upsample: int = -1
  scale_shift_norm: bool = True
  num_classes: int = 0
  null_class: bool = False
  dtype: Any = jnp.float32
  remat: bool = False

  def _heads(self, width: int, up: bool = False) -> int:
    return attention_heads(width, num_heads=self.num_heads,
                           num_head_channels=self.num_head_channels,
                           num_heads_upsample=self.num_heads_upsample, up=up)

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, t_B: jax.Array, train: bool = False,
               dropout_keys_B: jax.Array | None = None,
               labels_B: jax.Array | None = None) -> jax.Array:
    """Predicts the network output for noisy images at timesteps t (of class labels_B).

    Args:
      x_BxHxWxC: images, [B, H, W, C].
      t_B: timesteps [B], integer or float.
      train: enables dropout (masks from `dropout_keys_B`, one key per example, when given).
      dropout_keys_B: optional per-example PRNG keys.
      labels_B: int [B] class labels; required exactly when num_classes > 0.

    Returns:
      [B, H, W, out_ch], float32 (float64 only if dtype is float64).
    """
    b, height, width, _ = x_BxHxWxC.shape
    if t_B.shape != (b,):
      raise ValueError(f"t must have shape [{b}], got {t_B.shape}")
    if (labels_B is not None) != (self.num_classes > 0):
      raise ValueError("labels are needed exactly when the model is class-conditional: "
                       f"num_classes={self.num_classes}, labels "
                       f"{'given' if labels_B is not None else 'not given'}")
    if labels_B is not None and labels_B.shape != (b,):
      raise ValueError(f"labels must have shape [{b}], got {labels_B.shape}")
    for size in {height, width}:
      check_config(image_size=size, ch=self.ch, ch_mult=self.ch_mult,
                   attn_resolutions=self.attn_resolutions, num_heads=self.num_heads,
                   num_head_channels=self.num_head_channels,
                   num_heads_upsample=self.num_heads_upsample, num_classes=self.num_classes,
                   null_class=self.null_class)
    attn = tuple(self.attn_resolutions)
    emb_ch = 4 * self.ch
    block = nn.remat(ResBlock, static_argnums=(3,)) if self.remat else ResBlock

    emb = timestep_embedding(t_B, self.ch, self.dtype)
    emb = _dense(emb_ch, self.ch, "time_embed_0", self.dtype)(emb)
    emb = _dense(emb_ch, emb_ch, "time_embed_2", self.dtype)(nn.silu(emb))
    if self.num_classes:
      embed = nn.Embed(self.num_classes + int(self.null_class), emb_ch,
                       embedding_init=nn.initializers.normal(1.0), param_dtype=jnp.float32,
                       name="label_emb")
      emb = emb + embed(labels_B).astype(emb.dtype)

    def res(out_ch, name, h):
      return block(out_ch, emb_ch, self.dropout, self.scale_shift_norm, self.dtype,
                   name=name)(h, emb, train, dropout_keys_B)

    h = _conv(self.ch, 9 * x_BxHxWxC.shape[-1], "input_blocks_0_0", self.dtype)(x_BxHxWxC)
    hs = [h]
    k = 1
    for level, mult in enumerate(self.ch_mult):
      for _ in range(self.num_res_blocks):
        h = res(self.ch * mult, f"input_blocks_{k}_0", h)
        if h.shape[1] in attn:
          h = AttentionBlock(self._heads(h.shape[-1]), self.dtype, name=f"input_blocks_{k}_1")(h)
        hs.append(h)
        k += 1
      if level != len(self.ch_mult) - 1:
        h = Downsample(self.dtype, name=f"input_blocks_{k}_0")(h)
        hs.append(h)
        k += 1

    c = h.shape[-1]
    h = res(c, "middle_block_0", h)
    h = AttentionBlock(self._heads(c), self.dtype, name="middle_block_1")(h)
    h = res(c, "middle_block_2", h)

    k = 0
    for level in reversed(range(len(self.ch_mult))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, hs.pop().astype(h.dtype)], axis=-1)
        h = res(self.ch * self.ch_mult[level], f"output_blocks_{k}_0", h)
        layer = 1
        if h.shape[1] in attn:
          h = AttentionBlock(self._heads(h.shape[-1], up=True), self.dtype,
                             name=f"output_blocks_{k}_{layer}")(h)
          layer += 1
        if level and i == self.num_res_blocks:
          h = Upsample(self.dtype, name=f"output_blocks_{k}_{layer}")(h)
        k += 1
    assert not hs, "every skip connection must be consumed"

    h = nn.silu(_group_norm("out_0", self.dtype)(h))
    h = _conv(self.out_ch, 9 * h.shape[-1], "out_2", self.dtype, zero=True)(h)
    return h.astype(jnp.promote_types(self.dtype, jnp.float32))


# ----------------------------------------------------------------------------------------------
# The parameter table.

def summary(model: IDDPMUNet, image_size: int, channels: int) -> str:
  """Parameter-count table per top-level module (no compile); ends with `total params: N`."""
  x = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  labels = jax.ShapeDtypeStruct((1,), jnp.int32) if model.num_classes else None
  params = jax.eval_shape(lambda k, x, t, labels: model.init(k, x, t, labels_B=labels),
                          jax.random.key(0), x, t, labels)["params"]
  order = sorted(params, key=lambda n: (_ORDER.index(_group(n)),
                                        [int(p) for p in re.findall(r"\d+", n)]))
  return layers.param_table(params, order)


_ORDER = ("time_embed", "label_emb", "input_blocks", "middle_block", "output_blocks", "out")


def _group(name: str) -> str:
  return re.sub(r"(_\d+)+$", "", name)


# ----------------------------------------------------------------------------------------------
# The registry entry: model.architecture 'iddpm'.

SETTINGS = (
    Setting("num_heads", 1, "int", 1, note="attention heads; each width with attention splits "
            "evenly"),
    Setting("num_head_channels", -1, "int", -1, note="-1 = use num_heads"),
    Setting("num_heads_upsample", -1, "int", -1, note="-1 = num_heads"),
    Setting("scale_shift_norm", False, "bool",
            note="the timestep sets each block's norm scale and shift"),
    Setting("num_classes", 0, "int", 0, note="0 = unconditional"),
    # Classifier-free guidance's training: each label is replaced by the null class (label
    # num_classes, whose embedding row exists only when p_uncond > 0) with this probability.
    Setting("p_uncond", 0.0, "float", 0, 1, high_open=True, note="0 = no null class"),
)


def _build(*, p_uncond: float, **settings) -> IDDPMUNet:
  return IDDPMUNet(null_class=p_uncond > 0, **settings)


def _check(field, *, image_size: int, channels: int, ch: int, ch_mult: Sequence[int],
           attn_resolutions: Sequence[int], num_heads: int, num_head_channels: int,
           num_heads_upsample: int, num_classes: int, p_uncond: float, **_) -> None:
  del channels
  if p_uncond > 0 and not num_classes:
    raise ValueError(f"model.p_uncond={p_uncond!r} trains classifier-free guidance's null "
                     f"class, which needs a class-conditional model: set {field('num_classes')} "
                     f"to the number of classes, or {field('p_uncond')}=0")
  check_config(image_size=image_size, ch=ch, ch_mult=ch_mult, attn_resolutions=attn_resolutions,
               num_heads=num_heads, num_head_channels=num_head_channels,
               num_heads_upsample=num_heads_upsample, num_classes=num_classes,
               null_class=p_uncond > 0)


ARCHITECTURE = registry.Architecture(
    name="iddpm", title="Improved DDPM's U-Net", build=_build, settings=SETTINGS, check=_check,
    summary=summary, name_maps={"torch": "diffusion_jax.models.torch_names"},
    summary_line="Improved DDPM's U-Net (Nichol and Dhariwal 2021): multi-head attention, "
    "scale-shift norm, class labels")
