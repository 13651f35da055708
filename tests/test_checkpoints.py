"""Checkpoint integrity: damaged checkpoints are verified, set aside and skipped."""
import json
import pathlib
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from diffusion_jax import build
from diffusion_jax import checkpoints
from diffusion_jax import config_lib
from diffusion_jax import parallel
from diffusion_jax import train
from diffusion_jax import train_step

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


def test_a_deleted_checksums_item_is_not_taken_for_an_old_checkpoint(trained, tmp_path, capsys):
  config, _ = trained
  directory = copy_checkpoints(trained, tmp_path)
  shutil.rmtree(directory / "8" / "checksums")
  state, step = restore_latest(config, directory)
  assert step == 4 and int(state["step"]) == 4
  assert "checksums item was written but is missing" in capsys.readouterr().out
  assert sorted(p.name for p in directory.iterdir()) == ["4", "8.corrupt"]


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
