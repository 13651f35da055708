"""Index-based, deterministic training input.

The examples of training step `s` are a pure function of `(seed, s)`:

  position p = s * global_batch + i            (i = 0 .. global_batch - 1)
  epoch      = p // num_examples
  example    = permutation(seed, epoch)[p % num_examples]
  flip       = bits(seed, s)[i]                (a fresh draw per step and batch position)

so a run restarted from a checkpoint at step `s` sees exactly the batches an uninterrupted run
would have, and nothing but the step needs storing. Each host reads only its own rows
`[row_start, row_stop)` of every global batch (the rows its devices hold) and hands them, as
uint8, to `parallel.global_batch`; conversion to [-1, 1] (x / 127.5 - 1) happens on device. A
class-conditional model's batches carry each example's label beside its image (int32, the same
rows), from the datasets in `DATASET_CLASSES`.

The batches are a grain `MapDataset` indexed by step (`batch_dataset`); `BatchIterator` starts it
at the resumed step by slicing and lets grain's prefetch threads (or worker processes) prepare the
next batches, which grain returns in step order, so timing never changes what a step sees.

Sources (all random access, no TensorFlow needed):
  * tfds datasets through `tfds.data_source` (ArrayRecord files): `cifar10`,
    `imagenet_resized/64x64`, `celeb_a_hq/256`, `lsun/bedroom`, `lsun/church_outdoor`,
    `lsun/cat`;
  * `folder`: every .png/.jpg/.jpeg under `data.image_dir` (center-cropped to a square, resized);
  * `digits`: scikit-learn's 8x8 handwritten digits, in memory, resized to `data.image_size`;
    split 'train' is the first 1,500 in sklearn's order, 'test' the last 297.
"""
from __future__ import annotations

import functools
import sys
from typing import Iterator

from absl import flags
import grain
import numpy as np
from PIL import Image

TFDS_DATASETS = ("cifar10", "imagenet_resized/64x64", "celeb_a_hq/256", "lsun/bedroom",
                 "lsun/church_outdoor", "lsun/cat")
DATASETS = TFDS_DATASETS + ("folder", "digits")
# The datasets with class labels, and how many (labels 0 .. K-1): what a class-conditional
# model (model.num_classes > 0) can train on.
DATASET_CLASSES = {"cifar10": 10, "imagenet_resized/64x64": 1000, "digits": 10}
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
  """Images held in memory, uint8 [N, H, W, C], with optional labels int [N]."""

  def __init__(self, images: np.ndarray, labels: np.ndarray | None = None):
    self.images = images
    self.labels = labels

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> np.ndarray:
    return self.images[index]

  def example(self, index: int) -> dict[str, np.ndarray]:
    """{'image': uint8 [H, W, C]} and 'label' (an int) when the source has labels."""
    out = {"image": self.images[index]}
    if self.labels is not None:
      out["label"] = self.labels[index]
    return out


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
    return self.example(index)["image"]

  def example(self, index: int) -> dict[str, np.ndarray]:
    """{'image': uint8 [size, size, C]} and 'label' when the dataset has one (one read)."""
    record = self.source[int(index)]
    out = {"image": to_square(np.asarray(record["image"], dtype=np.uint8), self.image_size)}
    if "label" in record:
      out["label"] = record["label"]
    return out


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

  def example(self, index: int) -> dict[str, np.ndarray]:
    """{'image': uint8 [size, size, C]} (image files carry no labels)."""
    return {"image": self[index]}


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
    return ArraySource(*digits_split(data_config.split, data_config.image_size))
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


def check_labels(data_config, num_classes: int) -> None:
  """Raises ValueError, saying what to set, when a class-conditional model (num_classes > 0)
  cannot get its labels from the dataset: one without labels, or with more classes."""
  if num_classes <= 0:
    return
  name = data_config.dataset
  classes = DATASET_CLASSES.get(name)
  if classes is None:
    raise ValueError(
        f"dataset {name!r} has no class labels, and model.num_classes={num_classes} asks for "
        f"them: set --config.model.num_classes=0 (unconditional) or use a dataset with labels "
        f"({', '.join(DATASET_CLASSES)})")
  if num_classes < classes:
    raise ValueError(
        f"dataset {name!r} has {classes} classes (labels 0..{classes - 1}), more than "
        f"model.num_classes={num_classes}: set --config.model.num_classes={classes}")


def check_batch_labels(labels: np.ndarray, num_classes: int) -> None:
  """Raises ValueError when a label falls outside 0 .. num_classes - 1."""
  bad = labels[(labels < 0) | (labels >= num_classes)]
  if bad.size:
    raise ValueError(f"label {int(bad[0])} is outside the model's classes 0..{num_classes - 1} "
                     f"(model.num_classes={num_classes}); set model.num_classes to the "
                     f"dataset's number of classes")


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
               random_flip: bool, num_classes: int = 0) -> dict[str, np.ndarray]:
  """This host's rows of the global batch of step `step`.

  Args:
    source: random access examples (`len()`, `source.example(i)` -> {'image': uint8
      [H, W, C], 'label'} or `source[i]` -> the image).
    seed: the run's seed.
    step: the training step (0-based).
    global_batch: examples per step over all hosts.
    rows: this host's rows of the global batch.
    random_flip: whether to mirror the rows `flip_mask` draws.
    num_classes: > 0 to read the labels too (each checked to be below it).

  Returns:
    {'image': uint8 [len(rows), H, W, C]} and, with num_classes > 0, 'label' int32 [len(rows)].
  """
  indices = example_indices(seed, step, global_batch, len(source), rows)
  batch = read_examples(source, indices, num_classes=num_classes)
  if random_flip:
    flips = flip_mask(seed, step, global_batch)[rows]
    batch["image"] = np.where(flips[:, None, None, None], batch["image"][:, :, ::-1],
                              batch["image"])
  return batch


def read_examples(source, indices, *, num_classes: int = 0) -> dict[str, np.ndarray]:
  """The examples of a source at these indices, stacked.

  Args:
    source: random access examples (`source.example(i)` -> {'image', 'label'?}, `source[i]`
      -> the image).
    indices: which examples.
    num_classes: > 0 to read the labels too, each checked to be below it.

  Returns:
    {'image': uint8 [n, H, W, C]} and, with num_classes > 0, 'label' int32 [n].
  """
  if num_classes <= 0:
    return {"image": np.stack([source[int(i)] for i in indices])}
  examples = [source.example(int(i)) for i in indices]
  if any("label" not in e for e in examples):
    raise ValueError("the dataset has no labels; a class-conditional model "
                     "(model.num_classes > 0) needs them")
  labels = np.asarray([e["label"] for e in examples], np.int32)
  check_batch_labels(labels, num_classes)
  return {"image": np.stack([e["image"] for e in examples]), "label": labels}


# How the batches are prepared ahead: grain's prefetch threads in this process, or grain's worker
# processes (`mp_prefetch`), each preparing every num_workers-th batch.
PARALLELISM = ("threads", "processes")

# The step datasets have no end; a MapDataset needs a length, and this one is never reached.
_NUM_STEPS = sys.maxsize


class _StepBatch:
  """Step -> this host's rows of that step's batch (a class: worker processes unpickle it)."""

  def __init__(self, source, seed: int, global_batch: int, rows: slice, random_flip: bool,
               num_classes: int):
    self.source = source
    self.kwargs = dict(seed=seed, global_batch=global_batch, rows=rows, random_flip=random_flip,
                       num_classes=num_classes)

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    return load_batch(self.source, step=int(step), **self.kwargs)


def batch_dataset(source, *, seed: int, global_batch: int, rows: slice,
                  random_flip: bool, num_classes: int = 0) -> grain.MapDataset:
  """The training batches as a grain dataset: element `s` is `load_batch(..., step=s)`.

  Nothing depends on the number of hosts: every host builds the same steps and reads its own
  `rows` of each, so the hosts' rows together are the global batch of one host.

  Args:
    source: random access images (`len()`, `source[i] -> uint8 [H, W, C]`).
    seed: the run's seed.
    global_batch: examples per step over all hosts.
    rows: this host's rows of every global batch.
    random_flip: whether to mirror the rows `flip_mask` draws.
    num_classes: > 0 to read the labels too.

  Returns:
    a `grain.MapDataset` of `load_batch` dicts, indexed by step, of (practically) unbounded
    length; start at step k with `dataset[k:]`.
  """
  return grain.MapDataset.range(_NUM_STEPS).map(
      _StepBatch(source, seed, global_batch, rows, random_flip, num_classes))


def check_parallelism(parallelism: str) -> None:
  """Raises ValueError naming the allowed ways of preparing batches ahead."""
  if parallelism not in PARALLELISM:
    raise ValueError(f"unknown parallelism {parallelism!r}; allowed: {', '.join(PARALLELISM)}")


class BatchIterator:
  """This host's rows of the batches of steps start, start+1, ..., prepared ahead by grain.

  Yields `(step, {'image': uint8 [rows, H, W, C], 'label'?})`. The batch of step `s` is
  `load_batch(..., step=s)`
  whatever the number of workers or the timing: grain prepares `num_workers` batches at once
  (each batch decoded in one worker) and hands them back in step order.
  """

  def __init__(self, source, *, seed: int, start_step: int, global_batch: int,
               rows: slice, random_flip: bool, num_workers: int = 8, prefetch: int = 2,
               parallelism: str = "threads", num_classes: int = 0):
    """Starts preparing batches from step `start_step`.

    Args:
      source: random access images (`len()`, `source[i] -> uint8 [H, W, C]`).
      seed: the run's seed.
      start_step: the first step yielded (a resumed run's step; nothing before it is read).
      global_batch: examples per step over all hosts.
      rows: this host's rows of every global batch.
      random_flip: whether to mirror the rows `flip_mask` draws.
      num_workers: batches prepared at once (threads, or worker processes).
      prefetch: batches held ready; raised to `num_workers` so that no worker waits for room.
      parallelism: 'threads' (grain's prefetch threads; the default, see docs/performance.md)
        or 'processes' (grain's `mp_prefetch` worker processes; the source must pickle).
      num_classes: > 0 to read the labels too (a class-conditional model's).
    """
    check_parallelism(parallelism)
    if num_workers < 1 or prefetch < 1:
      raise ValueError(f"num_workers={num_workers} and prefetch={prefetch}: set both "
                       "(config.data.num_workers, config.data.prefetch) to 1 or more")
    steps = batch_dataset(source, seed=seed, global_batch=global_batch, rows=rows,
                          random_flip=random_flip, num_classes=num_classes)[start_step:]
    buffered = max(prefetch, num_workers)
    if parallelism == "threads":
      dataset = steps.to_iter_dataset(grain.ReadOptions(num_threads=num_workers,
                                                        prefetch_buffer_size=buffered))
    else:
      # grain's worker processes read absl flags; outside an absl program (a script, a test)
      # their defaults apply.
      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
      # Each worker reads its own batches one at a time: no threads inside the workers.
      dataset = steps.to_iter_dataset(
          grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)).mp_prefetch(
              grain.MultiprocessingOptions(
                  num_workers=num_workers,
                  per_worker_buffer_size=max(1, -(-buffered // num_workers))))
    self._iterator = iter(dataset)
    self._step = start_step

  def __iter__(self) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    return self

  def __next__(self) -> tuple[int, dict[str, np.ndarray]]:
    batch = next(self._iterator)
    step, self._step = self._step, self._step + 1
    return step, batch

  def close(self) -> None:
    """Stops the prefetch threads or worker processes."""
    close = getattr(self._iterator, "close", None)
    if close is not None:
      close()
