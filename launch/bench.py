#!/usr/bin/env python
"""Benchmarks of sajax; results go to docs/benchmarks.md together with the command that produced them.

``python launch/bench.py default [--repeats R]``: wall time of the main job (``python launch/train.py`` on
configs/default.py, a fresh workdir each time, process start to exit) and its final test error.

``python launch/bench.py p1 [--learners 8 --batch 16 --protocol softsync --n 2 --repeats 3]``: samples/s of
the threads engine ÷ samples/s of the same λ learner threads doing bare jit gradient steps on the same
devices and μ (the paper's cifar10_full net on random 32×32×3 images), measured in one process, alternating
baseline and engine repeats and pooling them. Goal ≥ 0.90.

``python launch/bench.py p2 [--learners 32 --batch 4 --devices 8 --steps 40 --repeats 3]``: time per sample of
the simulated executor with λ = 32 async learners of μ = 4 ÷ that of pmap SSGD at the same global batch λμ,
same model (cifar10_full) and devices, one process (launch/bench_p2.py). Also times each slot batching
(``--batchings auto vmap``). Goal ≤ 1.3.

``python launch/bench.py p3``: time to accuracy with one straggler (1 of 8 learners 4× slower), simulated
executor on mnist5k with the default config: simulated time for async with the ``inverse`` policy to reach the
SSGD run's final test error + 0.5 point ÷ the same for hardsync SSGD. Goal ≤ 0.6.

``python launch/bench.py accuracy [--epochs E]``: the paper's comparison on mnist5k with λ = 8, μ = 16: the
threads engine with n-softsync, n ∈ {1, 2, 8}, and the ``inverse`` policy, the ``constant`` policy at n = 8,
and the pmap SSGD baseline, all with the default config's α0, momentum and epochs; prints a markdown table.

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


def train_final(overrides: list[str]) -> tuple[dict, float]:
  """Runs ``python launch/train.py`` as a user would, in a fresh workdir: (last metrics record, wall seconds)."""
  records, wall = train_history(overrides)
  return records[-1], wall


def train_history(overrides: list[str]) -> tuple[list[dict], float]:
  """Runs ``python launch/train.py`` as a user would, in a fresh workdir: (every metrics record, wall seconds)."""
  with tempfile.TemporaryDirectory() as tmp:
    workdir = os.path.join(tmp, "run")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), "--workdir", workdir,
                           *overrides, "--config.progress=False"], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
      raise SystemExit(f"train.py {' '.join(overrides)} failed (exit {proc.returncode}): "
                       f"{proc.stderr.strip()[-500:]}")
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return [json.loads(line) for line in f], wall


def bench_default(repeats: int, extra: list[str]) -> dict:
  """Times the whole default run as a user starts it; reports median wall time and test errors."""
  walls, errors = [], []
  for r in range(repeats):
    final, wall = train_final(extra)
    walls.append(wall)
    errors.append(final["test_error"])
    print(f"repeat {r + 1}/{repeats}: {wall:.1f} s, test error {100 * final['test_error']:.2f} %", flush=True)
  return {"figure": "default_run_wall_s", "value": round(statistics.median(walls), 1),
          "wall_s": [round(w, 1) for w in walls], "test_error": errors, "cpu_count": os.cpu_count()}


ACCURACY_CELLS = [
    ("pmap SSGD", ["--config.executor=pmap"]),
    ("1-softsync, inverse", ["--config.executor=threads", "--config.protocol=softsync", "--config.n=1"]),
    ("2-softsync, inverse", ["--config.executor=threads", "--config.protocol=softsync", "--config.n=2"]),
    ("8-softsync (async), inverse", ["--config.executor=threads", "--config.protocol=softsync", "--config.n=8"]),
    ("8-softsync (async), constant", ["--config.executor=threads", "--config.protocol=softsync", "--config.n=8",
                                      "--config.policy=constant"]),
]


def bench_accuracy(extra: list[str]) -> dict:
  """Final test error of each cell of the paper's comparison (one run each, default seed)."""
  rows = []
  for name, overrides in ACCURACY_CELLS:
    final, wall = train_final([*overrides, *extra])
    rows.append({"cell": name, "test_error": final["test_error"], "staleness_mean": final["staleness_mean"],
                 "epoch": final["epoch"], "wall_s": round(wall, 1)})
    print(f"{name}: test error {100 * final['test_error']:.2f} %, ⟨σ⟩ {final['staleness_mean']:.2f}", flush=True)
  ssgd = rows[0]["test_error"]
  print("| cell | test error | Δ vs SSGD | ⟨σ⟩ | wall |\n|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['cell']} | {100 * r['test_error']:.2f} % | {100 * (r['test_error'] - ssgd):+.2f} | "
          f"{r['staleness_mean']:.2f} | {r['wall_s']:.0f} s |")
  worst = max(r["test_error"] - ssgd for r in rows[1:4])
  return {"figure": "accuracy_worst_inverse_gap_points", "value": round(100 * worst, 2), "rows": rows}


P3_SIDES = [
    ("hardsync SSGD", ["--config.protocol=hardsync"]),
    ("async, inverse", ["--config.protocol=async"]),
]


def time_to_error(records: list[dict], target: float) -> float | None:
  """Simulated time of the first evaluation with test error ≤ ``target`` (None if never reached)."""
  return next((r["sim_time"] for r in records if r["test_error"] <= target), None)


def bench_p3(extra: list[str]) -> dict:
  """Time to accuracy with one straggler: simulated executor, λ = 8, μ = 16, learner 0 four times slower.

  The target is the SSGD run's final test error + 0.5 point; each side's time is the simulated time of its
  first evaluation at or below the target. P3 = async time ÷ SSGD time.
  """
  common = ["--config.executor=simulated", "--config.learners=8", "--config.batch_per_learner=16",
            "--config.sim_speeds=(4.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0)", "--config.eval_every_epochs=0.5", *extra]
  histories = {}
  for name, overrides in P3_SIDES:
    records, wall = train_history([*common, *overrides])
    histories[name] = records
    print(f"{name}: final test error {100 * records[-1]['test_error']:.2f} %, sim_time {records[-1]['sim_time']:.0f}, "
          f"⟨σ⟩ {records[-1]['staleness_mean']:.2f}, wall {wall:.0f} s", flush=True)
  ssgd, asynchronous = (histories[name] for name, _ in P3_SIDES)
  target = ssgd[-1]["test_error"] + 0.005
  t_ssgd, t_async = time_to_error(ssgd, target), time_to_error(asynchronous, target)
  print(f"target test error {100 * target:.2f} %: SSGD reaches it at sim_time {t_ssgd}, async at {t_async}")
  return {"figure": "p3", "value": None if t_async is None else round(t_async / t_ssgd, 3),
          "target_test_error": target, "sim_time_ssgd": t_ssgd, "sim_time_async": t_async,
          "final_test_error": {name: h[-1]["test_error"] for name, h in histories.items()},
          "curves": {name: [[r["sim_time"], r["test_error"]] for r in h] for name, h in histories.items()}}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("figure", choices=["default", "p1", "p2", "p3", "accuracy"])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--learners", type=int, default=None, help="λ (p1: 8, p2: 32)")
  parser.add_argument("--batch", type=int, default=None, help="μ (p1: 16, p2: 4)")
  parser.add_argument("--devices", type=int, default=8, help="p2: CPU-emulated devices")
  parser.add_argument("--batchings", nargs="+", default=["auto", "vmap"], help="p2: sim_batching choices to time")
  parser.add_argument("--protocol", default="softsync")
  parser.add_argument("--n", type=int, default=2)
  parser.add_argument("--model", default="cifar10_full")
  parser.add_argument("--steps", type=int, default=40, help="gradient steps per learner per repeat")
  args, extra = parser.parse_known_args()
  args.learners = args.learners or (32 if args.figure == "p2" else 8)
  args.batch = args.batch or (4 if args.figure == "p2" else 16)
  if args.figure == "default":
    result = bench_default(args.repeats, extra)
  elif args.figure == "accuracy":
    result = bench_accuracy(extra)
  elif args.figure == "p3":
    result = bench_p3(extra)
  else:
    devices = args.learners + 1 if args.figure == "p1" else args.devices
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={devices}"
                               " --xla_cpu_collective_call_terminate_timeout_seconds=1800").strip()
    sys.path.insert(0, ROOT)
    from launch import bench_p1, bench_p2
    result = (bench_p1 if args.figure == "p1" else bench_p2).run(args)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
