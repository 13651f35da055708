"""Training checkpoints: orbax, asynchronous, last K kept, verified, restored with fallback.

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
                                   loss_history: with importance-sampled timesteps only:
                                               {losses [T, 10], counts [T]}
      config/metadata            the training config as JSON (`config.to_dict()`)
      checksums/metadata         JSON {"algorithm": "crc32", "arrays": {path: crc32}}: the
                                   CRC-32 of every array of `state` as saved (C order, its own
                                   dtype), keyed by its tree path (`jax.tree_util.keystr`, e.g.
                                   "['params']['conv_in']['kernel']"). Absent in checkpoints
                                   written (or converted) before checksums were stored: those
                                   load unverified, with a notice. One that lacks it although
                                   its _CHECKPOINT_METADATA lists it is refused.
      _CHECKPOINT_METADATA, commit_success.txt   written by orbax when the step is complete
                                   (the former lists the items the step was written with)
    <step>.corrupt[.<n>]/        a checkpoint that could not be read or failed verification,
                                   moved aside by training (never deleted, never restored)

A step directory is complete only once orbax has committed it (written to a temporary name and
renamed); an interrupted save leaves a `<step>.orbax-checkpoint-tmp*` directory that is never
restored. A save that fails (e.g. a full disk) removes its own temporary directory and raises
`SaveError`. Otherwise nothing is deleted except by keeping the last K steps.

Restoring verifies every restored array against its checksum and refuses non-finite values; a
checkpoint that cannot be read or fails either check is reported and the previous one is tried.
CRC-32 detects every error of up to 32 consecutive bits (so any single flipped bit) and any
other corruption with probability 1 - 2^-32.
"""
from __future__ import annotations

import errno
import logging
import os
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from diffusion_jax.utils import outputs

STATE = "state"
CONFIG = "config"
CHECKSUMS = "checksums"
CHECKSUM_ALGORITHM = "crc32"
CORRUPT_SUFFIX = ".corrupt"
_TMP_MARKER = ".orbax-checkpoint-tmp"


def _item_handlers(partial: bool = False):
  # A PyTree handler reads the StandardSave format too, and can restore part of the tree.
  state = ocp.PyTreeCheckpointHandler() if partial else ocp.StandardCheckpointHandler()
  return {STATE: state, CONFIG: ocp.JsonCheckpointHandler(),
          CHECKSUMS: ocp.JsonCheckpointHandler()}


class _ReadOnlyNotice(logging.Filter):
  """Drops orbax's warning that a manager is read-only: ours are on purpose (an evaluation may
  read the checkpoints of a training run that is still writing them)."""

  def filter(self, record):
    return not (f"{os.sep}orbax{os.sep}" in record.pathname
                and str(record.msg).startswith("Given directory is read only"))


_READ_ONLY_NOTICE = _ReadOnlyNotice()


def _read_only_manager(directory: epath.Path) -> ocp.CheckpointManager:
  """A manager that only reads `directory` (part of a state, the config, the checksums)."""
  logger = logging.getLogger("absl")  # orbax logs through absl
  if _READ_ONLY_NOTICE not in logger.filters:
    logger.addFilter(_READ_ONLY_NOTICE)
  # The options a read-only manager implies, set here so that orbax has none to correct (it
  # warns of each).
  options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
  return ocp.CheckpointManager(directory, options=options,
                               item_handlers=_item_handlers(partial=True))


class ShapeMismatchError(ValueError):
  """The checkpoint's parameter shapes differ from those the config builds."""


class CorruptCheckpointError(ValueError):
  """A checkpoint read back values that differ from those saved, or non-finite values."""


class UnreadableCheckpointError(FileNotFoundError):
  """The checkpoint asked for (or every checkpoint there) cannot be read or fails verification."""


class SaveError(RuntimeError):
  """A checkpoint could not be written (e.g. the disk is full); training cannot go on safely."""


def _leaf_shapes(tree) -> dict[str, tuple]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): tuple(getattr(leaf, "shape", np.shape(leaf)))
          for path, leaf in flat}


def _host_array(leaf) -> np.ndarray:
  """A leaf's full value on this host (a replicated global array: this host's copy)."""
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    if not leaf.is_fully_replicated:
      raise ValueError("checksums need arrays replicated on every host; got one sharded "
                       f"across hosts ({leaf.sharding})")
    leaf = leaf.addressable_data(0)
  return np.ascontiguousarray(np.asarray(leaf))


def array_checksums(tree) -> dict[str, int]:
  """The CRC-32 of each array's bytes (C order, its own dtype), keyed by its tree path.

  Args:
    tree: a pytree of arrays (jax arrays replicated over hosts, or numpy arrays).

  Returns:
    {keystr(path): crc32 as an unsigned int}.
  """
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): zlib.crc32(memoryview(_host_array(leaf)).cast("B"))
          for path, leaf in flat}


def verify(tree, checksums: dict[str, Any] | None, *, where: str) -> None:
  """Raises CorruptCheckpointError unless every array of `tree` matches its saved checksum
  (skipped when `checksums` is None) and every floating-point value is finite.

  Args:
    tree: restored arrays, as a dict with the saved state's top-level keys (a subset of them).
    checksums: the checkpoint's `checksums` item, or None for a checkpoint without one.
    where: names the checkpoint in messages.
  """
  saved = None
  if checksums is not None:
    if checksums.get("algorithm") != CHECKSUM_ALGORITHM:
      raise CorruptCheckpointError(f"{where}: unknown checksum algorithm "
                                   f"{checksums.get('algorithm')!r}")
    saved = checksums["arrays"]
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = jax.tree_util.keystr(path)
    value = _host_array(leaf)
    if saved is not None:
      crc = zlib.crc32(memoryview(value).cast("B"))
      if saved.get(name) != crc:
        raise CorruptCheckpointError(
            f"{where}: checksum mismatch in {name} (saved {saved.get(name)}, read {crc})")
    if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
      raise CorruptCheckpointError(f"{where}: non-finite values in {name}")


def describe(error: BaseException, limit: int = 300) -> str:
  """`Type: message`, its first line only, at most `limit` characters (orbax's messages can
  hold a whole TensorStore spec)."""
  lines = str(error).strip().splitlines()
  first = lines[0].split(" See full TensorStore details")[0] if lines else ""
  text = f"{type(error).__name__}: {first}"
  return text if len(text) <= limit else text[:limit - 3] + "..."


# What to do about a failed write, by its OS error. orbax and TensorStore wrap the OSError (as
# the cause or context of their own exception) or keep only its text, e.g.
# "... No space left on device [os_error_code='28']".
_WRITE_ADVICE = (
    ((errno.ENOSPC,), "Free space in {directory} (its disk is full)"),
    ((errno.EDQUOT,), "Free space in {directory} (its disk quota is exceeded)"),
    ((errno.EACCES, errno.EPERM), "Make {directory} writable by this user"),
    ((errno.EROFS,), "Make {directory} writable (its file system is mounted read-only)"),
    ((errno.EFBIG,), "Raise the limit on file sizes (`ulimit -f`), or put {directory} on a "
                     "file system that takes larger files"),
)


def _chained(error: BaseException) -> list[BaseException]:
  """`error` and every exception it was raised from or while handling, each once."""
  found, pending = [], [error]
  while pending:
    current = pending.pop()
    if current is None or any(current is seen for seen in found):
      continue
    found.append(current)
    pending += [current.__cause__, current.__context__]
  return found


def _write_error_code(error: BaseException) -> int | None:
  """The errno of the OS error behind `error` (one that `_WRITE_ADVICE` knows), looked for in
  its chain of causes and in their messages; None if none is found."""
  chain = _chained(error)
  for codes, _ in _WRITE_ADVICE:
    for code in codes:
      for e in chain:
        text = str(e)
        if (getattr(e, "errno", None) == code or f"os_error_code='{code}'" in text
            or os.strerror(code) in text):
          return code
  return None


def _save_advice(error: BaseException, directory) -> str:
  """What to do after a checkpoint could not be written to `directory` because of `error`."""
  code = _write_error_code(error)
  for codes, advice in _WRITE_ADVICE:
    if code in codes:
      return advice.format(directory=directory)
  return f"Fix writing to {directory} (the {type(error).__name__} above)"


def _report_unreadable(step: int, directory, error: Exception, then: str) -> None:
  """One line: printed by process 0 (beside the run's other output), logged by the others
  (each of which may have met another error, or none)."""
  message = (f"checkpoint at step {step} in {directory} cannot be used ({describe(error)}); "
             f"{then}")
  if jax.process_index() == 0:
    print(f"WARNING: {message}", flush=True)
  else:
    logging.warning("%s", message)


def _has_checksums(manager, directory: epath.Path, step: int) -> bool:
  """Whether the checkpoint of `step` has its checksums item.

  Raises:
    CorruptCheckpointError: orbax's record of the step lists the item, but it is gone (a
      checkpoint written before checksums existed does not list it).
  """
  if (directory / str(step) / CHECKSUMS).exists():
    return True
  try:
    written = CHECKSUMS in (manager.metadata(step).item_handlers or {})
  except Exception:  # pylint: disable=broad-except  # no readable record: judge by the files
    written = False
  if written:
    raise CorruptCheckpointError(f"checkpoint {directory}/{step}: its {CHECKSUMS} item was "
                                 f"written but is missing")
  return False


def _notice_unverified(step: int, directory) -> None:
  if jax.process_index() == 0:
    print(f"Note: the checkpoint at step {step} in {directory} has no checksums (written before "
          f"they were stored, or converted); restoring it without verifying them", flush=True)


def _copytree(src: epath.Path, dst: epath.Path) -> None:
  dst.mkdir(parents=True, exist_ok=True)
  for child in src.iterdir():
    if child.is_dir():
      _copytree(child, dst / child.name)
    else:
      child.copy(dst / child.name)


def move_aside(path: epath.Path) -> epath.Path:
  """Renames a checkpoint directory to `<name>.corrupt` (`.corrupt.1`, ... when taken).

  On gs:// (no directory rename) the directory is copied, then the original deleted.

  Returns:
    the new path.
  """
  path = outputs.resolve(path)
  target = path.parent / (path.name + CORRUPT_SUFFIX)
  n = 0
  while target.exists():
    n += 1
    target = path.parent / f"{path.name}{CORRUPT_SUFFIX}.{n}"
  if outputs.is_object_store(path):
    _copytree(path, target)
    path.rmtree()
  else:
    path.rename(target)
  return target


class Checkpointer:
  """Saves and restores the train state (plus config and checksums) under `directory`.

  Args:
    directory: usually WORKDIR/checkpoints (gs://, or local: a relative one starts at the
      current directory, once, here).
    keep: how many of the most recent checkpoints to keep.
    async_save: write in a background thread (the device-to-host copy happens before `save`
      returns, so the caller may donate or overwrite the state right after).
    keep_period: also keep, beyond `keep`, every checkpoint whose step is a multiple of this
      (None: none).
  """

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True,
               keep_period: int | None = None):
    self.directory = outputs.resolve(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        keep_period=keep_period)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_handlers=_item_handlers())
    self._saving: int | None = None  # the step of a save not yet checked for errors
    self._failed = False

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  # ---- saving

  def save(self, step: int, state: dict[str, Any], config: dict[str, Any]) -> None:
    """Starts saving `state` (a dict of step, params, ema_params, opt_state) as `step`.

    Raises:
      SaveError: this save, or the previous one, could not be written.
    """
    self._raise_if_failed()
    checksums = {"algorithm": CHECKSUM_ALGORITHM, "arrays": array_checksums(state)}
    self._saving = step
    try:
      self._manager.save(step, args=ocp.args.Composite(
          **{STATE: ocp.args.StandardSave(state), CONFIG: ocp.args.JsonSave(config),
             CHECKSUMS: ocp.args.JsonSave(checksums)}), force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(step, e) from e
    if self._manager.is_saving_in_progress():
      return
    self._raise_if_failed()  # a synchronous save: its errors are known now

  def check_for_errors(self) -> None:
    """Raises SaveError once the save in progress has failed; cheap (no waiting).

    With several processes a failure surfaces at the next `save` or at `close` instead, where
    every process waits for it alike.
    """
    if self._saving is None or jax.process_count() > 1:
      return
    if not self._manager.is_saving_in_progress():
      self._raise_if_failed()

  def _raise_if_failed(self) -> None:
    """Waits for the save in progress; SaveError if it failed."""
    if self._saving is None:
      return
    step = self._saving
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(step, e) from e
    self._saving = None

  def _save_error(self, step: int, error: Exception) -> SaveError:
    """Cleans up after the failed save of `step`; the error to raise."""
    self._saving = None
    self._failed = True
    if jax.process_index() == 0:
      for path in self.directory.glob(f"{step}{_TMP_MARKER}*"):
        path.rmtree(missing_ok=True)
    self._manager.reload()
    kept = [s for s in self.all_steps() if s != step]
    kept_text = (f"the older checkpoints {kept} are kept" if kept
                 else "no older checkpoint exists")
    resumes = f"it resumes from step {kept[-1]}" if kept else "it starts from step 0"
    return SaveError(
        f"saving the checkpoint of step {step} in {self.directory} failed "
        f"({describe(error, 600)}); training stopped, {kept_text}. "
        f"{_save_advice(error, self.directory)}, then restart with the same --workdir: "
        f"{resumes}")

  def wait(self) -> None:
    """Blocks until the save in progress is written. Raises SaveError if it failed."""
    self._raise_if_failed()

  def close(self) -> None:
    """Waits for the save in progress, then closes.

    Raises:
      SaveError: the last save failed (and no earlier failure was raised).
    """
    try:
      if not self._failed:
        self._raise_if_failed()
    finally:
      try:
        self._manager.close()
      except Exception:  # pylint: disable=broad-except  # already reported as a SaveError
        if not self._failed:
          raise

  # ---- restoring

  def _check_shapes(self, step: int, abstract_state) -> None:
    saved = self._manager.item_metadata(step)[STATE]
    saved_tree = getattr(saved, "tree", saved)
    # The importance sampler's loss history is in the state only when the config draws its
    # timesteps by importance; a checkpoint with or without it resumes only with the same choice.
    history = "loss_history"
    if (history in abstract_state) != (history in saved_tree):
      trained = "with" if history in saved_tree else "without"
      sampler = "loss_second_moment" if history in saved_tree else "uniform"
      raise ShapeMismatchError(
          f"the checkpoint at step {step} in {self.directory} was trained {trained} "
          f"importance-sampled timesteps (a loss history in the state), unlike the current "
          f"config: set --config.diffusion.timestep_sampler={sampler} to resume it (the config "
          f"it was trained with is saved in {self.directory}/{step}/config), or use a new "
          f"--workdir")
    compared = ("params", history) if history in saved_tree else ("params",)
    want = _leaf_shapes({k: abstract_state[k] for k in compared})
    have = _leaf_shapes({k: saved_tree[k] for k in compared})
    if want != have:
      diff = sorted(set(want.items()) ^ set(have.items()))[:6]
      raise ShapeMismatchError(
          f"the checkpoint at step {step} in {self.directory} has parameter shapes that the "
          f"current config does not build (first differences, path -> shape: {diff}). Use the "
          f"config it was trained with (saved in {self.directory}/{step}/config) or a new "
          f"--workdir")

  def _restore_verified(self, step: int, abstract_state):
    self._check_shapes(step, abstract_state)
    return _restore_state_verified(self._manager, self.directory, step,
                                   ocp.args.StandardRestore(abstract_state))

  def restore_latest(self, abstract_state: dict[str, Any]):
    """Restores the newest usable checkpoint into the shapes and shardings given.

    A checkpoint that cannot be read, fails its checksums or holds non-finite values is
    reported and moved aside to `<step>.corrupt` by process 0 (so that training can save that
    step again), and the previous one is tried. Every process restores the same step: one
    that any process cannot use is skipped by all.

    Args:
      abstract_state: dict of jax.ShapeDtypeStruct (with shardings) like the saved state.

    Returns:
      (state dict, step), or (None, 0) when there is no usable checkpoint.

    Raises:
      ShapeMismatchError: the config builds parameters of other shapes than the checkpoint.
    """
    for step in reversed(self.all_steps()):
      error = None
      try:
        state = self._restore_verified(step, abstract_state)
      except ShapeMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        error = e
      if _all_processes_ok(error is None):
        return state, step
      if error is None:
        error = RuntimeError("another process cannot read it")
      self._set_aside(step, error)
    return None, 0

  def _set_aside(self, step: int, error: Exception) -> None:
    moved = None
    if jax.process_index() == 0:
      try:
        moved = move_aside(self.directory / str(step))
      except Exception as e:  # pylint: disable=broad-except
        logging.error("cannot move %s/%d aside: %s", self.directory, step, e)
    then = (f"moved it to {moved} and trying the previous one" if moved is not None
            else "trying the previous one")
    _report_unreadable(step, self.directory, error, then)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
    self._manager.reload()


def _restore_state_verified(manager, directory: epath.Path, step: int, state_args):
  """Restores the `state` item of `step` as `state_args` asks (all of it or part), with its
  checksums when it has them, and verifies what was read (`verify`)."""
  has_checksums = _has_checksums(manager, directory, step)
  items = {STATE: state_args}
  if has_checksums:
    items[CHECKSUMS] = ocp.args.JsonRestore()
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  if not has_checksums:
    _notice_unverified(step, directory)
  verify(restored[STATE], restored[CHECKSUMS] if has_checksums else None,
         where=f"checkpoint {directory}/{step}")
  return restored[STATE]


def complete_steps(directory) -> list[int]:
  """The steps with a complete (committed) checkpoint in `directory` (none if it is missing),
  read from the files alone (no manager: safe from any thread)."""
  directory = outputs.resolve(directory)
  if not directory.exists():
    return []
  return sorted(ocp.step.checkpoint_steps(directory))


def select_step(directory, step: int | None = None) -> int:
  """`step` if `directory` has a complete checkpoint of it, else (None) the latest step.

  Raises:
    FileNotFoundError: no checkpoint at all, or none of `step` (naming the steps there).
  """
  directory = outputs.resolve(directory)
  steps = complete_steps(directory)
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {directory}: train first (--mode train), or "
                            "convert the authors' checkpoint with "
                            "`python -m diffusion_jax.tools.convert_tf_checkpoint`")
  if step is not None and step not in steps:
    raise FileNotFoundError(f"no checkpoint for step {step} in {directory}; steps there: {steps}")
  return steps[-1] if step is None else step


def read_config(directory, step: int) -> dict[str, Any]:
  """The config saved with the checkpoint of `step`, as the dict it was saved as."""
  manager = _read_only_manager(outputs.resolve(directory))
  try:
    return manager.restore(step, args=ocp.args.Composite(
        **{CONFIG: ocp.args.JsonRestore()}))[CONFIG]
  finally:
    manager.close()


def _all_processes_ok(ok: bool) -> bool:
  """Whether `ok` holds on every process (no collective with one process)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def _read_params(manager, directory: epath.Path, step: int, key: str):
  """Only `key` of the state (and the checksums) of one step, verified, as numpy arrays."""
  meta = manager.item_metadata(step)[STATE]
  meta = getattr(meta, "tree", meta)
  if key not in meta:
    raise KeyError(f"the checkpoint has no {key!r} (it has {sorted(meta)})")
  wanted = {key: meta[key]}
  restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                        wanted)
  state = _restore_state_verified(
      manager, directory, step,
      ocp.args.PyTreeRestore(item=wanted, restore_args=restore_args, partial_restore=True))
  return jax.tree_util.tree_map(np.asarray, state[key])


def restore_params(directory: str, step: int | None = None, *, ema: bool = True):
  """Reads only the (EMA) parameters of a checkpoint as host numpy arrays, for evaluation.

  Nothing else is read (a damaged optimizer state does not matter). The arrays are verified
  against the saved checksums and must be finite. Without `step`, a checkpoint that fails is
  reported and the previous one tried; nothing is moved or deleted (training may be writing).

  Args:
    directory: WORKDIR/checkpoints.
    step: which step (default: the newest usable one).
    ema: return `ema_params` (default) or `params`.

  Returns:
    (params pytree, step).

  Raises:
    FileNotFoundError: no checkpoint in `directory`.
    UnreadableCheckpointError: `step` (or, without one, every checkpoint) cannot be used.
  """
  directory = outputs.resolve(directory)
  manager = _read_only_manager(directory)
  try:
    steps = sorted(manager.all_steps())
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {directory}")
    key = "ema_params" if ema else "params"
    candidates = [step] if step is not None else list(reversed(steps))
    problems = []
    for candidate in candidates:
      try:
        return _read_params(manager, directory, candidate, key), candidate
      except Exception as e:  # pylint: disable=broad-except
        problems.append(f"step {candidate}: {describe(e)}")
        if step is None:
          _report_unreadable(candidate, directory, e, "trying the previous one")
    if step is not None:
      raise UnreadableCheckpointError(
          f"the checkpoint of step {step} in {directory} cannot be used ({problems[0]}); "
          f"omit --step to use the newest usable one (steps there: {steps})")
    raise UnreadableCheckpointError(
        f"no usable checkpoint in {directory} ({'; '.join(problems)}); train again or restore "
        f"the directory from a copy")
  finally:
    manager.close()


def check_new_workdir(workdir: str) -> epath.Path:
  """WORKDIR/checkpoints for a converted checkpoint; raises FileExistsError if it holds some."""
  out_dir = outputs.resolve(workdir) / "checkpoints"
  if out_dir.exists() and any(out_dir.iterdir()):
    raise FileExistsError(f"{out_dir} already holds checkpoints; choose a new --out directory")
  return out_dir


def save_converted(workdir: str, step: int, params, ema_params, config) -> epath.Path:
  """Writes a checkpoint converted from another codebase: WORKDIR/checkpoints/<step> with the
  parameters, their EMA and the config, and no optimizer state (for sampling and evaluation,
  which every --mode does from it). Returns the checkpoints directory."""
  out_dir = check_new_workdir(workdir)
  saver = Checkpointer(str(out_dir), keep=1, async_save=False)
  try:
    saver.save(step, {"step": np.int32(step), "params": params, "ema_params": ema_params},
               config.to_dict())
  finally:
    saver.close()
  return out_dir

