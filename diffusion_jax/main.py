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
import difflib
import logging as std_logging
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from diffusion_jax.config import checks as config_checks
from diffusion_jax.config import config_lib
from diffusion_jax.training import workdir_lock

# The installed package's, never the current directory's configs/digits.py, which may belong
# to another version or be missing.
_DEFAULT_CONFIG = config_lib.shipped_dir() / "digits.py"

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(_DEFAULT_CONFIG), "Config file (configs/*.py[:argument]) or a shipped "
    "config's name (digits, cifar10, ...[:argument]); default: digits, or for sample/eval/"
    "progressive/interpolate the config saved with the checkpoint.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples "
                               "(local or gs://).")
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "summary", "sample", "eval", "progressive", "interpolate"],
    "train; summary (parameter table); sample (eval.num_samples samples to .npz); eval (FID, "
    "Inception Score, bits/dim); progressive / interpolate (image grids).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step for sample/eval/progressive/"
                             "interpolate (default: the latest).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process runs without TPU "
    "metadata (with --num_processes and --process_id).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (0-based).")


_EVALUATION_MODES = ("sample", "eval", "progressive", "interpolate")


def _overrides() -> dict:
  """The `--config.a.b=value` flags given on the command line, {dotted name: value}."""
  return {name[len("config."):]: flags.FLAGS[name].value for name in flags.FLAGS
          if name.startswith("config.") and flags.FLAGS[name].present}


def _evaluation_config(mode: str, workdir: str):
  """The config of an evaluation mode: --config when given, else the one saved with the
  checkpoint (upgraded when an older version wrote it), with the --config.a.b overrides on top."""
  if flags.FLAGS["config"].present:
    return _CONFIG.value
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
  if not workdir:
    what = "" if mode == "train" else " (the training workdir)"
    raise app.UsageError(f"--mode {mode} needs --workdir{what}")
  if mode == "train":
    from diffusion_jax.training import loop as train  # pylint: disable=g-import-not-at-top
    train.train_and_evaluate(config, workdir)
    return
  from diffusion_jax.evaluation import modes as evaluate  # pylint: disable=g-import-not-at-top
  config = _evaluation_config(mode, workdir)
  if mode == "sample":
    evaluate.run_sample(config, workdir, step=_STEP.value)
  elif mode == "eval":
    evaluate.run_eval(config, workdir, step=_STEP.value)
  elif mode == "progressive":
    evaluate.run_progressive(config, workdir, step=_STEP.value)
  elif mode == "interpolate":
    evaluate.run_interpolate(config, workdir, step=_STEP.value)
  else:
    raise app.UsageError(f"unknown --mode {mode}")


# Mistakes in what was asked for: reported in one line, without a traceback, with exit code 2.
# Anything else is a bug and keeps its traceback.
_USER_ERRORS = (config_checks.ConfigError, FileNotFoundError, PermissionError, app.UsageError,
                workdir_lock.WorkdirBusyError)
USAGE_EXIT_CODE = 2
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as shells report Ctrl-C


def _exit_with_error(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(USAGE_EXIT_CODE)


def _config_spec(argv) -> str:
  """The --config value on the command line (the default config when absent)."""
  for i, arg in enumerate(argv):
    match = re.fullmatch(r"--?config(?:=(.*))?", arg)
    if match:
      return match.group(1) if match.group(1) is not None else argv[i + 1]
  return str(_DEFAULT_CONFIG)


def _unknown_field_message(argv) -> str | None:
  """Names the first `--config.a.b=...` override whose field the config lacks (None: none)."""
  config = config_lib.load_config(_config_spec(argv))
  for arg in argv:
    match = re.match(r"--?(?:no)?config\.([^=]+)", arg)
    if not match:
      continue
    node, parents = config, []
    for name in match.group(1).split("."):
      if not hasattr(node, "keys") or name not in node:
        where = ".".join(parents)
        fields = sorted(node.keys()) if hasattr(node, "keys") else []
        close = difflib.get_close_matches(name, fields, n=1)
        hint = (f"did you mean --config.{'.'.join(parents + close)}? " if close else "")
        return (f"--config.{match.group(1)}: the config has no field "
                f"{'.'.join(parents + [name])!r}; {hint}fields of "
                f"{where or 'the config'}: {', '.join(fields)}")
      node = node[name]
      parents.append(name)
  return None


def _flag_error_message(error: Exception, argv) -> str | None:
  """One or a few lines for a mistake in the flags; None when `error` looks like a bug."""
  if isinstance(error, flags.Error):
    message = str(error)
    if "Traceback (most recent call last)" in message:
      # A config file's get_config raised: keep the flag and the exception's own last line.
      flag = message.split(": Error whilst parsing config file", 1)[0]
      last = [line for line in message.splitlines() if line.strip()][-1].strip()
      message = f"{flag}: {last}"
    return message
  if isinstance(error, OSError):  # config_flags reports an unloadable file on first use
    spec = _config_spec(argv)
    path = spec.split(":", 1)[0]
    if not os.path.isfile(path):
      return (f"config file {path!r} not found (relative paths start at {os.getcwd()}); pass "
              f"--config=PATH.py, or a shipped config's name, e.g. --config=digits")
    cause = error.__cause__ or error
    return f"cannot load --config={spec}: {cause}"
  if isinstance(error, (AttributeError, KeyError)):  # a misspelled --config.a.b override
    try:
      return _unknown_field_message(argv)
    except Exception:  # pylint: disable=broad-except
      return None
  return None


def parse_flags(argv):
  """absl's flag parsing, with mistakes in the flags reported as one `error:` line, exit 2,
  and --help (--helpshort, --helpfull, --helpxml) exiting 0 once the help is printed.

  absl itself exits with code 1 for both and, for a config file or a `--config.x` override,
  prints a traceback; a wrapper script cannot tell those from a crash.
  """
  try:
    argv = config_lib.resolve_config_args(argv)
  except FileNotFoundError as e:
    _exit_with_error(str(e))
  try:
    rest = flags.FLAGS(argv)
    _CONFIG.value.keys()  # a config file that failed to load raises only on first use
  except SystemExit as e:
    # absl's help flags print the help, then exit with 1 while parsing.
    if e.code == 1 and any(re.fullmatch(r"--?(\?|help|helpshort|helpfull|helpxml)(=.*)?", arg)
                           for arg in argv[1:]):
      sys.stdout.flush()
      sys.exit(0)
    raise
  except Exception as e:  # pylint: disable=broad-except
    message = _flag_error_message(e, argv)
    if message is None:
      raise
    _exit_with_error(message)
  return rest


def main(argv):
  try:
    _run(argv)
  except KeyboardInterrupt:
    print("Interrupted (SIGINT); stopped without saving", file=sys.stderr, flush=True)
    sys.exit(INTERRUPTED_EXIT_CODE)
  except _USER_ERRORS as e:
    _exit_with_error(str(e))
  except Exception as e:  # pylint: disable=broad-except
    from diffusion_jax.training import checkpoints  # pylint: disable=g-import-not-at-top
    # A full disk, or a workdir whose checkpoint the config cannot resume: one line, no
    # traceback.
    if not isinstance(e, (checkpoints.SaveError, checkpoints.ShapeMismatchError)):
      raise
    _exit_with_error(str(e))


class _OrbaxConsoleRecords(std_logging.Filter):
  """orbax's log records on the console: its errors shortened to their first line (a failed
  background save, a full disk say, logs one traceback per array write, hundreds in all, and
  the run reports the failure itself in one `error:` line); its info and warnings (each save,
  each read-only reader) left out, unless `keep_notices` (--verbosity was given)."""

  def __init__(self, keep_notices: bool):
    super().__init__()
    self._keep_notices = keep_notices

  def filter(self, record):
    if f"{os.sep}orbax{os.sep}" not in record.pathname:
      return True
    if record.levelno < std_logging.ERROR:
      return self._keep_notices
    message = record.getMessage().strip().splitlines()
    record.msg, record.args = (message[0][:300] if message else ""), ()
    record.exc_info = record.exc_text = record.stack_info = None
    return True


def _quiet_library_logs() -> None:
  """Keeps the console to the run's own lines and one line per library error."""
  asked = flags.FLAGS["verbosity"].present
  if logging.get_verbosity() == logging.INFO and not asked:
    logging.set_verbosity(logging.WARNING)
  # On the handler, which both absl's logger (most of orbax) and Python's root logger (the
  # rest of orbax) reach.
  logging.get_absl_handler().addFilter(_OrbaxConsoleRecords(keep_notices=asked))
  # orbax's failed writes also end as asyncio tasks whose exceptions nobody retrieves; asyncio
  # logs each with a traceback when it is garbage collected. Nothing else here uses asyncio.
  std_logging.getLogger("asyncio").setLevel(std_logging.CRITICAL)
  # Unraisable reports with a traceback each, of failures the run reports itself: tensorstore
  # completing the writes of a failed save after orbax closed its event loop, and the abandoned
  # reads of a damaged checkpoint (every array's, with its whole TensorStore spec: tens of
  # thousands of lines).
  previous = sys.unraisablehook

  def unraisablehook(unraisable):
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
      return
    if (unraisable.exc_type is RuntimeError
        and str(unraisable.exc_value) == "Event loop is closed"):
      return
    previous(unraisable)

  sys.unraisablehook = unraisablehook


def _run(argv):
  from diffusion_jax.training import stopping  # pylint: disable=g-import-not-at-top
  if _MODE.value != "train":
    # Only training stops cleanly on a signal; the other modes keep the usual behaviour
    # (Ctrl-C interrupts them, SIGTERM ends them), for a signal received so far too.
    stopping.hand_back_signals()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _quiet_library_logs()
  from diffusion_jax import parallel  # pylint: disable=g-import-not-at-top
  mode = _MODE.value
  config = _CONFIG.value
  # Before waiting for other processes. An evaluation mode without --config checks the config
  # saved with the checkpoint instead, once it is read.
  if mode not in _EVALUATION_MODES or flags.FLAGS["config"].present:
    config_checks.check(config, mode=mode)
  if mode != "summary":
    parallel.initialize_distributed(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
        heartbeat_timeout_s=config.train.heartbeat_timeout_s)
  _dispatch(mode, config, _WORKDIR.value)


if __name__ == "__main__":
  from diffusion_jax.training import stopping  # pylint: disable=g-import-not-at-top
  # Caught before the flags are parsed: a stop requested at any point of a training run's
  # start-up ends it before its first step.
  with stopping.catch_signals():
    stopping.begin_stage("flags")
    try:
      app.run(main, flags_parser=parse_flags)
    except KeyboardInterrupt:  # a second Ctrl-C while the flags were parsed
      print("Interrupted (SIGINT); stopped without saving", file=sys.stderr, flush=True)
      sys.exit(INTERRUPTED_EXIT_CODE)
