"""The diffusers converter both ways and the safetensors export, against diffusers itself: a tiny
UNet2DModel with google/ddpm-*'s settings and random weights, saved by diffusers (safetensors and
.bin), converted, and compared with diffusers' own outputs; our checkpoints exported and loaded by
diffusers; DDPMScheduler's steps against our ancestral step with the same noise.

Tolerance of the network comparisons: both sides compute the same float32 operations in another
order (convolution sums of up to 9 * 96 terms, GroupNorm statistics, a softmax) through about
twenty layers; float32's relative rounding is 6e-8 per operation, and outputs of size ~0.3 agree
to ~3e-7 here, so 1e-5 of the output's scale leaves a wide margin and still catches any wrong
weight, layout or setting (which moves outputs by 1e-2 or more).
"""
import functools
import os
import shutil
import subprocess
import sys

# Nothing is downloaded: diffusers is told so before it is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline
from diffusers import DDPMScheduler
from diffusers import UNet2DModel
from safetensors import numpy as safetensors_numpy

from diffusion_jax.config import build
from diffusion_jax.config import config_lib
from diffusion_jax.evaluation import inference
from diffusion_jax.evaluation import modes as evaluate
from diffusion_jax.models import tf_names
from diffusion_jax.models import torch_names
from diffusion_jax.samplers import ancestral
from diffusion_jax.tools import convert_diffusers
from diffusion_jax.tools import export_safetensors
from diffusion_jax.training import checkpoints
from tests import helpers

T = 50
# google/ddpm-*'s settings at 16x16: widths 32 and 64 (GroupNorm's 32 groups divide both), one
# block per level, attention at 8x8.
TINY = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"), flip_sin_to_cos=False, freq_shift=1,
            downsample_padding=0, attention_head_dim=None, norm_eps=1e-6)


def tiny_unet(seed=0, **overrides):
  unet = UNet2DModel(**{**TINY, **overrides})
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in unet.parameters():
      p.copy_(0.1 * torch.randn(p.shape, generator=generator))
  return unet.eval()


def diffusers_output(unet, x_BxHxWxC, t_B):
  with torch.no_grad():
    out = unet(torch.from_numpy(np.transpose(x_BxHxWxC, (0, 3, 1, 2))),
               torch.from_numpy(t_B)).sample
  return np.transpose(out.numpy(), (0, 2, 3, 1))


@functools.lru_cache
def _compiled_apply(model):
  # One compile per model (every test here builds the same one), shared by the tests.
  return jax.jit(lambda params, x, t: model.apply({"params": params}, x, t))


def our_output(config, params, x_BxHxWxC, t_B):
  apply = _compiled_apply(build.make_model(config))
  return np.asarray(apply(params, jnp.asarray(x_BxHxWxC), jnp.asarray(t_B, jnp.int32)))


def assert_close(got, want):
  assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), np.abs(got - want).max()


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(1)
  return rng.standard_normal((2, 16, 16, 3)).astype(np.float32), np.array([0, T - 1], np.int64)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """The tiny model as diffusers saves it: a pipeline folder (safetensors), a model folder (.bin,
  scheduler_config.json beside it), and a model folder with older diffusers' attention names
  (.bin, no scheduler config)."""
  root = tmp_path_factory.mktemp("diffusers")
  unet = tiny_unet()
  scheduler = DDPMScheduler(num_train_timesteps=T, variance_type="fixed_large",
                            clip_sample=False)
  DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(root / "pipeline")
  unet.save_pretrained(root / "model", safe_serialization=False)
  scheduler.save_pretrained(root / "model")
  assert (root / "model" / convert_diffusers.WEIGHTS_BIN).is_file()
  old = {}
  for name, value in unet.state_dict().items():
    for new_name, old_name in (("to_q.", "query."), ("to_k.", "key."), ("to_v.", "value."),
                               ("to_out.0.", "proj_attn.")):
      name = name.replace(new_name, old_name)
    old[name] = value
  assert sum(".proj_attn." in name for name in old) == 2 * 4  # blocks: 1 down, 1 mid, 2 up
  (root / "old").mkdir()
  shutil.copy(root / "model" / "config.json", root / "old" / "config.json")
  torch.save(old, root / "old" / convert_diffusers.WEIGHTS_BIN)
  # diffusers itself reads the old names as today's.
  reread = UNet2DModel.from_pretrained(root / "old").state_dict()
  assert all(torch.equal(value, reread[name]) for name, value in unet.state_dict().items())
  return root, unet


def test_a_pipeline_folder_converts_and_computes_what_diffusers_computes(saved, inputs,
                                                                         tmp_path):
  root, unet = saved
  convert_diffusers.from_diffusers(str(root / "pipeline"), str(tmp_path / "out"), step=3)
  loaded = inference.load(str(tmp_path / "out"))
  config = loaded.config
  assert loaded.step == 3
  assert (config.model.ch, tuple(config.model.ch_mult), config.model.num_res_blocks,
          tuple(config.model.attn_resolutions), config.data.image_size) == (32, (1, 2), 1, (8,),
                                                                           16)
  assert (config.diffusion.num_timesteps, config.diffusion.var_type, config.diffusion.mean_type,
          config.sample.clip_denoised, config.model.dropout) == (T, "fixedlarge", "eps", False,
                                                                 0.0)
  x, t = inputs
  assert_close(our_output(config, loaded.params, x, t), diffusers_output(unet, x, t))
  with pytest.raises(FileExistsError, match="choose a new --out"):
    convert_diffusers.from_diffusers(str(root / "pipeline"), str(tmp_path / "out"))


def test_a_model_folder_with_a_bin_file_and_old_attention_names_converts_the_same(saved,
                                                                                tmp_path):
  root, _ = saved
  for name in ("pipeline", "model", "old"):
    convert_diffusers.from_diffusers(str(root / name), str(tmp_path / name))
  want, _ = checkpoints.restore_params(str(tmp_path / "pipeline" / "checkpoints"))
  for name in ("model", "old"):
    got, _ = checkpoints.restore_params(str(tmp_path / name / "checkpoints"))
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
  assert inference.saved_config(str(tmp_path / "model")).diffusion.var_type == "fixedlarge"
  # Without a scheduler config, DDPMScheduler's defaults.
  assert inference.saved_config(str(tmp_path / "old")).diffusion.var_type == "fixedsmall"


def test_our_checkpoint_exported_loads_in_diffusers_and_computes_what_we_compute(saved, inputs,
                                                                               tmp_path):
  root, _ = saved
  convert_diffusers.from_diffusers(str(root / "pipeline"), str(tmp_path / "ours"))
  # Weights of our own: the converted ones moved, EMA and raw apart.
  loaded = inference.load(str(tmp_path / "ours"))
  rng = np.random.default_rng(2)
  raw = jax.tree_util.tree_map(
      lambda p: (p + 0.05 * rng.standard_normal(p.shape)).astype(np.float32), loaded.params)
  ema = jax.tree_util.tree_map(lambda p: p * 0.5, raw)
  checkpoints.save_converted(str(tmp_path / "mine"), 7, raw, ema, loaded.config)
  x, t = inputs
  for which, params in (("ema", ema), ("raw", raw)):
    out = convert_diffusers.to_diffusers(str(tmp_path / "mine"), str(tmp_path / f"hf_{which}"),
                                         ema=which == "ema")
    pipeline = DDPMPipeline.from_pretrained(out)
    assert_close(diffusers_output(pipeline.unet.eval(), x, t),
                 our_output(loaded.config, params, x, t))
  card = (tmp_path / "hf_ema" / "README.md").read_text()
  assert "Training: 7 steps" in card and "EMA weights" in card and '"dataset": "cifar10"' in card
  scheduler = pipeline.scheduler.config
  assert (scheduler.num_train_timesteps, scheduler.variance_type, scheduler.clip_sample,
          scheduler.timestep_spacing) == (T, "fixed_large", False, "linspace")
  # Back again: the same weights and settings.
  convert_diffusers.from_diffusers(str(tmp_path / "hf_raw"), str(tmp_path / "again"))
  again = inference.load(str(tmp_path / "again"))
  jax.tree_util.tree_map(np.testing.assert_array_equal, again.params, raw)
  assert again.config.diffusion.to_dict() == loaded.config.diffusion.to_dict()
  (tmp_path / "taken").mkdir()
  (tmp_path / "taken" / "mine.txt").write_text("keep")
  with pytest.raises(FileExistsError, match="not an empty folder"):
    convert_diffusers.to_diffusers(str(tmp_path / "mine"), str(tmp_path / "taken"))
  assert (tmp_path / "taken" / "mine.txt").read_text() == "keep"


@pytest.mark.parametrize("schedule, variance, prediction, clip", [
    ("linear", "fixed_small", "epsilon", True),
    ("scaled_linear", "fixed_large", "sample", False),
    ("squaredcos_cap_v2", "learned_range", "v_prediction", True),
    ("linear", "fixed_small_log", "epsilon", False),
])
def test_ddpm_scheduler_steps_are_our_ancestral_steps(schedule, variance, prediction, clip):
  """The model output is random (the step's math is the subject); the noise is the noise
  diffusers draws from the same generator.

  diffusers keeps its coefficients in float32: near t = 0, 1 - alpha_bar_t (~3e-4) then carries
  a relative error of ~4e-4, which its step's divisions pass on. So its step runs here on its own
  float32 betas in float64 (as ours are precomputed), and the two agree to float32 rounding of
  the result (1e-5 leaves a margin of ~30 over the 3e-7 seen); the betas themselves agree to
  float32 rounding (6e-8; 1e-6 allowed)."""
  scheduler = DDPMScheduler(num_train_timesteps=T, beta_schedule=schedule, variance_type=variance,
                            prediction_type=prediction, clip_sample=clip)
  fields = convert_diffusers.diffusion_settings(scheduler.config)
  config = config_lib.load_config("configs/test.py", fields)
  sched = build.make_schedule(config)
  np.testing.assert_allclose(sched.betas, scheduler.betas.numpy(), rtol=1e-6)
  scheduler.alphas_cumprod = torch.cumprod(1.0 - scheduler.betas.double(), 0)
  scheduler.one = torch.tensor(1.0, dtype=torch.float64)
  channels = 6 if variance == "learned_range" else 3
  rng = np.random.default_rng(3)
  for t in (T - 1, 20, 1, 0):
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    output = rng.standard_normal((2, channels, 8, 8)).astype(np.float32)
    noise = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(t),
                        dtype=torch.float64)
    want = scheduler.step(torch.from_numpy(output).double(), t, torch.from_numpy(x).double(),
                          generator=torch.Generator().manual_seed(t)).prev_sample.numpy()
    nhwc = lambda a: jnp.asarray(np.transpose(a, (0, 2, 3, 1)))  # noqa: E731
    got, _ = ancestral.p_sample(sched, lambda x_, t_: nhwc(output), nhwc(x),
                                jnp.full((2,), t, jnp.int32), nhwc(noise.numpy()),
                                mean_type=config.diffusion.mean_type,
                                var_type=config.diffusion.var_type,
                                clip_denoised=config.sample.clip_denoised)
    np.testing.assert_allclose(np.transpose(np.asarray(got), (0, 3, 1, 2)), want, atol=1e-5,
                               rtol=1e-5)


def test_scheduler_settings_map_and_trained_betas_are_recognised():
  assert convert_diffusers.diffusion_settings(None) == {
      "diffusion.num_timesteps": 1000, "diffusion.beta_schedule": "linear",
      "diffusion.beta_start": 1e-4, "diffusion.beta_end": 0.02,
      "diffusion.var_type": "fixedsmall", "diffusion.mean_type": "eps",
      "sample.clip_denoised": True}
  betas = DDPMScheduler(num_train_timesteps=T, beta_schedule="scaled_linear").betas.tolist()
  fields = convert_diffusers.diffusion_settings({"num_train_timesteps": T,
                                                 "trained_betas": betas})
  assert fields["diffusion.beta_schedule"] == "quad"
  assert fields["diffusion.beta_end"] == pytest.approx(0.02, rel=1e-6)
  cosine = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2").betas
  assert convert_diffusers.diffusion_settings(
      {"num_train_timesteps": T, "trained_betas": cosine.tolist()})[
          "diffusion.beta_schedule"] == "cosine"


@pytest.mark.parametrize("field, value, message", [
    ("beta_schedule", "sigmoid", "beta_schedule='sigmoid': we have linear, scaled_linear, "
     "squaredcos_cap_v2"),
    ("trained_betas", list(np.linspace(1e-4, 0.02, T) ** 1.5), "trained_betas: none of our "
     "schedules"),
    ("variance_type", "learned", "diffusers reads the extra channels as the variance itself"),
    ("variance_type", "fixed_large_log", "variance_type='fixed_large_log': we have"),
    ("prediction_type", "x_prev", "prediction_type='x_prev': we have epsilon, sample, "
     "v_prediction"),
    ("thresholding", True, "thresholding=True: dynamic thresholding"),
    ("clip_sample_range", 2.0, "clip_sample_range=2.0: we clip x_0 predictions to [-1, 1] only"),
    ("rescale_betas_zero_snr", True, "rescale_betas_zero_snr=True"),
    ("timestep_spacing", "uniform", "timestep_spacing='uniform': diffusers has linspace"),
    ("steps_offset", -1, "steps_offset=-1"),
    ("_class_name", "DDIMScheduler", "the scheduler is a DDIMScheduler"),
])
def test_each_scheduler_setting_we_lack_is_refused_by_name(field, value, message):
  config = dict(DDPMScheduler(num_train_timesteps=T).config)
  config[field] = value
  with pytest.raises(convert_diffusers.ConversionError) as info:
    convert_diffusers.diffusion_settings(config)
  assert message in str(info.value)


@pytest.mark.parametrize("overrides, message", [
    ({"model.architecture": "iddpm"}, "model.architecture='iddpm': Improved DDPM's U-Net"),
    ({"model.block_size": 2}, "model.block_size=2: UNet2DModel has no space-to-depth"),
    ({"diffusion.var_type": "learned", "diffusion.loss_type": "kl"},
     "diffusion.var_type='learned': DDPMScheduler's 'learned' reads"),
    ({"diffusion.mean_type": "xprev"}, "diffusion.mean_type='xprev'"),
    ({"diffusion.beta_schedule": "jsd"}, "diffusion.beta_schedule='jsd': its last beta is 1"),
    ({"diffusion.rescale_timesteps": True}, "diffusion.rescale_timesteps=True"),
])
def test_what_diffusers_cannot_express_is_refused_on_export(overrides, message):
  config = config_lib.load_config("configs/test.py", overrides)
  with pytest.raises(convert_diffusers.ConversionError) as info:
    convert_diffusers.unet_config_of(config)
    convert_diffusers.scheduler_config(config)
  assert message in str(info.value)


def test_other_schedules_are_written_as_trained_betas_and_read_back():
  config = config_lib.load_config("configs/test.py", {"diffusion.beta_schedule": "warmup10"})
  written = convert_diffusers.scheduler_config(config)
  scheduler = DDPMScheduler(**{k: v for k, v in written.items() if not k.startswith("_")})
  np.testing.assert_allclose(scheduler.betas.numpy(), build.make_schedule(config).betas,
                             rtol=1e-6)
  fields = convert_diffusers.diffusion_settings(written)
  assert (fields["diffusion.beta_schedule"], fields["diffusion.beta_start"],
          fields["diffusion.beta_end"]) == ("warmup10", 1e-4, 0.02)


def test_release_folders_are_recognised_by_name_or_cache_path(tmp_path):
  assert convert_diffusers.release_name("/x/ddpm-ema-church-256") == "ddpm-ema-church-256"
  cache = tmp_path / "models--google--ddpm-cifar10-32" / "snapshots" / "abc123"
  cache.mkdir(parents=True)
  assert convert_diffusers.release_name(str(cache)) == "ddpm-cifar10-32"
  assert convert_diffusers.release_name(str(tmp_path)) is None
  with pytest.raises(FileNotFoundError, match="no UNet2DModel in"):
    convert_diffusers.locate(str(cache))


def test_safetensors_export_in_each_name_map(saved, tmp_path):
  root, unet = saved
  convert_diffusers.from_diffusers(str(root / "pipeline"), str(tmp_path / "ours"))
  path = export_safetensors.export(str(tmp_path / "ours"), str(tmp_path / "d.safetensors"))
  exported = safetensors_numpy.load_file(str(path))
  assert set(exported) == set(unet.state_dict())
  for name, value in unet.state_dict().items():
    np.testing.assert_array_equal(exported[name], value.numpy())
  path = export_safetensors.export(str(tmp_path / "ours"), str(tmp_path / "t.safetensors"),
                                   names="tf", ema=False)
  exported = safetensors_numpy.load_file(str(path))
  params, _ = checkpoints.restore_params(str(tmp_path / "ours" / "checkpoints"), ema=False)
  np.testing.assert_array_equal(exported["model/down_0/block_0/conv1/W"],
                                np.transpose(params["down_0"]["block_0"]["conv1"]["kernel"],
                                             (3, 2, 0, 1)))
  np.testing.assert_array_equal(exported[tf_names.tf_variable_name("mid/attn_1/q/kernel")],
                                params["mid"]["attn_1"]["q"]["kernel"].T)
  with pytest.raises(export_safetensors.ExportError, match="written with diffusers or tf"):
    export_safetensors.export(str(tmp_path / "ours"), str(tmp_path / "x.safetensors"),
                              names="torch")
  with pytest.raises(FileExistsError, match="choose a new --out"):
    export_safetensors.export(str(tmp_path / "ours"), str(path))


def test_improved_ddpm_parameters_export_as_the_reference_state_dict():
  config = config_lib.load_config("configs/test.py", {"model.architecture": "iddpm",
                                                      "model.num_heads": 2})
  model = build.make_model(config)
  abstract = jax.eval_shape(lambda: build.init_params(config, model, jax.random.key(0)))
  rng = np.random.default_rng(4)
  params = jax.tree_util.tree_map(
      lambda leaf: rng.standard_normal(leaf.shape).astype(np.float32), abstract)
  state = export_safetensors.named_tensors(params, "iddpm", "torch")
  assert state["input_blocks.3.1.qkv.weight"].shape == (192, 64, 1)
  assert state["input_blocks.3.0.skip_connection.weight"].shape == (64, 32, 1, 1)
  assert state["time_embed.0.weight"].shape == (128, 32)
  back = torch_names.params_from_torch(state, abstract)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)


@pytest.mark.slow  # samples with the converted checkpoint, and the command line in a subprocess
def test_command_line_converts_with_a_base_config_and_the_result_samples(saved, tmp_path,
                                                                        capsys):
  root, _ = saved
  release = tmp_path / "ddpm-cifar10-32"
  release.symlink_to(root / "pipeline")
  out = tmp_path / "converted"
  convert_diffusers.main([f"--from_diffusers={release}", f"--out={out}",
                          "--config=configs/test.py", "--config.eval.num_samples=4",
                          "--config.eval.batch_size=4"])
  printed = capsys.readouterr().out
  assert "the folder sets diffusion.num_timesteps 100 -> 50" in printed
  assert f"converted {release / 'unet'} (step 0, " in printed
  loaded = inference.load(str(out))
  assert loaded.config.data.dataset == "cifar10" and loaded.config.eval.num_samples == 4
  samples = evaluate.run_sample(loaded.config, str(out))
  with np.load(samples / "samples_0.npz") as f:
    assert f["images"].shape == (4, 16, 16, 3)
  # Without --config, the release's name picks its data set's config.
  convert_diffusers.main([f"--from_diffusers={release}", f"--out={tmp_path / 'by_name'}"])
  assert "base config: configs/cifar10.py" in capsys.readouterr().out
  env = helpers.subprocess_env(HF_HUB_OFFLINE=1)
  cmd = [sys.executable, "-m", "diffusion_jax.tools.convert_diffusers",
         f"--from_diffusers={root / 'pipeline'}", f"--out={out}"]
  got = subprocess.run(cmd, cwd=helpers.ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
  assert got.returncode == 2 and got.stderr.startswith("error: ") and (
      "already holds checkpoints" in got.stderr), got.stderr[-2000:]
  assert len(got.stderr.splitlines()) == 1
  got = subprocess.run(cmd[:4] + ["--to_diffusers", f"--out={tmp_path / 'x'}"],
                       cwd=helpers.ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert got.returncode == 2 and got.stderr == (
      "error: pass one of --from_diffusers DIR (into --out) or --to_diffusers (--workdir into "
      "--out)\n"), got.stderr[-2000:]


def test_a_refused_folder_is_one_error_line(saved, tmp_path, capsys):
  root, _ = saved
  folder = tmp_path / "other"
  tiny_unet(flip_sin_to_cos=True, freq_shift=0).save_pretrained(folder)
  with pytest.raises(SystemExit) as exited:
    convert_diffusers.main([f"--from_diffusers={folder}", f"--out={tmp_path / 'out'}"])
  assert exited.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: the UNet2DModel is not DDPM's U-Net: freq_shift=0: ") and (
      "flip_sin_to_cos=True" in err) and len(err.splitlines()) == 1, err
  assert not (tmp_path / "out" / "checkpoints").exists()
  del root
