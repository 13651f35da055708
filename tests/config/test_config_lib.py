"""Config code: overrides, config arguments, the values-only config files, and upgrading a
config saved with a checkpoint by an older version."""
import json
import pathlib

import ml_collections
import pytest

from diffusion_jax.config import checks as config_checks
from diffusion_jax.config import config_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]
# What the version before samplers were chosen by name saved with a checkpoint (config.to_dict()
# as JSON) for configs/test.py and configs/digits.py. They are history: never regenerate them.
SAVED_V0 = ROOT / "tests" / "golden" / "config_saved_v0.json"
SAVED_V0_DIGITS = ROOT / "tests" / "golden" / "config_saved_v0_digits.json"


def saved(path=SAVED_V0):
  return json.loads(path.read_text())


# --- Overrides and config arguments -------------------------------------------------------------

def test_apply_overrides_sets_existing_fields_and_names_a_missing_one():
  config = config_lib.load_config("configs/test.py")
  out = config_lib.apply_overrides(config, {"optim.lr": 0.5, "model.ch_mult": [1, 2, 2],
                                            "sample.sampler": "ancestral"})
  assert out is config
  assert config.optim.lr == 0.5 and config.model.ch_mult == (1, 2, 2)
  assert config.sample.sampler == "ancestral"
  for key in ("optim.lrr", "nothing.here", "optim.lr.deeper"):
    with pytest.raises(KeyError, match=f"config has no field '{key}'"):
      config_lib.apply_overrides(config, {key: 1})


def test_load_config_applies_overrides():
  config = config_lib.load_config("configs/test.py", {"sample.num_steps": 7})
  assert config.sample.num_steps == 7
  with pytest.raises(KeyError, match="config has no field 'sample.ddim_steps'"):
    config_lib.load_config("configs/test.py", {"sample.ddim_steps": 7})


def test_parse_arg_types_values_and_leaves_choices_to_the_checks():
  args = config_lib.parse_diffusion_arg("var_type=learned, loss_type=kl,n=3,flag=true",
                                        var_type="fixedlarge", n=1, flag=False)
  assert (args.mean_type, args.var_type, args.loss_type, args.n, args.flag) == (
      "eps", "learned", "kl", 3, True)
  # No value of a type is refused here (config_checks does that, for flags alike) ...
  assert config_lib.parse_diffusion_arg("var_type=big", var_type="fixedlarge").var_type == "big"
  # ... and nothing is switched silently.
  assert config_lib.parse_diffusion_arg("var_type=learned",
                                        var_type="fixedlarge").loss_type == "mse"
  with pytest.raises(ValueError, match="unknown config argument 'colour'; allowed keys"):
    config_lib.parse_arg("colour=blue", n=1)
  with pytest.raises(ValueError, match="is not key=value"):
    config_lib.parse_arg("n", n=1)
  with pytest.raises(ValueError, match="config argument n='x' must be of type int"):
    config_lib.parse_arg("n=x", n=1)
  with pytest.raises(ValueError, match="must be true or false"):
    config_lib.parse_arg("flag=maybe", flag=False)


def test_config_files_hold_values_only():
  for path in (ROOT / "configs").glob("*.py"):
    text = path.read_text()
    assert "diffusion_jax.core.diffusion" not in text and "import diffusion\n" not in text, path
    assert "def parse_" not in text, path


def test_the_256_configs_share_large_256():
  recipe = config_lib.load_config("configs/large_256.py:block_size=2")
  assert recipe.data.image_size == 256 and recipe.model.block_size == 2
  assert recipe.diffusion.var_type == "fixedsmall"
  for name, dataset, flip, steps in [("celebahq256", "celeb_a_hq/256", True, 500_000),
                                     ("lsun_bedroom", "lsun/bedroom", False, 2_400_000),
                                     ("lsun_cat", "lsun/cat", True, 1_800_000),
                                     ("lsun_church", "lsun/church_outdoor", True, 1_200_000)]:
    config = config_lib.load_config(f"configs/{name}.py:block_size=2")
    assert (config.data.dataset, config.data.random_flip, config.train.num_steps) == (
        dataset, flip, steps)
    config.data.dataset, config.data.random_flip, config.train.num_steps = (
        recipe.data.dataset, recipe.data.random_flip, recipe.train.num_steps)
    assert config.to_dict() == recipe.to_dict(), name


# --- Shipped configs by name -------------------------------------------------------------------

def test_shipped_configs_are_the_checkouts_configs_by_name(tmp_path):
  assert config_lib.shipped_names() == sorted(
      p.stem for p in (ROOT / "configs").glob("*.py") if p.name != "__init__.py")
  assert "__init__" not in config_lib.shipped_names()
  digits = config_lib.shipped_dir() / "digits.py"
  assert config_lib.resolve_path("digits") == digits
  assert config_lib.resolve_spec("digits:num_steps=100") == f"{digits}:num_steps=100"
  mine = tmp_path / "digits.py"  # a file, as given, even with a shipped config's name
  mine.write_text("")
  assert config_lib.resolve_spec(f"{mine}:num_steps=1") == f"{mine}:num_steps=1"
  by_name = config_lib.load_config("digits:num_steps=100", {"optim.lr": 0.5})
  by_path = config_lib.load_config("configs/digits.py:num_steps=100", {"optim.lr": 0.5})
  assert by_name.train.num_steps == 100 and by_name.optim.lr == 0.5
  assert by_name.to_dict() == by_path.to_dict()


def test_configs_path_elsewhere_is_the_shipped_config_unless_the_file_exists(tmp_path,
                                                                              monkeypatch):
  monkeypatch.chdir(tmp_path)
  shipped = config_lib.shipped_dir() / "digits.py"
  assert config_lib.resolve_path("configs/digits.py") == shipped
  assert config_lib.resolve_path("./configs/digits.py") == shipped
  assert config_lib.load_config("configs/digits.py").data.dataset == "digits"
  # A file where the path says wins over the shipped config of that name.
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "digits.py").write_text(
      "from diffusion_jax.config import config_lib\n"
      "default = config_lib.sibling_module(__file__, 'default')\n"
      "def get_config(arg=None):\n"
      "  return default.get_config(arg)\n")
  (tmp_path / "configs" / "default.py").write_text(
      (ROOT / "configs" / "default.py").read_text().replace(
          'config.data.dataset = "cifar10"', 'config.data.dataset = "mine"'))
  assert config_lib.resolve_path("configs/digits.py") == pathlib.Path("configs/digits.py")
  assert config_lib.load_config("configs/digits.py").data.dataset == "mine"
  assert config_lib.load_config("digits").data.dataset == "digits"


@pytest.mark.parametrize("spec,message", [
    ("cifar", r"^unknown config 'cifar': not a file, nor a config shipped with diffusion_jax "
              r"\(celebahq256, cifar10, .*digits.*\); name one of those"),
    ("cifar:var_type=fixedsmall", r"^unknown config 'cifar': "),
    ("configs/cifar.py", r"^config file 'configs/cifar.py' not found \(relative paths start "
                         r"at .*\); name an existing file, or a config shipped with "
                         r"diffusion_jax by its name: celebahq256, cifar10, "),
    ("elsewhere/digits.py", r"^config file 'elsewhere/digits.py' not found .*; name an "
                            r"existing file, or a config shipped"),
    ("configs/__init__.py", r"^config file 'configs/__init__.py' not found .*; name an "
                            r"existing file, or a config shipped .*: celebahq256, cifar10, "),
])
def test_an_unknown_config_names_the_shipped_ones(tmp_path, monkeypatch, spec, message):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(FileNotFoundError, match=message) as error:
    config_lib.load_config(spec)
  assert "\n" not in str(error.value)


# --- Upgrading saved configs --------------------------------------------------------------------

# Fields a config saved by the first version lacks (a few of those added since), with the values
# it gains; every field added since must take today's default (`_check_added`).
ADDED_SINCE_V0 = {
    "diffusion.min_snr_gamma": 0.0, "diffusion.rescale_learned_sigmas": True,
    "diffusion.rescale_timesteps": False, "diffusion.timestep_sampler": "uniform",
    "eval.bpd_clip_denoised": True, "model.architecture": "ddpm", "model.num_classes": 0,
    "model.p_uncond": 0.0, "sample.guidance_scale": 0.0, "sample.respacing": "",
    "sample.solver_order": 2, "sample.karras_rho": 7.0, "sample.dynamic_threshold": 0.0,
}


_flat = config_lib._flatten  # pylint: disable=protected-access


def _check_added(message: str, saved_tree: dict, config) -> str:
  """Asserts the message's 'added a=1, b=2' part names exactly the fields of today's layout the
  saved tree lacks, each with today's default, including `ADDED_SINCE_V0`; returns the message
  without that part."""
  head, added = message.split("added ", 1)
  added, _, tail = added.partition("; ")
  default = _flat(config_lib.load_config(str(config_lib.shipped_dir() / "default.py")).to_dict())
  saved_flat = _flat(saved_tree)
  want = sorted(p for p in default if p not in saved_flat and not p.startswith(
      ("sample.sampler", "sample.num_steps", "sample.eta")))
  names = [part.split("=", 1)[0] for part in added.split(", ")
           if "=" in part and part.split("=", 1)[0] in default]
  assert names == want, (names, want)
  for path, value in ADDED_SINCE_V0.items():
    assert f"{path}={value!r}" in added
    assert _flat(config.to_dict())[path] == value
  return head + ("; " + tail if tail else "")


def test_upgrade_of_a_saved_test_config():
  config, message = config_lib.upgrade(saved())
  # Evaluation modes used eval.ddim_steps=0 (ancestral); the grids' DDIM 5 steps are dropped.
  assert (config.sample.sampler, config.sample.num_steps, config.sample.eta) == (
      "ancestral", 0, 0.0)
  assert config.sample.clip_denoised and config.eval.bpd_clip_denoised
  assert "ddim_steps" not in config.sample and "ddim_steps" not in config.eval
  assert "ddim_eta" not in config.eval
  assert _check_added(message, saved(), config) == (
      "config saved by an older version, upgraded: eval.ddim_steps=0, eval.ddim_eta=0.0 -> "
      "sample.sampler='ancestral', sample.num_steps=0, sample.eta=0.0; dropped "
      "sample.ddim_steps=5 (the training grids' own sampler setting: the grids now use "
      "sample.sampler too); ")
  # The fields added since mean what the saved run did: uniform t, plain t, no respacing,
  # DDPM's U-Net, no labels.
  assert (config.diffusion.timestep_sampler, config.diffusion.rescale_timesteps,
          config.sample.respacing) == ("uniform", False, "")
  assert (config.model.architecture, config.model.num_classes) == ("ddpm", 0)
  # Every other value is the saved one, tuples as tuples.
  today = _today("configs/test.py", **{"sample.sampler": "ancestral", "sample.num_steps": 0})
  assert config.to_dict() == today.to_dict()
  assert isinstance(config.model.ch_mult, tuple) and isinstance(config.eval.fid_splits, tuple)
  for mode in ("sample", "eval"):
    config_checks.check(config, mode)


# Fields added since the first version whose value configs/test.py and digits.py set for their
# T: a config saved before has default.py's (a mode that uses one says what to set).
SET_FOR_T = {"eval.edit_t": (300, 500, 700)}


def _today(path: str, **overrides):
  return config_lib.load_config(path, {**SET_FOR_T, **overrides})


def test_upgrade_of_a_saved_digits_config_is_todays_digits_config():
  config, message = config_lib.upgrade(saved(SAVED_V0_DIGITS))
  assert config.to_dict() == _today("configs/digits.py").to_dict()
  assert "dropped sample.ddim_steps=0 (the same as eval.ddim_steps)" in message
  for mode in ("sample", "eval"):
    config_checks.check(config, mode)


def test_upgrade_of_ddim_settings():
  tree = saved()
  tree["eval"].update(ddim_steps=4, ddim_eta=0.5)
  tree["sample"]["clip_denoised"] = False
  config, message = config_lib.upgrade(tree)
  assert (config.sample.sampler, config.sample.num_steps, config.sample.eta) == ("ddim", 4, 0.5)
  assert not config.sample.clip_denoised  # kept
  assert message.startswith(
      "config saved by an older version, upgraded: eval.ddim_steps=4, eval.ddim_eta=0.5 -> "
      "sample.sampler='ddim', sample.num_steps=4, sample.eta=0.5; dropped sample.ddim_steps=5")
  for mode in ("sample", "eval"):
    config_checks.check(config, mode)


@pytest.mark.parametrize("path", [SAVED_V0, SAVED_V0_DIGITS])
def test_upgrade_is_idempotent(path):
  once, _ = config_lib.upgrade(saved(path))
  for again in (once, json.loads(json.dumps(once.to_dict()))):  # a ConfigDict, or its JSON
    twice, message = config_lib.upgrade(again)
    assert message is None
    assert twice.to_dict() == once.to_dict()


@pytest.mark.parametrize("name", ["test", "digits", "cifar10", "celebahq256", "folder"])
def test_an_up_to_date_config_round_trips_unchanged(name):
  config = config_lib.load_config(f"configs/{name}.py")
  upgraded, message = config_lib.upgrade(config)
  assert message is None
  assert upgraded.to_dict() == config.to_dict()


def test_upgrade_drops_and_names_unknown_fields_and_fills_missing_ones():
  tree = saved()
  tree["eval"]["colour"] = "blue"
  tree["extra"] = {"a": {"b": 2}}
  tree["optim"]["lr"] = {"peak": 1e-3}  # a section where today's layout has a value
  del tree["eval"]["watch"]
  config, message = config_lib.upgrade(tree)
  assert "colour" not in config.eval and "extra" not in config
  assert config.optim.lr == 2e-4 and config.eval.watch is False  # from the base
  assert "eval.watch=False" in message and "optim.lr=0.0002" in message
  assert _check_added(message, {k: v for k, v in tree.items() if k != "extra"}, config
                      ).endswith("; dropped fields no longer in the layout: eval.colour='blue', "
                                 "extra.a.b=2, optim.lr.peak=0.001")


def test_upgrade_reads_the_installed_default_not_the_current_directory(tmp_path, monkeypatch):
  expected, _ = config_lib.upgrade(saved())
  monkeypatch.chdir(tmp_path)
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "default.py").write_text(
      (ROOT / "configs" / "default.py").read_text().replace(
          "config.seed = 0", "config.seed = 0\n  config.colour = 'blue'"))
  config, _ = config_lib.upgrade(saved())
  assert "colour" not in config
  assert config.to_dict() == expected.to_dict()


def test_upgrade_takes_a_base():
  base = ml_collections.ConfigDict({"sample": {"sampler": "ancestral", "num_steps": 0,
                                               "eta": 0.0, "clip_denoised": True},
                                    "eval": {"bpd_clip_denoised": True}})
  config, message = config_lib.upgrade({"sample": {"ddim_steps": 3}, "eval": {}}, base)
  assert config.to_dict() == {"sample": {"sampler": "ancestral", "num_steps": 0, "eta": 0.0,
                                         "clip_denoised": True},
                              "eval": {"bpd_clip_denoised": True}}
  assert "dropped sample.ddim_steps=3 (the training grids' own sampler setting" in message
  assert base.sample.sampler == "ancestral"  # the base is not changed
