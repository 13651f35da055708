"""The tools' one command-line style: absl flags of each tool's own, the help on --help with exit
status 0, a mistake in one `error:` line with exit status 2, a config as `--config` with
`--config.a.b=value` overrides; every tool importable, and runnable, beside the others."""
import subprocess
import sys

import pytest

from diffusion_jax.tools import bench
from diffusion_jax.tools import convert_diffusers
from diffusion_jax.tools import convert_inception
from diffusion_jax.tools import convert_tf_checkpoint
from diffusion_jax.tools import convert_torch_checkpoint
from diffusion_jax.tools import export_safetensors
from diffusion_jax.tools import input_bench
from tests import helpers

# Each tool, a flag of its own, and the arguments that get it past its required flags.
TOOLS = {
    "bench": (bench, "--scaling", []),
    "input_bench": (input_bench, "--num_images", []),
    "convert_tf_checkpoint": (convert_tf_checkpoint, "--checkpoint",
                              ["--checkpoint=model.ckpt-1", "--out=unused"]),
    "convert_torch_checkpoint": (convert_torch_checkpoint, "--step",
                                 ["--checkpoint=model.pt", "--out=unused"]),
    "convert_inception": (convert_inception, "--torch_weights",
                          ["--torch_weights=model.pth", "--out=unused.npz"]),
    "convert_diffusers": (convert_diffusers, "--from_diffusers",
                          ["--from_diffusers=unused", "--out=unused"]),
    "export_safetensors": (export_safetensors, "--names",
                           ["--workdir=unused", "--out=unused.safetensors"]),
}
WITH_CONFIG = ("bench", "convert_tf_checkpoint", "convert_torch_checkpoint", "convert_diffusers")


def _exit_code(tool, argv) -> int:
  with pytest.raises(SystemExit) as exited:
    TOOLS[tool][0].main(argv)
  return exited.value.code


@pytest.mark.parametrize("tool", sorted(TOOLS))
@pytest.mark.parametrize("flag", ["--help", "--helpfull", "-?"])
def test_help_lists_the_flags_and_exits_0(tool, flag, capsys):
  module, own_flag, _ = TOOLS[tool]
  assert _exit_code(tool, [flag]) == 0
  out, err = capsys.readouterr()
  assert out.startswith(module.__doc__), out[:300]
  assert f"  {own_flag}: " in out
  assert ("  --config: " in out) == (tool in WITH_CONFIG)
  assert err == ""


@pytest.mark.parametrize("tool", sorted(TOOLS))
@pytest.mark.parametrize("args, message", [
    (["--no_such_flag=1"], "error: Unknown command line flag 'no_such_flag'"),
    (["positional"], "error: unexpected arguments: ['positional']")])
def test_a_mistake_in_the_flags_is_one_error_line_and_exit_2(tool, args, message, capsys):
  assert _exit_code(tool, TOOLS[tool][2] + args) == 2
  out, err = capsys.readouterr()
  assert err == message + "\n", err
  assert out == ""


@pytest.mark.parametrize("tool", WITH_CONFIG)
@pytest.mark.parametrize("override, message", [
    ("--config.model.chh=64", "error: --config.model.chh: the config has no field 'model.chh'; "
     "did you mean --config.model.ch? fields of model: "),
    ("--config.model.ch=wide", "error: flag --config.model.ch=wide: invalid literal for int()"),
    ("--config.optimm.lr=1", "error: --config.optimm.lr: the config has no field 'optimm'; did "
     "you mean --config.optim? fields of the config: ")])
def test_a_bad_config_override_is_one_error_line_and_exit_2(tool, override, message, capsys):
  assert _exit_code(tool, TOOLS[tool][2] + ["--config=configs/test.py", override]) == 2
  out, err = capsys.readouterr()
  assert err.startswith(message) and len(err.splitlines()) == 1, err
  assert out == ""


@pytest.mark.parametrize("tool", WITH_CONFIG)
def test_the_config_is_a_file_or_a_shipped_configs_name(tool, capsys):
  assert _exit_code(tool, TOOLS[tool][2] + ["--config=no_such_config"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: unknown config 'no_such_config': not a file, nor a config "
                        "shipped with diffusion_jax ("), err
  assert len(err.splitlines()) == 1


@pytest.mark.parametrize("tool", ["convert_tf_checkpoint", "convert_torch_checkpoint",
                                  "convert_inception"])
def test_a_converter_names_its_missing_flag(tool, capsys):
  first = {"convert_inception": "--torch_weights"}.get(tool, "--checkpoint")
  assert _exit_code(tool, []) == 2
  assert capsys.readouterr().err == f"error: {first} is required\n"


def test_input_bench_refuses_unknown_sources_and_workers(capsys):
  for args, message in (
      (["--sources=png_folder,jpeg_folder"],
       "error: --sources: unknown source 'jpeg_folder'; allowed: array_record, png_folder\n"),
      (["--workers=1,two"], "error: --workers: want whole numbers, e.g. 1,2; got 1,two\n"),
      (["--parallelism=fibers"], "error: --parallelism: unknown parallelism 'fibers'")):
    assert _exit_code("input_bench", args) == 2
    assert capsys.readouterr().err.startswith(message)


def test_a_tool_runs_as_a_module_with_the_same_command_line():
  # The real entry point, with another tool's module imported first: no flag of one is seen by
  # the other.
  script = ("import runpy, sys\n"
            "from diffusion_jax.tools import bench\n"
            "sys.argv = ['convert_tf_checkpoint'] + sys.argv[1:]\n"
            "runpy.run_module('diffusion_jax.tools.convert_tf_checkpoint', run_name='__main__', "
            "alter_sys=True)\n")
  run = subprocess.run([sys.executable, "-c", script, "--checkpoint=x", "--out=y",
                        "--config=test", "--config.model.chh=1"], cwd=helpers.ROOT,
                       env=helpers.subprocess_env(), capture_output=True, text=True, timeout=300)
  assert run.returncode == 2, run.stderr[-3000:]
  errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and errors[0].startswith("error: --config.model.chh: "), run.stderr
  helped = subprocess.run([sys.executable, "-m", "diffusion_jax.tools.convert_tf_checkpoint",
                           "--help"], cwd=helpers.ROOT, env=helpers.subprocess_env(),
                          capture_output=True, text=True, timeout=300)
  assert helped.returncode == 0, helped.stderr[-3000:]
  assert helped.stdout.startswith(convert_tf_checkpoint.__doc__)
  assert "--checkpoint: TF checkpoint prefix or directory." in helped.stdout
