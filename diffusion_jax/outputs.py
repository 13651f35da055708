"""What runs leave in their workdir besides checkpoints: metric logs and whole files.

Every file is written under a temporary name and renamed into place, so a reader (a watcher, a
restarted run, a user) never sees a partial file under the final name.
"""
from __future__ import annotations

import io
import json
import os
import time
import uuid

import numpy as np
from etils import epath


def write_atomically(path: epath.Path | str, data: bytes) -> epath.Path:
  """Writes `data` under a temporary name unique to this call, then renames it to `path`
  (parents made): writers racing for one file (processes caching the same statistics) never
  read or clobber half a file. Returns the path."""
  path = epath.Path(path)
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


class _EventWriter:
  """TensorBoard scalars and images written with the `tensorboard` package alone.

  Used when clu's writer is unavailable (clu.metric_writers imports TensorFlow).
  """

  def __init__(self, logdir: str):
    from tensorboard.summary.writer import event_file_writer  # pylint: disable=g-import-not-at-top
    epath.Path(logdir).mkdir(parents=True, exist_ok=True)
    self._writer = event_file_writer.EventFileWriter(logdir)

  def _add(self, step, values):
    from tensorboard.compat.proto import event_pb2, summary_pb2  # pylint: disable=g-import-not-at-top
    self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                           summary=summary_pb2.Summary(value=values)))

  def write_scalars(self, step, scalars):
    from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top
    self._add(step, [summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                     for k, v in scalars.items()])

  def write_images(self, step, images):
    from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top
    from diffusion_jax import images as images_lib  # pylint: disable=g-import-not-at-top
    values = []
    for tag, image in images.items():
      image = np.asarray(image)
      if image.ndim == 4:
        image = image[0]
      values.append(summary_pb2.Summary.Value(tag=tag, image=summary_pb2.Summary.Image(
          height=image.shape[0], width=image.shape[1], colorspace=image.shape[-1],
          encoded_image_string=images_lib.encode_png(image))))
    self._add(step, values)

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


class MetricsLog:
  """TensorBoard (clu when it can be imported) plus DIR/metrics.jsonl; inert when disabled
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
    tensorboard_dir = str(epath.Path(logdir) / "tensorboard")
    try:
      from clu import metric_writers  # pylint: disable=g-import-not-at-top
      self._writer = metric_writers.SummaryWriter(tensorboard_dir)
    except ImportError:
      self._writer = _EventWriter(tensorboard_dir)
    self._jsonl = epath.Path(logdir) / "metrics.jsonl"

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._writer.write_scalars(step, values)
    with self._jsonl.open("a") as f:
      f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in values.items()}}) + "\n")

  def image(self, step: int, tag: str, image_HxWxC: np.ndarray) -> None:
    if self.enabled:
      self._writer.write_images(step, {tag: image_HxWxC[None]})

  def flush(self) -> None:
    if self.enabled:
      self._writer.flush()

  def close(self) -> None:
    if self.enabled:
      self._writer.close()
