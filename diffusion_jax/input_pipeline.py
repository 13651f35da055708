"""Index-based, deterministic training input.

The examples of training step `s` are a pure function of `(seed, s)`:

  position p = s * global_batch + i            (i = 0 .. global_batch - 1)
  epoch      = p // num_examples
  example    = permutation(seed, epoch)[p % num_examples]
  flip       = bits(seed, s)[i]                (a fresh draw per step and batch position)

so a run restarted from a checkpoint at step `s` sees exactly the batches an uninterrupted run
would have, and nothing but the step needs storing. Each host reads only its own rows
`[row_start, row_stop)` of every global batch (the rows its devices hold) and hands them, as
uint8, to `parallel.global_batch`; conversion to [-1, 1] (x / 127.5 - 1) happens on device.

Sources (all random access, no TensorFlow needed):
  * tfds datasets through `tfds.data_source` (ArrayRecord files): `cifar10`, `celeb_a_hq/256`,
    `lsun/bedroom`, `lsun/church_outdoor`, `lsun/cat`;
  * `folder`: every .png/.jpg/.jpeg under `data.image_dir` (center-cropped to a square, resized);
  * `digits`: scikit-learn's 8x8 handwritten digits, in memory, resized to `data.image_size`;
    split 'train' is the first 1,500 in sklearn's order, 'test' the last 297.
"""
from __future__ import annotations

import concurrent.futures
import functools
import queue
import threading
from typing import Iterator

import numpy as np
from PIL import Image

TFDS_DATASETS = ("cifar10", "celeb_a_hq/256", "lsun/bedroom", "lsun/church_outdoor", "lsun/cat")
DATASETS = TFDS_DATASETS + ("folder", "digits")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")

# Separate streams of randomness drawn from the same seed.
_PERMUTATION_STREAM = 0
_FLIP_STREAM = 1

_MANUAL_DOWNLOAD_HELP = {
    "celeb_a_hq/256": (
        "CelebA-HQ needs a manual download: build the 256x256 images with the progressive_gan "
        "scripts (see `tfds build celeb_a_hq --help` and the tfds catalog page for celeb_a_hq), "
        "place them in <data_dir>/downloads/manual, run `tfds build celeb_a_hq/256 "
        "--file_format=array_record --data_dir <data_dir>`, then set --config.data.data_dir"),
    "lsun": (
        "prepare LSUN once with `tfds build lsun/<category> --file_format=array_record "
        "--data_dir <data_dir>` (needs tensorflow for the build only), then set "
        "--config.data.data_dir"),
}


def check_dataset(name: str) -> None:
  """Raises ValueError naming the allowed datasets when `name` is not one of them."""
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")


def to_square(image: np.ndarray, size: int) -> np.ndarray:
  """Center-crops an HxWxC uint8 image to a square and resizes it to size x size (bicubic)."""
  h, w = image.shape[:2]
  if (h, w) == (size, size):
    return image
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  pil = Image.fromarray(image[top:top + side, left:left + side].squeeze(-1)
                        if image.shape[-1] == 1 else image[top:top + side, left:left + side])
  resample = Image.Resampling.BICUBIC if size > side else Image.Resampling.BOX
  out = np.asarray(pil.resize((size, size), resample=resample))
  return out[..., None] if out.ndim == 2 else out


class ArraySource:
  """Images held in memory, uint8 [N, H, W, C]."""

  def __init__(self, images: np.ndarray):
    self.images = images

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> np.ndarray:
    return self.images[index]


class TfdsSource:
  """A tfds dataset read by index through `tfds.data_source` (no TensorFlow needed)."""

  def __init__(self, name: str, split: str, data_dir: str | None, image_size: int):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    try:
      self.source = tfds.data_source(name, split=split, data_dir=data_dir or None)
    except Exception as e:  # tfds raises several types for a missing dataset.
      key = "lsun" if name.startswith("lsun") else name
      hint = _MANUAL_DOWNLOAD_HELP.get(
          key, f"prepare it with `tfds build {name} --file_format=array_record` or set "
               "--config.data.data_dir to where it is")
      raise FileNotFoundError(f"cannot open tfds dataset {name!r} split {split!r} "
                              f"(data_dir={data_dir or 'default'}): {e}\n{hint}") from e
    self.image_size = image_size

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> np.ndarray:
    image = np.asarray(self.source[int(index)]["image"], dtype=np.uint8)
    return to_square(image, self.image_size)


class FolderSource:
  """Every png/jpg under a directory (sorted paths, local or gs://), as size x size RGB."""

  def __init__(self, image_dir: str, image_size: int, channels: int):
    from etils import epath  # pylint: disable=g-import-not-at-top
    if not image_dir:
      raise ValueError("dataset 'folder' needs --config.data.image_dir (a directory of "
                       "png/jpg images), e.g. --config configs/folder.py:image_dir=/path")
    root = epath.Path(image_dir)
    if not root.is_dir():
      raise FileNotFoundError(f"data.image_dir {image_dir!r} is not a directory")
    self.paths = sorted(_image_files(root))
    if not self.paths:
      raise FileNotFoundError(f"no {'/'.join(IMAGE_EXTENSIONS)} images under {image_dir!r}")
    self.image_size = image_size
    self.mode = "L" if channels == 1 else "RGB"

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> np.ndarray:
    from etils import epath  # pylint: disable=g-import-not-at-top
    with epath.Path(self.paths[int(index)]).open("rb") as f:
      image = np.asarray(Image.open(f).convert(self.mode))
    if image.ndim == 2:
      image = image[..., None]
    return to_square(image, self.image_size)


def _image_files(directory):
  # Walks level by level (gs:// paths do not support recursive globs).
  out = []
  for path in directory.iterdir():
    if path.is_dir():
      out += _image_files(path)
    elif path.suffix.lower() in IMAGE_EXTENSIONS:
      out.append(str(path))
  return out


# sklearn's order, split once: the last 297 digits (all 10 classes, 27 to 33 each) are held out.
DIGITS_SPLITS = {"train": slice(0, 1500), "test": slice(1500, 1797)}


def check_digits_split(split: str) -> None:
  """Raises ValueError naming the allowed splits of dataset 'digits'."""
  if split not in DIGITS_SPLITS:
    raise ValueError(f"unknown split {split!r} for dataset 'digits'; allowed: "
                     f"{', '.join(DIGITS_SPLITS)}")


@functools.lru_cache(maxsize=1)
def _digits_native() -> tuple[np.ndarray, np.ndarray]:
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()  # images float64 [1797, 8, 8] in 0..16
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  return images, digits.target.astype(np.int64)


@functools.lru_cache(maxsize=4)
def load_digits(image_size: int) -> np.ndarray:
  """scikit-learn's 1,797 digits (values 0..16, 8x8) as uint8 [N, size, size, 1] in 0..255."""
  images, _ = _digits_native()
  out = [np.asarray(Image.fromarray(im).resize((image_size, image_size),
                                               Image.Resampling.BILINEAR)) for im in images]
  return np.stack(out)[..., None]


def digits_split(split: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """One split of the digits, as training and evaluation read it.

  Args:
    split: 'train' (the first 1,500 in sklearn's order) or 'test' (the last 297).
    image_size: side of the returned images (bilinear from the native 8x8).

  Returns:
    (images uint8 [n, size, size, 1] in 0..255, labels int64 [n] in 0..9).
  """
  check_digits_split(split)
  part = DIGITS_SPLITS[split]
  return load_digits(image_size)[part], _digits_native()[1][part]


def make_source(data_config):
  """The random-access source a data config asks for.

  Args:
    data_config: `config.data` (dataset, split, data_dir, image_dir, image_size, channels).

  Returns:
    an object with `len()` and `source[i] -> uint8 [image_size, image_size, channels]`.
  """
  check_data_config(data_config)
  name = data_config.dataset
  if name == "digits":
    return ArraySource(digits_split(data_config.split, data_config.image_size)[0])
  if name == "folder":
    return FolderSource(data_config.image_dir, data_config.image_size, data_config.channels)
  return TfdsSource(name, data_config.split, data_config.data_dir, data_config.image_size)


def check_data_config(data_config) -> None:
  """Raises ValueError, saying what to set, for a dataset the data config cannot read as given:
  an unknown dataset, a channel count the dataset does not have, an unknown digits split, a
  tfds data_dir in an object store."""
  name = data_config.dataset
  check_dataset(name)
  data_dir = data_config.get("data_dir") or ""
  if name not in ("digits", "folder") and "://" in data_dir:
    raise ValueError(
        f"data.data_dir={data_dir!r}: tfds datasets are read by index from ArrayRecord files, "
        f"whose reader opens local files only. Copy the prepared dataset onto each host's disk "
        f"(launch/prepare_data.sh --data-dir {data_dir} --steps workers copies it into "
        f"~/tensorflow_datasets) and leave --config.data.data_dir='' or set it to that folder")
  if name == "digits":
    if data_config.channels != 1:
      raise ValueError("dataset 'digits' is grayscale: set --config.data.channels=1")
    check_digits_split(data_config.split)
  elif name != "folder" and data_config.channels != 3:
    raise ValueError(f"dataset {name!r} has 3 channels: set --config.data.channels=3")


@functools.lru_cache(maxsize=2)
def _permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  rng = np.random.Generator(np.random.PCG64([seed, _PERMUTATION_STREAM, epoch]))
  return rng.permutation(num_examples)


def example_indices(seed: int, step: int, global_batch: int, num_examples: int,
                    rows: slice | None = None) -> np.ndarray:
  """Dataset indices of the examples of training step `step` (all, or the given rows).

  Args:
    seed: the run's seed.
    step: the training step (0-based).
    global_batch: examples per step over all hosts.
    num_examples: dataset size.
    rows: which rows of the global batch to return (default all).

  Returns:
    int64 [len(rows)] indices into the source.
  """
  positions = step * global_batch + np.arange(global_batch, dtype=np.int64)
  if rows is not None:
    positions = positions[rows]
  epochs = positions // num_examples
  out = np.empty_like(positions)
  for epoch in np.unique(epochs):
    mask = epochs == epoch
    out[mask] = _permutation(seed, int(epoch), num_examples)[positions[mask] % num_examples]
  return out


def flip_mask(seed: int, step: int, global_batch: int) -> np.ndarray:
  """bool [global_batch]: which rows of step `step` are mirrored (probability 1/2 each)."""
  rng = np.random.Generator(np.random.PCG64([seed, _FLIP_STREAM, step]))
  return rng.integers(0, 2, size=global_batch).astype(bool)


def load_batch(source, *, seed: int, step: int, global_batch: int, rows: slice,
               random_flip: bool, pool: concurrent.futures.Executor | None = None
               ) -> np.ndarray:
  """This host's rows of the global batch of step `step`, uint8 [rows, H, W, C]."""
  indices = example_indices(seed, step, global_batch, len(source), rows)
  fetch = pool.map if pool is not None else map
  images = np.stack(list(fetch(source.__getitem__, indices)))
  if random_flip:
    flips = flip_mask(seed, step, global_batch)[rows]
    images = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
  return images


class BatchIterator:
  """Prefetching iterator over this host's rows of the batches of steps start, start+1, ...

  Yields `(step, uint8 [rows, H, W, C])`. Batches are prepared ahead by a background thread
  (examples decoded by `num_workers` threads); the content never depends on timing.
  """

  def __init__(self, source, *, seed: int, start_step: int, global_batch: int,
               rows: slice, random_flip: bool, num_workers: int = 8, prefetch: int = 2):
    self._kwargs = dict(seed=seed, global_batch=global_batch, rows=rows,
                        random_flip=random_flip)
    self._source = source
    self._pool = (concurrent.futures.ThreadPoolExecutor(num_workers)
                  if num_workers > 1 and not isinstance(source, ArraySource) else None)
    self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._produce, args=(start_step,), daemon=True)
    self._thread.start()

  def _produce(self, step: int) -> None:
    try:
      while not self._stop.is_set():
        batch = load_batch(self._source, step=step, pool=self._pool, **self._kwargs)
        while not self._stop.is_set():
          try:
            self._queue.put((step, batch), timeout=0.1)
            break
          except queue.Full:
            continue
        step += 1
    except BaseException as e:  # handed to the consumer
      self._queue.put((None, e))

  def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
    return self

  def __next__(self) -> tuple[int, np.ndarray]:
    step, batch = self._queue.get()
    if step is None:
      raise batch
    return step, batch

  def close(self) -> None:
    self._stop.set()
    self._thread.join(timeout=5)
    if self._pool is not None:
      self._pool.shutdown(wait=False, cancel_futures=True)

