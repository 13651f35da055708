"""What the command-line programs share: the training command line (`diffusion_jax.main`) and the
tools (`diffusion_jax.tools.*`).

  * Flags are absl flags; a program's config is an ml_collections config flag (`--config`, a
    config file's path or a shipped config's name, with `--config.a.b=value` overrides).
  * A mistake in what was asked for (a flag, a config field, a missing file) is reported in one
    `error:` line on stderr, without a traceback, with exit status 2 (`USAGE_EXIT_CODE`), before
    anything compiles; anything else is a bug and keeps its traceback.
  * `--help` (`--helpshort`, `--helpfull`, `--helpxml`) prints the help and exits 0.
  * A Ctrl-C that reaches the program (training stops on one itself, with a checkpoint) ends it
    with one line and exit status 130 (`INTERRUPTED_EXIT_CODE`).

`parse_flags` makes the flags parser of a program on absl's global flags (run by `run`, which
wraps `app.run`); `parse_own_flags` parses the flags of a tool, defined anew into a `FlagValues`
of its own on each call, so that any number of tools can be imported, and run, in one process.
`reports_errors` makes a program's main function report its mistakes.

Nothing here imports JAX: a tool's flags are checked before it starts.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import logging as std_logging
import os
import re
import sys
from typing import Callable, NoReturn, Sequence

from absl import app
from absl import flags
from absl import logging

from diffusion_jax.config import config_lib

USAGE_EXIT_CODE = 2
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as shells report Ctrl-C

# Mistakes in what was asked for: reported in one line, without a traceback, with exit code 2.
# Anything else is a bug and keeps its traceback. Named by module and class and looked up only in
# the modules already imported (an error of a module never imported cannot have been raised), so
# that importing this module does not start JAX.
USER_ERRORS = (
    ("diffusion_jax.config.checks", "ConfigError"),
    ("builtins", "FileNotFoundError"),
    ("builtins", "PermissionError"),
    ("absl.app", "UsageError"),
    ("diffusion_jax.training.workdir_lock", "WorkdirBusyError"),
    # A full disk, or a workdir whose checkpoint the config cannot resume.
    ("diffusion_jax.training.checkpoints", "SaveError"),
    ("diffusion_jax.training.checkpoints", "ShapeMismatchError"),
)

_INTERRUPTED = "Interrupted (SIGINT); stopped without saving"
_HELP_FLAG = re.compile(r"--?(\?|help|helpshort|helpfull|helpxml)(=.*)?")


def user_error_types(*extra: type[Exception]) -> tuple[type[Exception], ...]:
  """The classes of `USER_ERRORS` whose modules are imported, and `extra`."""
  found = tuple(getattr(sys.modules[module], name) for module, name in USER_ERRORS
                if module in sys.modules)
  return found + extra


def exit_with_error(message: str) -> NoReturn:
  """Prints `error: message` on stderr and exits with `USAGE_EXIT_CODE`."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(USAGE_EXIT_CODE)


def _exit_interrupted() -> NoReturn:
  print(_INTERRUPTED, file=sys.stderr, flush=True)
  sys.exit(INTERRUPTED_EXIT_CODE)


def reports_errors(*user_errors: type[Exception]) -> Callable[[Callable], Callable]:
  """A decorator of a program's main function: Ctrl-C (KeyboardInterrupt) ends it with one line,
  exit 130; a mistake (`USER_ERRORS`, or one of `user_errors`, the program's own) with one
  `error:` line, exit 2. Other exceptions pass unchanged."""

  def decorator(main):

    @functools.wraps(main)
    def reporting(*args, **kwargs):
      try:
        return main(*args, **kwargs)
      except KeyboardInterrupt:
        _exit_interrupted()
      except Exception as e:  # pylint: disable=broad-except
        if not isinstance(e, user_error_types(*user_errors)):
          raise
        exit_with_error(str(e))

    return reporting

  return decorator


# --- Flags ----------------------------------------------------------------------------------


def _config_spec(argv: Sequence[str], name: str, default: str | None) -> str | None:
  """The value of the config flag `--name` on the command line (`default` when absent)."""
  for i, arg in enumerate(argv):
    match = re.fullmatch(rf"--?{re.escape(name)}(?:=(.*))?", arg)
    if match:
      return match.group(1) if match.group(1) is not None else argv[i + 1]
  return default


def _unknown_field_message(argv: Sequence[str], name: str, default: str | None) -> str | None:
  """Names the first `--name.a.b=...` override whose field the config lacks (None: none)."""
  config = config_lib.load_config(_config_spec(argv, name, default))
  for arg in argv:
    match = re.match(rf"--?(?:no)?{re.escape(name)}\.([^=]+)", arg)
    if not match:
      continue
    node, parents = config, []
    for field in match.group(1).split("."):
      if not hasattr(node, "keys") or field not in node:
        where = ".".join(parents)
        fields = sorted(node.keys()) if hasattr(node, "keys") else []
        close = difflib.get_close_matches(field, fields, n=1)
        hint = (f"did you mean --{name}.{'.'.join(parents + close)}? " if close else "")
        return (f"--{name}.{match.group(1)}: the config has no field "
                f"{'.'.join(parents + [field])!r}; {hint}fields of "
                f"{where or 'the config'}: {', '.join(fields)}")
      node = node[field]
      parents.append(field)
  return None


def _flag_error_message(error: Exception, argv: Sequence[str], config_flag: str | None,
                        default_config: str | None) -> str | None:
  """One or a few lines for a mistake in the flags; None when `error` looks like a bug.

  Args:
    error: what parsing the flags raised.
    argv: the command line, the program's name first.
    config_flag: the name of the program's config flag (None: it has none).
    default_config: that flag's default.
  """
  if isinstance(error, flags.Error):
    message = str(error)
    if "Traceback (most recent call last)" in message:
      # A config file's get_config raised: keep the flag and the exception's own last line.
      flag = message.split(": Error whilst parsing config file", 1)[0]
      last = [line for line in message.splitlines() if line.strip()][-1].strip()
      message = f"{flag}: {last}"
    return message
  if config_flag is None:
    return None
  if isinstance(error, OSError):  # config_flags reports an unloadable file on first use
    spec = _config_spec(argv, config_flag, default_config)
    if spec is None:
      return None
    path = spec.split(":", 1)[0]
    if not os.path.isfile(path):
      return (f"config file {path!r} not found (relative paths start at {os.getcwd()}); pass "
              f"--{config_flag}=PATH.py, or a shipped config's name, e.g. "
              f"--{config_flag}=digits")
    cause = error.__cause__ or error
    return f"cannot load --{config_flag}={spec}: {cause}"
  if isinstance(error, (AttributeError, KeyError)):  # a misspelled --config.a.b override
    try:
      return _unknown_field_message(argv, config_flag, default_config)
    except Exception:  # pylint: disable=broad-except
      return None
  return None


def _asks_for_help(argv: Sequence[str]) -> bool:
  return any(_HELP_FLAG.fullmatch(arg) for arg in argv[1:])


def _print_help(flag_values: flags.FlagValues, doc: str) -> None:
  """A program's help, laid out as absl's: its docstring, then its flags."""
  text = flag_values.get_help(include_special_flags=False)
  sys.stdout.write(doc)
  if text:
    sys.stdout.write("\nflags:\n")
    sys.stdout.write(text)
  sys.stdout.write("\n")
  sys.stdout.flush()


def parse_flags(flag_values: flags.FlagValues | None = None, *,
                define: Callable[[flags.FlagValues, list[str]], None] | None = None,
                doc: str | None = None, config_flag: str | None = None,
                default_config: str | None = None) -> Callable[[Sequence[str]], list[str]]:
  """A flags parser (`app.run`'s `flags_parser`): absl's flag parsing, with mistakes in the flags
  reported as one `error:` line, exit 2, and --help (--helpshort, --helpfull, --helpxml) exiting
  0 once the help is printed.

  absl itself exits with code 1 for both and, for a config file or a `--config.x` override,
  prints a traceback; a wrapper script cannot tell those from a crash.

  Args:
    flag_values: the flags to parse: absl's global flags (the default), whose help flags
      `app.run` defines, or a program's own, whose help is printed here.
    define: a function `define(flag_values, argv)` that defines the program's flags first, with
      the command line (a config flag finds its overrides there); called by the parser, so that
      a mistake found while they are defined (the default config with a misspelled override) is
      reported as one found while they are parsed.
    doc: the help's text above the flags, with a program's own flags (default: none).
    config_flag: the name of the program's config flag (`config_flags.DEFINE_config_file`), if
      it has one: its value is loaded while the flags are parsed, and the mistakes in it or in
      its overrides named. A shipped config's name is resolved to its file for `--config`.
    default_config: that flag's default, the config checked when the command line names none.

  Returns:
    parse(argv): the arguments left after the flags, the program's name first (`argv`: the
    program's name, then its arguments).
  """
  flag_values = flags.FLAGS if flag_values is None else flag_values

  def parse(argv: Sequence[str]) -> list[str]:
    try:
      argv = config_lib.resolve_config_args(list(argv))
    except FileNotFoundError as e:
      exit_with_error(str(e))
    try:
      if define is not None:
        define(flag_values, argv)
      if flag_values is not flags.FLAGS and _asks_for_help(argv):
        _print_help(flag_values, doc or "")
        sys.exit(0)
      rest = flag_values(argv)
      if config_flag is not None and flag_values[config_flag].value is not None:
        flag_values[config_flag].value.keys()  # a config that failed to load raises on first use
    except SystemExit as e:
      # absl's help flags print the help, then exit with 1 while parsing.
      if e.code == 1 and _asks_for_help(argv):
        sys.stdout.flush()
        sys.exit(0)
      raise
    except Exception as e:  # pylint: disable=broad-except
      message = _flag_error_message(e, argv, config_flag, default_config)
      if message is None:
        raise
      exit_with_error(message)
    return rest

  return parse


def parse_own_flags(define: Callable[[flags.FlagValues, list[str]], None],
                    argv: Sequence[str] | None = None, *, prog: str, doc: str,
                    config_flag: str | None = None,
                    default_config: str | None = None) -> flags.FlagValues:
  """A tool's flags: defined by `define` into a new `FlagValues` and parsed from `argv`, as
  `parse_flags` parses them, with arguments other than flags refused.

  A `FlagValues` of the tool's own, made on each call, holds no flag of another tool or of an
  earlier call: tools of the same flag names import together, and run more than once in one
  process.

  Args:
    define: `define(flag_values, argv)` defines the tool's flags.
    argv: the arguments, without the program's name (default: `sys.argv[1:]`).
    prog: the program's name, e.g. `python -m diffusion_jax.tools.bench`.
    doc: the help's text above the flags.
    config_flag, default_config: as for `parse_flags`.

  Returns:
    the parsed flags: `flag_values.NAME` is the value of --NAME.
  """
  argv = [prog, *(sys.argv[1:] if argv is None else argv)]
  flag_values = flags.FlagValues()
  rest = parse_flags(flag_values, define=define, doc=doc, config_flag=config_flag,
                     default_config=default_config)(argv)
  if len(rest) > 1:
    exit_with_error(f"unexpected arguments: {rest[1:]}")
  return flag_values


def run(main: Callable[[list[str]], None], *, flags_parser: Callable[[Sequence[str]], list[str]],
        catch_signals: bool = False) -> NoReturn:
  """`app.run(main, flags_parser=flags_parser)`, with a Ctrl-C while the flags are parsed ending
  the program in one line, exit 130.

  Args:
    main: the program, given the arguments left after the flags (see `reports_errors`).
    flags_parser: see `parse_flags`.
    catch_signals: catch SIGTERM and SIGINT from before the flags are parsed
      (`stopping.catch_signals`), so that a stop requested at any point of a training run's
      start-up ends it before its first step. A program that does not train hands them back
      (`stopping.hand_back_signals`), which delivers a Ctrl-C received so far.
  """
  context = contextlib.nullcontext()
  if catch_signals:
    from diffusion_jax.training import stopping  # pylint: disable=g-import-not-at-top
    context = stopping.catch_signals()
  with context:
    if catch_signals:
      stopping.begin_stage("flags")
    try:
      app.run(main, flags_parser=flags_parser)
    except KeyboardInterrupt:  # a second Ctrl-C while the flags were parsed
      _exit_interrupted()


# --- Logs -----------------------------------------------------------------------------------


class OrbaxConsoleRecords(std_logging.Filter):
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


def quiet_library_logs() -> None:
  """Keeps the console to the run's own lines and one line per library error (once absl's
  global flags are parsed)."""
  asked = flags.FLAGS["verbosity"].present
  if logging.get_verbosity() == logging.INFO and not asked:
    logging.set_verbosity(logging.WARNING)
  # On the handler, which both absl's logger (most of orbax) and Python's root logger (the
  # rest of orbax) reach.
  logging.get_absl_handler().addFilter(OrbaxConsoleRecords(keep_notices=asked))
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
