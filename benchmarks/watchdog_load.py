"""The load `parallel.PeerWatchdog` puts on the coordinator, and how soon it notices a lost process.

  python benchmarks/watchdog_load.py --processes 2 4 8 16 --seconds 20 --every_s 1 --timeout_s 5

For each number of processes N, starts N local processes joined by `jax.distributed` on
127.0.0.1 (CPU), each running a watchdog whose key-value client is wrapped to count its calls.
After `--warmup` seconds, each process counts for `--seconds`: its requests (calls to the
coordinator, by method) and its entries (key-value pairs written or read back). Their sums are
the coordinator's load. Then the last process is killed (SIGKILL) and each other one records
when its watchdog reports it (its `on_lost` returns, so that process 0, which hosts the
coordinator, stays up for the others); the latency is the time from the kill to that report.

Prints one JSON line per N and, at the end, a Markdown table with the measured rows and rows
extrapolated to larger N: from the measured entries per process per heartbeat, fitted as
a + b * N over the measured sizes (b is about 1 when each process reads every other process's
heartbeat, about 0 when it reads a fixed number of them), and the requests per process per
heartbeat (their mean).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
_EXTRAPOLATE = (256, 1536)


class CountingClient:
  """Stands in for the distributed runtime's client: passes every call on and counts it.

  Entries: 1 for each key written (`key_value_set*`), one per key-value pair a read returns
  (0 for a key not found), none for other calls.
  """

  def __init__(self, client):
    self._client = client
    self._lock = threading.Lock()
    self.requests: dict[str, int] = {}
    self.entries = 0

  def snapshot(self) -> tuple[dict[str, int], int]:
    with self._lock:
      return dict(self.requests), self.entries

  def __getattr__(self, name):
    attr = getattr(self._client, name)
    if not callable(attr):
      return attr

    def counted(*args, **kwargs):
      with self._lock:
        self.requests[name] = self.requests.get(name, 0) + 1
      result = attr(*args, **kwargs)  # raises for a key not found: no entry
      if name.startswith("key_value_set"):
        entries = 1
      elif name.startswith("key_value_dir_get"):
        entries = len(result)
      elif name.startswith(("key_value_try_get", "blocking_key_value_get")):
        entries = 1
      else:
        entries = 0
      with self._lock:
        self.entries += entries
      return result

    return counted


def _emit(record: dict) -> None:
  # os.write: one line in one call, also from the watchdog thread.
  os.write(1, (json.dumps(record) + "\n").encode())


def _worker(args) -> None:
  """One process of the run: starts a counted watchdog, reports its counts, waits to be killed
  or for its report of the killed one."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  from diffusion_jax import parallel  # pylint: disable=g-import-not-at-top

  jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                             heartbeat_timeout_seconds=args.heartbeat_timeout_s)
  jax.devices()  # the backend starts with the real client (its collectives use it)
  counting = CountingClient(distributed.global_state.client)
  distributed.global_state.client = counting

  def on_lost(process: int, why: str) -> None:
    _emit({"process": args.process_id, "lost": process, "why": why, "time": time.time()})

  watchdog = parallel.PeerWatchdog(timeout_s=args.timeout_s, every_s=args.every_s,
                                   on_lost=on_lost).start()
  time.sleep(args.warmup)
  requests0, entries0 = counting.snapshot()
  t0 = time.monotonic()
  time.sleep(args.seconds)
  requests1, entries1 = counting.snapshot()
  elapsed = time.monotonic() - t0
  _emit({"process": args.process_id, "seconds": elapsed, "entries": entries1 - entries0,
         "requests": {k: v - requests0.get(k, 0) for k, v in requests1.items()}})
  sys.stdin.read()  # until the parent closes it
  watchdog.close()
  # Not the runtime's shutdown at exit: it waits at a barrier for every process, one of them
  # killed.
  os._exit(0)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _read_records(proc, records, process):
  for line in proc.stdout:
    if line.startswith("{"):
      record = json.loads(line)
      record["process"] = process
      records.append(record)


def measure(num_processes: int, args) -> dict:
  """Runs N processes: their load over `args.seconds`, then the latency to report a kill."""
  coordinator = f"127.0.0.1:{_free_port()}"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  procs, records, readers = [], [], []
  for i in range(num_processes):
    proc = subprocess.Popen(
        [sys.executable, __file__, "--worker", "--coordinator", coordinator,
         "--num_processes", str(num_processes), "--process_id", str(i),
         "--seconds", str(args.seconds), "--warmup", str(args.warmup),
         "--every_s", str(args.every_s), "--timeout_s", str(args.timeout_s),
         "--heartbeat_timeout_s", str(args.heartbeat_timeout_s)],
        env=env, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    procs.append(proc)
    reader = threading.Thread(target=_read_records, args=(proc, records, i), daemon=True)
    reader.start()
    readers.append(reader)
  try:
    deadline = time.time() + args.warmup + args.seconds + 120
    while sum("seconds" in r for r in records) < num_processes:
      if time.time() > deadline or any(p.poll() is not None for p in procs):
        raise RuntimeError(f"the processes did not all report their counts: {records}")
      time.sleep(0.1)
    loads = [r for r in records if "seconds" in r]
    killed = num_processes - 1
    kill_time = time.time()
    procs[killed].send_signal(signal.SIGKILL)
    deadline = kill_time + 3 * args.timeout_s + 10 * args.every_s + 10
    while (sum("lost" in r for r in records) < num_processes - 1 and time.time() < deadline):
      time.sleep(0.05)
  finally:
    # Process 0 last: its end takes the coordinator down, and the runtime then aborts the
    # processes still connected.
    for proc in reversed(procs):
      if proc.poll() is None:
        proc.stdin.close()
      try:
        proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
  reports = [r for r in records if "lost" in r]
  requests: dict[str, float] = {}
  for load in loads:
    for name, count in load["requests"].items():
      requests[name] = requests.get(name, 0.0) + count / load["seconds"]
  beats_per_s = 1.0 / args.every_s
  result = {
      "processes": num_processes,
      "requests_per_s": sum(requests.values()),
      "entries_per_s": sum(load["entries"] / load["seconds"] for load in loads),
      "requests_by_method_per_s": requests,
      "reported": len(reports),
      "reported_right_process": sum(r["lost"] == killed for r in reports),
      "latency_s": sorted(round(r["time"] - kill_time, 2) for r in reports),
      "latency_by_process_s": {r["process"]: round(r["time"] - kill_time, 2)
                               for r in sorted(reports, key=lambda r: r["process"])},
      "whys": sorted({r["why"] for r in reports}),
  }
  result["requests_per_process_beat"] = (result["requests_per_s"] / num_processes / beats_per_s)
  result["entries_per_process_beat"] = result["entries_per_s"] / num_processes / beats_per_s
  return result


def _fit_line(xs, ys):
  """Least squares y = a + b x."""
  n = len(xs)
  mx, my = sum(xs) / n, sum(ys) / n
  sxx = sum((x - mx) ** 2 for x in xs)
  b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
  return my - b * mx, b


def _table(results: list[dict], every_s: float) -> str:
  lines = [
      "| processes | requests/s | entries/s | requests / process / beat | "
      "entries / process / beat | kill noticed after (s): processes 1.., process 0 |",
      "|---:|---:|---:|---:|---:|---|"]
  for r in results:
    by_process = {int(p): t for p, t in r["latency_by_process_s"].items()}
    others = [t for p, t in by_process.items() if p != 0]
    latency = (f"{min(others):.1f} - {max(others):.1f}" if others else "-") + (
        f", {by_process[0]:.1f}" if 0 in by_process else ", not reported")
    if r["reported_right_process"] < r["processes"] - 1:
      latency += f" ({r['reported_right_process']} of {r['processes'] - 1} reported it)"
    lines.append(f"| {r['processes']} | {r['requests_per_s']:.1f} | {r['entries_per_s']:.1f} | "
                 f"{r['requests_per_process_beat']:.2f} | {r['entries_per_process_beat']:.2f} | "
                 f"{latency} |")
  if len(results) >= 2:
    a, b = _fit_line([r["processes"] for r in results],
                     [r["entries_per_process_beat"] for r in results])
    # Counts per heartbeat are whole numbers; a window's edges cut a fraction of one off.
    per_beat = round(sum(r["requests_per_process_beat"] for r in results) / len(results), 2)
    for n in _EXTRAPOLATE:
      entries = round(a + b * n, 2)
      lines.append(f"| {n} (extrapolated) | {n * per_beat / every_s:,.0f} | "
                   f"{n * entries / every_s:,.0f} | {per_beat:.2f} | {entries:.2f} | |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--processes", type=int, nargs="+", default=[2, 4, 8])
  parser.add_argument("--seconds", type=float, default=20.0, help="counting window")
  parser.add_argument("--warmup", type=float, default=3.0)
  parser.add_argument("--every_s", type=float, default=1.0)
  parser.add_argument("--timeout_s", type=float, default=5.0)
  parser.add_argument("--heartbeat_timeout_s", type=int, default=100)
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--coordinator", help=argparse.SUPPRESS)
  parser.add_argument("--num_processes", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--process_id", type=int, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    _worker(args)
    return
  results = []
  for n in args.processes:
    result = measure(n, args)
    print(json.dumps(result), flush=True)
    results.append(result)
  print(f"every_s={args.every_s:g}, timeout_s={args.timeout_s:g}")
  print(_table(results, args.every_s))


if __name__ == "__main__":
  main()
