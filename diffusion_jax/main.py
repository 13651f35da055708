"""Command line: `python -m diffusion_jax.main --config configs/<name>.py --workdir DIR`.

Runs unchanged on one machine, on every host of a TPU pod, or in a notebook cell:

  python -m diffusion_jax.main --config configs/digits.py --workdir runs/digits
  python -m diffusion_jax.main --config configs/cifar10.py:var_type=fixedsmall \
      --config.optim.lr=1e-4 --workdir gs://bucket/cifar10
  python -m diffusion_jax.main --config configs/cifar10.py --mode summary
"""
import pathlib

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parent.parent / "configs" / "digits.py"

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(_DEFAULT_CONFIG), "Training config file (configs/*.py[:argument]).",
    lock_config=True)
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


def _train(config):
  from diffusion_jax import train  # pylint: disable=g-import-not-at-top
  if not _WORKDIR.value:
    raise app.UsageError("--mode train needs --workdir")
  train.train_and_evaluate(config, _WORKDIR.value)


def _summary(config):
  from diffusion_jax import train  # pylint: disable=g-import-not-at-top
  print(train.summary(config))


def _evaluation(name):
  def run(config):
    from diffusion_jax import evaluate  # pylint: disable=g-import-not-at-top
    if not _WORKDIR.value:
      raise app.UsageError(f"--mode {name} needs --workdir (the training workdir)")
    getattr(evaluate, f"run_{name}")(config, _WORKDIR.value, step=_STEP.value)
  return run


MODES = {"train": _train, "summary": _summary,
         **{name: _evaluation(name) for name in ("sample", "eval", "progressive", "interpolate")}}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if logging.get_verbosity() == logging.INFO and not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # keeps checkpointing chatter off the console
  from diffusion_jax import parallel  # pylint: disable=g-import-not-at-top
  if _MODE.value != "summary":
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  MODES[_MODE.value](_CONFIG.value)


if __name__ == "__main__":
  app.run(main)
