"""The TF checkpoint converter, on checkpoints written here with the original's variable names."""

import jax
import numpy as np
import pytest
import tensorflow as tf  # the 'test' extra installs tensorflow-cpu

from diffusion_jax.config import build
from diffusion_jax.config import config_lib
from diffusion_jax.evaluation import inference
from diffusion_jax.models import tf_names
from diffusion_jax.tools import convert_tf_checkpoint
from diffusion_jax.training import checkpoints


def original_variables(config, seed):
  """Values for every variable the original's unet.py creates for this config, by TF name."""
  model = build.make_model(config)
  size, channels = config.data.image_size, config.data.channels
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(0), np.zeros((1, size, size, channels), np.float32),
      np.zeros((1,), np.int32)))["params"]
  rng = np.random.default_rng(seed)
  names = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    name = tf_names.tf_variable_name(tuple(k.key for k in path))
    names[name] = (0.2 * rng.standard_normal(leaf.shape)).astype(np.float32)
  return names


def write_tf1_checkpoint(prefix, tensors):
  """Writes a name-keyed tensor bundle, as a TF1 Saver does (no object graph)."""
  names = sorted(tensors)
  tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=names, shape_and_slices=[""] * len(names),
                    tensors=[tf.constant(tensors[n]) for n in names])


@pytest.fixture(scope="module")
def config():
  return config_lib.load_config("configs/test.py")


def test_every_variable_lands_in_place_and_the_model_agrees(config, tmp_path, monkeypatch):
  raw = original_variables(config, seed=0)
  ema = {name + convert_tf_checkpoint.EMA_SUFFIX: value + 1.0 for name, value in raw.items()}
  extras = {"global_step": np.int64(790000)}
  # Adam slots sit beside the variables in the original's checkpoints and are ignored.
  extras.update({f"{n}/Adam": np.zeros_like(v) for n, v in list(raw.items())[:3]})
  prefix = tmp_path / "tf" / "model.ckpt-790000"
  prefix.parent.mkdir()
  write_tf1_checkpoint(prefix, {**raw, **ema, **extras})

  step, has_ema = convert_tf_checkpoint.convert(str(prefix), config, str(tmp_path / "out"))
  assert step == 790000 and has_ema
  params, got_step = checkpoints.restore_params(str(tmp_path / "out" / "checkpoints"), ema=False)
  ema_params, _ = checkpoints.restore_params(str(tmp_path / "out" / "checkpoints"), ema=True)
  assert got_step == 790000
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  assert len(flat) == len(raw)
  for path, value in flat:
    keys = tuple(k.key for k in path)
    name = tf_names.tf_variable_name(keys)
    np.testing.assert_array_equal(value, raw[name])
    ema_value = ema_params
    for k in keys:
      ema_value = ema_value[k]
    np.testing.assert_array_equal(ema_value, raw[name] + 1.0)

  # The converted model computes what a model given the same values directly computes.
  model = build.make_model(config)
  direct = {}
  for name, value in raw.items():
    node = direct
    keys = tf_names.flax_param_path(name)
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = value
  x = np.random.default_rng(1).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
  t = np.array([3, 70], np.int32)
  apply = jax.jit(lambda p: model.apply({"params": p}, x, t, train=False))
  np.testing.assert_array_equal(np.asarray(apply(params)), np.asarray(apply(direct)))

  # A directory containing the checkpoint works too; an occupied --out is refused; a relative
  # --out starts at the current directory.
  (prefix.parent / "checkpoint").write_text(f'model_checkpoint_path: "{prefix.name}"\n')
  with pytest.raises(FileExistsError, match="already holds checkpoints"):
    convert_tf_checkpoint.convert(str(prefix.parent), config, str(tmp_path / "out"))
  monkeypatch.chdir(tmp_path)
  step2, _ = convert_tf_checkpoint.convert(str(prefix.parent), config, "out2")
  assert step2 == 790000
  assert checkpoints.restore_params(str(tmp_path / "out2" / "checkpoints"))[1] == 790000


def test_checkpoint_without_ema_uses_the_raw_variables(config, tmp_path):
  raw = original_variables(config, seed=2)
  prefix = tmp_path / "model.ckpt-5"
  write_tf1_checkpoint(prefix, raw)
  step, has_ema = convert_tf_checkpoint.convert(str(prefix), config, str(tmp_path / "out"))
  assert (step, has_ema) == (0, False)
  ema_params, _ = checkpoints.restore_params(str(tmp_path / "out" / "checkpoints"), ema=True)
  np.testing.assert_array_equal(ema_params["conv_in"]["kernel"], raw["model/conv_in/W"])


def test_mismatched_checkpoint_names_the_first_mismatches(config, tmp_path):
  raw = original_variables(config, seed=3)
  del raw["model/mid/attn_1/q/W"]
  raw["model/conv_out/W"] = raw["model/conv_out/W"][..., :1]
  raw["model/down_9/block_0/conv1/W"] = np.zeros((3, 3, 4, 4), np.float32)
  prefix = tmp_path / "model.ckpt-1"
  write_tf1_checkpoint(prefix, raw)
  with pytest.raises(convert_tf_checkpoint.CheckpointMismatchError) as info:
    convert_tf_checkpoint.convert(str(prefix), config, str(tmp_path / "out"))
  message = str(info.value)
  assert "missing model/mid/attn_1/q/W" in message
  assert "model/conv_out/W has shape (3, 3, 32, 1), the config builds (3, 3, 32, 3)" in message
  assert "unexpected model/down_9/block_0/conv1/W" in message
  assert "Use the config the checkpoint was trained with" in message
  # Nothing that looks like a finished conversion is left behind.
  assert not (tmp_path / "out" / "checkpoints").exists()


def test_missing_checkpoint_is_reported(config, tmp_path):
  with pytest.raises(FileNotFoundError, match="model.ckpt-1.index does not exist"):
    convert_tf_checkpoint.convert(str(tmp_path / "model.ckpt-1"), config, str(tmp_path / "o"))
  with pytest.raises(FileNotFoundError, match="no TensorFlow checkpoint in directory"):
    convert_tf_checkpoint.convert(str(tmp_path), config, str(tmp_path / "o"))


def test_command_line_converts_with_config_overrides_and_refuses_another_model(config, tmp_path,
                                                                             capsys):
  raw = original_variables(config, seed=4)
  prefix = tmp_path / "model.ckpt-9"
  write_tf1_checkpoint(prefix, {**raw, "global_step": np.int64(9)})
  out = tmp_path / "out"
  convert_tf_checkpoint.main([f"--checkpoint={prefix}", "--config", "configs/test.py",
                              "--config.model.dropout=0.0", f"--out={out}"])
  assert capsys.readouterr().out.startswith(f"converted {prefix} (step 9, ")
  saved = inference.saved_config(str(out))
  assert saved.model.dropout == 0.0 and saved.model.ch == 32
  assert checkpoints.restore_params(str(out / "checkpoints"))[1] == 9
  # A config of another model (an override of the width): one line, exit 2, nothing written.
  with pytest.raises(SystemExit) as exited:
    convert_tf_checkpoint.main([f"--checkpoint={prefix}", "--config=test",
                                "--config.model.ch=64", f"--out={tmp_path / 'other'}"])
  assert exited.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: the TensorFlow checkpoint does not match the model this config "
                        "builds: model/") and len(err.splitlines()) == 1, err
  assert not (tmp_path / "other" / "checkpoints").exists()
