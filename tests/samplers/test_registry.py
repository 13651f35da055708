"""Samplers by name: a sampler is one entry that owns its settings, and one from another package
reaches every driver (the config and its checks, result names, `samplers.sample`, the `Sampler`
and the command line) through the entry-point group alone, with no edit to diffusion_jax."""
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.config import build
from diffusion_jax.config import checks as config_checks
from diffusion_jax.config import config_lib
from diffusion_jax.core import schedules
from diffusion_jax.evaluation import inference
from diffusion_jax import samplers
from diffusion_jax.samplers import registry
from tests import checkpoint_fixtures, helpers

# A package of someone else's: DDIM's deterministic samples times a setting of its own.
TOY_MODULE = '''
"""A sampler outside diffusion_jax."""
from diffusion_jax import samplers
from diffusion_jax.samplers import ddim


def run(sched, model_fn, keys, shape, *, timesteps, clip_denoised, dynamic_threshold,
        mean_type, var_type, toy_scale):
  return toy_scale * ddim.sample_ddim(sched, model_fn, keys, shape, timesteps=timesteps,
                                      eta=0.0, clip_denoised=clip_denoised,
                                      dynamic_threshold=dynamic_threshold,
                                      mean_type=mean_type, var_type=var_type)


ENTRY = samplers.SamplerEntry(
    name="toy", run=run,
    settings=(samplers.Setting("toy_scale", 1.0, "float", low=0, high=1,
                               note="the toy's scale"),),
    tag=lambda toy_scale: [f"scale{toy_scale:g}"])
'''


def write_plugin(root: pathlib.Path) -> pathlib.Path:
  """The distribution `toy-sampler` under `root`, its entry point in `diffusion_jax.samplers`."""
  return helpers.write_plugin(root, "toy_sampler", TOY_MODULE, registry.ENTRY_POINT_GROUP)


@pytest.fixture
def toy_plugin(tmp_path, monkeypatch):
  """The toy distribution on sys.path, read by the registry as on its first use."""
  root = write_plugin(tmp_path / "site")
  monkeypatch.syspath_prepend(str(root))
  monkeypatch.setattr(registry.REGISTRY, "plugins_loaded", False)
  try:
    yield root
  finally:
    samplers.unregister("toy")
    sys.modules.pop("toy_sampler", None)


def _model_fn(x, t):
  del t
  return 0.3 * x


def test_the_package_registers_its_samplers_explicitly():
  assert samplers.names()[:4] == ("ancestral", "ddim", "dpmsolver++", "dpmsolver")
  # The section: the sampler, the common settings, then each sampler's own (a sampler added to
  # the package adds its own without changing these).
  defaults = samplers.default_settings()
  assert list(defaults) == ["sampler"] + [setting.name for setting in samplers.settings()]
  assert list(defaults)[:5] == ["sampler", "num_steps", "respacing", "clip_denoised",
                                "dynamic_threshold"]
  assert defaults.items() >= {
      "sampler": "ancestral", "num_steps": 0, "respacing": "", "clip_denoised": True,
      "dynamic_threshold": 0.0, "eta": 0.0, "solver_order": 2,
      "solver_grid": "time_uniform"}.items()
  assert registry.owners("solver_order") == ["dpmsolver++", "dpmsolver"]
  # The config's sample section is the registry's, with guidance and the grids' count.
  section = config_lib.load_config("configs/default.py").sample.to_dict()
  assert section == {**samplers.default_settings(), "guidance_scale": 0.0, "num_samples": 64}


@pytest.mark.parametrize("entry, match", [
    (samplers.SamplerEntry("ddim", run=_model_fn), "a sampler named 'ddim' is registered"),
    (samplers.SamplerEntry("mine", run=_model_fn,
                           settings=(samplers.Setting("num_steps", 3, "int"),)),
     "its setting 'num_steps' is a field every sampler has"),
    (samplers.SamplerEntry("mine", run=_model_fn,
                           settings=(samplers.Setting("eta", 0.5, "float"),)),
     "its setting 'eta' differs from the one of sampler 'ddim'"),
])
def test_register_refuses_clashes(entry, match):
  with pytest.raises(ValueError, match=match):
    samplers.register(entry)
  assert "mine" not in samplers.names()


def test_register_takes_entries_only():
  with pytest.raises(TypeError, match="register takes a SamplerEntry"):
    samplers.register(_model_fn)


def test_an_installed_sampler_reaches_the_config_its_checks_and_the_result_names(toy_plugin):
  assert samplers.names()[-1] == "toy"
  config = config_lib.load_config("configs/test.py")
  assert config.sample.toy_scale == 1.0
  config.sample.update(sampler="toy", num_steps=4, toy_scale=0.5)
  config_checks.check(config, "sample")
  assert build.sampler_tag(config) == "_toy4_scale0.5"
  config.sample.toy_scale = 2.0
  assert config_checks.problems(config, "sample") == [
      "sample.toy_scale=2.0 must be a finite number in [0, 1] (the toy's scale): set "
      "--config.sample.toy_scale=X"]
  with pytest.raises(ValueError, match=r"sample.toy_scale=2.0 must be in 0..1 \(the toy's "
                                       r"scale\): set sample.toy_scale to one of 0..1"):
    samplers.check("toy", dict(config.sample), 100)
  config.sample.update(sampler="ddim", toy_scale=0.5)
  assert config_checks.problems(config, "sample") == [
      "sample.toy_scale=0.5 is a setting of sampler 'toy' (the toy's scale), which 'ddim' does "
      "not use: set --config.sample.toy_scale=1.0, or --config.sample.sampler='toy'"]


def test_an_installed_sampler_runs_through_sample(toy_plugin):
  sched = schedules.Schedule.from_betas(np.linspace(1e-4, 0.02, 40))
  keys = jax.random.split(jax.random.key(1), 3)
  kw = dict(mean_type="eps", var_type="fixedlarge", num_steps=5)
  toy = samplers.sample("toy", sched, _model_fn, keys, (3, 4, 4, 1), toy_scale=0.25, **kw)
  ddim = samplers.sample("ddim", sched, _model_fn, keys, (3, 4, 4, 1), **kw)
  assert float(jnp.abs(ddim).max()) > 0.1
  np.testing.assert_allclose(np.asarray(toy), 0.25 * np.asarray(ddim), rtol=1e-6)


@pytest.mark.slow  # compiles two sampling programs of the tiny U-Net
def test_an_installed_sampler_runs_through_the_python_sampler(toy_plugin, tmp_path):
  config = helpers.eval_config()
  checkpoint_fixtures.randomized_checkpoint(config, tmp_path, 5)
  sampler = inference.Sampler.from_workdir(str(tmp_path))
  toy = sampler.sample(4, seed=2, sampler="toy", num_steps=4, toy_scale=0.5)
  ddim = sampler.sample(4, seed=2, sampler="ddim", num_steps=4)
  # uint8 images of x and 0.5 x: 0.5 x in [-1, 1] maps to the middle half of [0, 255].
  want = np.clip(np.round((0.5 * (ddim.astype(np.float64) / 127.5 - 1.0) + 1.0) * 127.5), 0, 255)
  assert np.abs(toy.astype(np.float64) - want).max() <= 1.0
  assert toy.std() < ddim.std()
  with pytest.raises(ValueError, match=r"sample.toy_scale=3.0 must be in 0..1"):
    sampler.sample(4, sampler="toy", toy_scale=3.0)


@pytest.mark.slow  # the command line in subprocesses, compiling a sampling program
def test_an_installed_sampler_runs_from_the_command_line(tmp_path):
  config = helpers.eval_config()
  workdir = tmp_path / "run"
  checkpoint_fixtures.randomized_checkpoint(config, workdir, 5)
  plugin = write_plugin(tmp_path / "site")
  env = helpers.subprocess_env()
  env["PYTHONPATH"] = os.pathsep.join([str(plugin), env["PYTHONPATH"]])
  command = [sys.executable, "-m", "diffusion_jax.main", "--mode", "sample", "--workdir",
             str(workdir), "--config.eval.num_samples=4", "--config.sample.sampler=toy",
             "--config.sample.num_steps=4"]
  bad = subprocess.run(command + ["--config.sample.toy_scale=2.0"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2, bad.stderr[-3000:]
  assert bad.stderr.strip().splitlines()[-1] == (
      "error: sample.toy_scale=2.0 must be a finite number in [0, 1] (the toy's scale): set "
      "--config.sample.toy_scale=X"), bad.stderr[-3000:]
  good = subprocess.run(command + ["--config.sample.toy_scale=0.5"], env=env, cwd=tmp_path,
                        capture_output=True, text=True, timeout=600)
  assert good.returncode == 0, good.stderr[-3000:]
  dumps = sorted(p.name for p in (workdir / "samples").iterdir())
  assert dumps == ["5_toy4_scale0.5_n4_seed3"], dumps  # eval_config draws with seed 3
  images = np.load(workdir / "samples" / dumps[0] / "samples_0.npz")["images"]
  assert images.shape == (4, 8, 8, 3) and images.dtype == np.uint8
  # Scaled by 0.5 around the middle grey: nothing near black or white.
  assert 60 <= images.min() and images.max() <= 195, (images.min(), images.max())
