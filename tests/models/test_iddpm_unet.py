"""Tests for diffusion_jax.models.iddpm_unet: Improved DDPM's U-Net against the reference
PyTorch model's outputs, its parameter counts, its PyTorch names and its checks.

Golden values: tests/golden/iddpm_unet_tiny.npz, made by running the reference's UNetModel (see
tests/golden/make_iddpm_golden.py for how to regenerate it). The seeded weights are not stored:
they are drawn again here from the stored state dict names and shapes.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.config import build
from diffusion_jax.config import config_lib
from diffusion_jax.models import iddpm_unet
from diffusion_jax.models.iddpm_unet import IDDPMUNet
from diffusion_jax.models import layers
from diffusion_jax.models import torch_names
from tests import iddpm_golden

golden_script = iddpm_golden.golden_script


def _abstract_params(model, image_size, channels=3):
  x = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  labels = jax.ShapeDtypeStruct((1,), jnp.int32) if model.num_classes else None
  return jax.eval_shape(lambda k, x, t, y: model.init(k, x, t, labels_B=y), jax.random.key(0),
                        x, t, labels)["params"]


def ours_for(spec) -> IDDPMUNet:
  """Our U-Net for the reference's keyword arguments (attention at image_size // rate)."""
  kw, size = spec["kwargs"], spec["image_size"]
  return IDDPMUNet(ch=kw["model_channels"], ch_mult=tuple(kw["channel_mult"]),
                   num_res_blocks=kw["num_res_blocks"],
                   attn_resolutions=tuple(size // r for r in kw["attention_resolutions"]),
                   out_ch=kw["out_channels"], num_heads=kw["num_heads"],
                   num_heads_upsample=kw.get("num_heads_upsample", -1),
                   scale_shift_norm=kw["use_scale_shift_norm"],
                   num_classes=kw["num_classes"] or 0)


@pytest.fixture(scope="module")
def golden():
  return iddpm_golden.load_golden()


# ---------------------------------------------------------------- counts and names (no compile)

# The reference's counts: its paper and README for CIFAR-10 and conditional ImageNet-64; its
# create_model with the README's flags for the other two (counted once with PyTorch).
@pytest.mark.parametrize("spec,expected", [
    ("configs/cifar10_iddpm.py", 52_546_438),
    ("configs/imagenet64_iddpm.py:variant=cond", 273_049_350),
    ("configs/imagenet64_iddpm.py", 121_063_942),
    ("configs/lsun_bedroom_iddpm.py", 113_676_678),
])
def test_released_configs_have_the_reference_parameter_counts(spec, expected):
  config = config_lib.load_config(spec)
  model = build.make_model(config)
  assert isinstance(model, IDDPMUNet)
  params = jax.eval_shape(functools.partial(build.init_params, config, model),
                          jax.random.key(0))
  count = layers.count_params(params)
  assert count == expected
  assert build.model_summary(config).splitlines()[-1] == f"total params: {count:,}"
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(params))


def test_every_parameter_has_its_reference_name(golden):
  _, cases = golden
  for case in cases.values():
    model = ours_for(case["spec"])
    abstract = _abstract_params(model, case["spec"]["image_size"])
    paths = [tuple(k.key for k in p)
             for p, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]]
    names = [torch_names.torch_name(p) for p in paths]
    assert sorted(names) == sorted(case["state"])  # one to one, nothing left over
    assert [torch_names.param_path(n) for n in names] == paths
  assert torch_names.torch_name("params/out_0/scale") == "out.0.weight"
  assert torch_names.param_path("label_emb.weight") == ("label_emb", "embedding")
  assert torch_names.param_path("input_blocks.1.0.in_layers.0.weight") == (
      "input_blocks_1_0", "in_layers_0", "scale")


# ---------------------------------------------------------------- the reference's outputs

@pytest.mark.parametrize("key", list(golden_script.CONFIGS))
def test_forward_matches_the_reference_model(golden, key):
  """Our model with the converted state dict gives the reference's outputs (NCHW there, NHWC
  here). Both run in float32 with different summation orders over ~1,000-term dot products
  of O(1) values, and their exp() differs by one ulp in some sinusoid frequencies, which at
  t = 3999 moves a phase by ~1e-4 rad: measured, the largest error is 5.8e-6 of the output's
  scale (at t = 3999; 1.1e-6 to 1.6e-6 at t <= 123.4). 1e-5 of the scale is ~100x float32's
  epsilon, while a wrong layout, scale or order of a layer moves the output by > 1e-2 of it.
  GroupNorm's epsilon barely shows on these unit-variance features (1e-6 for 1e-5 moves the
  output by 1.4e-5 to 1.9e-5 of its scale); the attention test below pins it."""
  timesteps, cases = golden
  case = cases[key]
  model = ours_for(case["spec"])
  params = torch_names.params_from_torch(
      case["state"], _abstract_params(model, case["spec"]["image_size"]))
  x = np.transpose(case["x"], (0, 2, 3, 1))
  labels = None if case["y"] is None else jnp.asarray(case["y"], jnp.int32)
  out = model.apply({"params": params}, x, jnp.asarray(timesteps), labels_B=labels)
  want = np.transpose(case["out"], (0, 2, 3, 1))
  scale = np.abs(want).max()
  assert np.abs(np.asarray(out) - want).max() < 1e-5 * scale, (
      np.abs(np.asarray(out) - want).max(), scale)
  if labels is not None:  # the labels enter: other labels, other outputs
    other = model.apply({"params": params}, x, jnp.asarray(timesteps),
                        labels_B=(labels + 1) % case["spec"]["kwargs"]["num_classes"])
    assert np.abs(np.asarray(other) - want).max() > 1e-2 * scale


# ---------------------------------------------------------------- pieces against NumPy

def test_timestep_embedding_is_the_references_cos_then_sin():
  t = np.array([0.0, 1.0, 123.4, 3999.0])
  for dim in (8, 9):
    half = dim // 2
    freqs = np.exp(-math.log(10000.0) * np.arange(half) / half)
    want = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], axis=1)
    if dim % 2:
      want = np.concatenate([want, np.zeros((4, 1))], axis=1)
    got = np.asarray(iddpm_unet.timestep_embedding(jnp.asarray(t, jnp.float32), dim))
    # float32 phases of t * f up to ~4000 rad: absolute error ~4000 * 6e-8.
    np.testing.assert_allclose(got, want, atol=5e-4)
    assert got.shape == (4, dim)


def test_attention_splits_heads_before_q_k_v():
  """Two heads over 32 channels: qkv's 96 channels are [q0 k0 v0 q1 k1 v1], 16 each; each head
  attends with softmax(q k^T / sqrt(16)); the heads' outputs are concatenated in order."""
  rng = np.random.default_rng(0)
  # Features of variance 1e-6, on which GroupNorm's epsilon (PyTorch's 1e-5, not DDPM's 1e-6)
  # changes the normalized values several-fold.
  x = 1e-3 * rng.standard_normal((2, 2, 3, 32)).astype(np.float32)
  block = iddpm_unet.AttentionBlock(num_heads=2)
  params = jax.tree_util.tree_map(
      lambda s: rng.standard_normal(s.shape).astype(np.float32) * 0.3,
      jax.eval_shape(block.init, jax.random.key(0), x))["params"]
  got = np.asarray(block.apply({"params": params}, x), np.float64)

  xs = x.astype(np.float64).reshape(2, 6, 32)  # [B, N, C]
  # GroupNorm with 32 groups of one channel each: per example and channel over positions.
  mu = xs.mean(axis=1, keepdims=True)
  var = xs.var(axis=1, keepdims=True)
  normed = (xs - mu) / np.sqrt(var + 1e-5) * params["norm"]["scale"] + params["norm"]["bias"]
  qkv = normed @ params["qkv"]["kernel"] + params["qkv"]["bias"]  # [B, N, 96]
  heads = []
  for head in range(2):
    part = qkv[..., head * 48:(head + 1) * 48]
    q, k, v = part[..., :16], part[..., 16:32], part[..., 32:]
    logits = np.einsum("btc,bsc->bts", q, k) / math.sqrt(16)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    heads.append(np.einsum("bts,bsc->btc", w, v))
  out = np.concatenate(heads, axis=-1) @ params["proj_out"]["kernel"] + params["proj_out"]["bias"]
  want = (xs + out).reshape(2, 2, 3, 32)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- checks

@pytest.mark.parametrize("kwargs,match", [
    (dict(num_heads=3),
     r"num_heads=3 does not divide the width 64 .*set --config.model.num_heads"),
    (dict(num_heads_upsample=5), r"num_heads_upsample=5 does not divide"),
    (dict(num_head_channels=24), r"num_head_channels=24 does not divide the width 64"),
    (dict(num_heads=0), r"num_heads=0: use a positive number"),
    (dict(num_head_channels=0), r"num_head_channels=0: use a positive number or -1"),
    (dict(attn_resolutions=(3,)), r"never reaches"),
    (dict(image_size=10), r"not divisible by the total downsampling factor 4"),
    (dict(ch=48), r"do not split into 32 GroupNorm groups; use ch .*a multiple of 32"),
    (dict(num_classes=-1), r"num_classes=-1: use 0 \(unconditional\) or the number"),
])
def test_bad_settings_are_refused_with_what_to_set(kwargs, match):
  settings = dict(image_size=16, ch=32, ch_mult=(1, 2, 2), attn_resolutions=(8,),
                  num_heads=2)
  settings.update(kwargs)
  with pytest.raises(ValueError, match=match):
    iddpm_unet.check_config(**settings)


def test_heads_upsample_need_not_divide_a_width_only_the_middle_block_has():
  """Attention at 16x16 (width 64) and in the middle (width 96): the output blocks' heads
  split 64 only, as the reference's UNetModel runs them; num_heads must split both."""
  settings = dict(image_size=16, ch=32, ch_mult=(2, 3), attn_resolutions=(16,))
  iddpm_unet.check_config(**settings, num_heads=2, num_heads_upsample=64)
  with pytest.raises(ValueError, match=r"num_heads=64 does not divide the width 96 .*\(64, 96\)"):
    iddpm_unet.check_config(**settings, num_heads=64)


def test_heads_from_channels_per_head():
  assert iddpm_unet.attention_heads(256, num_heads=4, num_head_channels=64) == 4
  assert iddpm_unet.attention_heads(256, num_heads=4, num_heads_upsample=2, up=True) == 2
  assert iddpm_unet.attention_heads(256, num_heads=4, num_heads_upsample=2) == 4


def test_labels_are_needed_exactly_for_a_conditional_model():
  x, t = jnp.zeros((2, 8, 8, 3)), jnp.zeros((2,), jnp.int32)
  conditional = IDDPMUNet(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                          num_classes=3)
  with pytest.raises(ValueError, match="labels are needed exactly when the model is "
                                       "class-conditional: num_classes=3, labels not given"):
    jax.eval_shape(conditional.init, jax.random.key(0), x, t)
  plain = conditional.clone(num_classes=0)
  with pytest.raises(ValueError, match="num_classes=0, labels given"):
    jax.eval_shape(lambda k: plain.init(k, x, t, labels_B=jnp.zeros((2,), jnp.int32)),
                   jax.random.key(0))


def test_a_state_dict_that_does_not_fit_is_refused_naming_each_mismatch(golden):
  _, cases = golden
  case = cases["heads_scale_shift_classes"]
  spec = case["spec"]
  state = dict(case["state"])
  state.pop("label_emb.weight")
  state["input_blocks.1.0.emb_layers.1.weight"] = np.zeros((64, 256), np.float32)
  state["extra.weight"] = np.zeros((3,), np.float32)
  abstract = _abstract_params(ours_for(spec), spec["image_size"])
  with pytest.raises(ValueError) as info:
    torch_names.params_from_torch(state, abstract)
  message = str(info.value)
  assert "1 missing: label_emb.weight (our label_emb/embedding (5, 256))" in message
  assert "1 unexpected: extra.weight (3,)" in message
  assert ("1 with another shape: input_blocks.1.0.emb_layers.1.weight (64, 256) for our "
          "input_blocks_1_0/emb_layers_1/kernel (256, 128)") in message
  assert "model.num_classes" in message and "model.scale_shift_norm" in message


def test_a_fixed_variance_state_dict_for_a_learned_variance_model_names_the_variance(golden):
  _, cases = golden
  spec = cases["plain_three_levels"]["spec"]
  abstract = _abstract_params(ours_for(spec).clone(out_ch=6), spec["image_size"])
  with pytest.raises(ValueError) as info:
    torch_names.params_from_torch(cases["plain_three_levels"]["state"], abstract)
  message = str(info.value)
  assert ("2 with another shape: out.2.bias (3,) for our out_2/bias (6,), out.2.weight "
          "(3, 32, 3, 3) for our out_2/kernel (3, 3, 32, 6)") in message
  assert "missing" not in message and "unexpected" not in message
  assert "diffusion.var_type (a learned variance has 2C outputs)" in message


# One small model, initialized once, for the initialization and dropout tests: attention with
# two heads, a width change (1x1 skip), class labels, scale-shift norm and a learned variance.
SMALL = IDDPMUNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.5,
                  out_ch=6, num_heads=2, scale_shift_norm=True, num_classes=3)


@pytest.fixture(scope="module")
def small_init():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((3, 8, 8, 3)), jnp.float32)
  t = jnp.asarray([5.0, 9.0, 123.4])
  labels = jnp.asarray([0, 2, 1])
  params = jax.jit(lambda k: SMALL.init(k, x, t, labels_B=labels))(jax.random.key(0))["params"]
  return x, t, labels, params


def _is_zero_layer(path) -> bool:
  # The reference's zero_module layers: each ResBlock's last conv, attention's proj_out and the
  # output conv.
  return path[-2] in ("out_layers_3", "proj_out", "out_2")


def test_initialization_is_pytorchs(small_init):
  """Weights and biases uniform in +-1/sqrt(fan_in) (fan_in of the layer's weight), the zero
  layers exactly zero, GroupNorm scale 1 and bias 0, label embeddings N(0, 1)."""
  params = small_init[3]
  flat = {tuple(k.key for k in p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  seen = set()
  for path, value in flat.items():
    module, leaf = path[:-1], path[-1]
    if _is_zero_layer(path):
      assert not value.any(), path
    elif leaf == "embedding":
      assert abs(value.std() - 1.0) < 0.1 and abs(value.mean()) < 0.1
    elif leaf == "scale" or "kernel" not in params_at(params, module):
      # GroupNorm: the modules without a kernel.
      want = 1.0 if leaf == "scale" else 0.0
      assert (value == want).all(), path
    else:
      kernel = params_at(params, module)["kernel"]
      bound = 1.0 / math.sqrt(math.prod(kernel.shape[:-1]))
      # >= 32 draws: the largest is above half the bound but for a 2**-32 chance.
      assert 0.5 * bound < np.abs(value).max() <= bound, path
      if value.size >= 1000:  # uniform: std bound / sqrt(3), and the bound nearly reached
        assert abs(value.std() * math.sqrt(3) / bound - 1) < 0.1, path
        assert np.abs(value).max() > 0.95 * bound, path
      seen.add(leaf)
  assert seen == {"kernel", "bias"}


def params_at(params, module_path):
  for key in module_path:
    params = params[key]
  return params


def test_dropout_masks_follow_each_examples_key(small_init):
  """With per-example keys, example 0's training output does not depend on its batch."""
  x, t, labels, params = small_init
  params = jax.tree_util.tree_map(lambda p: p + 0.1, params)  # the zero layers let noise through
  keys = jax.random.split(jax.random.key(2), 3)
  apply = jax.jit(lambda p, x, t, y, k: SMALL.apply({"params": p}, x, t, train=True,
                                                    dropout_keys_B=k, labels_B=y))
  whole = apply(params, x, t, labels, keys)
  pick = jnp.array([0, 2])
  pair = apply(params, x[pick], t[pick], labels[pick], keys[pick])
  # Equal up to float32 summation order, which XLA may pick by batch size (outputs are O(1);
  # a different mask moves them by O(0.1)).
  np.testing.assert_allclose(pair[0], whole[0], rtol=1e-5, atol=1e-5)
  other_key = apply(params, x[pick], t[pick], labels[pick], keys[jnp.array([1, 2])])
  assert np.abs(np.asarray(other_key[0] - whole[0])).max() > 1e-3
