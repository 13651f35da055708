"""Tests for diffusion_jax.models.unet.

Full-size models are only traced with `jax.eval_shape`; the numeric tests share one tiny model
(compiled once per function kind) built by module-scoped fixtures.

Golden values: tests/golden/unet_tiny.npz. After an intended change to the forward computation,
regenerate with

    python tests/golden/make_unet_golden.py

and explain the change in the commit message.
"""
import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from diffusion_jax.models import unet as unet_lib

from diffusion_jax.models import tf_names

from diffusion_jax.models import layers
from diffusion_jax.models.unet import UNet

_GOLDEN_DIR = pathlib.Path(__file__).resolve().parents[1] / "golden"
_spec = importlib.util.spec_from_file_location("make_unet_golden",
                                               _GOLDEN_DIR / "make_unet_golden.py")
golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden)

CIFAR = dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), out_ch=3)
LSUN = dict(ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_resolutions=(16,),
            out_ch=3)
# The shared tiny model: attention at 8 (level 1 and the middle), dropout on, learned variance.
TINY = golden.GOLDEN_CONFIG
TINY_SIZE, TINY_C, TINY_B = golden.IMAGE_SIZE, golden.CHANNELS, golden.BATCH


def _shapes_of(model, image_size, channels, batch=1):
  x = jax.ShapeDtypeStruct((batch, image_size, image_size, channels), jnp.float32)
  t = jax.ShapeDtypeStruct((batch,), jnp.int32)
  variables = jax.eval_shape(lambda k, x, t: model.init(k, x, t), jax.random.key(0), x, t)
  return variables["params"], x, t


def _rel_l2(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---------------------------------------------------------------- shapes and counts (no compile)

@pytest.mark.parametrize("config,image_size,expected", [
    (CIFAR, 32, 35_746_307),
    (LSUN, 256, 113_673_219),
])
def test_full_config_param_counts(config, image_size, expected):
  params, _, _ = _shapes_of(UNet(**config), image_size, 3)
  assert layers.count_params(params) == expected
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(params))


def test_summary_cifar():
  text = unet_lib.summary(UNet(**CIFAR), 32, 3)
  lines = text.splitlines()
  assert lines[-1] == "total params: 35,746,307"
  names = [line.split()[0] for line in lines[1:-1]]
  assert names == ["conv_in", "temb", "down_0", "down_1", "down_2", "down_3", "mid",
                   "up_3", "up_2", "up_1", "up_0", "norm_out", "conv_out"]
  counts = [int(line.split()[1].replace(",", "")) for line in lines[1:-1]]
  assert sum(counts) == 35_746_307
  assert counts[0] == 3 * 3 * 3 * 128 + 128  # conv_in
  assert counts[1] == (128 * 512 + 512) + (512 * 512 + 512)  # temb dense0, dense1


def test_bf16_model_keeps_float32_params_and_same_tree():
  p32, _, _ = _shapes_of(UNet(**CIFAR), 32, 3)
  p16, _, _ = _shapes_of(UNet(**CIFAR, dtype=jnp.bfloat16, remat=True), 32, 3)
  assert jax.tree_util.tree_structure(p32) == jax.tree_util.tree_structure(p16)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(p16))


@pytest.mark.parametrize("image_size,ch_mult,attn,out_ch,block_size", [
    (8, (1, 2), (4,), 3, 1),
    (16, (1, 2), (8, 16), 6, 1),
    (32, (1, 2), (16,), 3, 1),
    (32, (1, 2, 2), (8,), 6, 1),
    (16, (1, 1, 2), (16, 4), 3, 1),
    (32, (1, 2), (8,), 6, 2),
])
def test_output_shapes(image_size, ch_mult, attn, out_ch, block_size):
  model = UNet(ch=32, ch_mult=ch_mult, num_res_blocks=1, attn_resolutions=attn,
               dropout=0.1, out_ch=out_ch, block_size=block_size)
  params, x, t = _shapes_of(model, image_size, 3, batch=2)
  for dtype in (jnp.float32, jnp.bfloat16):
    out = jax.eval_shape(
        lambda p, x, t, k: model.clone(dtype=dtype).apply(
            {"params": p}, x, t, train=True, rngs={"dropout": k}),
        params, x, t, jax.random.key(1))
    assert out.shape == (2, image_size, image_size, out_ch)
    assert out.dtype == jnp.float32
  # Attention exists exactly where the (space-to-depth) feature maps hit attn resolutions.
  base = image_size // block_size
  for i in range(len(ch_mult)):
    has_attn = "attn_0" in params[f"down_{i}"]
    assert has_attn == (base // 2 ** i in attn)


# ---------------------------------------------------------------- TF variable names

def _original_tf_variables(ch, ch_mult, num_res_blocks, attn_resolutions, image_size, in_ch,
                           out_ch):
  """Variables the TF original creates, from a reading of its model(): name -> shape."""
  v = {}

  def conv(name, cin, cout, k=3):
    v[f"{name}/W"], v[f"{name}/b"] = (k, k, cin, cout), (cout,)

  def nin(name, cin, cout):  # also `dense`
    v[f"{name}/W"], v[f"{name}/b"] = (cin, cout), (cout,)

  def norm(name, c):
    v[f"{name}/gamma"], v[f"{name}/beta"] = (c,), (c,)

  def res(name, cin, cout):
    norm(f"{name}/norm1", cin)
    conv(f"{name}/conv1", cin, cout)
    nin(f"{name}/temb_proj", 4 * ch, cout)
    norm(f"{name}/norm2", cout)
    conv(f"{name}/conv2", cout, cout)
    if cin != cout:
      nin(f"{name}/nin_shortcut", cin, cout)

  def attn(name, c):
    norm(f"{name}/norm", c)
    for sub in ("q", "k", "v", "proj_out"):
      nin(f"{name}/{sub}", c, c)

  nin("model/temb/dense0", ch, 4 * ch)
  nin("model/temb/dense1", 4 * ch, 4 * ch)
  conv("model/conv_in", in_ch, ch)
  skips, res_now, c = [ch], image_size, ch
  for i, m in enumerate(ch_mult):
    for j in range(num_res_blocks):
      res(f"model/down_{i}/block_{j}", c, ch * m)
      c = ch * m
      if res_now in attn_resolutions:
        attn(f"model/down_{i}/attn_{j}", c)
      skips.append(c)
    if i != len(ch_mult) - 1:
      conv(f"model/down_{i}/downsample/conv", c, c)
      skips.append(c)
      res_now //= 2
  res("model/mid/block_1", c, c)
  attn("model/mid/attn_1", c)
  res("model/mid/block_2", c, c)
  for i in reversed(range(len(ch_mult))):
    for j in range(num_res_blocks + 1):
      res(f"model/up_{i}/block_{j}", c + skips.pop(), ch * ch_mult[i])
      c = ch * ch_mult[i]
      if res_now in attn_resolutions:
        attn(f"model/up_{i}/attn_{j}", c)
    if i != 0:
      conv(f"model/up_{i}/upsample/conv", c, c)
      res_now *= 2
  assert not skips
  norm("model/norm_out", c)
  conv("model/conv_out", c, out_ch)
  return v


def test_tf_variable_names_are_a_bijection_with_matching_shapes():
  params, _, _ = _shapes_of(UNet(**CIFAR), 32, 3)
  flat = traverse_util.flatten_dict(params)
  ours = {tf_names.tf_variable_name(path): tuple(leaf.shape) for path, leaf in flat.items()}
  assert len(ours) == len(flat)  # injective
  expected = _original_tf_variables(128, (1, 2, 2, 2), 2, (16,), 32, 3, 3)
  assert ours == expected  # onto, with identical shapes (no kernel transposes needed)
  assert sum(math.prod(s) for s in expected.values()) == 35_746_307
  for path in flat:
    assert tf_names.flax_param_path(tf_names.tf_variable_name(path)) == path

  # A few names and shapes spelled out by hand from the original.
  spot = {
      "model/conv_in/W": (3, 3, 3, 128),
      "model/temb/dense0/W": (128, 512),
      "model/temb/dense1/b": (512,),
      "model/down_0/block_0/conv1/W": (3, 3, 128, 128),
      "model/down_0/block_0/temb_proj/W": (512, 128),
      "model/down_1/block_0/nin_shortcut/W": (128, 256),
      "model/down_1/attn_1/q/W": (256, 256),
      "model/down_2/downsample/conv/W": (3, 3, 256, 256),
      "model/mid/attn_1/proj_out/W": (256, 256),
      "model/mid/block_2/norm2/gamma": (256,),
      "model/up_1/block_2/nin_shortcut/W": (384, 256),
      "model/up_1/attn_2/k/b": (256,),
      "model/up_1/upsample/conv/W": (3, 3, 256, 256),
      "model/up_0/block_0/conv1/W": (3, 3, 384, 128),
      "model/norm_out/beta": (128,),
      "model/conv_out/W": (3, 3, 128, 3),
  }
  for name, shape in spot.items():
    assert ours[name] == shape, name
  assert tf_names.tf_variable_name(("params", "norm_out", "scale")) == "model/norm_out/gamma"
  assert tf_names.tf_variable_name("mid/attn_1/q/kernel") == "model/mid/attn_1/q/W"
  assert tf_names.flax_param_path("model/mid/block_1/norm1/beta:0") == (
      "mid", "block_1", "norm1", "bias")


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("kwargs,match", [
    (dict(image_size=32, ch_mult=(1, 2, 2, 2), attn_resolutions=(2,)), "never reaches"),
    (dict(image_size=32, ch_mult=(1, 2), attn_resolutions=(32, 64)), "never reaches"),
    (dict(image_size=30, ch_mult=(1, 2, 2, 2), attn_resolutions=()), "divisible by .* 8"),
    (dict(image_size=20, ch_mult=(1, 2), attn_resolutions=(), block_size=4),
     "divisible by .* 8"),
    (dict(image_size=32, ch_mult=(1, 2), attn_resolutions=(32,), block_size=2), "never"),
    (dict(image_size=32, ch_mult=(1, 2), attn_resolutions=(), ch=48), "GroupNorm"),
])
def test_check_config_raises(kwargs, match):
  with pytest.raises(ValueError, match=match):
    unet_lib.check_config(**kwargs)


def test_check_config_accepts_paper_settings():
  unet_lib.check_config(image_size=32, ch_mult=(1, 2, 2, 2), attn_resolutions=(16,))
  unet_lib.check_config(image_size=256, ch_mult=(1, 1, 2, 2, 4, 4), attn_resolutions=(16,))
  unet_lib.check_config(image_size=256, ch_mult=(1, 1, 2, 2, 4, 4), attn_resolutions=(16,),
                        block_size=2)


@pytest.mark.parametrize("image_size,attn", [(16, (4,)), (18, (8,))])
def test_call_raises(image_size, attn):
  model = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=attn)
  with pytest.raises(ValueError, match="never reaches|divisible"):
    _shapes_of(model, image_size, 3)


# ---------------------------------------------------------------- building blocks vs NumPy

def _np_conv(x, w, b, stride, pads):
  """float64 NHWC/HWIO cross-correlation with explicit ((top, bottom), (left, right)) pads."""
  x = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  kh, kw = w.shape[:2]
  ho = (x.shape[1] - kh) // stride + 1
  wo = (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], ho, wo, w.shape[3]))
  for i in range(kh):
    for j in range(kw):
      patch = x[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
      out += np.einsum("bhwc,cd->bhwd", patch, w[i, j])
  return out + b


def _np_group_norm(x, gamma, beta, groups=32, eps=1e-6):
  b, h, w, c = x.shape
  xg = x.reshape(b, h, w, groups, c // groups)
  mean = xg.mean(axis=(1, 2, 4), keepdims=True)
  var = ((xg - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
  return ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape) * gamma + beta


def _np_swish(x):
  return x / (1.0 + np.exp(-x))


def _f64(tree):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def test_timestep_embedding_matches_formula():
  t = np.array([0, 1, 17, 500, 999])
  dim = 128
  got = np.asarray(unet_lib.get_timestep_embedding(jnp.asarray(t), dim))
  half = dim // 2
  freqs = np.exp(-np.log(10000.0) * np.arange(half) / (half - 1))
  want = np.concatenate([np.sin(t[:, None] * freqs), np.cos(t[:, None] * freqs)], axis=1)
  # float32 rounds t * f (up to 999 rad) to ~6e-5 absolute; sin/cos pass that through.
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)
  np.testing.assert_allclose(got[:, 0], np.sin(t), atol=2e-4)  # f_0 = 1
  np.testing.assert_allclose(got[:, half - 1], np.sin(t * 1e-4), atol=1e-6)  # f_last = 1e-4
  odd = unet_lib.get_timestep_embedding(jnp.asarray(t), 9)
  assert odd.shape == (5, 9) and np.all(np.asarray(odd)[:, -1] == 0)


def test_downsample_is_tf_same_bottom_right_padding():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  module = unet_lib._Resample(up=False)
  params = module.init(jax.random.key(0), x)
  w = np.asarray(params["params"]["conv"]["kernel"], np.float64)
  b = rng.standard_normal(4)
  got = np.asarray(module.apply(
      {"params": {"conv": {"kernel": w.astype(np.float32), "bias": b.astype(np.float32)}}}, x))
  want = _np_conv(x.astype(np.float64), w, b, 2, ((0, 1), (0, 1)))
  assert got.shape == (2, 4, 4, 4)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # The symmetric alternative must be distinguishable, or the test proves nothing.
  other = _np_conv(x.astype(np.float64), w, b, 2, ((1, 0), (1, 0)))
  assert np.max(np.abs(other - want)) > 0.1


def test_upsample_is_nearest_repeat_then_conv():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((1, 4, 4, 3)).astype(np.float32)
  module = unet_lib._Resample(up=True)
  params = module.init(jax.random.key(0), x)
  got = np.asarray(module.apply(params, x))
  p = _f64(params["params"]["conv"])
  up = x.astype(np.float64).repeat(2, axis=1).repeat(2, axis=2)
  want = _np_conv(up, p["kernel"], p["bias"], 1, ((1, 1), (1, 1)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_space_to_depth_matches_tf_layout():
  x = np.arange(2 * 4 * 6 * 3, dtype=np.float32).reshape(2, 4, 6, 3)
  y = np.asarray(unet_lib.space_to_depth(jnp.asarray(x), 2))
  assert y.shape == (2, 2, 3, 12)
  for dy in range(2):
    for dx in range(2):
      k = (dy * 2 + dx) * 3
      np.testing.assert_array_equal(y[:, :, :, k:k + 3], x[:, dy::2, dx::2, :])
  np.testing.assert_array_equal(np.asarray(unet_lib.depth_to_space(jnp.asarray(y), 2)), x)


def test_attention_block_matches_numpy_float64():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 4, 4, 32)).astype(np.float32)
  module = unet_lib.AttnBlock()
  shapes = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
  params = golden.numpy_params(shapes, seed=3)
  got = np.asarray(module.apply({"params": params}, x))
  p = _f64(params)
  xd = x.astype(np.float64)
  h = _np_group_norm(xd, p["norm"]["scale"], p["norm"]["bias"])
  q, k, v = (h @ p[n]["kernel"] + p[n]["bias"] for n in ("q", "k", "v"))
  b, hh, ww, c = x.shape
  logits = np.einsum("bhwc,bHWc->bhwHW", q, k).reshape(b, hh, ww, hh * ww) / np.sqrt(c)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w = (w / w.sum(-1, keepdims=True)).reshape(b, hh, ww, hh, ww)
  a = np.einsum("bhwHW,bHWc->bhwc", w, v)
  want = xd + a @ p["proj_out"]["kernel"] + p["proj_out"]["bias"]
  # float32 with O(1) activations and 32-term sums: errors ~1e-6; 1e-4 leaves headroom.
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_res_block_matches_numpy_float64():
  rng = np.random.default_rng(4)
  x = rng.standard_normal((2, 4, 4, 32)).astype(np.float32)
  temb = rng.standard_normal((2, 16)).astype(np.float32)
  module = unet_lib.ResBlock(out_ch=64)
  shapes = jax.eval_shape(lambda k: module.init(k, x, temb, False), jax.random.key(0))
  params = golden.numpy_params(shapes["params"], seed=5)
  got = np.asarray(module.apply({"params": params}, x, temb, False))
  p = _f64(params)
  xd = x.astype(np.float64)
  h = _np_swish(_np_group_norm(xd, p["norm1"]["scale"], p["norm1"]["bias"]))
  h = _np_conv(h, p["conv1"]["kernel"], p["conv1"]["bias"], 1, ((1, 1), (1, 1)))
  tproj = _np_swish(temb.astype(np.float64)) @ p["temb_proj"]["kernel"] + p["temb_proj"]["bias"]
  h = h + tproj[:, None, None, :]
  h = _np_swish(_np_group_norm(h, p["norm2"]["scale"], p["norm2"]["bias"]))
  h = _np_conv(h, p["conv2"]["kernel"], p["conv2"]["bias"], 1, ((1, 1), (1, 1)))
  want = xd @ p["nin_shortcut"]["kernel"] + p["nin_shortcut"]["bias"] + h
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_example_dropout_rate_scale_and_keys():
  h = jnp.ones((3, 40, 40, 8))
  keys = jax.random.split(jax.random.key(0), 3)
  out = np.asarray(layers.example_dropout(h, 0.25, keys, site=7))
  # Kept values are scaled by 1 / keep; the rest are zero.
  assert set(np.unique(out)) <= {0.0, np.float32(1 / 0.75)}
  dropped = float(np.mean(out == 0))
  se = math.sqrt(0.25 * 0.75 / out.size)
  assert abs(dropped - 0.25) < 5 * se, dropped
  # Each example's mask depends only on its own key and the site.
  alone = np.asarray(layers.example_dropout(h[1:2], 0.25, keys[1:2], site=7))
  np.testing.assert_array_equal(alone[0], out[1])
  other_site = np.asarray(layers.example_dropout(h, 0.25, keys, site=8))
  assert np.mean(other_site != out) > 0.2
  assert np.mean(out[0] != out[1]) > 0.2


# ---------------------------------------------------------------- the tiny model, numerically

@pytest.fixture(scope="module")
def tiny():
  """Tiny model, its real init, NumPy-randomised weights, inputs and jitted functions."""
  x, t = golden.golden_inputs()
  x, t = jnp.asarray(x), jnp.asarray(t)
  model = UNet(**TINY)
  init_params = jax.jit(model.init)(jax.random.key(0), x, t)["params"]
  rand_params = jax.tree_util.tree_map(jnp.asarray, golden.numpy_params(init_params, seed=11))

  def make_apply(m):
    @jax.jit
    def apply_eval(params, x, t, key):
      return m.apply({"params": params}, x, t, train=False, rngs={"dropout": key})

    @jax.jit
    def apply_train(params, x, t, key):
      return m.apply({"params": params}, x, t, train=True, rngs={"dropout": key})

    return apply_eval, apply_train

  def make_grad(m):
    weights = jax.random.normal(jax.random.key(9), (TINY_B, TINY_SIZE, TINY_SIZE,
                                                    TINY["out_ch"]))

    @jax.jit
    def out_and_grad(params, x, t, key):
      def loss(p):
        # Per-example dropout keys, as the training step passes them.
        out = m.apply({"params": p}, x, t, train=True,
                      dropout_keys_B=jax.random.split(key, x.shape[0]))
        return jnp.sum(out * weights), out
      (_, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
      return out, grads

    return out_and_grad

  apply_eval, apply_train = make_apply(model)
  bf16_eval, _ = make_apply(model.clone(dtype=jnp.bfloat16))
  return dict(model=model, x=x, t=t, init_params=init_params, rand_params=rand_params,
              apply_eval=apply_eval, apply_train=apply_train, bf16_eval=bf16_eval,
              grad=make_grad(model), remat_grad=make_grad(model.clone(remat=True)))


def test_output_near_zero_at_init(tiny):
  out = tiny["apply_eval"](tiny["init_params"], tiny["x"], tiny["t"], jax.random.key(0))
  assert out.shape == (TINY_B, TINY_SIZE, TINY_SIZE, TINY["out_ch"])
  assert out.dtype == jnp.float32
  # conv_out's weights have variance 1e-10 / fan_avg, i.e. std 1e-5 times a unit-scale init,
  # so with O(1) inputs the output is O(1e-5): zero for every practical purpose, not exactly.
  assert float(jnp.max(jnp.abs(out))) < 1e-4 * float(jnp.max(jnp.abs(tiny["x"])))
  assert float(jnp.max(jnp.abs(out))) > 0
  # The same holds for each scaled layer: its weights are ~1e-5 of a regular layer's.
  for path, leaf in traverse_util.flatten_dict(tiny["init_params"]).items():
    if path[-1] == "bias" and not path[-2].startswith("norm"):
      assert not np.any(np.asarray(leaf)), path
    if path[-1] != "kernel":
      continue
    # fan_avg as TF computes it: receptive field * (in + out) / 2 ([in, out] matrices: 1).
    fan_avg = math.prod(leaf.shape[:-2]) * (leaf.shape[-2] + leaf.shape[-1]) / 2
    scale = 1e-10 if path[-2] in ("conv2", "proj_out", "conv_out") else 1.0
    # Uniform(-l, l) with l = sqrt(3 scale / fan_avg): the max of many draws is close to l.
    limit = math.sqrt(3 * scale / fan_avg)
    assert 0.9 * limit < float(jnp.max(jnp.abs(leaf))) <= limit, path


def test_golden_values(tiny):
  ref = np.load(golden.GOLDEN_PATH)
  np.testing.assert_array_equal(ref["x"], np.asarray(tiny["x"]))
  np.testing.assert_array_equal(ref["t"], np.asarray(tiny["t"]))
  params = jax.tree_util.tree_map(jnp.asarray, golden.numpy_params(tiny["init_params"]))
  out = np.asarray(tiny["apply_eval"](params, tiny["x"], tiny["t"], jax.random.key(0)))
  # The reference is float64. When it was made, float32 was off by at most
  # ref['float32_max_rel_err'] (~2e-6) of max|out|; reassociation in other XLA versions or
  # thread counts can move that by a small factor, while any real change to the network
  # moves outputs by 1e-2 or more. 5e-5 of max|out| separates the two.
  scale = float(np.max(np.abs(ref["out"])))
  assert float(ref["float32_max_rel_err"]) < 1e-5
  np.testing.assert_allclose(out, ref["out"], rtol=0, atol=5e-5 * scale)


def test_bf16_close_to_float32(tiny):
  args = (tiny["rand_params"], tiny["x"], tiny["t"], jax.random.key(0))
  out32 = tiny["apply_eval"](*args)
  out16 = tiny["bf16_eval"](*args)
  assert out16.dtype == jnp.float32
  err = _rel_l2(out16, out32)
  # bf16 keeps 8 significant bits: each rounding adds ~2^-9/sqrt(3) ~ 1.1e-3 rms relative
  # error. The longest path stores ~100 rounded intermediates (conv, GN, swish, residual
  # outputs, skips) whose errors add up roughly like a random walk: sqrt(100) * 1.1e-3 ~ 1e-2,
  # with GroupNorm keeping every stage at unit scale so they do not compound. Measured:
  # 1.41e-2 to 1.52e-2 over six weight seeds; a bug (a layer skipped, a float32-only path
  # broken) shows up as O(1).
  assert err < 2e-2, err
  assert err > 1e-4, "bf16 run looks like float32: is the compute dtype being applied?"


def test_dropout_train_vs_eval(tiny):
  p, x, t = tiny["rand_params"], tiny["x"], tiny["t"]
  k1, k2 = jax.random.key(1), jax.random.key(2)
  eval1 = np.asarray(tiny["apply_eval"](p, x, t, k1))
  eval2 = np.asarray(tiny["apply_eval"](p, x, t, k2))
  np.testing.assert_array_equal(eval1, eval2)
  train1 = np.asarray(tiny["apply_train"](p, x, t, k1))
  train1_again = np.asarray(tiny["apply_train"](p, x, t, k1))
  train2 = np.asarray(tiny["apply_train"](p, x, t, k2))
  np.testing.assert_array_equal(train1, train1_again)
  assert _rel_l2(train1, train2) > 1e-2
  assert _rel_l2(train1, eval1) > 1e-2
  # Evaluation needs no dropout stream at all.
  out = jax.eval_shape(lambda p, x, t: tiny["model"].apply({"params": p}, x, t), p, x, t)
  assert out.shape == eval1.shape


@pytest.mark.slow  # compiles the gradient twice, with and without remat
def test_gradients_finite_nonzero_and_remat_equal(tiny):
  args = (tiny["rand_params"], tiny["x"], tiny["t"], jax.random.key(3))
  out, grads = tiny["grad"](*args)
  out_r, grads_r = tiny["remat_grad"](*args)
  flat = traverse_util.flatten_dict(grads)
  flat_r = traverse_util.flatten_dict(grads_r)
  assert flat.keys() == flat_r.keys() == traverse_util.flatten_dict(args[0]).keys()
  max_grad = max(float(np.max(np.abs(np.asarray(g)))) for g in flat.values())
  for path, g in flat.items():
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), path
    if path[-2:] == ("k", "bias"):
      # The key bias adds q_i . b to every logit of query i; softmax over keys ignores
      # such shifts, so its true gradient is 0 (in the original as well). Only float32
      # noise may remain.
      kernel_grad = np.asarray(flat[(*path[:-1], "kernel")])
      assert np.max(np.abs(g)) < 1e-4 * np.max(np.abs(kernel_grad)), path
      continue
    # Well above float32 noise (~1e-7 of the largest gradients), not merely != 0.
    assert np.max(np.abs(g)) > 1e-4 * max_grad, path
  # Recomputation replays the same ops with the same dropout masks; only XLA's fusion
  # choices may differ, hence float32-rounding tolerances rather than bit equality.
  np.testing.assert_allclose(np.asarray(out_r), np.asarray(out), rtol=1e-5, atol=1e-5)
  for path, g in flat.items():
    if path[-2:] != ("k", "bias"):
      assert _rel_l2(flat_r[path], g) < 1e-4, path
