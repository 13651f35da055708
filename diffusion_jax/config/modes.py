"""The command line's modes (`--mode`), each stated once: what it does, what it reads and what
runs it.

`diffusion_jax.main` builds its --mode flag, its help and its dispatch from `MODES`; the config
checks read which modes sample with the `sample` section and which read the dataset's labels.
Adding a mode is one line here and its run function.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Mode:
  """One --mode.

  Attributes:
    name: its --mode value.
    help: what it does, for --help.
    run: 'module:function' running it as function(config, workdir, step=...) (train and distill:
      function(config, workdir)); '' for summary, which main runs itself.
    samples: it draws images with the `sample` section's sampler (train only when
      train.sample_every > 0), so the sampler's rules apply.
    reads_labels: it reads the dataset's examples, with their labels for a class-conditional
      model (eval only when eval.bpd_split is set).
    evaluates: it reads a training run's checkpoint; without --config it uses the config saved
      with it (and --step chooses the checkpoint).
  """
  name: str
  help: str
  run: str = ""
  samples: bool = False
  reads_labels: bool = False
  evaluates: bool = False

  def runner(self) -> Callable:
    """The function that runs this mode (imported now)."""
    module, function = self.run.split(":")
    return getattr(importlib.import_module(module), function)


_EVALUATION = "diffusion_jax.evaluation.modes:"

MODES = {mode.name: mode for mode in (
    Mode("train", "train (or resume) in --workdir", "diffusion_jax.training.loop:"
         "train_and_evaluate", samples=True, reads_labels=True),
    Mode("summary", "the network's parameter table"),
    Mode("distill", "progressive distillation of distill.teacher's model into a student of "
         "distill.end_steps steps, in --workdir", "diffusion_jax.training.distill:run",
         reads_labels=True),
    Mode("sample", "eval.num_samples samples to .npz", _EVALUATION + "run_sample", samples=True,
         evaluates=True),
    Mode("eval", "FID, Inception Score, bits/dim", _EVALUATION + "run_eval", samples=True,
         reads_labels=True, evaluates=True),
    Mode("progressive", "x_0 predictions along the chain (an image grid)",
         _EVALUATION + "run_progressive", samples=True, evaluates=True),
    Mode("interpolate", "mixes of test images (an image grid)", _EVALUATION + "run_interpolate",
         samples=True, reads_labels=True, evaluates=True),
    Mode("encode", "DDIM latents of eval.bpd_split's images, with their reconstruction error",
         _EVALUATION + "run_encode", samples=True, reads_labels=True, evaluates=True),
    Mode("edit", "SDEdit of eval.edit_images (or eval.bpd_split's) at each of eval.edit_t",
         _EVALUATION + "run_edit", samples=True, reads_labels=True, evaluates=True),
    Mode("inpaint", "RePaint: eval.edit_images completed outside eval.inpaint_mask",
         _EVALUATION + "run_inpaint", samples=True, reads_labels=True, evaluates=True),
)}

NAMES = tuple(MODES)


def get(name: str) -> Mode:
  """The mode `name`; ValueError naming the modes that exist."""
  if name not in MODES:
    raise ValueError(f"unknown mode {name!r}; choose one of {', '.join(NAMES)}")
  return MODES[name]


def help_text() -> str:
  """--mode's help: each mode and what it does."""
  return "; ".join(f"{mode.name}: {mode.help}" for mode in MODES.values()) + "."
