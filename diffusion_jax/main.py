r"""Command line: `python -m diffusion_jax.main --config configs/<name>.py --workdir DIR`.

Runs unchanged on one machine, on every host of a TPU pod, or in a notebook cell:

  python -m diffusion_jax.main --config configs/digits.py --workdir runs/digits
  python -m diffusion_jax.main --config configs/cifar10.py:var_type=fixedsmall \
      --config.optim.lr=1e-4 --workdir gs://bucket/cifar10
  python -m diffusion_jax.main --config cifar10 --mode summary

--config takes a config file's path, or the name of a config shipped with the package
(`cifar10`, `digits:num_steps=2000`), which works from any directory.

Exit status: 0 done (or stopped by SIGTERM/Ctrl-C with a checkpoint; or --help shown); 2 a
mistake in the flags or config (one `error:` line); 75 another process of a multi-process
training run was lost (`parallel.LOST_PROCESS_EXIT_CODE`: start every process again, it
resumes); 130 a second Ctrl-C.
"""
from absl import app
from absl import flags
from ml_collections import config_flags

from diffusion_jax import cli
from diffusion_jax.config import checks as config_checks
from diffusion_jax.config import config_lib
from diffusion_jax.config import modes as modes_lib

# The installed package's, never the current directory's configs/digits.py, which may belong
# to another version or be missing.
_DEFAULT_CONFIG = config_lib.shipped_dir() / "digits.py"

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples "
                               "(local or gs://).")
_MODE = flags.DEFINE_enum("mode", "train", list(modes_lib.NAMES), modes_lib.help_text())
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step for the modes that read a training "
                             "run's checkpoint (default: the latest).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process runs without TPU "
    "metadata (with --num_processes and --process_id).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (0-based).")



def _overrides() -> dict:
  """The `--config.a.b=value` flags given on the command line, {dotted name: value}."""
  return {name[len("config."):]: flags.FLAGS[name].value for name in flags.FLAGS
          if name.startswith("config.") and flags.FLAGS[name].present}


def _evaluation_config(mode: str, workdir: str):
  """The config of an evaluation mode: --config when given, else the one saved with the
  checkpoint (upgraded when an older version wrote it), with the --config.a.b overrides on top."""
  if flags.FLAGS["config"].present:
    return flags.FLAGS["config"].value
  from diffusion_jax.evaluation import inference  # pylint: disable=g-import-not-at-top
  config = inference.saved_config(workdir, _STEP.value)
  try:
    config = config_lib.apply_overrides(config, _overrides())
  except KeyError as e:
    raise config_checks.ConfigError(e.args[0]) from e
  config_checks.check(config, mode=mode)
  return config


def _dispatch(mode: str, config, workdir: str | None) -> None:
  """Runs one mode; every mode but summary needs --workdir."""
  if mode == "summary":
    from diffusion_jax.config import build  # pylint: disable=g-import-not-at-top
    try:
      build.check_model(config)
    except ValueError as e:
      raise config_checks.ConfigError(str(e)) from e
    print(build.model_summary(config))
    return
  spec = modes_lib.get(mode)
  if not workdir:
    what = " (the training workdir)" if spec.evaluates else ""
    raise app.UsageError(f"--mode {mode} needs --workdir{what}")
  if not spec.evaluates:
    spec.runner()(config, workdir)
    return
  config = _evaluation_config(mode, workdir)
  spec.runner()(config, workdir, step=_STEP.value)


def _define_config_flag(flag_values: flags.FlagValues, argv) -> None:
  """--config, defined while the flags are parsed: loading the default config applies the
  command line's --config.a.b overrides, so a misspelled one is a mistake in the flags (one
  `error:` line), not an error at import."""
  if "config" in flag_values:  # parsed once already in this process
    return
  config_flags.DEFINE_config_file(
      "config", str(_DEFAULT_CONFIG), "Config file (configs/*.py[:argument]) or a shipped "
      "config's name (digits, cifar10, ...[:argument]); default: digits, or for the modes "
      "that read a training run's checkpoint the config saved with it.",
      flag_values=flag_values, lock_config=True, sys_argv=argv)


# Mistakes in the flags: one `error:` line, exit 2; --help: exit 0.
parse_flags = cli.parse_flags(define=_define_config_flag, config_flag="config",
                              default_config=str(_DEFAULT_CONFIG))


@cli.reports_errors()
def main(argv):
  """Runs --mode (`argv`: what is left after the flags, the program's name first)."""
  from diffusion_jax.training import stopping  # pylint: disable=g-import-not-at-top
  if _MODE.value != "train":
    # Only training stops cleanly on a signal; the other modes keep the usual behaviour
    # (Ctrl-C interrupts them, SIGTERM ends them), for a signal received so far too.
    stopping.hand_back_signals()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_library_logs()
  from diffusion_jax import parallel  # pylint: disable=g-import-not-at-top
  mode = _MODE.value
  config = flags.FLAGS["config"].value
  # Before waiting for other processes. An evaluation mode without --config checks the config
  # saved with the checkpoint instead, once it is read.
  if not modes_lib.get(mode).evaluates or flags.FLAGS["config"].present:
    config_checks.check(config, mode=mode)
  if mode != "summary":
    parallel.initialize_distributed(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
        heartbeat_timeout_s=config.train.heartbeat_timeout_s)
  _dispatch(mode, config, _WORKDIR.value)


if __name__ == "__main__":
  # Signals caught before the flags are parsed: a stop requested at any point of a training
  # run's start-up ends it before its first step.
  cli.run(main, flags_parser=parse_flags, catch_signals=True)
