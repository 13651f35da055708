"""diffusers' UNet2DModel names, layout and config.json for DDPM's U-Net: checked against the
model diffusers builds for google/ddpm-cifar10-32's config (on PyTorch's meta device: names and
shapes, no weights) and our CIFAR-10 config's parameters through `jax.eval_shape`."""
import functools
import os

# Nothing is downloaded: diffusers is told so before it is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

from diffusion_jax.config import build
from diffusion_jax.config import config_lib
from diffusion_jax.models import diffusers_names
from diffusion_jax.models import layers
from tests import helpers


def abstract_params(spec):
  config = config_lib.load_config(spec)
  model = build.make_model(config)
  return jax.eval_shape(functools.partial(build.init_params, config, model), jax.random.key(0))


@pytest.fixture(scope="module")
def cifar10_params():
  return abstract_params("configs/cifar10.py")


def random_tree(abstract, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda leaf: rng.standard_normal(leaf.shape).astype(np.float32), abstract)


def test_cifar10_names_and_shapes_are_those_of_google_ddpm_cifar10_32(cifar10_params):
  with torch.device("meta"):
    theirs = UNet2DModel(**{k: v for k, v in helpers.google_ddpm_cifar10_unet_config().items()
                            if not k.startswith("_")})
  shapes = {name: tuple(value.shape) for name, value in theirs.state_dict().items()}
  assert sum(int(np.prod(s)) for s in shapes.values()) == 35_746_307
  assert layers.count_params(cifar10_params) == 35_746_307
  flat = jax.tree_util.tree_flatten_with_path(cifar10_params)[0]
  ours = {}
  for path, leaf in flat:
    keys = tuple(k.key for k in path)
    name = diffusers_names.diffusers_name(keys, 4)
    assert diffusers_names.param_path(name, 4) == keys
    ours[name] = diffusers_names.torch_layout_shape(leaf.shape, keys)
  assert ours == shapes
  # A few by hand: the up blocks count from the top; the shortcut is a 1x1 convolution.
  assert diffusers_names.diffusers_name("up_0/block_2/nin_shortcut/kernel", 4) == (
      "up_blocks.3.resnets.2.conv_shortcut.weight")
  assert diffusers_names.diffusers_name(("up_1", "attn_0", "proj_out", "bias"), 4) == (
      "up_blocks.2.attentions.0.to_out.0.bias")
  assert diffusers_names.diffusers_name(("mid", "attn_1", "norm", "scale"), 4) == (
      "mid_block.attentions.0.group_norm.weight")
  assert diffusers_names.diffusers_name(("temb", "dense1", "kernel"), 4) == (
      "time_embedding.linear_2.weight")


def test_old_attention_names_read_as_todays():
  for old, new in (("query", "q"), ("key", "k"), ("value", "v"), ("proj_attn", "proj_out")):
    assert diffusers_names.param_path(f"down_blocks.1.attentions.0.{old}.weight", 4) == (
        "down_1", "attn_0", new, "kernel")
  assert diffusers_names.canonical_name("mid_block.attentions.0.proj_attn.bias") == (
      "mid_block.attentions.0.to_out.0.bias")
  with pytest.raises(ValueError, match="not a parameter of a UNet2DModel"):
    diffusers_names.param_path("down_blocks.0.resnets.0.weird.weight", 4)
  with pytest.raises(ValueError, match="block 5 of a U-Net of 4 levels"):
    diffusers_names.param_path("up_blocks.5.resnets.0.conv1.weight", 4)


def test_state_dict_round_trips_and_mismatches_are_named():
  abstract = abstract_params("configs/test.py")
  params = random_tree(abstract)
  state = diffusers_names.state_dict_from_params(params)
  assert state["down_blocks.1.resnets.0.conv_shortcut.weight"].shape == (64, 32, 1, 1)
  assert state["conv_in.weight"].shape == (32, 3, 3, 3)
  np.testing.assert_array_equal(state["conv_in.weight"],
                                np.transpose(params["conv_in"]["kernel"], (3, 2, 0, 1)))
  back = diffusers_names.params_from_state_dict(state, abstract)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
  # The old attention spelling reads the same.
  old = {name.replace("to_q", "query").replace("to_out.0", "proj_attn"): value
         for name, value in state.items()}
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         diffusers_names.params_from_state_dict(old, abstract), params)
  broken = dict(state)
  del broken["mid_block.attentions.0.to_q.weight"]
  broken["conv_out.weight"] = broken["conv_out.weight"][:1]
  broken["down_blocks.7.resnets.0.conv1.weight"] = np.zeros((1,), np.float32)
  with pytest.raises(ValueError) as info:
    diffusers_names.params_from_state_dict(broken, abstract)
  message = str(info.value)
  assert "1 missing: mid_block.attentions.0.to_q.weight (our mid/attn_1/q/kernel (64, 64))" in (
      message)
  assert "1 unexpected: down_blocks.7.resnets.0.conv1.weight (1,)" in message
  assert "conv_out.weight (1, 32, 3, 3), expected (3, 32, 3, 3)" in message


def test_config_json_reads_as_our_settings_and_back(cifar10_params):
  settings = diffusers_names.unet_settings(helpers.google_ddpm_cifar10_unet_config())
  assert settings == {"image_size": 32, "in_channels": 3, "out_channels": 3, "ch": 128,
                      "ch_mult": (1, 2, 2, 2), "num_res_blocks": 2, "attn_resolutions": (16,),
                      "dropout": 0.0}
  written = diffusers_names.unet_config(
      image_size=32, in_channels=3, out_channels=3, ch=128, ch_mult=(1, 2, 2, 2),
      num_res_blocks=2, attn_resolutions=(16,), dropout=0.1)
  assert diffusers_names.unet_settings(written) == {**settings, "dropout": 0.1}
  google = helpers.google_ddpm_cifar10_unet_config()
  assert {k: written[k] for k in google if k in written} == {
      k: v for k, v in google.items() if k in written and k != "dropout"} | {"dropout": 0.1}
  # Several attention levels, and a 256x256 layout.
  big = diffusers_names.unet_config(image_size=256, in_channels=3, out_channels=6, ch=128,
                                    ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                                    attn_resolutions=(16, 32))
  assert big["down_block_types"][2:] == ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D",
                                         "DownBlock2D"]
  assert diffusers_names.unet_settings(big)["attn_resolutions"] == (32, 16)


@pytest.mark.parametrize("field, value, message", [
    ("flip_sin_to_cos", True, "flip_sin_to_cos=True: DDPM's U-Net needs False (True orders"),
    ("freq_shift", 0, "freq_shift=0: DDPM's U-Net needs 1"),
    ("downsample_padding", 1, "downsample_padding=1: DDPM's U-Net needs 0 (1 pads every side"),
    ("attention_head_dim", 8, "attention_head_dim=8: DDPM's U-Net needs None"),
    ("norm_eps", 1e-5, "norm_eps=1e-05: DDPM's U-Net needs 1e-06"),
    ("norm_num_groups", 16, "norm_num_groups=16: DDPM's U-Net needs 32"),
    ("class_embed_type", "timestep", "class_embed_type='timestep'"),
    ("num_class_embeds", 10, "num_class_embeds=10"),
    ("resnet_time_scale_shift", "scale_shift", "'scale_shift' is Improved DDPM's block"),
    ("time_embedding_type", "fourier", "time_embedding_type='fourier'"),
    ("center_input_sample", True, "center_input_sample=True"),
    ("mid_block_scale_factor", 2, "mid_block_scale_factor=2"),
    ("act_fn", "gelu", "act_fn='gelu'"),
    ("down_block_types", ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
     "block types ['CrossAttnDownBlock2D']"),
    ("up_block_types", ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
     "attention at down levels [1] but up levels [2]"),
    ("block_out_channels", [128, 192, 256, 256], "each must be a multiple of the first"),
    ("sample_size", [32, 64], "our U-Net takes square images"),
    ("out_channels", 4, "out_channels=4"),
    ("_class_name", "UNet2DConditionModel", "describes a UNet2DConditionModel"),
])
def test_each_setting_of_another_model_is_refused_by_name(field, value, message):
  config = helpers.google_ddpm_cifar10_unet_config()
  config[field] = value
  with pytest.raises(ValueError) as info:
    diffusers_names.unet_settings(config)
  assert message in str(info.value)


def test_a_field_left_out_takes_diffusers_default():
  config = helpers.google_ddpm_cifar10_unet_config()
  del config["attention_head_dim"], config["freq_shift"]
  with pytest.raises(ValueError) as info:
    diffusers_names.unet_settings(config)
  message = str(info.value)
  assert "freq_shift=0, diffusers' default for a missing field: DDPM's U-Net needs 1" in message
  assert "attention_head_dim=8, diffusers' default" in message
  assert 'add "attention_head_dim": null' in message
  # One head as wide as every block with attention is DDPM's too.
  config = helpers.google_ddpm_cifar10_unet_config()
  config["attention_head_dim"] = 256
  assert diffusers_names.unet_settings(config)["ch"] == 128
