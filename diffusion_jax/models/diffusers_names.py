"""diffusers' `UNet2DModel` and DDPM's U-Net (`models.unet`): the state dict's names and layout, and
the `config.json` that describes one as the other, both ways.

diffusers publishes the authors' models (google/ddpm-cifar10-32, google/ddpm-ema-celebahq-256, ...)
as a `UNet2DModel` whose config makes it DDPM's U-Net exactly: `flip_sin_to_cos=False` and
`freq_shift=1` (the sinusoid [sin, cos] with frequencies exp(-ln(10000) i / (ch/2 - 1))),
`downsample_padding=0` (pad right and bottom by 1, then stride 2: TF's 'SAME'),
`attention_head_dim=None` (one head as wide as the block), GroupNorm of 32 groups with eps 1e-6,
and the block types DownBlock2D / AttnDownBlock2D / UpBlock2D / AttnUpBlock2D, the Attn ones at
the levels with attention. `unet_settings` reads such a config into our U-Net's keywords and
refuses, naming each field, one that computes anything else; `unet_config` writes one.

The parameters map one to one (`diffusers_name`, `param_path`):

  conv_in, conv_out                        conv_in, conv_out
  temb/dense0, temb/dense1                 time_embedding.linear_1, time_embedding.linear_2
  down_i/block_j/{norm1,conv1,temb_proj,norm2,conv2,nin_shortcut}
                                           down_blocks.i.resnets.j.{norm1,conv1,time_emb_proj,
                                                                    norm2,conv2,conv_shortcut}
  down_i/attn_j/{norm,q,k,v,proj_out}      down_blocks.i.attentions.j.{group_norm,to_q,to_k,to_v,
                                                                       to_out.0}
  down_i/downsample/conv                   down_blocks.i.downsamplers.0.conv
  mid/block_1, mid/attn_1, mid/block_2     mid_block.resnets.0, mid_block.attentions.0,
                                           mid_block.resnets.1
  up_i/...  (i counted from the bottom)    up_blocks.(L-1-i)...  (counted from the top),
                                           upsample -> upsamplers.0
  norm_out                                 conv_norm_out

Leaves: kernel -> weight (norms: scale -> weight), bias -> bias. Layout: PyTorch's, convolutions
[O, I, kh, kw] (ours [kh, kw, I, O]), linear layers [O, I] (ours [I, O]), the 1x1 shortcut a
convolution [O, I, 1, 1] (ours a Dense [I, O]). Older diffusers wrote the attention layers as
`query`, `key`, `value`, `proj_attn` (diffusers renames them when it loads); both are read.

Pure NumPy: nothing here imports PyTorch or diffusers.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from diffusion_jax.models import layers
from diffusion_jax.models import torch_names

UNET_CLASS = "UNet2DModel"
GROUPS = 32
NORM_EPS = 1e-6

# `UNet2DModel.__init__`'s defaults: what diffusers builds for a field a config.json leaves out
# (configs written by older versions lack the newer fields).
UNET_DEFAULTS = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896),
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,
}

# The fields whose value is DDPM's U-Net, and what each must be (the rest are read as sizes).
DDPM_FIELDS = {
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 1,
    "flip_sin_to_cos": False,
    "mid_block_type": "UNetMidBlock2D",
    "mid_block_scale_factor": 1,
    "downsample_padding": 0,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "act_fn": "silu",
    "attention_head_dim": None,
    "norm_num_groups": GROUPS,
    "attn_norm_num_groups": None,
    "norm_eps": NORM_EPS,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
}

# Why a field must have its DDPM value: what the other values compute.
_WHY = {
    "freq_shift": "the sinusoid's frequencies exp(-ln(10000) i / (ch/2 - freq_shift)); DDPM's "
                  "divide by ch/2 - 1",
    "flip_sin_to_cos": "True orders the sinusoid [cos, sin]; DDPM's is [sin, cos]",
    "downsample_padding": "1 pads every side; DDPM's stride-2 convolutions pad only right and "
                          "bottom (TF's 'SAME')",
    "attention_head_dim": "DDPM's attention has one head as wide as its block; a config.json "
                          "written before the field existed gets diffusers' default 8: add "
                          "\"attention_head_dim\": null to it if the model has one head, as "
                          "the authors' do",
    "norm_eps": "DDPM's GroupNorm eps",
    "norm_num_groups": "DDPM's GroupNorm groups",
    "class_embed_type": "DDPM's U-Net has no class embedding",
    "num_class_embeds": "DDPM's U-Net has no class embedding",
    "time_embedding_type": "DDPM's timestep embedding is the sinusoid",
    "resnet_time_scale_shift": "'scale_shift' is Improved DDPM's block (model.architecture="
                               "'iddpm'), which this format does not convert",
}

_DOWN_TYPES = {"DownBlock2D": False, "AttnDownBlock2D": True}
_UP_TYPES = {"UpBlock2D": False, "AttnUpBlock2D": True}

# Our module name -> diffusers', inside a ResBlock or an attention block.
_RES = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2",
        "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_RES_BACK = {v: k for k, v in _RES.items()}
_ATTN_BACK = {v: k for k, v in _ATTN.items()}
# Older diffusers' attention names (and a downsampler's alias) -> today's.
_OLD_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0",
              "Conv2d_0": "conv"}
_TOP = {"conv_in": "conv_in", "conv_out": "conv_out", "norm_out": "conv_norm_out"}
_TOP_BACK = {v: k for k, v in _TOP.items()}
_NORMS = ("norm", "norm1", "norm2", "norm_out")


def _modules_to_diffusers(modules: Sequence[str], num_levels: int) -> str:
  first = modules[0]
  if first in _TOP and len(modules) == 1:
    return _TOP[first]
  if first == "temb" and len(modules) == 2 and modules[1] in ("dense0", "dense1"):
    return f"time_embedding.linear_{int(modules[1][-1]) + 1}"
  match = re.fullmatch(r"(down|up)_(\d+)", first)
  if match and len(modules) >= 2:
    level = int(match.group(2))
    if match.group(1) == "down":
      prefix = f"down_blocks.{level}"
    else:
      prefix = f"up_blocks.{num_levels - 1 - level}"
    return prefix + "." + _inner(modules[1:], "down" if match.group(1) == "down" else "up")
  if first == "mid" and len(modules) == 3:
    index = {"block_1": "resnets.0", "attn_1": "attentions.0", "block_2": "resnets.1"}
    if modules[1] in index:
      table = _ATTN if modules[1].startswith("attn") else _RES
      if modules[2] in table:
        return f"mid_block.{index[modules[1]]}.{table[modules[2]]}"
  raise ValueError(f"not a parameter of DDPM's U-Net: {'/'.join(modules)!r}")


def _inner(modules: Sequence[str], side: str) -> str:
  block = modules[0]
  match = re.fullmatch(r"(block|attn)_(\d+)", block)
  if match and len(modules) == 2:
    table = _RES if match.group(1) == "block" else _ATTN
    if modules[1] in table:
      kind = "resnets" if match.group(1) == "block" else "attentions"
      return f"{kind}.{match.group(2)}.{table[modules[1]]}"
  resample = "downsample" if side == "down" else "upsample"
  if block == resample and list(modules[1:]) == ["conv"]:
    return f"{resample}rs.0.conv"
  raise ValueError(f"not a parameter of DDPM's U-Net: {'/'.join(modules)!r}")


def diffusers_name(path: Sequence[str] | str, num_levels: int) -> str:
  """The `UNet2DModel` state dict's name of one of our parameters.

  Args:
    path: the parameter's path in `variables['params']`, as keys or '/'-joined (a leading
      'params' is ignored), e.g. ('up_0', 'block_2', 'nin_shortcut', 'kernel').
    num_levels: the U-Net's levels (len(ch_mult)): diffusers counts the up blocks from the top.

  Returns:
    e.g. 'up_blocks.3.resnets.2.conv_shortcut.weight' (with 4 levels).
  """
  parts = path.split("/") if isinstance(path, str) else list(path)
  if parts and parts[0] == "params":
    parts = parts[1:]
  if len(parts) < 2 or parts[-1] not in ("kernel", "bias", "scale"):
    raise ValueError(f"not a parameter path: {path!r}")
  leaf = "bias" if parts[-1] == "bias" else "weight"
  return f"{_modules_to_diffusers(parts[:-1], num_levels)}.{leaf}"


def canonical_name(name: str) -> str:
  """`name` with older diffusers' spellings (`query`, `key`, `value`, `proj_attn`) as today's."""
  parts = name.split(".")
  if len(parts) >= 3 and parts[-2] in _OLD_NAMES:
    return ".".join(parts[:-2] + [_OLD_NAMES[parts[-2]], parts[-1]])
  return name


def param_path(name: str, num_levels: int) -> tuple[str, ...]:
  """Inverse of `diffusers_name` (old attention names accepted).

  Args:
    name: e.g. 'mid_block.attentions.0.to_q.weight' or 'mid_block.attentions.0.query.weight'.
    num_levels: the U-Net's levels.

  Returns:
    e.g. ('mid', 'attn_1', 'q', 'kernel').
  """
  canonical = canonical_name(name)
  parts = canonical.split(".")
  if len(parts) < 2 or parts[-1] not in ("weight", "bias"):
    raise ValueError(f"not a UNet2DModel parameter name: {name!r}")
  body, leaf = ".".join(parts[:-1]), parts[-1]
  modules = _modules_from_diffusers(body, num_levels, name)
  if leaf == "bias":
    return (*modules, "bias")
  return (*modules, "scale" if modules[-1] in _NORMS else "kernel")


def _modules_from_diffusers(body: str, num_levels: int, name: str) -> tuple[str, ...]:
  if body in _TOP_BACK:
    return (_TOP_BACK[body],)
  match = re.fullmatch(r"time_embedding\.linear_([12])", body)
  if match:
    return ("temb", f"dense{int(match.group(1)) - 1}")
  match = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(.+)", body)
  if match:
    index, rest = int(match.group(2)), match.group(3)
    level = index if match.group(1) == "down" else num_levels - 1 - index
    if not 0 <= level < num_levels:
      raise ValueError(f"{name!r}: block {index} of a U-Net of {num_levels} levels")
    top = f"{match.group(1)}_{level}"
    resample = "downsamplers.0.conv" if match.group(1) == "down" else "upsamplers.0.conv"
    if rest == resample:
      return (top, resample.split("rs.")[0], "conv")
    inner = re.fullmatch(r"(resnets|attentions)\.(\d+)\.(.+)", rest)
    if inner:
      table = _RES_BACK if inner.group(1) == "resnets" else _ATTN_BACK
      if inner.group(3) in table:
        kind = "block" if inner.group(1) == "resnets" else "attn"
        return (top, f"{kind}_{inner.group(2)}", table[inner.group(3)])
  match = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d)\.(.+)", body)
  if match:
    module = {("resnets", "0"): "block_1", ("attentions", "0"): "attn_1",
              ("resnets", "1"): "block_2"}.get((match.group(1), match.group(2)))
    table = _RES_BACK if match.group(1) == "resnets" else _ATTN_BACK
    if module and match.group(3) in table:
      return ("mid", module, table[match.group(3)])
  raise ValueError(f"not a parameter of a UNet2DModel with DDPM's blocks: {name!r}")


# --- Layout ------------------------------------------------------------------------------------


def to_torch_layout(value: np.ndarray, path: Sequence[str]) -> np.ndarray:
  """One of our arrays in PyTorch's layout (`layers.to_torch_layout`; the 1x1 shortcut
  `nin_shortcut` as a conv [O, I, 1, 1])."""
  return layers.to_torch_layout(value, path, conv1x1=("nin_shortcut",))


def torch_layout_shape(shape: Sequence[int], path: Sequence[str]) -> tuple[int, ...]:
  """The shape `to_torch_layout` gives our array of `shape` at `path`."""
  return to_torch_layout(np.empty(tuple(shape), np.float32), path).shape


def from_torch_layout(value: np.ndarray, shape: Sequence[int]) -> np.ndarray:
  """A PyTorch-layout array as our array of `shape` (the inverse of `to_torch_layout`; a linear
  layer stored as a 1x1 convolution is accepted too)."""
  value = np.asarray(value)
  shape = tuple(shape)
  if value.ndim == 4 and len(shape) == 4:
    value = np.transpose(value, (2, 3, 1, 0))
  elif value.ndim == 4 and len(shape) == 2 and value.shape[2:] == (1, 1):
    value = value[:, :, 0, 0].T
  elif value.ndim == 2 and len(shape) == 2:
    value = value.T
  if value.shape != shape:
    raise ValueError(f"shape {value.shape} for {shape}")
  return np.ascontiguousarray(value)


def _flat(params) -> dict[tuple[str, ...], Any]:
  return {tuple(k.key for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def num_levels_of(params) -> int:
  """The levels of the U-Net whose parameter tree (or shapes) is `params`."""
  return sum(1 for key in params if re.fullmatch(r"down_\d+", key))


def state_dict_from_params(params) -> dict[str, np.ndarray]:
  """A `UNet2DModel` state dict (float32, PyTorch's layout) from our parameter tree."""
  levels = num_levels_of(params)
  return {diffusers_name(path, levels): to_torch_layout(np.asarray(value, np.float32), path)
          for path, value in _flat(params).items()}


def params_from_state_dict(state_dict: Mapping[str, np.ndarray], abstract_params) -> dict:
  """Our parameter tree from a `UNet2DModel` state dict, checked name by name and shape by shape
  against the tree the intended config builds.

  Args:
    state_dict: {name: array in PyTorch's layout}; old attention names are accepted.
    abstract_params: our parameter tree (arrays or ShapeDtypeStructs).

  Returns:
    nested dict of float32 NumPy arrays in our layout.

  Raises:
    ValueError: naming every missing, unexpected and misshapen tensor.
  """
  flat = {path: tuple(leaf.shape) for path, leaf in _flat(abstract_params).items()}
  levels = num_levels_of(abstract_params)
  expected = {diffusers_name(path, levels): path for path in flat}
  given: dict[str, str] = {}
  for name in state_dict:
    canonical = canonical_name(name)
    if canonical in given:  # an alias of a name also given (a downsampler's Conv2d_0)
      continue
    given[canonical] = name
  missing = [f"{name} (our {'/'.join(path)} {flat[path]})"
             for name, path in sorted(expected.items()) if name not in given]
  unexpected = [f"{given[name]} {tuple(np.shape(state_dict[given[name]]))}"
                for name in sorted(given) if name not in expected]
  misshapen = []
  for name, path in sorted(expected.items()):
    if name in given:
      have = tuple(np.shape(state_dict[given[name]]))
      want = torch_layout_shape(flat[path], path)
      if have != want and not (len(want) == 2 and have == (*want, 1, 1)):
        misshapen.append(f"{given[name]} {have}, expected {want} (our {'/'.join(path)} "
                         f"{flat[path]})")
  problems = torch_names.mismatch_summary(missing, unexpected, misshapen)
  if problems:
    raise ValueError(problems)
  tree: dict = {}
  for name, path in expected.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = from_torch_layout(np.asarray(state_dict[given[name]], np.float32),
                                       flat[path])
  return tree


# --- config.json ----------------------------------------------------------------------------


def _same(value, want) -> bool:
  if isinstance(want, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
    return math.isclose(value, want, rel_tol=1e-9)
  if isinstance(want, bool) or want is None or isinstance(value, bool):
    return value is want or value == want and type(value) is type(want)
  return value == want


def unet_settings(unet_config: Mapping[str, Any]) -> dict[str, Any]:
  """Our U-Net's settings from a `UNet2DModel` config (config.json), whose absent fields take
  diffusers' defaults.

  Args:
    unet_config: the parsed config.json.

  Returns:
    {'image_size', 'in_channels', 'out_channels', 'ch', 'ch_mult', 'num_res_blocks',
     'attn_resolutions', 'dropout'}: `models.unet.UNet`'s keywords (out_channels is its
    out_ch), the image size and channels, and the dropout (None when config.json has none).

  Raises:
    ValueError: naming every field that makes the model something other than DDPM's U-Net,
      with its value and the value that would be.
  """
  cls = unet_config.get("_class_name", UNET_CLASS)
  if cls != UNET_CLASS:
    raise ValueError(f"config.json describes a {cls}; only a {UNET_CLASS} (the model of "
                     f"DDPMPipeline) converts")
  get = lambda key: unet_config.get(key, UNET_DEFAULTS[key])  # noqa: E731
  problems = []

  def refuse(key, value, want):
    note = f" ({_WHY[key]})" if key in _WHY else ""
    default = "" if key in unet_config else ", diffusers' default for a missing field"
    problems.append(f"{key}={value!r}{default}: DDPM's U-Net needs {want!r}{note}")

  widths = [int(c) for c in get("block_out_channels")]
  heads_ok = get("attention_head_dim")
  for key, want in DDPM_FIELDS.items():
    value = get(key)
    if key == "attention_head_dim" and value is not None:
      continue  # checked below: one head as wide as every block with attention is DDPM's
    if not _same(value, want):
      refuse(key, value, want)
  down, up = list(get("down_block_types")), list(get("up_block_types"))
  levels = len(widths)
  if len(down) != levels or len(up) != levels:
    problems.append(f"down_block_types ({len(down)}), up_block_types ({len(up)}) and "
                    f"block_out_channels ({levels}) must have one entry per level")
  bad = [t for t in down if t not in _DOWN_TYPES] + [t for t in up if t not in _UP_TYPES]
  if bad:
    problems.append(f"block types {bad}: DDPM's U-Net is made of {', '.join(_DOWN_TYPES)} "
                    f"and {', '.join(_UP_TYPES)}")
  attn_levels = []
  if not bad and len(down) == levels == len(up):
    attn_levels = [i for i in range(levels) if _DOWN_TYPES[down[i]]]
    up_levels = [i for i in range(levels) if _UP_TYPES[up[levels - 1 - i]]]
    if attn_levels != up_levels:
      problems.append(f"attention at down levels {attn_levels} but up levels {up_levels} "
                      f"(counted from the top): DDPM's U-Net has attention at the same "
                      f"resolutions on both sides (down_block_types {down}, up_block_types "
                      f"{up})")
  ch = widths[0] if widths else 0
  if not widths or any(w <= 0 or w % ch for w in widths):
    problems.append(f"block_out_channels={widths}: each must be a multiple of the first (our "
                    f"ch_mult is block_out_channels / block_out_channels[0])")
  elif any(w % GROUPS for w in widths):
    problems.append(f"block_out_channels={widths}: each must be a multiple of {GROUPS} "
                    f"(GroupNorm's groups)")
  if heads_ok is not None:
    widths_with_attention = {widths[i] for i in attn_levels} | ({widths[-1]} if widths else set())
    if widths_with_attention != {heads_ok}:
      refuse("attention_head_dim", heads_ok, None)
  size = get("sample_size")
  if isinstance(size, (list, tuple)):
    if len(size) != 2 or size[0] != size[1]:
      problems.append(f"sample_size={list(size)}: our U-Net takes square images")
      size = None
    else:
      size = size[0]
  if size is None:
    problems.append("sample_size is missing: set it in config.json to the image size the model "
                    "was trained at")
  elif widths and size % 2 ** (levels - 1):
    problems.append(f"sample_size={size} is not divisible by 2**{levels - 1} (the U-Net's "
                    f"downsampling)")
  layers = get("layers_per_block")
  if not isinstance(layers, int) or layers < 1:
    problems.append(f"layers_per_block={layers!r}: one number of blocks per level, at least 1")
  in_channels, out_channels = int(get("in_channels")), int(get("out_channels"))
  if out_channels not in (in_channels, 2 * in_channels):
    problems.append(f"out_channels={out_channels}: DDPM's U-Net outputs in_channels "
                    f"({in_channels}), or twice as many for a learned variance")
  if problems:
    raise ValueError("the UNet2DModel is not DDPM's U-Net: " + "; ".join(problems))
  return {
      "image_size": int(size), "in_channels": in_channels, "out_channels": out_channels,
      "ch": ch, "ch_mult": tuple(w // ch for w in widths), "num_res_blocks": layers,
      "attn_resolutions": tuple(int(size) // 2 ** i for i in attn_levels),
      "dropout": float(unet_config["dropout"]) if "dropout" in unet_config else None,
  }


def unet_config(*, image_size: int, in_channels: int, out_channels: int, ch: int,
                ch_mult: Sequence[int], num_res_blocks: int, attn_resolutions: Sequence[int],
                dropout: float = 0.0) -> dict[str, Any]:
  """The `UNet2DModel` config (config.json) of our U-Net with these settings.

  Args:
    image_size: the square images' size.
    in_channels, out_channels: the image channels; the outputs (twice the channels for a
      learned variance).
    ch, ch_mult, num_res_blocks, attn_resolutions, dropout: `models.unet.UNet`'s.

  Returns:
    the config as a JSON-ready dict.
  """
  levels = len(ch_mult)
  attention = [image_size // 2 ** i in set(attn_resolutions) for i in range(levels)]
  config = {
      "_class_name": UNET_CLASS,
      "sample_size": int(image_size),
      "in_channels": int(in_channels),
      "out_channels": int(out_channels),
      "block_out_channels": [int(ch * m) for m in ch_mult],
      "layers_per_block": int(num_res_blocks),
      "down_block_types": [("AttnDownBlock2D" if a else "DownBlock2D") for a in attention],
      "up_block_types": [("AttnUpBlock2D" if a else "UpBlock2D") for a in reversed(attention)],
      "dropout": float(dropout),
  }
  config.update(DDPM_FIELDS)
  return config
