"""Input pipeline: determinism by (seed, step), host slicing, grain workers, sources, errors,
and the input benchmark."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from diffusion_jax.config import checks as config_checks
from diffusion_jax.config import config_lib
from diffusion_jax.data import input_pipeline
from diffusion_jax import parallel
from diffusion_jax.tools import input_bench



def load_config(name, arg=None):
  return config_lib.load_config(f"configs/{name}.py" + (f":{arg}" if arg else ""))


def test_indices_cover_each_epoch_once_and_depend_only_on_seed_and_step():
  n, batch = 10, 4
  first_epoch = np.concatenate([input_pipeline.example_indices(0, s, batch, n) for s in range(3)])
  # Steps 0, 1 and the first half of step 2 are epoch 0: a permutation of 0..9.
  assert sorted(first_epoch[:10]) == list(range(10))
  again = input_pipeline.example_indices(0, 2, batch, n)
  np.testing.assert_array_equal(again, first_epoch[8:])
  assert not np.array_equal(input_pipeline.example_indices(1, 0, batch, n), first_epoch[:4])


def test_row_slices_concatenate_to_the_global_batch():
  full = input_pipeline.example_indices(3, 7, 8, 100)
  parts = [input_pipeline.example_indices(3, 7, 8, 100, slice(i, i + 4)) for i in (0, 4)]
  np.testing.assert_array_equal(np.concatenate(parts), full)
  source = input_pipeline.ArraySource(np.arange(100 * 4, dtype=np.uint8).reshape(100, 2, 2, 1))
  kwargs = dict(seed=3, step=7, global_batch=8, random_flip=True)
  whole = input_pipeline.load_batch(source, rows=slice(0, 8), **kwargs)
  halves = [input_pipeline.load_batch(source, rows=slice(i, i + 4), **kwargs) for i in (0, 4)]
  np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]), whole["image"])
  assert set(whole) == {"image"}  # no labels asked for


def test_contiguous_rows_merges_device_ranges_or_says_they_are_not_contiguous():
  # A host's devices hold adjacent row ranges, in any order; replicated devices repeat one.
  assert parallel.contiguous_rows([(8, 12), (4, 8), (4, 8)]) == slice(4, 12)
  assert parallel.contiguous_rows([(0, 16)]) == slice(0, 16)
  with pytest.raises(ValueError, match="not contiguous"):
    parallel.contiguous_rows([(0, 4), (8, 12)])


def test_flips_mirror_exactly_the_drawn_rows():
  images = np.arange(6 * 2 * 3, dtype=np.uint8).reshape(6, 2, 3, 1)
  source = input_pipeline.ArraySource(images)
  out = input_pipeline.load_batch(source, seed=0, step=5, global_batch=6, rows=slice(0, 6),
                                  random_flip=True)["image"]
  idx = input_pipeline.example_indices(0, 5, 6, 6)
  flips = input_pipeline.flip_mask(0, 5, 6)
  for row in range(6):
    want = images[idx[row]][:, ::-1] if flips[row] else images[idx[row]]
    np.testing.assert_array_equal(out[row], want)


def test_batch_iterator_resumes_at_any_step():
  source = input_pipeline.ArraySource(np.arange(50, dtype=np.uint8).reshape(50, 1, 1, 1))
  kwargs = dict(seed=1, global_batch=8, rows=slice(0, 8), random_flip=False, num_workers=1)
  it = input_pipeline.BatchIterator(source, start_step=0, **kwargs)
  straight = [next(it) for _ in range(9)]
  it.close()
  it = input_pipeline.BatchIterator(source, start_step=6, **kwargs)
  resumed = [next(it) for _ in range(3)]
  it.close()
  for (s1, b1), (s2, b2) in zip(straight[6:], resumed):
    assert s1 == s2
    np.testing.assert_array_equal(b1["image"], b2["image"])


def _numbered_source(n=40):
  # Every pixel differs between examples and between mirrored columns, so any wrong example,
  # row or flip shows; so does any wrong label (example i's is i mod 7).
  images = np.arange(n * 2 * 3, dtype=np.uint8).reshape(n, 2, 3, 1)
  return input_pipeline.ArraySource(images, np.arange(n) % 7)


def _assert_batches_equal(got, want):
  assert set(got) == set(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name])


def test_batch_dataset_element_s_is_the_batch_of_step_s():
  source = _numbered_source()
  kwargs = dict(seed=4, global_batch=8, rows=slice(2, 6), random_flip=True, num_classes=7)
  dataset = input_pipeline.batch_dataset(source, **kwargs)
  resumed = dataset[7:]
  for step in (0, 5, 7, 12):
    want = input_pipeline.load_batch(source, step=step, **kwargs)
    _assert_batches_equal(dataset[step], want)
  _assert_batches_equal(resumed[3], input_pipeline.load_batch(source, step=10, **kwargs))


@pytest.mark.parametrize("rows", [slice(0, 8), slice(0, 4), slice(4, 8), slice(2, 6)])
def test_grain_iterator_yields_load_batch_whatever_the_workers(rows):
  source = _numbered_source()
  kwargs = dict(seed=2, global_batch=8, rows=rows, random_flip=True, num_classes=7)
  start, count = 5, 7  # steps 5..11 cross the epoch boundary at step 5 (40 examples / 8)
  want = [input_pipeline.load_batch(source, step=s, **kwargs)
          for s in range(start, start + count)]
  for num_workers, prefetch in ((1, 1), (3, 2), (4, 8)):
    it = input_pipeline.BatchIterator(source, start_step=start, num_workers=num_workers,
                                      prefetch=prefetch, **kwargs)
    got = [next(it) for _ in range(count)]
    it.close()
    assert [s for s, _ in got] == list(range(start, start + count))
    for (_, batch), expected in zip(got, want):
      _assert_batches_equal(batch, expected)


def test_hosts_rows_from_grain_make_the_one_host_batch():
  source = _numbered_source()
  kwargs = dict(seed=9, start_step=3, global_batch=8, random_flip=True, num_workers=2,
                num_classes=7)
  one_host = input_pipeline.BatchIterator(source, rows=slice(0, 8), **kwargs)
  hosts = [input_pipeline.BatchIterator(source, rows=slice(i, i + 2), **kwargs)
           for i in range(0, 8, 2)]
  for _ in range(4):
    step, whole = next(one_host)
    parts = [next(host) for host in hosts]
    assert {s for s, _ in parts} == {step}
    for name in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([b[name] for _, b in parts]), whole[name])
  for it in [one_host] + hosts:
    it.close()


@pytest.mark.slow  # starts grain's worker processes
def test_grain_worker_processes_yield_the_same_batches():
  source = _numbered_source()
  kwargs = dict(seed=2, start_step=4, global_batch=8, rows=slice(2, 6), random_flip=True,
                num_classes=7)
  it = input_pipeline.BatchIterator(source, num_workers=2, parallelism="processes", **kwargs)
  got = [next(it) for _ in range(5)]
  it.close()
  for step, batch in got:
    _assert_batches_equal(batch, input_pipeline.load_batch(
        source, step=step, **{k: v for k, v in kwargs.items() if k != "start_step"}))
  assert [s for s, _ in got] == list(range(4, 9))


def test_batch_iterator_refuses_unknown_parallelism_and_zero_workers():
  source = _numbered_source()
  kwargs = dict(seed=0, start_step=0, global_batch=8, rows=slice(0, 8), random_flip=False)
  with pytest.raises(ValueError, match="allowed: threads, processes"):
    input_pipeline.BatchIterator(source, parallelism="fibers", **kwargs)
  with pytest.raises(ValueError, match="config.data.num_workers"):
    input_pipeline.BatchIterator(source, num_workers=0, **kwargs)


@pytest.mark.slow  # builds the benchmark's data sets
def test_input_benchmark_prints_one_json_record_per_case(tmp_path, capsys):
  argv = ["--num_images", "256", "--cache_dir", str(tmp_path), "--steps", "2", "--warmup", "1",
          "--workers", "1,2"]
  records = input_bench.main(argv)
  lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
  assert [json.loads(l) for l in lines] == records
  assert [(r["source"], r["num_workers"]) for r in records] == [
      ("array_record", 1), ("array_record", 2), ("png_folder", 1), ("png_folder", 2)]
  for record in records:
    assert record["parallelism"] == "threads" and record["global_batch"] == 128
    assert record["num_images"] == 256 and record["hosts"] == 1
    assert record["images_per_s"] > 0 and record["paper_images_per_s"] == 21 * 128
    assert record["fraction_of_paper"] == pytest.approx(record["images_per_s"] / 2688, abs=1e-3)
    assert record["cpus"] >= 1 and len(record["load_average"]) == 3 and record["cpu"]
  # A second run reads the data sets built by the first.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["array_record_256", "png_folder_256"]
  assert input_bench.main(argv[:4] + ["--sources", "png_folder", "--workers", "1",
                                      "--steps", "1"])[0]["num_images"] == 256


def _input_bench_without_tensorflow(tmp_path, *argv):
  """Runs input_bench in a fresh interpreter where `import tensorflow` fails, as on the base
  install."""
  code = ("import sys; sys.modules['tensorflow'] = None\n"
          "from diffusion_jax import input_bench\n"
          f"input_bench.main({list(argv)!r})\n")
  return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                        text=True, timeout=300, check=False)


@pytest.mark.slow  # builds the benchmark's data sets
def test_input_benchmark_without_tensorflow_measures_the_png_folder_and_says_why(tmp_path):
  quick = ["--num_images", "64", "--cache_dir", str(tmp_path), "--steps", "1", "--warmup", "1",
           "--workers", "1", "--global_batch", "8"]
  run = _input_bench_without_tensorflow(tmp_path, *quick)
  assert run.returncode == 0, run.stderr
  assert "Traceback" not in run.stderr
  skipped = [l for l in run.stdout.splitlines() if "skipping array_record" in l]
  assert len(skipped) == 1 and 'pip install -e ".[tf]"' in skipped[0]
  records = [json.loads(l) for l in run.stdout.splitlines() if l.startswith("{")]
  assert [r["source"] for r in records] == ["png_folder"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["png_folder_64"]

  # Asked for alone, the ArrayRecord case is refused in one line, before anything is built.
  refused = _input_bench_without_tensorflow(tmp_path, *quick, "--sources", "array_record")
  assert refused.returncode == 2
  assert refused.stderr.strip().splitlines()[-1].endswith('pip install -e ".[tf]"')
  assert "Traceback" not in refused.stderr


def test_cifar10_through_tfds_data_source_mock():
  config = load_config("test")
  with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
    source = input_pipeline.make_source(config.data)
    assert len(source) == 20
    batch = input_pipeline.load_batch(source, seed=0, step=0, global_batch=4,
                                      rows=slice(0, 4), random_flip=True, num_classes=10)
  assert batch["image"].shape == (4, 8, 8, 3) and batch["image"].dtype == np.uint8
  # cifar10's labels come with the images, read in the same record.
  assert batch["label"].dtype == np.int32 and batch["label"].shape == (4,)
  assert np.all((batch["label"] >= 0) & (batch["label"] < 10))


def test_digits_source_reads_the_train_split():
  config = load_config("digits")
  assert config.data.split == "train"
  source = input_pipeline.make_source(config.data)
  assert len(source) == 1500
  image, size = source[0], config.data.image_size
  assert image.shape == (size, size, 1) and image.dtype == np.uint8 and image.max() > 200
  config.data.split = "test"
  test = input_pipeline.make_source(config.data)
  assert len(test) == 297
  np.testing.assert_array_equal(test[0], input_pipeline.load_digits(size)[1500])


def test_digits_batches_carry_each_images_label():
  config = load_config("digits")
  source = input_pipeline.make_source(config.data)
  images, labels = input_pipeline.digits_split("train", config.data.image_size)
  kwargs = dict(seed=3, step=11, global_batch=16, rows=slice(4, 12), random_flip=False)
  batch = input_pipeline.load_batch(source, num_classes=10, **kwargs)
  indices = input_pipeline.example_indices(3, 11, 16, len(source), slice(4, 12))
  np.testing.assert_array_equal(batch["label"], labels[indices])
  np.testing.assert_array_equal(batch["image"], images[indices])
  unlabelled = input_pipeline.load_batch(source, **kwargs)
  np.testing.assert_array_equal(batch["image"], unlabelled["image"])


def test_imagenet64_through_tfds_data_source_mock():
  config = load_config("imagenet64_iddpm", "variant=cond")
  assert (config.data.dataset, config.model.num_classes) == ("imagenet_resized/64x64", 1000)
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    source = input_pipeline.make_source(config.data)
    batch = input_pipeline.load_batch(source, seed=0, step=0, global_batch=6,
                                      rows=slice(0, 6), random_flip=True, num_classes=1000)
  assert batch["image"].shape == (6, 64, 64, 3)
  assert np.all((batch["label"] >= 0) & (batch["label"] < 1000))


def test_labels_a_dataset_cannot_give_are_refused(tmp_path):
  lsun = load_config("lsun_bedroom")
  with pytest.raises(ValueError, match=r"'lsun/bedroom' has no class labels.*"
                                       r"--config.model.num_classes=0"):
    input_pipeline.check_labels(lsun.data, 10)
  input_pipeline.check_labels(lsun.data, 0)
  cifar = load_config("cifar10")
  with pytest.raises(ValueError, match=r"10 classes \(labels 0..9\).*num_classes=5: set "
                                       r"--config.model.num_classes=10"):
    input_pipeline.check_labels(cifar.data, 5)
  input_pipeline.check_labels(cifar.data, 10)
  with pytest.raises(ValueError, match="label 7 is outside the model's classes 0..4"):
    input_pipeline.check_batch_labels(np.array([1, 7, 3]), 5)
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
  folder = input_pipeline.make_source(load_config("folder", f"image_dir={tmp_path}").data)
  with pytest.raises(ValueError, match="has no labels"):
    input_pipeline.load_batch(folder, seed=0, step=0, global_batch=1, rows=slice(0, 1),
                              random_flip=False, num_classes=3)


def test_digits_splits_are_disjoint_and_hold_every_class():
  train_images, train_labels = input_pipeline.digits_split("train", 8)
  test_images, test_labels = input_pipeline.digits_split("test", 8)
  assert (len(train_images), len(test_images)) == (1500, 297)
  assert len(train_labels) == 1500 and len(test_labels) == 297
  from sklearn import datasets  # the labels are sklearn's, in sklearn's order
  np.testing.assert_array_equal(np.concatenate([train_labels, test_labels]),
                                datasets.load_digits().target)
  assert set(train_labels) == set(test_labels) == set(range(10))
  assert min(np.bincount(test_labels)) >= 20
  # No test image is a copy of a training image (sklearn's digits hold no duplicates).
  train_rows = {im.tobytes() for im in train_images}
  assert not any(im.tobytes() in train_rows for im in test_images)
  # The native size is the 0..16 data scaled to 0..255, unchanged by the resize.
  np.testing.assert_array_equal(
      test_images[..., 0], np.round(datasets.load_digits().images[1500:] * 255 / 16))


def test_digits_unknown_split_lists_allowed():
  config = load_config("digits")
  config.data.split = "validation"
  with pytest.raises(ValueError, match="'validation'.*allowed: train, test"):
    input_pipeline.make_source(config.data)
  with pytest.raises(ValueError, match="allowed: train, test"):
    input_pipeline.digits_split("all", 16)


def test_folder_source_center_crops_and_resizes(tmp_path):
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(tmp_path / "a.png")
  (tmp_path / "sub").mkdir()
  Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(tmp_path / "sub/b.jpg")
  (tmp_path / "notes.txt").write_text("not an image")
  config = load_config("folder", f"image_dir={tmp_path},image_size=8")
  source = input_pipeline.make_source(config.data)
  assert len(source) == 2
  assert source[0].shape == (8, 8, 3) and source[1].shape == (8, 8, 3)


def test_folder_errors(tmp_path):
  config = load_config("folder", "image_size=8")
  with pytest.raises(ValueError, match="image_dir"):
    input_pipeline.make_source(config.data)
  config.data.image_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match="no .*images"):
    input_pipeline.make_source(config.data)


def test_unknown_dataset_lists_allowed():
  config = load_config("test")
  config.data.dataset = "mnist"
  with pytest.raises(ValueError, match="allowed: cifar10, imagenet_resized/64x64, celeb_a_hq"):
    input_pipeline.make_source(config.data)


def test_missing_manual_dataset_says_how(tmp_path):
  config = load_config("celebahq256")
  config.data.data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match="manual download"):
    input_pipeline.make_source(config.data)


def test_tfds_data_dir_in_cloud_storage_is_refused_before_reading():
  config = load_config("cifar10")
  config.data.data_dir = "gs://bucket/tfds"
  with pytest.raises(ValueError, match=r"opens local files only.*launch/prepare_data.sh "
                                       r"--data-dir gs://bucket/tfds --steps workers"):
    input_pipeline.make_source(config.data)
  config.data.data_dir = ""
  input_pipeline.check_data_config(config.data)  # the default (~/tensorflow_datasets) is fine


@pytest.mark.parametrize("name", ["cifar10", "celebahq256", "lsun_bedroom", "lsun_church",
                                  "lsun_cat", "large_256", "folder", "digits", "test"])
def test_configs_load_and_reject_unknown_values(name):
  config = load_config(name, "var_type=fixedsmall")
  assert config.diffusion.var_type == "fixedsmall"
  learned = load_config(name, "var_type=learned,loss_type=kl")
  assert (learned.diffusion.var_type, learned.diffusion.loss_type) == ("learned", "kl")
  config_checks.check_diffusion(learned)
  # A learned variance alone keeps the mse loss, which the checks refuse with what to set.
  with pytest.raises(config_checks.ConfigError,
                     match=r"set --config.diffusion.loss_type=kl\|rescaled_kl\|hybrid, "):
    config_checks.check_diffusion(load_config(name, "var_type=learned"))
  config_checks.check_diffusion(load_config(name, "var_type=learned_range,loss_type=hybrid"))
  with pytest.raises(config_checks.ConfigError, match="fixedlarge"):
    config_checks.check_diffusion(load_config(name, "var_type=big"))
  with pytest.raises(ValueError, match="allowed keys"):
    load_config(name, "colour=blue")


def test_paper_settings():
  cifar = load_config("cifar10")
  assert (cifar.model.ch_mult, cifar.train.batch_size, cifar.optim.lr, cifar.model.dropout) == (
      (1, 2, 2, 2), 128, 2e-4, 0.1)
  bedroom = load_config("lsun_bedroom")
  assert not bedroom.data.random_flip and bedroom.model.ch_mult == (1, 1, 2, 2, 4, 4)
  assert bedroom.train.batch_size == 64 and bedroom.optim.lr == 2e-5
  assert load_config("lsun_church").data.random_flip
  assert load_config("celebahq256").diffusion.var_type == "fixedsmall"
