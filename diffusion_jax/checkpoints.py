"""Training checkpoints: orbax, asynchronous, last K kept, restored with fallback.

Layout (what an evaluation driver reads and a TF-checkpoint converter writes):

  WORKDIR/checkpoints/
    <step>/                      one directory per saved step (state after <step> updates)
      state/                     orbax PyTree (StandardSave) of the dict
                                   step:       int32 scalar, equal to <step>
                                   params:     U-Net parameters, float32 ({'conv_in': ...},
                                               the flax tree of `models.unet.UNet`)
                                   ema_params: same tree, EMA of params (what samples use)
                                   opt_state:  optax Adam state for params (may be omitted
                                               by a converter: `restore_params` ignores it)
      config/metadata            the training config as JSON (`config.to_dict()`)
      _CHECKPOINT_METADATA, commit_success.txt   written by orbax when the step is complete

A step directory is complete only once orbax has committed it (written to a temporary name and
renamed); an interrupted save leaves a `<step>.orbax-checkpoint-tmp-*` directory that is never
restored and never deleted here. Nothing is deleted except by keeping the last K steps.
"""
from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

STATE = "state"
CONFIG = "config"


def _item_handlers():
  return {STATE: ocp.StandardCheckpointHandler(), CONFIG: ocp.JsonCheckpointHandler()}


class ShapeMismatchError(ValueError):
  """The checkpoint's parameter shapes differ from those the config builds."""


def _leaf_shapes(tree) -> dict[str, tuple]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): tuple(getattr(leaf, "shape", np.shape(leaf)))
          for path, leaf in flat}


class Checkpointer:
  """Saves and restores the train state (plus config) under `directory`.

  Args:
    directory: usually WORKDIR/checkpoints (local or gs://).
    keep: how many of the most recent checkpoints to keep.
    async_save: write in a background thread (the device-to-host copy happens before `save`
      returns, so the caller may donate or overwrite the state right after).
  """

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = epath.Path(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_handlers=_item_handlers())

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: dict[str, Any], config: dict[str, Any]) -> None:
    """Starts saving `state` (a dict of step, params, ema_params, opt_state) as `step`."""
    self._manager.save(step, args=ocp.args.Composite(
        **{STATE: ocp.args.StandardSave(state), CONFIG: ocp.args.JsonSave(config)}), force=True)

  def _check_shapes(self, step: int, abstract_state) -> None:
    saved = self._manager.item_metadata(step)[STATE]
    saved_tree = getattr(saved, "tree", saved)
    want = _leaf_shapes({k: abstract_state[k] for k in ("params",)})
    have = _leaf_shapes({k: saved_tree[k] for k in ("params",)})
    if want != have:
      diff = sorted(set(want.items()) ^ set(have.items()))[:6]
      raise ShapeMismatchError(
          f"the checkpoint at step {step} in {self.directory} has parameter shapes that the "
          f"current config does not build (first differences, path -> shape: {diff}). Use the "
          f"config it was trained with (saved in {self.directory}/{step}/config) or a new "
          f"--workdir")

  def restore_latest(self, abstract_state: dict[str, Any]):
    """Restores the newest readable checkpoint into the shapes and shardings given.

    A checkpoint that cannot be read is reported and the previous one tried.

    Args:
      abstract_state: dict of jax.ShapeDtypeStruct (with shardings) like the saved state.

    Returns:
      (state dict, step), or (None, 0) when there is no readable checkpoint.

    Raises:
      ShapeMismatchError: the config builds parameters of other shapes than the checkpoint.
    """
    for step in reversed(self.all_steps()):
      try:
        self._check_shapes(step, abstract_state)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            **{STATE: ocp.args.StandardRestore(abstract_state)}))
        return restored[STATE], step
      except ShapeMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        logging.error("checkpoint at step %d in %s cannot be read (%s: %s); trying the "
                      "previous one", step, self.directory, type(e).__name__, e)
        print(f"WARNING: checkpoint at step {step} in {self.directory} cannot be read "
              f"({type(e).__name__}); trying the previous one", flush=True)
    return None, 0

  def restore_config(self, step: int | None = None) -> dict[str, Any]:
    """The config saved with a checkpoint (default: the latest)."""
    step = self.latest_step() if step is None else step
    return self._manager.restore(step, args=ocp.args.Composite(
        **{CONFIG: ocp.args.JsonRestore()}))[CONFIG]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def restore_params(directory: str, step: int | None = None, *, ema: bool = True):
  """Reads only the (EMA) parameters of a checkpoint as host numpy arrays, for evaluation.

  Args:
    directory: WORKDIR/checkpoints.
    step: which step (default: the latest).
    ema: return `ema_params` (default) or `params`.

  Returns:
    (params pytree, step).
  """
  manager = ocp.CheckpointManager(epath.Path(directory),
                                  options=ocp.CheckpointManagerOptions(read_only=True),
                                  item_handlers=_item_handlers())
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {directory}")
  key = "ema_params" if ema else "params"
  restored = manager.restore(step, args=ocp.args.Composite(
      **{STATE: ocp.args.StandardRestore()}))
  return jax.tree_util.tree_map(np.asarray, restored[STATE][key]), step
