"""Checkpoint integrity: damaged checkpoints are verified, set aside and skipped."""
import errno
import json
import logging
import os
import pathlib
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from etils import epath

from diffusion_jax.config import build
from diffusion_jax.config import config_lib
from diffusion_jax import parallel
from diffusion_jax.training import checkpoints
from diffusion_jax.training import loop as train
from diffusion_jax.training import step as train_step

# orbax abandons the reads of the other arrays when one fails; Python reports each abandoned
# coroutine as unraisable (the command line keeps them off the console, see test_main.py).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def load_config():
  config = config_lib.load_config("configs/test.py")
  config.train.num_steps = 8
  config.train.checkpoint_every = 4
  return config


def run(config, workdir):
  with tfds.testing.mock_data(num_examples=32, policy=tfds.testing.MockPolicy.USE_CODE):
    return train.train_and_evaluate(config, str(workdir))


# Trains end to end: the tests that use it are marked slow.
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """8 steps of the test config, checkpoints at 4 and 8."""
  config = load_config()
  workdir = tmp_path_factory.mktemp("trained")
  run(config, workdir)
  return config, workdir


def copy_checkpoints(trained, tmp_path) -> pathlib.Path:
  _, workdir = trained
  shutil.copytree(workdir / "checkpoints", tmp_path / "checkpoints")
  return tmp_path / "checkpoints"


def data_file(step_dir: pathlib.Path) -> pathlib.Path:
  """The largest file of a step's state: the one holding the arrays' bytes."""
  return max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)


def restore_latest(config, directory):
  model, optimizer = build.make_model(config), build.make_optimizer(config)
  abstract = train_step.abstract_state(config, model, optimizer, parallel.make_mesh())
  return checkpoints.Checkpointer(str(directory)).restore_latest(abstract.to_dict())


def read_without_verifying(directory, step):
  """The whole state as orbax alone reads it (no checksums)."""
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      read_only=True), item_handlers={"state": ocp.StandardCheckpointHandler()})
  return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))


def step_dirs(directory):
  return sorted(p.name for p in directory.iterdir())


def corrupt(path: pathlib.Path, kind: str) -> None:
  data = path.read_bytes()
  if kind == "truncated":
    path.write_bytes(data[:len(data) // 2])
  elif kind == "deleted":
    path.unlink()
  elif kind == "garbage":
    path.write_bytes(np.random.default_rng(0).bytes(len(data)))
  elif kind == "emptied":
    path.write_bytes(b"")
  else:
    raise ValueError(kind)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["truncated", "deleted", "garbage", "emptied"])
def test_damaged_latest_is_moved_aside_and_the_previous_restored(trained, tmp_path, capsys,
                                                                 kind):
  config, _ = trained
  directory = copy_checkpoints(trained, tmp_path)
  files_before = sorted(p.relative_to(directory / "8") for p in (directory / "8").rglob("*"))
  damaged = data_file(directory / "8")
  corrupt(damaged, kind)
  state, step = restore_latest(config, directory)
  assert step == 4 and int(state["step"]) == 4
  out = capsys.readouterr().out
  assert "checkpoint at step 8" in out and "8.corrupt" in out, out
  # Moved aside, nothing deleted: every other file of the step is still there.
  assert step_dirs(directory) == ["4", "8.corrupt"]
  files_after = sorted(p.relative_to(directory / "8.corrupt")
                       for p in (directory / "8.corrupt").rglob("*"))
  missing = {damaged.relative_to(directory / "8")} if kind == "deleted" else set()
  assert set(files_before) - set(files_after) == missing


def test_a_second_corrupt_copy_of_a_step_gets_a_numbered_name(tmp_path):
  for expected in ["8.corrupt", "8.corrupt.1", "8.corrupt.2"]:
    (tmp_path / "8" / "state").mkdir(parents=True)
    moved = checkpoints.move_aside(checkpoints.epath.Path(tmp_path / "8"))
    assert moved.name == expected and (tmp_path / expected / "state").is_dir()
  assert not (tmp_path / "8").exists()


@pytest.mark.slow
def test_training_goes_on_past_a_corrupt_latest_checkpoint(trained, tmp_path, capsys):
  config, _ = trained
  directory = copy_checkpoints(trained, tmp_path)
  corrupt(data_file(directory / "8"), "truncated")
  config = load_config()
  config.train.num_steps = 12
  state = run(config, tmp_path)  # restores 4, saves 8 and 12 again
  assert int(jax.device_get(state.step)) == 12
  out = capsys.readouterr().out
  assert "Resumed from" in out and "steps 4 -> 12" in out, out
  assert step_dirs(directory) == ["12", "8", "8.corrupt"]
  # The run's own checkpoints read back and verify.
  _, step = restore_latest(config, directory)
  assert step == 12


@pytest.mark.slow
def test_a_flipped_bit_is_caught_by_the_checksum(trained, tmp_path, capsys):
  config, _ = trained
  directory = copy_checkpoints(trained, tmp_path)
  want = read_without_verifying(directory, 8)["state"]
  path = data_file(directory / "8")
  data = bytearray(path.read_bytes())
  position = len(data) // 3 + int(np.random.default_rng(1).integers(0, len(data) // 3))
  data[position] ^= 1 << 4
  path.write_bytes(bytes(data))
  # orbax alone reads it back without complaint, one value differing ...
  got = read_without_verifying(directory, 8)["state"]
  differing = [a.shape for a, b in zip(jax.tree_util.tree_leaves(want),
                                       jax.tree_util.tree_leaves(got))
               if not np.array_equal(a, b)]
  assert len(differing) == 1
  # ... the checksum refuses it.
  _, step = restore_latest(config, directory)
  assert step == 4
  assert "checksum mismatch" in capsys.readouterr().out


@pytest.mark.slow
def test_random_bytes_over_a_span_are_refused(trained, tmp_path, capsys):
  config, _ = trained
  directory = copy_checkpoints(trained, tmp_path)
  path = data_file(directory / "8")
  data = bytearray(path.read_bytes())
  start = len(data) // 2
  data[start:start + 512] = np.random.default_rng(2).bytes(512)
  path.write_bytes(bytes(data))
  _, step = restore_latest(config, directory)
  assert step == 4
  assert "checkpoint at step 8" in capsys.readouterr().out
  assert step_dirs(directory) == ["4", "8.corrupt"]


@pytest.mark.slow
def test_non_finite_values_are_refused(trained, tmp_path, capsys):
  config, _ = trained
  directory = copy_checkpoints(trained, tmp_path)
  saved = jax.tree_util.tree_map(np.array, read_without_verifying(directory, 8)["state"])
  saved["ema_params"]["conv_in"]["bias"][3] = np.nan
  saver = checkpoints.Checkpointer(str(directory), async_save=False)
  saver.save(12, saved, config.to_dict())  # its checksums match the NaN
  saver.close()
  _, step = restore_latest(config, directory)
  assert step == 8
  out = capsys.readouterr().out
  assert "non-finite values in ['ema_params']['conv_in']['bias']" in out, out


@pytest.mark.slow
def test_checkpoint_without_checksums_loads_with_one_notice(trained, tmp_path, capsys):
  config, _ = trained
  directory = copy_checkpoints(trained, tmp_path)
  # What a checkpoint written before checksums existed looks like: no item, and orbax's record
  # of the step does not list one.
  shutil.rmtree(directory / "8" / "checksums")
  record = directory / "8" / "_CHECKPOINT_METADATA"
  metadata = json.loads(record.read_text())
  del metadata["item_handlers"]["checksums"]
  record.write_text(json.dumps(metadata))
  state, step = restore_latest(config, directory)
  assert step == 8 and int(state["step"]) == 8
  notices = [l for l in capsys.readouterr().out.splitlines() if "has no checksums" in l]
  assert len(notices) == 1, notices


@pytest.mark.slow
def test_a_deleted_checksums_item_is_not_taken_for_an_old_checkpoint(trained, tmp_path, capsys):
  config, _ = trained
  directory = copy_checkpoints(trained, tmp_path)
  shutil.rmtree(directory / "8" / "checksums")
  state, step = restore_latest(config, directory)
  assert step == 4 and int(state["step"]) == 4
  assert "checksums item was written but is missing" in capsys.readouterr().out
  assert sorted(p.name for p in directory.iterdir()) == ["4", "8.corrupt"]


@pytest.mark.slow
def test_checksums_cover_every_array_by_path(trained):
  _, workdir = trained
  directory = workdir / "checkpoints"
  saved = json.loads((directory / "8" / "checksums" / "metadata").read_text())
  state = read_without_verifying(directory, 8)["state"]
  assert saved["algorithm"] == "crc32"
  # (read without a target, the optimizer state comes back as plain containers: other paths)
  without_opt = {k: state[k] for k in ("step", "params", "ema_params")}
  want = checkpoints.array_checksums(without_opt)
  assert {k: v for k, v in saved["arrays"].items() if k in want} == want
  assert any(k.startswith("['opt_state']") for k in saved["arrays"])
  assert len(saved["arrays"]) == len(jax.tree_util.tree_leaves(state))


def small_state(step):
  weights = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
  return {"step": np.int32(step), "params": weights, "ema_params": weights}


def test_relative_directories_start_at_the_current_directory(tmp_path, monkeypatch, caplog):
  monkeypatch.chdir(tmp_path)
  saver = checkpoints.Checkpointer("run/checkpoints")  # asynchronous, as training saves
  assert saver.directory == tmp_path / "run" / "checkpoints"
  saver.save(3, small_state(3), {"seed": 1})
  saver.close()
  assert checkpoints.complete_steps("run/checkpoints") == [3]
  assert checkpoints.select_step("run/checkpoints") == 3
  assert checkpoints.read_config("run/checkpoints", 3) == {"seed": 1}
  params, step = checkpoints.restore_params("run/checkpoints")
  assert step == 3
  np.testing.assert_array_equal(params["w"], small_state(3)["params"]["w"])
  # orbax has nothing to warn of (the read-only readers are read-only on purpose).
  assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING], (
      caplog.text)
  with pytest.raises(FileExistsError, match=f"{tmp_path}/run/checkpoints already holds"):
    checkpoints.check_new_workdir("run")
  assert checkpoints.move_aside("run/checkpoints/3") == tmp_path / "run/checkpoints/3.corrupt"
  assert (tmp_path / "run" / "checkpoints" / "3.corrupt" / "state").is_dir()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def fail_writes_under(directory, code, monkeypatch):
  """Makes every write of a small file (orbax's metadata and JSON items) under `directory`
  fail with the OS error `code`, as a full (or otherwise failing) disk does."""
  path_type = type(epath.Path(directory))
  write_text = path_type.write_text

  def failing(self, *args, **kwargs):
    if str(directory) in os.fspath(self):
      raise OSError(code, os.strerror(code), os.fspath(self))
    return write_text(self, *args, **kwargs)

  monkeypatch.setattr(path_type, "write_text", failing)


@pytest.mark.parametrize("code,advice", [
    (errno.ENOSPC, "Free space in {directory} (its disk is full), then restart"),
    (errno.EACCES, "Make {directory} writable by this user, then restart"),
    (errno.EIO, "Fix writing to {directory} (the OSError above), then restart"),
])
def test_a_failed_save_says_what_to_do_about_its_cause(tmp_path, monkeypatch, code, advice):
  directory = tmp_path / "checkpoints"
  saver = checkpoints.Checkpointer(str(directory), async_save=False)
  saver.save(1, small_state(1), {})
  fail_writes_under(directory, code, monkeypatch)
  with pytest.raises(checkpoints.SaveError) as failed:
    saver.save(2, small_state(2), {})
  saver.close()
  message = str(failed.value)
  assert os.strerror(code) in message
  assert advice.format(directory=directory) in message, message
  assert message.endswith("--workdir: it resumes from step 1"), message
  assert ("Free space" in message) == (code == errno.ENOSPC)
  assert checkpoints.complete_steps(directory) == [1]


def raised_while_handling(cause: BaseException, error: BaseException) -> BaseException:
  """`error` as raised from `cause` (its __cause__ and __context__ set)."""
  try:
    try:
      raise cause
    except type(cause) as e:
      raise error from e
  except type(error) as e:
    return e


@pytest.mark.parametrize("error,code", [
    # TensorStore's own words, all that orbax passes on of a full disk.
    (ValueError('RESOURCE_EXHAUSTED: Error writing "params.w/0.0" in OCDBT database at local '
                'file "/x/ocdbt.process_0/": Failed to write 929129 bytes to file 11: No space '
                "left on device [os_error_code='28']"), errno.ENOSPC),
    (raised_while_handling(PermissionError(errno.EACCES, os.strerror(errno.EACCES)),
                           RuntimeError("the save failed")), errno.EACCES),
    (RuntimeError("the save failed"), None),
])
def test_the_os_error_is_found_in_messages_and_causes(error, code):
  assert checkpoints._write_error_code(error) == code  # pylint: disable=protected-access


@pytest.mark.slow
def test_an_unusable_checkpoint_is_reported_once(trained, tmp_path, capsys, caplog):
  directory = copy_checkpoints(trained, tmp_path)
  shutil.rmtree(directory / "8" / "checksums")  # whichever arrays are read, step 8 is refused
  _, step = checkpoints.restore_params(str(directory))
  assert step == 4
  captured = capsys.readouterr()
  everything = captured.out + captured.err + caplog.text
  assert everything.count("checkpoint at step 8") == 1, everything
  assert f"WARNING: checkpoint at step 8 in {directory} cannot be used" in captured.out
