"""Converts a checkpoint of the authors' TensorFlow code into a diffusion_jax checkpoint.

  python -m diffusion_jax.tools.convert_tf_checkpoint \
      --checkpoint diffusion_cifar10_model/model.ckpt-790000 \
      --config configs/cifar10.py --out runs/cifar10_authors

The original's `unet.py` creates variables named like `model/down_0/block_0/conv1/W`; its
training keeps their exponential moving averages as `<name>/ExponentialMovingAverage` and the
step as `global_step`. Every U-Net variable (and its EMA shadow) is mapped onto our parameters by
`models.tf_names.flax_param_path`, checked against the shapes the config builds, and written to
`OUT/checkpoints/<step>/` in the layout of `diffusion_jax.training.checkpoints` (params,
ema_params, step and the config; no optimizer state, so the result is for sampling and
evaluation), which every `--mode` of `diffusion_jax.main` loads with `--workdir OUT`.

`--config` names the config as for `diffusion_jax.main` (a file, or a shipped config's name), and
`--config.a.b=value` overrides one of its fields. A mistake (a flag, a missing checkpoint, a config
that builds another model) ends the command with one `error:` line, exit status 2.

TensorFlow is needed to read the checkpoint (`pip install tensorflow-cpu`); nothing else here uses
it.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from diffusion_jax import cli
from diffusion_jax.config import build
from diffusion_jax import models
from diffusion_jax.models import tf_names
from diffusion_jax.training import checkpoints

EMA_SUFFIX = "/ExponentialMovingAverage"
_MODEL_PREFIX = "model/"
# Optimizer slots and other bookkeeping the original saves beside the model's variables.
_IGNORED_SUFFIXES = ("/Adam", "/Adam_1", "/Momentum", "/RMSProp", "/RMSProp_1")


class CheckpointMismatchError(ValueError):
  """The TF checkpoint's variables do not match the parameters the config builds."""


def _open_reader(path: str):
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("reading a TensorFlow checkpoint needs TensorFlow: "
                      "pip install tensorflow-cpu") from e
  prefix = path
  if tf.io.gfile.isdir(path):
    prefix = tf.train.latest_checkpoint(path)
    if prefix is None:
      raise FileNotFoundError(f"no TensorFlow checkpoint in directory {path} (expected a "
                              "'checkpoint' file, or pass the prefix model.ckpt-NNNN itself)")
  elif not tf.io.gfile.glob(prefix + ".index"):
    raise FileNotFoundError(f"no TensorFlow checkpoint at {path}: {path}.index does not exist "
                            "(pass the prefix, e.g. .../model.ckpt-790000, or its directory)")
  return tf.train.load_checkpoint(prefix), prefix


def map_variables(tf_shapes: dict[str, list[int]], abstract_params, names=tf_names):
  """Pairs every parameter with its TF variable and EMA shadow, checking names and shapes.

  Args:
    tf_shapes: TF variable name -> shape, as `CheckpointReader.get_variable_to_shape_map()`.
    abstract_params: our parameter tree (arrays or ShapeDtypeStructs) that the config builds.
    names: the architecture's TF name map (`models.name_map(architecture, 'tf')`).

  Returns:
    (mapping {param path tuple: (tf name, ema tf name or None)}, has_ema).

  Raises:
    CheckpointMismatchError: naming the first missing, unexpected or misshapen variables.
  """
  flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  problems, mapping = [], {}
  expected = set()
  for path, leaf in flat:
    keys = tuple(k.key for k in path)
    name = names.tf_variable_name(keys)
    expected.add(name)
    want = tuple(leaf.shape)
    if name not in tf_shapes:
      problems.append(f"missing {name} (shape {want})")
      continue
    have = tuple(tf_shapes[name])
    if have != want:
      problems.append(f"{name} has shape {have}, the config builds {want}")
    ema = name + EMA_SUFFIX
    if ema in tf_shapes and tuple(tf_shapes[ema]) != want:
      problems.append(f"{ema} has shape {tuple(tf_shapes[ema])}, the config builds {want}")
    mapping[keys] = (name, ema if ema in tf_shapes else None)
  for name in sorted(tf_shapes):
    base = name[:-len(EMA_SUFFIX)] if name.endswith(EMA_SUFFIX) else name
    if (base.startswith(_MODEL_PREFIX) and base not in expected
        and not base.endswith(_IGNORED_SUFFIXES)):
      problems.append(f"unexpected {name} (shape {tuple(tf_shapes[name])})")
  if problems:
    shown = "; ".join(problems[:8])
    more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
    raise CheckpointMismatchError(
        f"the TensorFlow checkpoint does not match the model this config builds: {shown}{more}. "
        "Use the config the checkpoint was trained with (e.g. configs/cifar10.py for the CIFAR-10 "
        "model, configs/celebahq256.py or configs/lsun_*.py for the 256x256 ones)")
  with_ema = [ema is not None for _, ema in mapping.values()]
  if any(with_ema) and not all(with_ema):
    missing = [tf for tf, ema in mapping.values() if ema is None][:5]
    raise CheckpointMismatchError(f"only some variables have an EMA shadow; none for {missing}")
  return mapping, all(with_ema) and bool(with_ema)


def convert(checkpoint: str, config, out: str) -> tuple[int, bool]:
  """Converts a TF checkpoint to `out/checkpoints/<step>`; returns (step, had EMA shadows)."""
  out_dir = checkpoints.check_new_workdir(out)
  try:
    names = models.name_map(config.model.architecture, "tf")
  except ValueError as e:
    raise CheckpointMismatchError(str(e)) from None
  reader, prefix = _open_reader(checkpoint)
  model = build.make_model(config)
  size, channels = config.data.image_size, config.data.channels
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.key(0), np.zeros((1, size, size, channels), np.float32),
                         np.zeros((1,), np.int32), train=False))["params"]
  shapes = reader.get_variable_to_shape_map()
  mapping, has_ema = map_variables(shapes, abstract, names)

  def load(which):
    tree = {}
    for keys, names in mapping.items():
      value = np.asarray(reader.get_tensor(names[which] or names[0]), np.float32)
      node = tree
      for k in keys[:-1]:
        node = node.setdefault(k, {})
      node[keys[-1]] = value
    return tree

  params = load(0)
  ema_params = load(1) if has_ema else params
  step = int(reader.get_tensor("global_step")) if "global_step" in shapes else 0
  checkpoints.save_converted(out, step, params, ema_params, config)
  print(f"converted {prefix} (step {step}, {len(mapping)} variables"
        f"{', with EMA' if has_ema else ', no EMA shadows: ema_params = params'}) -> {out_dir}")
  return step, has_ema


_PROG = "python -m diffusion_jax.tools.convert_tf_checkpoint"


def _define_flags(values: flags.FlagValues, argv: list[str]) -> None:
  """The converter's flags, into `values` (`argv`: the command line, for the config flag)."""
  config_flags.DEFINE_config_file(
      "config", None, "The config the checkpoint was trained with (configs/*.py[:argument], or a "
      "shipped config's name); override its fields with --config.a.b=value.",
      flag_values=values, lock_config=True, sys_argv=argv)
  flags.DEFINE_string("checkpoint", None, "TF checkpoint prefix or directory.",
                      flag_values=values)
  flags.DEFINE_string("out", None, "Output workdir (a new directory).", flag_values=values)


@cli.reports_errors(CheckpointMismatchError, FileExistsError, ImportError)
def main(argv: Sequence[str] | None = None) -> None:
  """The command line: converts --checkpoint into --out (`argv`: the arguments, default
  `sys.argv[1:]`). Mistakes end it with one `error:` line, exit 2."""
  args = cli.parse_own_flags(_define_flags, argv, prog=_PROG, doc=__doc__, config_flag="config")
  for name in ("checkpoint", "out"):
    if not args[name].value:
      raise app.UsageError(f"--{name} is required")
  if args.config is None:
    raise app.UsageError("--config is required")
  convert(args.checkpoint, args.config, args.out)


if __name__ == "__main__":
  main()
