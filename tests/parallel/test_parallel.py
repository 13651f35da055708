"""parallel.PeerWatchdog against a stand-in for the distributed runtime's key-value store.

This process plays one process of a run (process 0 of 2 unless a test says otherwise); the test
decides what the other processes' keys hold, as functions of the number of heartbeats this
process has written so far.
"""
import json
import threading
import time

import jax
import pytest
from jax._src import distributed

from diffusion_jax import parallel
from diffusion_jax.parallel import distributed as parallel_distributed

_UNAVAILABLE = "UNAVAILABLE: Failed to send RPC to coordination service"


class FakeClient:
  """The key-value calls the watchdog makes, in memory.

  Args:
    others: {name: function of the beats written so far -> the value, or None (no key)}, for the
      keys of the other processes: "beat/P" (process P's heartbeat), "lost/P" (a loss process P
      published). Names are relative to the watchdog's directory.
  """

  def __init__(self, others):
    self.others = others
    self.beats = 0
    self.store = {}
    self.prefix = None  # the watchdog's directory, learnt from its first write
    self.requests = []  # (method, key relative to the directory), in order
    self.unreachable = False

  def _call(self, method, key):
    if self.prefix is None:
      self.prefix = key[:key.rindex("beat/")]
    self.requests.append((method, key[len(self.prefix):]))
    if self.unreachable:
      raise RuntimeError(_UNAVAILABLE)

  def _entries(self):
    entries = dict(self.store)
    for name, value_of in self.others.items():
      value = value_of(self.beats)
      if value is not None:
        entries[self.prefix + name] = value
    return entries

  def key_value_set(self, key, value, allow_overwrite=False):
    assert allow_overwrite
    self._call("set", key)
    if value.isdigit():
      self.beats += 1
    self.store[key] = value

  def key_value_try_get(self, key):
    self._call("try_get", key)
    entries = self._entries()
    if key not in entries:
      raise RuntimeError(f"NOT_FOUND: Config key {key} not found.")
    return entries[key]

  def key_value_dir_get(self, prefix):
    self._call("dir_get", prefix)
    return sorted((k, v) for k, v in self._entries().items() if k.startswith(prefix))

  def beat_requests(self):
    """The requests of each heartbeat: the lists that start with a write of a counter."""
    beats = []
    for request in self.requests:
      if request[0] == "set" and request[1].startswith("beat/"):
        beats.append([])
      if beats:
        beats[-1].append(request)
    return beats


@pytest.fixture
def watch(monkeypatch):
  """Starts a watchdog (timeout 0.4 s, heartbeat every 0.05 s) as process `me` of `count`."""
  started = []

  def start(others, me=0, count=2):
    monkeypatch.setattr(jax, "process_count", lambda: count)
    monkeypatch.setattr(jax, "process_index", lambda: me)
    client = FakeClient(others)
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
  watchdog, _, lost, reported = watch({"beat/1": lambda beats: "7"})
  t0 = time.monotonic()
  assert reported.wait(5)
  print(f"reported after {time.monotonic() - t0:.2f} s (timeout 0.4 s)")
  assert lost[0][0] == 1 and lost[0][1].startswith("no heartbeat for ")
  assert watchdog.lost == lost[0]


def test_a_process_that_never_wrote_is_reported(watch):
  _, _, lost, reported = watch({})
  assert reported.wait(5)
  assert lost[0][0] == 1


def test_a_live_process_is_not_reported_and_confirmed(watch):
  watchdog, client, lost, reported = watch({"beat/1": str})  # a new value at every beat
  assert not reported.wait(1.0)
  assert client.beats > 5
  assert watchdog.confirm_peers()
  watchdog.close(failed=True)
  assert set(client.store.values()) == {"failed"}  # what the other processes read
  assert lost == []


def test_a_done_process_is_no_longer_watched(watch):
  watchdog, client, lost, reported = watch(
      {"beat/1": lambda beats: str(beats) if beats < 3 else "done"})
  assert not reported.wait(1.0)
  assert watchdog.confirm_peers()
  assert lost == []
  reads = [r for r in client.requests if r[0] != "set"]
  # Once process 1 is done there is nothing left to watch: no more reads of its key.
  assert [r for r in reads if r[1] == "beat/1"] == [("try_get", "beat/1")] * 3


def test_a_failed_process_is_reported_unless_this_one_is_failing_too(watch):
  _, _, lost, reported = watch({"beat/1": lambda beats: "failed"})
  assert reported.wait(5)
  assert lost[0][0] == 1 and "ended with an error" in lost[0][1]
  watchdog, _, lost, reported = watch({"beat/1": lambda beats: "failed"})
  assert watchdog.confirm_peers()  # this process is ending with an error of its own
  assert not reported.wait(1.0)
  assert lost == []


def test_confirm_peers_lets_the_watchdog_report_a_process_lost_meanwhile(watch):
  watchdog, _, lost, _ = watch({"beat/1": lambda beats: "3"})
  assert not watchdog.confirm_peers()
  assert lost and lost[0][0] == 1


def test_an_unreachable_coordinator_is_reported_as_process_0(watch):
  _, client, lost, reported = watch({"beat/1": str})
  client.unreachable = True
  assert reported.wait(5)
  assert lost[0][0] == 0 and "coordinator has not answered" in lost[0][1]


def test_bad_settings_are_refused():
  with pytest.raises(ValueError, match="every_s < timeout_s"):
    parallel.PeerWatchdog(timeout_s=1.0, every_s=1.0, on_lost=print)


# --- The ring: each process watches the next one ---------------------------------------------


def test_each_heartbeat_makes_three_requests_whatever_the_number_of_processes(watch):
  """Process 3 of 8: it writes its counter, reads the published losses and process 4's counter,
  and nothing else."""
  others = {f"beat/{p}": str for p in range(8) if p != 3}
  _, client, lost, reported = watch(others, me=3, count=8)
  assert not reported.wait(1.0)
  beats = client.beat_requests()
  assert len(beats) > 5
  for requests in beats[:-1]:  # the last one may still be under way
    assert requests == [("set", "beat/3"), ("dir_get", "lost/"), ("try_get", "beat/4")]
  assert lost == []


def test_the_last_process_watches_the_first(watch):
  _, client, lost, reported = watch({"beat/0": lambda beats: "5", "beat/1": str}, me=2, count=3)
  assert reported.wait(5)
  assert lost[0][0] == 0 and lost[0][1].startswith("no heartbeat for ")
  assert {r[1] for r in client.requests if r[0] == "try_get"} == {"beat/0"}


def test_past_processes_that_left_done_the_next_one_is_watched(watch):
  """Processes 1 and 2 left before the start, 3 leaves after a few heartbeats; process 4 then
  goes silent: process 0 reports it, reading at most a few counters per heartbeat."""
  max_reads = parallel.PeerWatchdog._MAX_READS
  _, client, lost, reported = watch({
      "beat/1": lambda beats: "done",
      "beat/2": lambda beats: "done",
      "beat/3": lambda beats: str(beats) if beats < 5 else "done",
      "beat/4": lambda beats: str(min(beats, 12)),
      "beat/5": str,
  }, count=6)
  assert reported.wait(5)
  assert lost[0][0] == 4 and lost[0][1].startswith("no heartbeat for ")
  beats = client.beat_requests()
  read = [[r[1] for r in requests if r[0] == "try_get"] for requests in beats]
  assert read[0] == ["beat/1", "beat/2", "beat/3"]
  assert all(1 <= len(keys) <= max_reads for keys in read[:-1])
  assert ["beat/3", "beat/4"] in read  # moved on when 3 left
  assert {key for keys in read for key in keys} == {"beat/1", "beat/2", "beat/3", "beat/4"}
  # Each counter of a process that left was read once after it left.
  assert sum(keys.count("beat/1") + keys.count("beat/2") for keys in read) == 2


def test_when_every_other_process_left_nothing_is_read_or_reported(watch):
  _, client, lost, reported = watch({f"beat/{p}": lambda beats: "done" for p in (1, 2, 3)},
                                    count=4)
  assert not reported.wait(1.0)
  assert lost == []
  reads = [r for r in client.requests if r[0] == "try_get"]
  assert reads == [("try_get", "beat/1"), ("try_get", "beat/2"), ("try_get", "beat/3")]


def test_this_process_publishes_the_loss_it_finds(watch):
  _, client, lost, reported = watch({"beat/0": str, "beat/2": lambda beats: "4"},
                                    me=1, count=3)
  assert reported.wait(5)
  assert lost[0][0] == 2
  published = json.loads(client.store[client.prefix + "lost/1"])
  assert published == {"process": 2, "why": lost[0][1], "failed": False}


def test_a_loss_another_process_published_is_reported_at_the_next_heartbeat(watch):
  record = json.dumps({"process": 3, "why": "no heartbeat for 31 s", "failed": False})
  _, _, lost, reported = watch({
      "beat/1": str, "beat/2": str, "beat/3": lambda beats: "9",
      "lost/2": lambda beats: record if beats >= 4 else None,
  }, count=4)
  assert reported.wait(5)
  assert lost == [(3, "no heartbeat for 31 s; found by process 2")]


def test_a_published_failed_process_is_not_reported_by_one_failing_too(watch):
  record = json.dumps({"process": 2, "why": "it ended with an error 1 s ago; see its log",
                       "failed": True})
  # Published from the 5th heartbeat on, once confirm_peers has begun.
  others = {"beat/1": str, "beat/2": lambda beats: "failed",
            "lost/1": lambda beats: record if beats >= 5 else None}
  _, _, lost, reported = watch(others, count=3)
  assert reported.wait(5)
  assert lost[0][0] == 2 and lost[0][1].endswith("; found by process 1")
  watchdog, client, lost, reported = watch(others, count=3)
  assert watchdog.confirm_peers()  # this process is ending with an error of its own
  assert not reported.wait(1.0)
  assert lost == [] and client.beats > 5


def test_confirm_peers_reads_every_process_and_finds_an_unwatched_loss(watch):
  """Process 2 never wrote, but process 0 watches process 1, which runs: only confirm_peers,
  which reads every counter, finds it."""
  watchdog, client, lost, reported = watch({"beat/1": str}, count=3)
  assert not reported.wait(1.0)
  assert not watchdog.confirm_peers()
  assert lost and lost[0][0] == 2
  assert ("dir_get", "beat/") in client.requests


def test_process_0_reports_two_heartbeats_late_when_others_must_read_the_loss(watch,
                                                                                monkeypatch):
  """Its end takes the coordinator down: with more than 2 processes, process 0 waits for the
  others to read what it publishes."""
  sleeps = []
  monkeypatch.setattr(parallel_distributed.time, "sleep", sleeps.append)
  _, _, lost, reported = watch({"beat/1": lambda beats: "2", "beat/2": str}, count=3)
  assert reported.wait(5) and lost[0][0] == 1
  assert sleeps == [parallel.PeerWatchdog._LINGER_BEATS * 0.05]
  sleeps.clear()
  _, _, lost, reported = watch({"beat/1": lambda beats: "2"}, count=2)
  assert reported.wait(5) and lost[0][0] == 1
  assert sleeps == []  # nobody else to tell
  _, _, lost, reported = watch({"beat/0": str, "beat/2": lambda beats: "2"}, me=1, count=3)
  assert reported.wait(5) and lost[0][0] == 2
  assert sleeps == []


def test_a_single_process_run_starts_no_thread(monkeypatch):
  monkeypatch.setattr(jax, "process_count", lambda: 1)
  before = set(threading.enumerate())
  watchdog = parallel.PeerWatchdog(timeout_s=0.4, every_s=0.05, on_lost=print).start()
  assert set(threading.enumerate()) - before == set()
  assert not watchdog.confirm_peers()
  watchdog.close()
