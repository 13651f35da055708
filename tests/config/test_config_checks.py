"""The config value rules: every numeric field has one, shipped configs pass, bad values fail."""
import re

import pytest

from diffusion_jax.config import checks as config_checks
from diffusion_jax.config import config_lib
from diffusion_jax import samplers


CONFIGS = sorted(config_lib.shipped_names())


def load_config(name="test", arg=None, overrides=None):
  return config_lib.load_config(f"configs/{name}.py" + (f":{arg}" if arg else ""), overrides)


def numeric_leaves(tree, prefix=""):
  """Dotted names of the int/float leaves (not bools) and tuples holding numbers."""
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, dict):
      yield from numeric_leaves(value, path + ".")
    elif isinstance(value, (tuple, list)):
      if any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        yield path
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      yield path


@pytest.mark.parametrize("name", CONFIGS)
def test_every_numeric_field_has_a_rule(name):
  tree = load_config(name).to_dict()
  ruled = {rule.path for rule in config_checks.rules()}
  missing = sorted(set(numeric_leaves(tree)) - ruled)
  assert not missing, (f"add a Rule to config_checks.RULES (or a samplers.Setting, for the "
                       f"sample section) for {missing}")


def test_every_rule_names_a_field():
  tree = load_config("default").to_dict()
  for rule in config_checks.rules():
    node = tree
    for name in rule.path.split("."):
      node = node[name]
    for bound in (rule.low, rule.high):
      if isinstance(bound, str):
        assert bound.split(".")[0] in tree, bound


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("mode", config_checks.MODES)
def test_shipped_configs_pass(name, mode):
  config_checks.check(load_config(name), mode)


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_pass_training_checks(name):
  config_checks.check_training(load_config(name), 8)


@pytest.mark.parametrize("field,value", [
    ("optim.warmup_steps", 0), ("optim.grad_clip", 0.0), ("optim.ema_decay", 0.0),
    ("optim.b1", 0.0), ("train.sample_every", 0), ("train.time_limit_s", 0.0),
    ("train.profile_start", -1), ("sample.num_steps", 0), ("sample.num_steps", 100),
    ("sample.eta", 0.0), ("sample.eta", 2.0), ("sample.clip_denoised", False),
    ("eval.bpd_clip_denoised", False),
    ("diffusion.beta_start", 0.02), ("data.channels", 1), ("seed", 2**32 - 1),
])
def test_edge_values_pass(field, value):
  config = load_config()
  section, key = field.rsplit(".", 1) if "." in field else (None, field)
  (config[section] if section else config)[key] = value
  config_checks.check(config, "train")


def test_unused_betas_are_not_checked():
  config = load_config()
  config.diffusion.beta_schedule = "cosine"
  config.diffusion.beta_start = 0.0
  config.diffusion.beta_end = 5.0
  config_checks.check(config, "train")
  config.diffusion.beta_schedule = "const"
  with pytest.raises(config_checks.ConfigError, match="diffusion.beta_end=5.0"):
    config_checks.check(config, "train")


# Refused by training (config_checks.check_training, hence train_and_evaluate before compiling).
TRAIN_REFUSED = [
    ("seed", -1), ("seed", 2**32),
    ("data.image_size", 0), ("data.channels", 2), ("data.num_workers", 0), ("data.prefetch", 0),
    ("model.ch", 0), ("model.ch_mult", (1, 0)), ("model.num_res_blocks", 0),
    ("model.attn_resolutions", (0,)), ("model.dropout", 1.0), ("model.dropout", -0.1),
    ("model.block_size", 0),
    ("diffusion.beta_start", 0.0), ("diffusion.beta_start", 0.03), ("diffusion.beta_end", 1.0),
    ("diffusion.num_timesteps", 1), ("diffusion.num_timesteps", 0),
    ("optim.lr", 0.0), ("optim.lr", -1.0), ("optim.lr", float("nan")), ("optim.lr", float("inf")),
    ("optim.warmup_steps", -1), ("optim.grad_clip", -1.0), ("optim.b1", 1.0),
    ("optim.b1", -0.1), ("optim.b2", 1.0), ("optim.eps", 0.0), ("optim.ema_decay", 1.0),
    ("optim.ema_decay", -0.5), ("optim.grad_accum_steps", 0),
    ("train.batch_size", 0), ("train.num_steps", 0), ("train.log_every", 0),
    ("train.checkpoint_every", 0), ("train.keep_checkpoints", 0), ("train.sample_every", -1),
    ("train.time_limit_s", -1.0), ("train.profile_start", -2), ("train.profile_steps", 0),
    ("train.stop_check_every", 0), ("train.heartbeat_every_s", 0.0),
    ("train.lost_process_timeout_s", 1.0), ("train.lost_process_timeout_s", 100.0),
    ("train.heartbeat_timeout_s", 0),
    ("sample.num_samples", 0), ("sample.num_steps", -1), ("sample.num_steps", 101),
    ("sample.eta", -0.5),
]


@pytest.mark.parametrize("field,value", TRAIN_REFUSED)
def test_training_refuses(field, value):
  config = load_config()
  section, key = field.rsplit(".", 1) if "." in field else (None, field)
  (config[section] if section else config)[key] = value
  with pytest.raises(config_checks.ConfigError) as info:
    config_checks.check_training(config, 8)
  message = str(info.value)
  assert f"{field}={value}" in message and f"set --config.{field}=" in message


# Refused by the evaluation mode that uses the field (its driver checks before reading a
# checkpoint).
EVAL_REFUSED = [
    ("sample", "eval.batch_size", 0), ("sample", "eval.num_samples", 0),
    ("sample", "sample.num_steps", -1), ("sample", "sample.num_steps", 101),
    ("sample", "sample.eta", -0.5), ("eval", "sample.num_steps", 101), ("sample", "eval.seed", -1),
    ("eval", "eval.bpd_max_examples", -1), ("eval", "eval.fid_max_real", -1),
    ("eval", "eval.inception_size", 74), ("eval", "eval.is_splits", 0),
    ("eval", "eval.is_splits", 51), ("eval", "eval.watch_poll_s", 0.0),
    ("eval", "eval.watch_timeout_s", 0.0),
    ("progressive", "eval.progressive_freq", 0), ("progressive", "eval.progressive_freq", 101),
    ("progressive", "eval.progressive_num", 0),
    ("interpolate", "eval.interp_t", -1), ("interpolate", "eval.interp_t", 100),
    ("interpolate", "eval.interp_pairs", 0), ("interpolate", "eval.interp_steps", 1),
]


@pytest.mark.parametrize("mode,field,value", EVAL_REFUSED)
def test_evaluation_modes_refuse(mode, field, value):
  config = load_config(overrides={"eval.num_samples": 50, field: value})
  with pytest.raises(config_checks.ConfigError, match=f"{field}={value} must be"):
    config_checks.check(config, mode)


def test_a_cross_field_range_is_checked_only_where_it_is_used():
  config = load_config()
  config.eval.num_samples = 3     # fewer than eval.is_splits: only --mode eval needs them
  config.eval.interp_t = 500      # >= T: only --mode interpolate uses it
  for mode in ("train", "sample", "progressive"):
    config_checks.check(config, mode)
  with pytest.raises(config_checks.ConfigError, match="eval.is_splits=10"):
    config_checks.check(config, "eval")
  with pytest.raises(config_checks.ConfigError, match="eval.interp_t=500"):
    config_checks.check(config, "interpolate")


def test_types():
  tree = load_config().to_dict()  # a plain dict: no ConfigDict type checks on assignment
  tree["seed"] = True
  tree["train"]["num_steps"] = 1.5
  tree["optim"]["lr"] = "big"
  tree["model"]["ch_mult"] = (1, 2.0)
  got = config_checks.problems(tree, "train")
  assert [m.split("=")[0] for m in got] == ["seed", "model.ch_mult", "optim.lr",
                                            "train.num_steps"]
  assert "optim.lr='big' must be a finite number > 0" in got[2]


def test_messages_name_field_value_range_and_flag_and_are_collected():
  config = load_config()
  config.train.log_every = 0
  config.optim.b2 = 1.0
  with pytest.raises(config_checks.ConfigError) as info:
    config_checks.check_training(config, 8)
  lines = str(info.value).splitlines()
  assert lines[0] == "2 config problems:"
  assert lines[1].strip() == ("optim.b2=1.0 must be a finite number in [0, 1): "
                              "set --config.optim.b2=X")
  assert lines[2].strip() == "train.log_every=0 must be an integer >= 1: " \
                             "set --config.train.log_every=N"


def test_structural_problems_are_collected_too():
  config = load_config()
  config.data.dataset = "imagenet"
  config.model.dtype = "float16"
  with pytest.raises(config_checks.ConfigError, match="(?s)(?=.*'imagenet')(?=.*float16)"):
    config_checks.check_training(config, 8)


def test_unknown_mode():
  with pytest.raises(ValueError, match="unknown mode"):
    config_checks.check(load_config(), "fit")


# --- The sampler ---------------------------------------------------------------------------------

def test_the_sampler_is_checked_in_the_modes_that_sample():
  config = load_config(overrides={"sample.sampler": "ancestral", "sample.num_steps": 1})
  for mode in ("summary", "train"):  # train: sample_every = 0
    config_checks.check(config, mode)
  want = (r"sampler 'ancestral' needs at least 2 steps, got 1: set "
          r"--config.sample.num_steps or --config.sample.respacing to keep more, or another "
          r"--config.sample.sampler")
  for mode in ("sample", "eval", "progressive", "interpolate"):
    with pytest.raises(config_checks.ConfigError, match=want):
      config_checks.check(config, mode)
  config.train.sample_every = 3
  with pytest.raises(config_checks.ConfigError, match=want):
    config_checks.check(config, "train")


@pytest.mark.parametrize("overrides, match", [
    ({"sample.eta": 0.5, "sample.sampler": "ancestral", "sample.num_steps": 0},
     r"sample.eta=0.5 is a setting of sampler 'ddim' \(DDIM's noise scale, 0 = "
     r"deterministic\), which 'ancestral' does not use: set --config.sample.eta=0.0, or "
     r"--config.sample.sampler='ddim'"),
    ({"sample.sampler": "plms"},
     "^" + re.escape(f"sample.sampler='plms' must be one of {', '.join(samplers.names())}: "
                     f"set --config.sample.sampler={'|'.join(samplers.names())}") + "$"),
    ({"sample.sampler": "dpmsolver++", "sample.solver_order": 4},
     r"^sample.solver_order=4 must be an integer one of 1, 2, 3 \(DPM-Solver's order\): set "
     r"--config.sample.solver_order=N$"),
    ({"sample.sampler": "dpmsolver++", "sample.solver_grid": "quadratic"},
     r"^sample.solver_grid='quadratic' must be one of time_uniform, logSNR"),
    ({"sample.sampler": "dpmsolver++", "sample.num_steps": 2, "sample.solver_order": 3},
     r"^DPM-Solver of order 3 needs at least 3 steps, got 2: set --config.sample.solver_order, "
     r"--config.sample.solver_grid or --config.sample.num_steps, or another "
     r"--config.sample.sampler$"),
    ({"sample.sampler": "dpmsolver", "diffusion.mean_type": "xprev"},
     r"mean_type 'eps', 'xstart' or 'v'\), got mean_type 'xprev'"),
    ({"sample.sampler": "dpmsolver++", "sample.num_steps": 0, "sample.respacing": "10"},
     r"^sample.respacing='10': 'dpmsolver\+\+' takes its steps from "
     r"--config.sample.num_steps, not from a respacing; set --config.sample.respacing=''$"),
    ({"sample.sampler": "ddim", "sample.solver_grid": "logSNR"},
     r"^sample.solver_grid='logSNR' is a setting of sampler 'dpmsolver\+\+' or 'dpmsolver' "
     r"\(DPM-Solver's time grid\), which 'ddim' does not use: set "
     r"--config.sample.solver_grid='time_uniform', or --config.sample.sampler='dpmsolver\+\+'$"),
    ({"sample.num_steps": 101},
     r"^sample.num_steps=101 must be an integer in \[0, diffusion.num_timesteps=100\] "
     r"\(0 = all T\): set --config.sample.num_steps=N$"),
    ({"sample.respacing": "ddim200", "sample.num_steps": 0},
     r"^respacing 'ddim200' asks for 200 steps; T=100 has 1..100: set "
     r"--config.sample.respacing to a spec such as 'ddim50', '50' or '10,20,30' \(steps of "
     r"T=100\), or '' for none$"),
    ({"sample.sampler": "dpmsolver", "sample.dynamic_threshold": 99.5},
     r"^sample.dynamic_threshold=99.5: sampler 'dpmsolver' steps with noise predictions and "
     r"clips no x_0 prediction; set --config.sample.dynamic_threshold=0, or another "
     r"--config.sample.sampler$"),
    ({"sample.dynamic_threshold": 99.5, "sample.clip_denoised": False},
     r"^sample.dynamic_threshold=99.5 is a way to clip the x_0 predictions, and "
     r"sample.clip_denoised=False clips none: set --config.sample.clip_denoised=True, or "
     r"--config.sample.dynamic_threshold=0$"),
    ({"sample.dynamic_threshold": 101.0},
     r"^sample.dynamic_threshold=101.0 must be a finite number in \[0, 100\] \(clip each x_0 "
     r"prediction by dynamic thresholding at this percentile; 0 = to \[-1, 1\]\): set "
     r"--config.sample.dynamic_threshold=X$"),
    ({"sample.respacing": "10"},
     r"^sample.respacing='10' and sample.num_steps=5 both choose the timesteps: set "
     r"--config.sample.num_steps=0 to use the respacing, or --config.sample.respacing=''"),
])
def test_sampler_settings_are_refused_once_with_what_to_set(overrides, match):
  with pytest.raises(config_checks.ConfigError, match=match):
    config_checks.check(load_config(overrides=overrides), "sample")


def test_ddim_and_ancestral_settings_pass():
  for overrides in ({"sample.sampler": "dpmsolver++", "sample.num_steps": 20,
                     "sample.solver_order": 3, "sample.solver_grid": "logSNR"},
                    {"sample.sampler": "dpmsolver", "sample.num_steps": 1,
                     "sample.solver_order": 1},
                    {"sample.sampler": "ddim", "sample.num_steps": 0, "sample.eta": 1.0},
                    {"sample.sampler": "ddim", "sample.num_steps": 100},
                    {"sample.sampler": "ancestral", "sample.num_steps": 100},
                    {"sample.sampler": "ancestral", "sample.num_steps": 10},
                    {"sample.sampler": "ancestral", "sample.num_steps": 0,
                     "sample.respacing": "5,5"},
                    {"sample.sampler": "ddim", "sample.num_steps": 0,
                     "sample.respacing": "ddim25"}):
    for mode in config_checks.MODES:
      config_checks.check(load_config(overrides=overrides), mode)


def test_bools():
  tree = load_config().to_dict()
  tree["eval"]["bpd_clip_denoised"] = 0
  tree["sample"]["clip_denoised"] = "yes"
  assert config_checks.problems(tree, "progressive") == [
      "sample.clip_denoised='yes' must be True or False (clip each x_0 prediction to [-1, 1]): "
      "set --config.sample.clip_denoised=True|False",
      "eval.bpd_clip_denoised=0 must be True or False: "
      "set --config.eval.bpd_clip_denoised=True|False"]


# --- The diffusion types -------------------------------------------------------------------------

# Flags, which apply on top of a config argument, however the variance was chosen.
LEARNED_NEEDS_KL = (r"^diffusion.loss_type='mse' cannot train diffusion.var_type='learned' \(a "
                    r"learned variance\): set --config.diffusion.loss_type=kl\|rescaled_kl\|hybrid, "
                    r"or keep loss_type=mse with --config.diffusion.var_type=fixedlarge\|fixedsmall$")


@pytest.mark.parametrize("how", ["config argument", "flag"])
def test_a_learned_variance_needs_kl_however_it_is_set(how):
  config = (load_config("cifar10", "var_type=learned") if how == "config argument"
            else load_config("cifar10", overrides={"diffusion.var_type": "learned"}))
  assert config.diffusion.loss_type == "mse"  # nothing changes it silently
  with pytest.raises(config_checks.ConfigError, match=LEARNED_NEEDS_KL):
    config_checks.check_diffusion(config)
  for mode in config_checks.MODES:
    with pytest.raises(config_checks.ConfigError, match=LEARNED_NEEDS_KL):
      config_checks.check(config, mode)
  config.diffusion.loss_type = "kl"
  config_checks.check_diffusion(config)


def test_hybrid_needs_a_learned_variance():
  config = load_config("test", "loss_type=hybrid")
  want = (r"^diffusion.loss_type='hybrid' cannot train diffusion.var_type='fixedlarge' \(a fixed "
          r"variance\): set --config.diffusion.loss_type=mse\|kl\|rescaled_kl, or keep "
          r"loss_type=hybrid with --config.diffusion.var_type=learned\|learned_range$")
  with pytest.raises(config_checks.ConfigError, match=want):
    config_checks.check(config, "train")
  for var_type in ("learned", "learned_range"):
    config_checks.check(load_config("test", f"var_type={var_type},loss_type=hybrid"), "train")


@pytest.mark.parametrize("field, value, allowed", [
    ("mean_type", "velocity", "eps|xstart|xprev|v"),
    ("var_type", "big", "fixedlarge|fixedsmall|learned|learned_range"),
    ("loss_type", "l1", "mse|kl|rescaled_kl|hybrid"),
    ("timestep_sampler", "importance", "uniform|loss_second_moment"),
])
def test_unknown_diffusion_types_say_both_spellings(field, value, allowed):
  if field == "timestep_sampler":  # not a config argument: a field with a rule
    want = (f"diffusion.{field}='{value}' must be one of {allowed.replace('|', ', ')}: set "
            f"--config.diffusion.{field}={allowed}")
    with pytest.raises(config_checks.ConfigError) as info:
      config_checks.check(load_config("test", overrides={f"diffusion.{field}": value}))
    assert str(info.value) == want
    return
  want = (f"diffusion.{field}='{value}' must be one of {allowed.replace('|', ', ')}: set "
          f"--config.diffusion.{field}={allowed}, or the config argument :{field}={allowed}")
  for config in (load_config("test", f"{field}={value}"),
                 load_config("test", overrides={f"diffusion.{field}": value})):
    with pytest.raises(config_checks.ConfigError) as info:
      config_checks.check_diffusion(config)
    assert str(info.value) == want
