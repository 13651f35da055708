"""The command-line helpers every program shares: flag mistakes in one `error:` line with exit
status 2, --help with exit status 0, user errors and Ctrl-C reported in one line, and orbax's
records kept off the console."""
import logging
import subprocess
import sys
import textwrap
import types

import pytest
from absl import app
from absl import flags
from ml_collections import config_flags

from diffusion_jax import cli
from tests import helpers

DOC = "A program.\n\n  prog --config test --config.a.b=value\n"


def _define(values, argv):
  config_flags.DEFINE_config_file("config", None, "The config.", flag_values=values,
                                  lock_config=True, sys_argv=argv)
  flags.DEFINE_integer("count", 3, "How many.", flag_values=values)


def _parse(argv, define=_define, default_config=None):
  return cli.parse_own_flags(define, argv, prog="prog", doc=DOC, config_flag="config",
                             default_config=default_config)


def _error(capsys, argv, **kwargs) -> str:
  """The stderr of a parse that must end with exit status 2 (and print nothing else)."""
  with pytest.raises(SystemExit) as exited:
    _parse(argv, **kwargs)
  assert exited.value.code == cli.USAGE_EXIT_CODE == 2
  out, err = capsys.readouterr()
  assert out == ""
  assert err.startswith("error: ") and err.endswith("\n"), err
  return err[len("error: "):-1]


def test_flags_and_config_overrides_are_parsed():
  values = _parse(["--config=configs/test.py:var_type=fixedsmall", "--config.optim.lr=5e-4",
                   "--count=7"])
  assert values.count == 7
  assert values.config.optim.lr == 5e-4 and values.config.diffusion.var_type == "fixedsmall"
  # A shipped config by its name.
  assert _parse(["--config", "test"]).config.data.image_size == 8


def test_each_parse_has_flags_of_its_own():
  first = _parse(["--config=test", "--config.optim.lr=5e-4", "--count=7"])
  second = _parse(["--config=test"])  # the same definitions again: no DuplicateFlagError
  assert second.count == 3 and second.config.optim.lr != 5e-4
  assert first.count == 7 and first.config.optim.lr == 5e-4


@pytest.mark.parametrize("argv, message", [
    (["--config=test", "--config.optim.lrr=1"],
     "--config.optim.lrr: the config has no field 'optim.lrr'; did you mean --config.optim.lr? "
     "fields of optim: b1, b2, ema_decay, eps, grad_accum_steps, grad_clip, lr, warmup_steps"),
    (["--config=test", "--config.optim.lr.x=1"],
     "--config.optim.lr.x: the config has no field 'optim.lr.x'; fields of optim.lr: "),
    (["--config=test", "--config.optim.lr=fast"],
     "flag --config.optim.lr=fast: could not convert string to float: 'fast'"),
    (["--config=test", "--count=many"],
     "flag --count=many: invalid literal for int() with base 10: 'many'"),
    (["--config=test:var_type=big,x=1"],
     "flag --config=configs/test.py:var_type=big,x=1: ValueError: unknown config argument 'x'; "
     "allowed keys: ['loss_type', 'mean_type', 'var_type']"),
    (["--config=test", "--colour=red"], "Unknown command line flag 'colour'"),
    (["--config=test", "red"], "unexpected arguments: ['red']"),
])
def test_a_mistake_is_one_error_line(capsys, monkeypatch, argv, message):
  monkeypatch.chdir(helpers.ROOT)
  got = _error(capsys, argv)
  if "configs/test.py" in message:  # the shipped config's file, wherever it is installed
    got = got.replace(str(helpers.ROOT / "configs" / "test.py"), "configs/test.py")
  assert got.startswith(message), got
  assert "\n" not in got


def test_a_misspelled_override_of_the_default_config_is_reported(capsys):
  # The default config loads while the flags are defined, with the overrides of the command line.
  def define(values, argv):
    config_flags.DEFINE_config_file("config", str(helpers.ROOT / "configs" / "test.py"),
                                    "The config.", flag_values=values, sys_argv=argv)

  got = _error(capsys, ["--config.model.chh=1"], define=define,
               default_config=str(helpers.ROOT / "configs" / "test.py"))
  assert got.startswith("--config.model.chh: the config has no field 'model.chh'; did you "
                        "mean --config.model.ch?"), got


def test_a_missing_config_file_names_the_shipped_ones(capsys, tmp_path):
  got = _error(capsys, [f"--config={tmp_path / 'nothing.py'}"])
  assert got.startswith(f"config file '{tmp_path / 'nothing.py'}' not found"), got
  assert "test" in got.split("by its name: ", 1)[1]


def test_a_config_that_cannot_load_is_named(capsys, tmp_path):
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(arg=None):\n  raise ValueError('no dataset ' + arg)\n")
  # The flag and the exception's own line, not the traceback of the file's get_config.
  assert _error(capsys, [f"--config={broken}:x"]) == (
      f"flag --config={broken}:x: ValueError: no dataset x")


@pytest.mark.parametrize("flag", ["--help", "--helpshort", "--helpfull", "-?"])
def test_help_prints_the_doc_and_the_flags_and_exits_0(capsys, flag):
  with pytest.raises(SystemExit) as exited:
    _parse(["--config=test", flag])
  assert exited.value.code == 0
  out, err = capsys.readouterr()
  assert out.startswith(DOC + "\nflags:\n"), out
  assert "  --config: The config." in out and "  --count: How many." in out
  assert err == ""


def test_the_error_message_helpers_directly():
  argv = ["prog", "--cfg", "configs/test.py", "--cfg.model.dropot=0.5"]
  assert cli._config_spec(argv, "cfg", None) == "configs/test.py"
  assert cli._config_spec(["prog"], "cfg", "digits") == "digits"
  assert cli._unknown_field_message(argv, "cfg", None).startswith(
      "--cfg.model.dropot: the config has no field 'model.dropot'; did you mean "
      "--cfg.model.dropout?")
  assert cli._unknown_field_message(["prog", "--cfg.model.dropout=0.5"], "cfg",
                                    "configs/test.py") is None
  # Not a mistake in the flags: a bug, whose traceback stays.
  assert cli._flag_error_message(ZeroDivisionError(), argv, "cfg", None) is None
  assert cli._flag_error_message(KeyError("x"), ["prog"], None, None) is None
  assert cli._flag_error_message(flags.Error("flag --n=x: bad"), argv, None, None) == (
      "flag --n=x: bad")


class _OwnError(Exception):
  pass


@cli.reports_errors(_OwnError)
def _fails_with(error):
  raise error


@pytest.mark.parametrize("error", [FileNotFoundError("no file x"), app.UsageError("no file x"),
                                   _OwnError("no file x")])
def test_reports_errors_gives_user_errors_one_line_and_exit_2(capsys, error):
  with pytest.raises(SystemExit) as exited:
    _fails_with(error)
  assert exited.value.code == 2
  assert capsys.readouterr().err == "error: no file x\n"


def test_reports_errors_leaves_bugs_their_traceback():
  with pytest.raises(ZeroDivisionError):
    _fails_with(ZeroDivisionError("a bug"))
  assert cli.reports_errors()(lambda x: x + 1)(1) == 2


def test_reports_errors_ends_a_ctrl_c_with_one_line_and_exit_130(capsys):
  with pytest.raises(SystemExit) as exited:
    _fails_with(KeyboardInterrupt())
  assert exited.value.code == cli.INTERRUPTED_EXIT_CODE == 130
  assert capsys.readouterr().err == "Interrupted (SIGINT); stopped without saving\n"


def test_user_errors_are_looked_up_in_the_imported_modules(monkeypatch):
  class Refused(Exception):
    pass

  monkeypatch.setattr(cli, "USER_ERRORS", (("builtins", "PermissionError"),
                                           ("a_module_never_imported", "Refused")))
  assert cli.user_error_types() == (PermissionError,)
  monkeypatch.setitem(sys.modules, "a_module_never_imported",
                      types.SimpleNamespace(Refused=Refused))
  assert cli.user_error_types(KeyError) == (PermissionError, Refused, KeyError)


def test_the_config_errors_of_the_package_are_user_errors():
  from diffusion_jax.config import checks  # pylint: disable=g-import-not-at-top
  from diffusion_jax.training import checkpoints  # pylint: disable=g-import-not-at-top
  from diffusion_jax.training import workdir_lock  # pylint: disable=g-import-not-at-top
  found = cli.user_error_types()
  for error in (checks.ConfigError, workdir_lock.WorkdirBusyError, checkpoints.SaveError,
                checkpoints.ShapeMismatchError, app.UsageError, FileNotFoundError):
    assert error in found, error


def _record(pathname, level, message):
  return logging.LogRecord("orbax", level, pathname, 1, message, (), None)


def test_orbax_records_are_kept_short_on_the_console():
  orbax_file = "/site-packages/orbax/checkpoint/save.py"
  quiet, verbose = cli.OrbaxConsoleRecords(False), cli.OrbaxConsoleRecords(True)
  assert not quiet.filter(_record(orbax_file, logging.INFO, "saved step 3"))
  assert verbose.filter(_record(orbax_file, logging.WARNING, "read-only reader"))
  error = _record(orbax_file, logging.ERROR, "write failed: disk full\nTraceback ...\n  more")
  assert quiet.filter(error) and error.getMessage() == "write failed: disk full"
  ours = _record("/site-packages/diffusion_jax/training/loop.py", logging.INFO, "a\nb")
  assert quiet.filter(ours) and ours.getMessage() == "a\nb"


_PROGRAM = textwrap.dedent('''
    """A program run by cli.run."""
    import sys
    from absl import flags
    from diffusion_jax import cli

    _COUNT = flags.DEFINE_integer("count", 1, "How many.")

    def main(argv):
      if _COUNT.value < 0:
        raise KeyboardInterrupt
      print(f"counted {_COUNT.value}")

    def parse(argv):
      if "--interrupt_parsing" in argv:
        raise KeyboardInterrupt
      return cli.parse_flags()(argv)

    cli.run(cli.reports_errors()(main), flags_parser=parse)
''')


@pytest.mark.parametrize("args, code, out, err", [
    (["--count=2"], 0, "counted 2\n", ""),
    (["--count=two"], 2, "", "error: flag --count=two: invalid literal for int() with base 10: "
     "'two'\n"),
    (["--interrupt_parsing"], 130, "", "Interrupted (SIGINT); stopped without saving\n"),
    (["--count=-1"], 130, "", "Interrupted (SIGINT); stopped without saving\n"),
])
def test_run_with_absls_global_flags(tmp_path, args, code, out, err):
  program = tmp_path / "program.py"
  program.write_text(_PROGRAM)
  proc = subprocess.run([sys.executable, str(program), *args], env=helpers.subprocess_env(),
                        capture_output=True, text=True, timeout=120)
  assert (proc.returncode, proc.stdout, proc.stderr) == (code, out, err)


def test_run_prints_absls_help_and_exits_0(tmp_path):
  program = tmp_path / "program.py"
  program.write_text(_PROGRAM)
  proc = subprocess.run([sys.executable, str(program), "--help"], env=helpers.subprocess_env(),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith("A program run by cli.run.") and "--count: How many." in (
      proc.stdout)
  assert proc.stderr == ""
