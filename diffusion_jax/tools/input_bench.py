"""Benchmark: images per second the training input delivers on one host.

  python -m diffusion_jax.tools.input_bench --cache_dir /tmp/input_bench
  python -m diffusion_jax.tools.input_bench --num_images 2000 --steps 20     # a quick run

Builds two CIFAR-shaped data sets of random 32x32x3 uint8 images (once; kept in `--cache_dir`
when given, else in a temporary directory removed at the end):
  * `array_record`: a tfds dataset written by a small tfds builder in the ArrayRecord file format
    (PNG-encoded images, as tfds stores cifar10), read through `input_pipeline.TfdsSource`, the
    class training uses for cifar10 (`tfds.data_source`);
  * `png_folder`: one PNG file per image, read through `input_pipeline.FolderSource`.
Writing the ArrayRecord data set needs TensorFlow (`pip install -e ".[tf]"`); without it the
benchmark says so in one line and measures the PNG folder alone (asking for `array_record` alone
is refused). Each is read through `input_pipeline.BatchIterator`, as train.py reads it, for every
parallelism and worker count asked for, one host holding all rows of the global batch. Prints
one JSON line per case; `images_per_s` counts batches after `--warmup` untimed ones. The paper
trained CIFAR-10 on a TPU v3-8 at about 21 steps/s of 128 images: 2,688 images/s for its one
host (`paper_images_per_s`). A mistake in the flags ends it with one `error:` line, exit status 2.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import platform
import shutil
import tempfile
import time
import types
from typing import Sequence

import numpy as np
from absl import flags
from PIL import Image

from diffusion_jax import cli
from diffusion_jax.data import input_pipeline

PAPER_STEPS_PER_S = 21  # Ho et al. 2020, CIFAR-10 on a TPU v3-8.
PAPER_BATCH = 128
SOURCES = ("array_record", "png_folder")
_TFDS_NAME = "random_cifar_shaped"
_IMAGE_SHAPE = (32, 32, 3)


_PROG = "python -m diffusion_jax.tools.input_bench"


def _define_flags(values: flags.FlagValues, argv: list[str]) -> None:
  """The benchmark's flags, into `values`."""
  del argv  # no config flag
  flags.DEFINE_integer("num_images", 50_000, "Images in each data set (CIFAR-10 has 50,000).",
                       flag_values=values)
  flags.DEFINE_string("cache_dir", None, "Where the data sets are built and kept between runs "
                      "(default: a temporary directory, removed at the end).", flag_values=values)
  flags.DEFINE_list("sources", list(SOURCES), f"Data sets to read: {', '.join(SOURCES)}.",
                    flag_values=values)
  flags.DEFINE_list("parallelism", ["threads"], "Ways of preparing batches: "
                    f"{', '.join(input_pipeline.PARALLELISM)}.", flag_values=values)
  flags.DEFINE_list("workers", ["1", "2"], "Worker counts.", flag_values=values)
  flags.DEFINE_integer("global_batch", PAPER_BATCH, "Images per batch.", flag_values=values)
  flags.DEFINE_integer("steps", 100, "Timed batches per case.", flag_values=values)
  flags.DEFINE_integer("warmup", 5, "Untimed batches first.", flag_values=values)
  flags.DEFINE_integer("prefetch", 2, "As config.data.prefetch.", flag_values=values)


def _parse(argv: Sequence[str] | None):
  """The cases asked for by `argv` (default: the command line): a namespace of the flags, with
  `workers` as numbers and the sources this machine can build. Mistakes end the program with one
  `error:` line, exit 2."""
  values = cli.parse_own_flags(_define_flags, argv, prog=_PROG, doc=__doc__)
  args = types.SimpleNamespace(**values.flag_values_dict())
  for name in args.sources:
    if name not in SOURCES:
      cli.exit_with_error(f"--sources: unknown source {name!r}; allowed: {', '.join(SOURCES)}")
  if "array_record" in args.sources and not tensorflow_installed():
    if args.sources == ["array_record"]:
      cli.exit_with_error(f"--sources array_record: {_NEEDS_TENSORFLOW}")
    args.sources.remove("array_record")
    print(f"[input_bench] skipping array_record: {_NEEDS_TENSORFLOW}", flush=True)
  for name in args.parallelism:
    try:
      input_pipeline.check_parallelism(name)
    except ValueError as e:
      cli.exit_with_error(f"--parallelism: {e}")
  try:
    args.workers = [int(w) for w in args.workers]
  except ValueError:
    cli.exit_with_error(f"--workers: want whole numbers, e.g. 1,2; got {','.join(args.workers)}")
  return args


_NEEDS_TENSORFLOW = ('writing the tfds ArrayRecord data set needs TensorFlow, which is not '
                     'installed: pip install -e ".[tf]"')


def tensorflow_installed() -> bool:
  """Whether TensorFlow can be imported (without importing it: that takes seconds)."""
  try:
    return importlib.util.find_spec("tensorflow") is not None
  except (ImportError, ValueError):  # a broken install, or a module set to None in sys.modules
    return False


def _random_images(num_images: int):
  # Fixed content, so a cached data set and a fresh one hold the same images.
  rng = np.random.default_rng(0)
  for _ in range(num_images):
    yield rng.integers(0, 256, _IMAGE_SHAPE, dtype=np.uint8)


def build_array_record(data_dir: pathlib.Path, num_images: int) -> None:
  """Writes `num_images` random images as tfds dataset `random_cifar_shaped` (split 'train').

  Args:
    data_dir: the tfds data_dir to write into.
    num_images: how many images.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  # Not registered: tfds.data_source then reads it from data_dir, as a prepared cifar10 is read.
  with tfds.core.registered.skip_registration():

    class RandomCifarShaped(tfds.core.GeneratorBasedBuilder):
      """Random CIFAR-shaped images, stored as tfds stores cifar10."""
      name = _TFDS_NAME
      VERSION = tfds.core.Version("1.0.0")
      RELEASE_NOTES = {"1.0.0": "Random images for the input benchmark."}
      # No checksums file or metadata beside the code: without this tfds looks for them through
      # the importlib_resources package, which it does not require (and is not installed).
      code_path = None

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"image": tfds.features.Image(shape=_IMAGE_SHAPE)}))

      def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

      def _generate_examples(self):
        for i, image in enumerate(_random_images(num_images)):
          yield i, {"image": image}

  builder = RandomCifarShaped(data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare()


def build_png_folder(image_dir: pathlib.Path, num_images: int) -> None:
  """Writes `num_images` random images as PNG files into `image_dir`."""
  image_dir.mkdir(parents=True, exist_ok=True)
  for i, image in enumerate(_random_images(num_images)):
    Image.fromarray(image).save(image_dir / f"{i:06d}.png")


def _prepared(root: pathlib.Path, name: str, num_images: int, build) -> pathlib.Path:
  # A marker written last: a build cut short is rebuilt rather than read.
  path = root / f"{name}_{num_images}"
  if not (path / "complete").exists():
    shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    build(path, num_images)
    (path / "complete").write_text("")
    print(f"[input_bench] built {name} ({num_images:,} images) in "
          f"{time.perf_counter() - t0:.1f} s at {path}", flush=True)
  return path


def make_source(root: pathlib.Path, name: str, num_images: int):
  """The benchmark's data set `name`, built under `root` if it is not there yet."""
  if name == "array_record":
    path = _prepared(root, name, num_images, build_array_record)
    source = input_pipeline.TfdsSource(_TFDS_NAME, "train", str(path), _IMAGE_SHAPE[0])
  else:
    path = _prepared(root, name, num_images, build_png_folder)
    source = input_pipeline.FolderSource(str(path), _IMAGE_SHAPE[0], _IMAGE_SHAPE[2])
  assert len(source) == num_images, (len(source), num_images)
  return source


def measure(source, *, parallelism: str, num_workers: int, global_batch: int, steps: int,
            warmup: int, prefetch: int) -> dict:
  """Reads `warmup + steps` batches through BatchIterator; times the last `steps`.

  Returns:
    startup_s (until the first batch), steps_per_s and images_per_s (of the timed batches).
  """
  t0 = time.perf_counter()
  batches = input_pipeline.BatchIterator(
      source, seed=0, start_step=0, global_batch=global_batch, rows=slice(0, global_batch),
      random_flip=True, num_workers=num_workers, prefetch=prefetch, parallelism=parallelism)
  try:
    next(batches)
    startup_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
      next(batches)
    t1 = time.perf_counter()
    for _ in range(steps):
      _, batch = next(batches)
    elapsed = time.perf_counter() - t1
  finally:
    batches.close()
  images = batch["image"]
  assert images.shape == (global_batch,) + _IMAGE_SHAPE and images.dtype == np.uint8
  return dict(startup_s=round(startup_s, 3), steps_per_s=round(steps / elapsed, 2),
              images_per_s=round(steps * global_batch / elapsed, 1))


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


@cli.reports_errors()
def main(argv: Sequence[str] | None = None) -> list[dict]:
  """The command line: runs every case `argv` (default: `sys.argv[1:]`) asks for and prints one
  JSON line each. Mistakes end it with one `error:` line, exit 2.

  Returns:
    the printed records.
  """
  args = _parse(argv)
  temporary = None if args.cache_dir else tempfile.mkdtemp(prefix="input_bench_")
  root = pathlib.Path(args.cache_dir or temporary)
  records = []
  try:
    for source_name in args.sources:
      source = make_source(root, source_name, args.num_images)
      for parallelism in args.parallelism:
        for workers in args.workers:
          result = measure(source, parallelism=parallelism, num_workers=workers,
                           global_batch=args.global_batch, steps=args.steps,
                           warmup=max(1, args.warmup), prefetch=args.prefetch)
          paper = PAPER_STEPS_PER_S * PAPER_BATCH
          record = dict(
              source=source_name, parallelism=parallelism, num_workers=workers,
              num_images=args.num_images, global_batch=args.global_batch, hosts=1,
              steps=args.steps, **result, paper_images_per_s=paper,
              fraction_of_paper=round(result["images_per_s"] / paper, 3),
              cpu=_cpu_model(), cpus=os.cpu_count(),
              load_average=[round(x, 2) for x in os.getloadavg()])
          print(json.dumps(record), flush=True)
          records.append(record)
  finally:
    if temporary:
      shutil.rmtree(temporary, ignore_errors=True)
  return records


if __name__ == "__main__":
  main()
