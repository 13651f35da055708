"""parallel.PeerWatchdog against a stand-in for the distributed runtime's key-value store.

This process plays process 0 of 2; the test decides what process 1's heartbeat key holds.
"""
import threading
import time

import jax
import pytest
from jax._src import distributed

from diffusion_jax import parallel


class FakeClient:
  """The two key-value calls the watchdog makes; process 1's value comes from `peer`."""

  def __init__(self, peer):
    self.peer = peer  # a function of the number of reads so far: the value, or None (no key)
    self.reads = 0
    self.store = {}
    self.unreachable = False

  def key_value_set(self, key, value, allow_overwrite=False):
    assert allow_overwrite
    if self.unreachable:
      raise RuntimeError("UNAVAILABLE: Failed to send RPC to coordination service")
    self.store[key] = value

  def key_value_dir_get(self, prefix):
    if self.unreachable:
      raise RuntimeError("UNAVAILABLE: Failed to send RPC to coordination service")
    self.reads += 1
    entries = [(k, v) for k, v in self.store.items() if k.startswith(prefix)]
    value = self.peer(self.reads)
    return entries + ([(prefix + "1", value)] if value is not None else [])


@pytest.fixture
def watch(monkeypatch):
  """Starts a watchdog (timeout 0.4 s, heartbeat every 0.05 s) as process 0 of 2."""
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  started = []

  def start(peer):
    client = FakeClient(peer)
    monkeypatch.setattr(distributed.global_state, "client", client)
    lost = []
    reported = threading.Event()

    def on_lost(process, why):
      lost.append((process, why))
      reported.set()

    watchdog = parallel.PeerWatchdog(timeout_s=0.4, every_s=0.05, on_lost=on_lost).start()
    started.append(watchdog)
    return watchdog, client, lost, reported

  yield start
  for watchdog in started:
    watchdog.close()


def test_a_silent_process_is_reported_after_the_timeout(watch):
  watchdog, _, lost, reported = watch(lambda reads: "7")
  t0 = time.monotonic()
  assert reported.wait(5)
  print(f"reported after {time.monotonic() - t0:.2f} s (timeout 0.4 s)")
  assert lost[0][0] == 1 and lost[0][1].startswith("no heartbeat for ")
  assert watchdog.lost == lost[0]


def test_a_process_that_never_wrote_is_reported(watch):
  _, _, lost, reported = watch(lambda reads: None)
  assert reported.wait(5)
  assert lost[0][0] == 1


def test_a_live_process_is_not_reported_and_confirmed(watch):
  watchdog, client, lost, reported = watch(str)  # a new value at every read
  assert not reported.wait(1.0)
  assert client.reads > 5
  assert watchdog.confirm_peers()
  watchdog.close(failed=True)
  assert set(client.store.values()) == {"failed"}  # what the other processes read
  assert lost == []


def test_a_done_process_is_no_longer_watched(watch):
  watchdog, _, lost, reported = watch(lambda reads: str(reads) if reads < 3 else "done")
  assert not reported.wait(1.0)
  assert watchdog.confirm_peers()
  assert lost == []


def test_a_failed_process_is_reported_unless_this_one_is_failing_too(watch):
  _, _, lost, reported = watch(lambda reads: "failed")
  assert reported.wait(5)
  assert lost[0][0] == 1 and "ended with an error" in lost[0][1]
  watchdog, _, lost, reported = watch(lambda reads: "failed")
  assert watchdog.confirm_peers()  # this process is ending with an error of its own
  assert not reported.wait(1.0)
  assert lost == []


def test_confirm_peers_lets_the_watchdog_report_a_process_lost_meanwhile(watch):
  watchdog, _, lost, _ = watch(lambda reads: "3")
  assert not watchdog.confirm_peers()
  assert lost and lost[0][0] == 1


def test_an_unreachable_coordinator_is_reported_as_process_0(watch):
  _, client, lost, reported = watch(str)
  client.unreachable = True
  assert reported.wait(5)
  assert lost[0][0] == 0 and "coordinator has not answered" in lost[0][1]


def test_bad_settings_are_refused():
  with pytest.raises(ValueError, match="every_s < timeout_s"):
    parallel.PeerWatchdog(timeout_s=1.0, every_s=1.0, on_lost=print)
