"""What runs leave in their workdir besides checkpoints: metric logs and whole files.

Every file is written whole before it appears under its name (locally: a temporary name renamed
into place; in an object store, where an upload appears only when complete: in place), so a
reader (a watcher, a restarted run, a user) never sees a partial file.
"""
from __future__ import annotations

import io
import json
import os
import uuid

import numpy as np
from etils import epath


def is_object_store(path) -> bool:
  """Whether `path` is in an object store (gs://, s3://: no append, no rename) or local."""
  return "://" in os.fspath(path)


def resolve(path) -> epath.Path:
  """`path` as the library hands it on: a local path with `~` expanded and made absolute (orbax
  and TensorStore refuse relative paths, and a later change of directory must not move it); an
  object-store path (gs://) unchanged."""
  if is_object_store(path):
    return epath.Path(path)
  return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def write_atomically(path: epath.Path | str, data: bytes) -> epath.Path:
  """Writes `data` to `path` whole. Locally: under a temporary name unique to this call, then
  renamed to `path` (parents made), so writers racing for one file (processes caching the same
  statistics) never read or clobber half a file. In an object store: in place, where an object
  appears only once its upload is complete. Returns the path."""
  path = epath.Path(path)
  if is_object_store(path):
    # An object store (gs://) shows an object only once its upload is complete, and has no
    # rename (a copy and a delete): write in place.
    path.write_bytes(data)
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f"{path.name}.{uuid.uuid4().hex}.tmp"
  tmp.write_bytes(data)
  tmp.replace(path)
  return path


def write_json(path: epath.Path | str, value) -> epath.Path:
  """`value` as indented JSON with sorted keys, written atomically."""
  return write_atomically(path, json.dumps(value, indent=2, sort_keys=True).encode())


def write_npz(path: epath.Path | str, **arrays) -> epath.Path:
  """An .npz of `arrays` (as `np.savez`), written atomically."""
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return write_atomically(path, buf.getvalue())


def check_workdir(workdir: str) -> None:
  """Raises PermissionError unless a file can be created in `workdir` (made if missing)."""
  path = epath.Path(workdir)
  probe = path / f".write_test_{os.getpid()}"
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe.write_text("ok")
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except
    raise PermissionError(f"cannot write to --workdir {workdir!r} ({type(e).__name__}: {e}); "
                          f"pass a directory you can write to") from e


class _ObjectStoreRecordFile:
  """A tensorboardX event file on a `gs://` (or other remote) path, written through epath.

  Object stores cannot append: the whole file is rewritten at each flush, as tensorboardX's
  own Google Cloud Storage writer does (which would need the google-cloud-storage client; this
  one uses the same file access as everything else here).
  """

  def __init__(self, path: str):
    self._path = epath.Path(path)
    self._buffer = io.BytesIO()

  def write(self, data: bytes) -> None:
    self._buffer.write(data)

  def flush(self) -> None:
    self._path.write_bytes(self._buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _ObjectStoreRecordFiles:
  """tensorboardX's writer factory interface (open, directory_check) for `gs://` paths."""

  def open(self, path: str) -> _ObjectStoreRecordFile:
    return _ObjectStoreRecordFile(path)

  def directory_check(self, path: str) -> None:
    del path  # object stores have no directories to make


def _summary_writer(logdir: str):
  """tensorboardX's SummaryWriter: TensorBoard event files without TensorFlow."""
  import tensorboardX  # pylint: disable=g-import-not-at-top
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  record_writer.register_writer_factory("gs", _ObjectStoreRecordFiles())
  # The default file name has a one-second timestamp: a suffix keeps two writers of the same
  # second (a quick restart, an evaluation beside training) from replacing each other's file.
  return tensorboardX.SummaryWriter(logdir, flush_secs=30,
                                    filename_suffix=f".{os.getpid()}.{uuid.uuid4().hex[:8]}")


class MetricsLog:
  """TensorBoard event files (tensorboardX) plus DIR/metrics.jsonl; inert when disabled
  (processes other than 0).

  Args:
    logdir: the run's workdir (TensorBoard under DIR/tensorboard) or its eval directory.
    enabled: whether this process writes.
  """

  def __init__(self, logdir: str, enabled: bool):
    self.enabled = enabled
    self._writer = None
    if not enabled:
      return
    self._writer = _summary_writer(os.fspath(epath.Path(logdir) / "tensorboard"))
    self._jsonl = epath.Path(logdir) / "metrics.jsonl"
    # Object stores (gs://) cannot append: there the log is kept here and rewritten whole.
    self._rewrite = is_object_store(logdir)
    self._text = self._jsonl.read_text() if self._rewrite and self._jsonl.exists() else ""

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if not self.enabled:
      return
    for tag, value in values.items():
      self._writer.add_scalar(tag, float(value), int(step))
    line = json.dumps({"step": int(step), **{k: float(v) for k, v in values.items()}}) + "\n"
    if self._rewrite:
      self._text += line
      self._jsonl.write_text(self._text)
    else:
      with self._jsonl.open("a") as f:
        f.write(line)

  def image(self, step: int, tag: str, image_HxWxC: np.ndarray) -> None:
    """A uint8 image [H, W, C] (C = 1 or 3)."""
    if self.enabled:
      self._writer.add_image(tag, np.asarray(image_HxWxC), int(step), dataformats="HWC")

  def flush(self) -> None:
    if self.enabled:
      self._writer.flush()

  def close(self) -> None:
    if self.enabled:
      self._writer.close()
