"""The PyTorch checkpoint converter, on .pt files written here (torch is in the test extra)
holding the state dict the reference's UNetModel has for a tiny config, with the reference's
outputs for it (tests/golden/iddpm_unet_tiny.npz)."""
import functools
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from diffusion_jax.config import build
from diffusion_jax.config import config_lib
from diffusion_jax.evaluation import inference
from diffusion_jax.evaluation import modes as evaluate
from diffusion_jax.models import layers
from diffusion_jax.models import torch_names
from diffusion_jax.tools import convert_torch_checkpoint
from tests import iddpm_golden

ROOT = pathlib.Path(__file__).resolve().parents[2]
KEY = "heads_scale_shift_classes"


@pytest.fixture(scope="module")
def golden_case():
  timesteps, cases = iddpm_golden.load_golden()
  return timesteps, cases[KEY]


def tiny_config(spec):
  """Our config for the golden case: Improved DDPM's U-Net at 16x16 with 5 classes and the
  learned-range variance (6 outputs)."""
  kw, size = spec["kwargs"], spec["image_size"]
  config = config_lib.load_config("configs/test.py:var_type=learned_range,loss_type=hybrid")
  config.data.image_size = size
  config.model.update(dict(
      architecture="iddpm", ch=kw["model_channels"], ch_mult=tuple(kw["channel_mult"]),
      num_res_blocks=kw["num_res_blocks"],
      attn_resolutions=tuple(size // r for r in kw["attention_resolutions"]),
      num_heads=kw["num_heads"], num_heads_upsample=kw["num_heads_upsample"],
      scale_shift_norm=kw["use_scale_shift_norm"], num_classes=kw["num_classes"], dropout=0.0))
  config.diffusion.num_timesteps = 20
  config.eval.update(dict(num_samples=6, batch_size=8))
  config.sample.update(dict(sampler="ddim", num_steps=3))
  return config


def save_pt(path, state):
  torch.save({name: torch.from_numpy(value) for name, value in state.items()}, path)


@pytest.mark.slow  # samples with the converted checkpoint
def test_a_state_dict_file_converts_and_samples_as_the_reference_computes(golden_case,
                                                                         tmp_path):
  timesteps, case = golden_case
  config = tiny_config(case["spec"])
  save_pt(tmp_path / "model.pt", case["state"])
  out = tmp_path / "converted"
  count = convert_torch_checkpoint.convert(str(tmp_path / "model.pt"), config, str(out), 7)
  assert count == len(case["state"])
  loaded = inference.load(str(out))  # the config saved with the checkpoint
  assert loaded.step == 7 and loaded.config.model.num_classes == 5
  model = build.make_model(loaded.config)
  got = model.apply({"params": loaded.params}, np.transpose(case["x"], (0, 2, 3, 1)),
                    jnp.asarray(timesteps), labels_B=jnp.asarray(case["y"], jnp.int32))
  want = np.transpose(case["out"], (0, 2, 3, 1))
  assert np.abs(np.asarray(got) - want).max() < 1e-5 * np.abs(want).max()
  # Every mode loads it: --mode sample writes the samples with their labels.
  samples = evaluate.run_sample(loaded.config, str(out))
  with np.load(samples / "samples_0.npz") as f:
    assert f["images"].shape == (6, 16, 16, 3)
    np.testing.assert_array_equal(f["labels"], np.arange(6) % 5)
  with pytest.raises(FileExistsError, match="choose a new --out"):
    convert_torch_checkpoint.convert(str(tmp_path / "model.pt"), config, str(out))


def test_a_state_dict_of_another_model_is_refused_naming_what_differs(golden_case, tmp_path):
  _, case = golden_case
  config = tiny_config(case["spec"])
  config.model.scale_shift_norm = False
  save_pt(tmp_path / "model.pt", case["state"])
  with pytest.raises(convert_torch_checkpoint.CheckpointMismatchError,
                     match=r"does not match the model this config builds: .*with another "
                           r"shape: .*emb_layers.*model.scale_shift_norm.*configs/"
                           r"cifar10_iddpm.py for cifar10_uncond_50M_500K"):
    convert_torch_checkpoint.convert(str(tmp_path / "model.pt"), config, str(tmp_path / "out"))
  assert not (tmp_path / "out" / "checkpoints").exists()  # nothing written
  ddpm = config_lib.load_config("configs/test.py")
  with pytest.raises(convert_torch_checkpoint.CheckpointMismatchError,
                     match="model.architecture='iddpm'"):
    convert_torch_checkpoint.convert_state_dict(case["state"], ddpm)
  torch.save(torch.zeros(3), tmp_path / "tensor.pt")
  with pytest.raises(ValueError, match="does not hold a state dict"):
    convert_torch_checkpoint.read_state_dict(str(tmp_path / "tensor.pt"))


@pytest.mark.parametrize("name", sorted(convert_torch_checkpoint.RELEASES))
def test_each_released_state_dict_maps_one_to_one_onto_its_configs_model(name):
  """The names and shapes of the released models' state dicts (the reference's create_model
  with its README's flags, tests/golden/iddpm_released_state_dicts.json) against the parameters
  our config for each builds (traced, not computed)."""
  released = json.loads((ROOT / "tests" / "golden" /
                         "iddpm_released_state_dicts.json").read_text())[name]
  config, _ = convert_torch_checkpoint.release_config(f"{name}.pt")
  model = build.make_model(config)
  abstract = jax.eval_shape(functools.partial(build.init_params, config, model),
                            jax.random.key(0))
  mapping = torch_names.match_state_dict(released, abstract)
  assert len(mapping) == len(released)
  assert layers.count_params(abstract) == sum(math.prod(shape) for shape in released.values())


def test_released_files_are_recognised_by_name_and_get_their_configs():
  assert len(convert_torch_checkpoint.RELEASES) == 7
  config, step = convert_torch_checkpoint.release_config("/x/imagenet64_cond_270M_250K.pt")
  assert step == 250_000
  assert (config.model.ch, config.model.num_classes, config.diffusion.rescale_timesteps,
          config.diffusion.rescale_learned_sigmas) == (192, 1000, False, False)
  config, step = convert_torch_checkpoint.release_config("cifar10_uncond_vlb_50M_500K.pt")
  assert (config.diffusion.loss_type, config.diffusion.timestep_sampler, step) == (
      "rescaled_kl", "loss_second_moment", 500_000)
  assert convert_torch_checkpoint.release_config("model.pt") is None


@pytest.mark.slow  # the converter's command line in a subprocess
def test_command_line_names_the_releases_when_it_cannot_tell_the_config(golden_case, tmp_path):
  _, case = golden_case
  save_pt(tmp_path / "mine.pt", case["state"])
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "diffusion_jax.tools.convert_torch_checkpoint",
         f"--checkpoint={tmp_path / 'mine.pt'}", f"--out={tmp_path / 'out'}"]
  got = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert got.returncode == 2, got.stderr[-2000:]
  assert got.stderr.startswith("error: mine.pt is not one of the released checkpoints"), (
      got.stderr[-2000:])
  assert "pass --config" in got.stderr and len(got.stderr.splitlines()) == 1
  # A released name with the wrong contents: its config is the full-size model's.
  save_pt(tmp_path / "cifar10_uncond_50M_500K.pt", case["state"])
  cmd[3] = f"--checkpoint={tmp_path / 'cifar10_uncond_50M_500K.pt'}"
  got = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert got.returncode == 2, got.stderr[-2000:]
  assert got.stderr.startswith("error: the PyTorch checkpoint does not match the model this "
                               "config builds"), got.stderr[-2000:]
  assert "Traceback" not in got.stderr


def test_command_line_builds_the_config_from_its_flags(golden_case, tmp_path, capsys):
  """The golden case's model as `--config` with overrides (the one `tiny_config` builds in
  Python), converted in this process."""
  _, case = golden_case
  save_pt(tmp_path / "mine.pt", case["state"])
  out = tmp_path / "converted"
  convert_torch_checkpoint.main([
      f"--checkpoint={tmp_path / 'mine.pt'}", f"--out={out}", "--step=7",
      "--config=configs/test.py:var_type=learned_range,loss_type=hybrid",
      "--config.data.image_size=16", "--config.model.architecture=iddpm", "--config.model.ch=64",
      "--config.model.attn_resolutions=(16, 8)", "--config.model.num_heads=2",
      "--config.model.num_heads_upsample=4", "--config.model.scale_shift_norm=True",
      "--config.model.num_classes=5", "--config.model.dropout=0.0"])
  assert capsys.readouterr().out.startswith(
      f"converted {tmp_path / 'mine.pt'} (step 7, {len(case['state'])} tensors) -> ")
  saved = inference.saved_config(str(out))
  assert saved.model.to_dict() == tiny_config(case["spec"]).model.to_dict()
  assert saved.diffusion.var_type == "learned_range"
  # Without --config, a file not among the releases is refused in one line, exit 2.
  with pytest.raises(SystemExit) as exited:
    convert_torch_checkpoint.main([f"--checkpoint={tmp_path / 'mine.pt'}",
                                   f"--out={tmp_path / 'other'}"])
  assert exited.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: mine.pt is not one of the released checkpoints (") and (
      err.endswith("pass --config with the config it was trained with\n")), err
