"""Shared defaults: the original's CIFAR-10 recipe (`scripts/run_cifar.py`).

Every other config starts from `get_config()` here and changes what differs. Config arguments
(`--config configs/cifar10.py:var_type=fixedsmall,loss_type=kl`) are parsed by `parse_arg`.
"""
import ml_collections

from diffusion_jax import config_lib

# The diffusion options a config argument may set, with their allowed values.
from diffusion_jax.diffusion import LOSS_TYPES, MEAN_TYPES, VAR_TYPES  # noqa: E402
_ARG_CHOICES = {"mean_type": MEAN_TYPES, "var_type": VAR_TYPES, "loss_type": LOSS_TYPES}


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses a config argument `key=value,key=value` against typed defaults.

  Args:
    arg: the text after the colon in `--config file.py:arg` (None or '' for none).
    **defaults: every accepted key with its default value (the value's type is kept).

  Returns:
    a ConfigDict with one entry per default, overridden where `arg` says so.

  Raises:
    ValueError: for an unknown key, a malformed item or a value not in the allowed set.
  """
  out = ml_collections.ConfigDict(dict(defaults))
  for item in (arg or "").split(","):
    if not item.strip():
      continue
    if "=" not in item:
      raise ValueError(f"config argument {item!r} is not key=value; allowed keys: "
                       f"{sorted(defaults)}")
    key, value = (s.strip() for s in item.split("=", 1))
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; allowed keys: {sorted(defaults)}")
    default = defaults[key]
    if isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key} must be true or false, got {value!r}")
      value = value.lower() in ("true", "1")
    elif default is not None:
      value = type(default)(value)
    if key in _ARG_CHOICES and value not in _ARG_CHOICES[key]:
      raise ValueError(f"{key}={value!r} is not one of {_ARG_CHOICES[key]}")
    out[key] = value
  return out


def parse_diffusion_arg(arg: str | None, *, var_type: str, **extra) -> ml_collections.ConfigDict:
  """Parses `mean_type`, `var_type`, `loss_type` (+ `extra` keys) from a config argument.

  A learned variance needs the variational-bound loss, so `var_type=learned` alone also selects
  `loss_type=kl` (the original's setting for it).
  """
  args = parse_arg(arg, mean_type="eps", var_type=var_type, loss_type="mse", **extra)
  if args.var_type == "learned" and "loss_type=" not in (arg or ""):
    args.loss_type = "kl"
  return args


def apply_diffusion_args(config: ml_collections.ConfigDict, args) -> ml_collections.ConfigDict:
  """Sets the diffusion types parsed by `parse_diffusion_arg` on a config; returns it."""
  config.diffusion.mean_type = args.mean_type
  config.diffusion.var_type = args.var_type
  config.diffusion.loss_type = args.loss_type
  return config


def large_256(arg: str | None, *, dataset: str, random_flip: bool,
              num_steps: int) -> ml_collections.ConfigDict:
  """The original's 256x256 recipe (`scripts/run_celebahq.py`, `run_lsun.py`).

  A 114M-parameter U-Net (ch_mult 1,1,2,2,4,4), batch 64, lr 2e-5, no dropout; trained with eps
  prediction and the mse loss, and sampled with the posterior variance beta_tilde, hence
  var_type=fixedsmall by default. Config arguments: as `get_config`, plus `block_size=N` (the
  original's optional space-to-depth).
  """
  args = parse_diffusion_arg(arg, var_type="fixedsmall", block_size=1)
  config = apply_diffusion_args(get_config(), args)
  config.data.dataset = dataset
  config.data.image_size = 256
  config.data.random_flip = random_flip
  config.model.ch_mult = (1, 1, 2, 2, 4, 4)
  config.model.dropout = 0.0
  config.model.block_size = args.block_size
  config.optim.lr = 2e-5
  config.train.batch_size = 64
  config.train.num_steps = num_steps
  config.train.sample_every = 10_000
  config.sample.num_samples = 16
  return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The CIFAR-10 settings of the original; a base for every other config.

  Args:
    arg: optional `mean_type=...,var_type=...,loss_type=...`.
  """
  args = parse_diffusion_arg(arg, var_type="fixedlarge")
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  # One of input_pipeline.DATASETS: cifar10, celeb_a_hq/256, lsun/bedroom, lsun/church_outdoor,
  # lsun/cat, folder, digits.
  config.data.dataset = "cifar10"
  config.data.split = "train"
  config.data.data_dir = ""        # tfds data_dir, local or gs://; '' = the tfds default.
  config.data.image_dir = ""       # for dataset='folder': a directory of png/jpg images.
  config.data.image_size = 32
  config.data.channels = 3
  config.data.random_flip = True
  config.data.num_workers = 8      # threads decoding examples on each host.
  config.data.prefetch = 2         # batches prepared ahead on each host.

  config.model = ml_collections.ConfigDict()
  config.model.ch = 128
  config.model.ch_mult = (1, 2, 2, 2)
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = (16,)
  config.model.dropout = 0.1
  config.model.dtype = "float32"   # compute dtype: float32 or bfloat16 (weights stay float32).
  config.model.remat = False
  config.model.block_size = 1

  config.diffusion = ml_collections.ConfigDict()
  config.diffusion.beta_schedule = "linear"
  config.diffusion.beta_start = 1e-4
  config.diffusion.beta_end = 0.02
  config.diffusion.num_timesteps = 1000
  config.diffusion.mean_type = args.mean_type
  config.diffusion.var_type = args.var_type
  config.diffusion.loss_type = args.loss_type

  config.optim = ml_collections.ConfigDict()
  config.optim.lr = 2e-4
  config.optim.warmup_steps = 5000
  config.optim.grad_clip = 1.0     # on the global norm of the mean gradient; 0 disables.
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.eps = 1e-8
  config.optim.ema_decay = 0.9999
  config.optim.grad_accum_steps = 1  # micro-batches per step (same global batch, less memory).

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 128    # global, over all devices of all hosts.
  config.train.num_steps = 800_000
  config.train.log_every = 100
  config.train.checkpoint_every = 5000
  config.train.keep_checkpoints = 3
  config.train.sample_every = 20_000
  config.train.time_limit_s = 0.0  # stop (with a checkpoint) after this many seconds; 0 = none.
  # Several processes: agree on stopping (a signal, the time limit) every this many steps; each
  # agreement waits for the steps dispatched so far.
  config.train.stop_check_every = 10
  # Several processes: each writes a heartbeat every heartbeat_every_s; one silent for
  # lost_process_timeout_s counts as lost and the others exit with status 75 (restart them).
  # It must be shorter than heartbeat_timeout_s, after which the JAX runtime aborts them all.
  config.train.heartbeat_every_s = 1.0
  config.train.lost_process_timeout_s = 30.0
  config.train.heartbeat_timeout_s = 100  # jax.distributed.initialize(heartbeat_timeout_seconds)
  config.train.profile_start = -1  # first step of a profiler trace; -1 = no trace.
  config.train.profile_steps = 5
  # Persistent XLA cache so a restart does not recompile; '' disables, '~' is expanded.
  config.train.compile_cache_dir = "~/.cache/diffusion_jax/xla"

  config.sample = ml_collections.ConfigDict()
  config.sample.num_samples = 64   # images in each PNG grid.
  config.sample.ddim_steps = 0     # 0 = ancestral sampling over all T steps; >0 = DDIM.
  config.sample.clip_denoised = True

  # --mode sample / eval / progressive / interpolate (see config_lib.eval_defaults).
  config.eval = config_lib.eval_defaults()
  return config
