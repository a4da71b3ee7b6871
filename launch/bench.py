#!/usr/bin/env python
"""Benchmarks of sajax; results go to docs/benchmarks.md together with the command that produced them.

``python launch/bench.py default [--repeats R]``: wall time of the main job (``python launch/train.py`` on
configs/default.py, a fresh workdir each time, process start to exit) and its final test error.

The last line printed is one JSON object with ``figure`` and ``value``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_default(repeats: int, extra: list[str]) -> dict:
  """Times the whole default run as a user starts it; reports median wall time and test errors."""
  walls, errors = [], []
  for r in range(repeats):
    with tempfile.TemporaryDirectory() as tmp:
      workdir = os.path.join(tmp, "run")
      env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
      start = time.perf_counter()
      proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), "--workdir", workdir,
                             "--config.progress=False", *extra], env=env, capture_output=True, text=True)
      wall = time.perf_counter() - start
      if proc.returncode != 0:
        raise SystemExit(f"the default run failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
      with open(os.path.join(workdir, "metrics.jsonl")) as f:
        final = [json.loads(line) for line in f][-1]
    walls.append(wall)
    errors.append(final["test_error"])
    print(f"repeat {r + 1}/{repeats}: {wall:.1f} s, test error {100 * final['test_error']:.2f} %", flush=True)
  return {"figure": "default_run_wall_s", "value": round(statistics.median(walls), 1),
          "wall_s": [round(w, 1) for w in walls], "test_error": errors, "cpu_count": os.cpu_count()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("figure", choices=["default"])
  parser.add_argument("--repeats", type=int, default=3)
  args, extra = parser.parse_known_args()
  result = bench_default(args.repeats, extra)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
