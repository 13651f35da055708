"""Run outputs: atomic files and the metrics log (TensorBoard events without TensorFlow)."""
import json
import subprocess
import sys
import textwrap

import numpy as np

from diffusion_jax.utils import outputs


def test_write_atomically_leaves_only_the_file(tmp_path):
  path = outputs.write_atomically(tmp_path / "a" / "b.bin", b"123")
  assert path.read_bytes() == b"123"
  outputs.write_json(tmp_path / "a" / "c.json", {"y": 1, "x": [2]})
  outputs.write_npz(tmp_path / "a" / "d.npz", x=np.arange(3))
  assert json.loads((tmp_path / "a" / "c.json").read_text()) == {"x": [2], "y": 1}
  with np.load(tmp_path / "a" / "d.npz") as f:
    np.testing.assert_array_equal(f["x"], np.arange(3))
  assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.bin", "c.json", "d.npz"]


def test_metrics_log_writes_events_and_jsonl_and_keeps_them_across_restarts(tmp_path):
  for step in (1, 2):  # a second run in the same directory appends
    log = outputs.MetricsLog(str(tmp_path), enabled=True)
    log.scalars(step, {"loss": 0.5 * step})
    log.image(step, "samples/ema", np.full((4, 4, 1), 255 * (step - 1), np.uint8))
    log.close()
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert lines == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 1.0}]
  # Each run wrote its own event file (two runs of one second must not share a name).
  files = sorted((tmp_path / "tensorboard").iterdir())
  assert len(files) == 2
  from tensorboard.backend.event_processing import event_accumulator
  scalars, images = [], []
  for path in files:
    events = event_accumulator.EventAccumulator(str(path))
    events.Reload()
    scalars += [(e.step, "loss", e.value) for e in events.Scalars("loss")]
    images += [(i.step, "samples/ema", i.width, i.height) for i in events.Images("samples/ema")]
  assert sorted(scalars) == [(1, "loss", 0.5), (2, "loss", 1.0)]
  assert sorted(images) == [(1, "samples/ema", 4, 4), (2, "samples/ema", 4, 4)]


def test_disabled_metrics_log_writes_nothing(tmp_path):
  log = outputs.MetricsLog(str(tmp_path), enabled=False)
  log.scalars(1, {"loss": 1.0})
  log.close()
  assert not list(tmp_path.iterdir())


def test_object_store_event_file_rewrites_everything_it_was_given(tmp_path):
  record = outputs._ObjectStoreRecordFile(str(tmp_path / "events"))  # pylint: disable=protected-access
  record.write(b"ab")
  record.flush()
  record.write(b"cd")
  record.close()
  assert (tmp_path / "events").read_bytes() == b"abcd"


def test_metrics_log_does_not_import_tensorflow(tmp_path):
  script = textwrap.dedent(f"""
      import sys
      from diffusion_jax.utils import outputs
      log = outputs.MetricsLog({str(tmp_path)!r}, enabled=True)
      log.scalars(1, {{"loss": 1.0}})
      log.close()
      assert not [m for m in sys.modules if m.split(".")[0] in ("tensorflow", "clu")], "imported"
  """)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
