"""Architectures by name: an architecture is one entry that owns its settings, and one from
another package reaches every driver (the config and its checks, `--mode summary`, the training
step) through `models.register` or the entry-point group alone, with no edit to diffusion_jax."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from diffusion_jax.config import build
from diffusion_jax.config import checks as config_checks
from diffusion_jax.config import config_lib
from diffusion_jax import models
from diffusion_jax.models import registry
from tests import helpers

# A package of someone else's: a few convolutions, with a depth setting of its own.
TOY_MODULE = '''
"""An architecture outside diffusion_jax."""
import flax.linen as nn
import jax.numpy as jnp

from diffusion_jax import models
from diffusion_jax.utils.settings import Setting


class ToyNet(nn.Module):
  out_ch: int
  ch: int
  toy_depth: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, t, train=False, dropout_keys_B=None):
    del train, dropout_keys_B
    h = nn.Conv(self.ch, (3, 3), name="conv_in")(x)
    temb = nn.Dense(self.ch, name="temb")(jnp.sin(jnp.asarray(t, jnp.float32)[:, None] / 100.0))
    h = h + temb[:, None, None, :]
    for i in range(self.toy_depth):
      h = nn.Conv(self.ch, (3, 3), name=f"conv_{i}")(nn.silu(h))
    return nn.Conv(self.out_ch, (3, 3), name="conv_out")(nn.silu(h))


def build(*, out_ch, ch, dropout, toy_depth, **unused):
  del unused
  return ToyNet(out_ch=out_ch, ch=ch, toy_depth=toy_depth, dropout=dropout)


def check(field, *, image_size, channels, ch, **unused):
  del image_size, channels, unused
  if ch % 2:
    raise ValueError(f"model.ch={ch} must be even for the toy: set {field('ch')}=32")


ENTRY = models.Architecture(
    name="toy", title="the toy network", build=build, check=check,
    settings=(Setting("toy_depth", 1, "int", 1, 4, note="the toy's convolutions"),))
'''


def write_plugin(root):
  """The distribution `toy-net` under `root`, its entry point in `diffusion_jax.models`."""
  return helpers.write_plugin(root, "toy_net", TOY_MODULE, registry.ENTRY_POINT_GROUP)


@pytest.fixture
def toy(tmp_path, monkeypatch):
  """The toy architecture, registered in this process through the entry-point group, as on the
  registry's first use."""
  root = write_plugin(tmp_path / "site")
  monkeypatch.syspath_prepend(str(root))
  monkeypatch.setattr(registry.REGISTRY, "plugins_loaded", False)
  try:
    assert "toy" in models.names()
    yield root
  finally:
    models.unregister("toy")
    sys.modules.pop("toy_net", None)


def _config(**model):
  return config_lib.load_config("configs/test.py", {f"model.{k}": v for k, v in model.items()})


def test_the_package_registers_its_architectures_explicitly():
  assert models.names()[:2] == ("ddpm", "iddpm")
  # The model section of every config is the registry's: the architecture, the common settings,
  # then each architecture's own, in the order the original's configs listed them.
  assert set(config_lib.load_config("configs/default.py").model) == set(models.default_settings())
  assert list(models.default_settings()) == [
          "architecture", "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout",
          "dtype", "remat", "block_size", "num_heads", "num_head_channels",
          "num_heads_upsample", "scale_shift_norm", "num_classes", "p_uncond"]
  assert registry.owners("block_size") == ["ddpm"]
  assert registry.owners("num_heads") == ["iddpm"] and registry.owners("ch") == []


def test_each_setting_has_its_rule_in_the_config_checks():
  rules = {rule.path: rule for rule in config_checks.model_rules()}
  assert set(rules) == {f"model.{name}" for name in models.default_settings()}
  assert rules["model.architecture"].choices == models.names()
  assert (rules["model.dropout"].low, rules["model.dropout"].high,
          rules["model.dropout"].high_open) == (0, 1, True)


@pytest.mark.parametrize("change, message", [
    (dict(dtype="float16"), "model.dtype='float16' must be one of float32, bfloat16: set "
     "--config.model.dtype=float32|bfloat16"),
    (dict(dropout=1.0), "model.dropout=1.0 must be a finite number in [0, 1): set "
     "--config.model.dropout=X"),
    (dict(ch_mult=(1, 0)), "model.ch_mult=(1, 0) must be a tuple of integers each >= 1 (each "
     "level's width over ch): set --config.model.ch_mult='(N, ...)'"),
    (dict(architecture="transformer"), "model.architecture='transformer' must be one of ddpm, "
     "iddpm: set --config.model.architecture=ddpm|iddpm"),
    (dict(block_size=2, architecture="iddpm"), "model.block_size=2: Improved DDPM's U-Net "
     "(model.architecture='iddpm') does not read it; it is a setting of DDPM's U-Net ('ddpm'): "
     "set --config.model.architecture=ddpm, or --config.model.block_size=1"),
])
def test_bad_model_settings_say_what_to_set(change, message):
  with pytest.raises(config_checks.ConfigError) as info:
    config_checks.check(_config(**change), "train")
  assert str(info.value) == message


def test_a_setting_of_another_architecture_names_its_owner():
  with pytest.raises(config_checks.ConfigError,
                     match=r"^model.num_heads=2, model.num_classes=10: DDPM's U-Net "
                           r"\(model.architecture='ddpm'\) does not read them; they are settings "
                           r"of Improved DDPM's U-Net \('iddpm'\): set "
                           r"--config.model.architecture=iddpm, or --config.model.num_heads=1 "
                           r"--config.model.num_classes=0$"):
    config_checks.check(_config(num_heads=2, num_classes=10), "train")


def test_make_builds_each_architecture_from_its_settings():
  ddpm = build.make_model(_config(block_size=2, attn_resolutions=(2,)))
  assert type(ddpm).__name__ == "UNet" and ddpm.block_size == 2 and ddpm.ch_mult == (1, 2)
  iddpm = build.make_model(_config(architecture="iddpm", num_classes=10, p_uncond=0.1,
                                   num_heads=2))
  assert type(iddpm).__name__ == "IDDPMUNet" and iddpm.null_class and iddpm.num_heads == 2
  with pytest.raises(ValueError, match="tf checkpoints hold the parameters of another "
                                       "architecture than Improved DDPM's U-Net"):
    models.name_map("iddpm", "tf")
  assert models.name_map("ddpm", "tf").__name__ == "diffusion_jax.models.tf_names"


def test_a_third_architecture_is_one_entry(toy):
  del toy
  config = _config(architecture="toy", toy_depth=2)
  assert config.model.toy_depth == 2
  config_checks.check(config, "train")
  # Its setting's rule, stated by the entry; its own check; its setting kept off other models.
  for change, message in [
      (dict(toy_depth=5), "model.toy_depth=5 must be an integer in [1, 4] (the toy's "
       "convolutions): set --config.model.toy_depth=N"),
      (dict(ch=33), "model.ch=33 must be even for the toy: set --config.model.ch=32")]:
    with pytest.raises(config_checks.ConfigError) as info:
      config_checks.check(_config(architecture="toy", **change), "train")
    assert str(info.value) == message
  with pytest.raises(config_checks.ConfigError, match=r"^model.toy_depth=3: DDPM's U-Net .* "
                                                      r"setting of the toy network \('toy'\)"):
    config_checks.check(_config(toy_depth=3), "train")
  # Its parameter table, one row per top-level module (the entry has no table of its own).
  table = build.model_summary(config).splitlines()
  assert [line.split()[0] for line in table[1:6]] == ["conv_0", "conv_1", "conv_in", "conv_out",
                                                      "temb"], table
  # One training step of the sharded step, on its parameters.
  rng = np.random.default_rng(0)
  images = {"image": rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)}
  params, history, _ = helpers.run_steps(config, jax.devices()[:1], images, 1)
  assert sorted(params) == ["conv_0", "conv_1", "conv_in", "conv_out", "temb"]
  assert np.isfinite(history[0]["loss"]) and history[0]["loss"] > 0
  total = sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(params))
  assert table[-1] == f"total params: {total:,}"


@pytest.mark.slow  # the command line in a subprocess
def test_the_command_line_summarizes_a_plugin_architecture(tmp_path):
  root = write_plugin(tmp_path / "site")
  env = helpers.subprocess_env()
  env["PYTHONPATH"] = os.pathsep.join([str(root), env["PYTHONPATH"]])
  command = [sys.executable, "-m", "diffusion_jax.main", "--config", str(
      helpers.ROOT / "configs" / "test.py"), "--config.model.architecture=toy", "--mode=summary"]
  good = subprocess.run(command + ["--config.model.toy_depth=3"], env=env, cwd=tmp_path,
                        capture_output=True, text=True, timeout=300)
  assert good.returncode == 0, good.stderr[-3000:]
  assert "conv_2" in good.stdout and good.stdout.strip().splitlines()[-1].startswith(
      "total params: ")
  bad = subprocess.run(command + ["--config.model.toy_depth=0"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1] == (
      "error: model.toy_depth=0 must be an integer in [1, 4] (the toy's convolutions): set "
      "--config.model.toy_depth=N")
