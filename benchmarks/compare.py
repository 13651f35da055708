"""Runs the PyTorch U-Net and `diffusion_jax.tools.bench` alternately on this machine; prints ratios.

  python benchmarks/compare.py --torch_python /tmp/torchbench/bin/python --batches 8 32 \
      --rounds 2 --threads 2

Each round runs torch then JAX for every batch size, one process at a time (so they never share
the cores); medians over rounds are compared. A ratio ours/torch below 1 means ours is faster.
Use an interpreter with torch for `--torch_python` (torch is not a dependency of the package).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent


def _last_json(stdout: str) -> dict:
  lines = [line for line in stdout.splitlines() if line.strip().startswith("{")]
  if not lines:
    raise RuntimeError(f"no JSON record in output:\n{stdout[-2000:]}")
  return json.loads(lines[-1])


def _run(cmd, env) -> dict:
  print("$", " ".join(cmd), flush=True)
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f"{cmd[0]} failed:\n{proc.stderr[-4000:]}")
  record = _last_json(proc.stdout)
  print("  ", json.dumps(record), flush=True)
  return record


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--torch_python", default=sys.executable)
  parser.add_argument("--jax_python", default=sys.executable)
  parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--config", default="configs/cifar10.py")
  parser.add_argument("--torch_nchw", action="store_true",
                      help="run torch in NCHW (default: channels_last, its faster layout here)")
  args = parser.parse_args()

  # Both frameworks get the same number of threads.
  env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
  results = {b: {"torch": [], "jax": []} for b in args.batches}
  for _ in range(args.rounds):
    for batch in args.batches:
      results[batch]["torch"].append(_run(
          [args.torch_python, str(HERE / "torch_unet.py"), "--batch", str(batch), "--steps",
           str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
          + ([] if args.torch_nchw else ["--channels_last"]), env))
      results[batch]["jax"].append(_run(
          [args.jax_python, "-m", "diffusion_jax.tools.bench", "--config", args.config, "--batch",
           str(batch), "--steps", str(args.steps), "--warmup", str(args.warmup), "--skip",
           "sample"], env))

  print(f"\n{'batch':>5}  {'what':<8}  {'torch s':>8}  {'ours s':>8}  {'ours/torch':>10}")
  for batch in args.batches:
    for what, field in (("train", "train_step_median_s"), ("forward", "forward_median_s")):
      torch_s = statistics.median(r[field] for r in results[batch]["torch"])
      ours_s = statistics.median(r[field] for r in results[batch]["jax"])
      print(f"{batch:>5}  {what:<8}  {torch_s:>8.3f}  {ours_s:>8.3f}  {ours_s / torch_s:>10.2f}")


if __name__ == "__main__":
  main()
