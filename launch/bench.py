#!/usr/bin/env python
"""Benchmarks of sajax; results go to docs/benchmarks.md together with the command that produced them.

``python launch/bench.py default [--repeats R]``: wall time of the main job (``python launch/train.py`` on
configs/default.py, a fresh workdir each time, process start to exit) and its final test error.

``python launch/bench.py p1 [--learners 8 --batch 16 --protocol softsync --n 2 --repeats 5]``: samples/s of
the threads engine ÷ samples/s of the same λ learner threads doing bare jit gradient steps on the same
devices and μ (the paper's cifar10_full net on random 32×32×3 images), measured in one process, alternating
baseline and engine repeats; the figure is the median of the per-repeat ratios, with their range. Goal ≥ 0.95.

``python launch/bench.py p2 [--learners 32 --batch 4 --devices 8 --steps 40 --repeats 3]``: time per sample of
the simulated executor with λ = 32 async learners of μ = 4 ÷ that of pmap SSGD at the same global batch λμ,
same model (cifar10_full) and devices, one process (launch/bench_p2.py). Goal ≤ 1.3.

``python launch/bench.py p3``: time to accuracy with one straggler (1 of 8 learners 4× slower), simulated
executor on mnist5k with the default config: simulated time for async with the ``inverse`` policy to reach the
SSGD run's final test error + 0.5 point ÷ the same for hardsync SSGD (launch/bench_p3.py). Goal ≤ 0.6.

``python launch/bench.py accuracy [--epochs E]``: the paper's comparison on mnist5k with λ = 8, μ = 16: the
threads engine with n-softsync, n ∈ {1, 2, 8}, and the ``inverse`` policy, the ``constant`` policy at n = 8,
and the pmap SSGD baseline, all with the default config's α0, momentum and epochs; prints a markdown table.

``python launch/bench.py mpi [--learners 8 --ranks 3 --repeats 1]``: samples/s of ``mpiexec -n 3`` with
``executor=mpi`` ÷ samples/s of the threads executor with the same λ and the same total number of CPU devices
(λ + 1), default config for 4 epochs (``samples_per_s`` of the last record, evaluation excluded); bytes per
push; the median push round trip (a push-sized message to rank 0 and a weights-sized reply, 200 times, with
the executor's polling send/receive).

``python launch/bench.py ray [--learners 8 --per-actor 1 8 --repeats 3]``: steady samples/s of ``executor=ray`` (a
local Ray; learners in actors of ``--per-actor`` learners each) ÷ that of the threads executor, same λ, μ, protocol
and default config for 4 epochs, evaluating every epoch: samples between the first and the last evaluation ÷ the
wall time between them, so the actors' start-up (one process each, importing JAX and compiling) is left out, and
so is the threads run's first compilation. Alternating repeats; medians and ranges.

``python launch/bench.py ray-trip [--batch 16 --steps 20 --repeats 3]``: the ray executor's per-gradient overhead,
one round trip through Ray's object store (``ray.put`` of θ, an actor returning a gradient-sized array) against
one jit gradient of μ examples, for the default config's small CNN, cifar10_full and MLPs of d ≈ 10⁵, 10⁶, 10⁷
(launch/bench_raytrip.py).

``python launch/bench.py elastic [--repeats 3 --epochs 10]``: the simulated executor (default config, λ = 8, the
``heterogeneous`` speed profile) with learners 4–7 leaving at ⅓ of the run and rejoining at ⅔, beside the same run
with a fixed λ, one per seed (``--repeats`` seeds); test error against simulated time in
docs/benchmarks/elastic.png and a markdown table (launch/elastic_report.py).

``python launch/bench.py psmem [--learners 30 --model cifar10_full]``: live device bytes the parameter server
holds for one update of c = λ gradients, stacked (no known policy) vs the running sum of a scale policy
(launch/bench_psmem.py).

``python launch/bench.py simloop [--learners 32 --batch 4 --devices 8 --steps 20 --repeats 5]``: samples/s of
the simulated executor (async, λ learners of μ, small CNN, mnist5k) ÷ samples/s of the plain per-event loop
public simulators run (one jitted gradient on the learner's stale snapshot, one jitted update, per event),
alternating repeats, median and range (launch/bench_simloop.py). Goal ≥ 3.

``python launch/bench.py tax [--learners 8 --batch 16 --n 2 --steps 40 --repeats 5 --models small_cnn
cifar10_full]``: the async tax, threads-executor samples/s ÷ pmap SSGD samples/s at the same λμ on the same
devices, one process, alternating repeats, median and range of the per-repeat ratios (launch/bench_tax.py).
Goal ≥ 0.8 for the small CNN.

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


def _without_xla_flags() -> dict:
  """This environment less XLA_FLAGS: a launched train.py picks its own CPU device count."""
  return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def train_final(overrides: list[str], launcher: tuple[str, ...] = ()) -> tuple[dict, float]:
  """Runs ``python launch/train.py`` as a user would, in a fresh workdir: (last metrics record, wall seconds)."""
  with tempfile.TemporaryDirectory() as tmp:
    workdir = os.path.join(tmp, "run")
    env = _without_xla_flags()
    start = time.perf_counter()
    proc = subprocess.run([*launcher, sys.executable, os.path.join(ROOT, "launch", "train.py"), "--workdir", workdir,
                           *overrides, "--config.progress=False"], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
      raise SystemExit(f"train.py {' '.join(overrides)} failed (exit {proc.returncode}): "
                       f"{proc.stderr.strip()[-500:]}")
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return [json.loads(line) for line in f][-1], wall


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


def bench_mpi(args: argparse.Namespace, extra: list[str]) -> dict:
  """executor=mpi over ``args.ranks`` processes vs the threads executor on the same λ + 1 devices."""
  import shutil
  mpiexec = shutil.which("mpiexec") or os.path.join(os.path.dirname(sys.executable), "mpiexec")
  common = [f"--config.learners={args.learners}", f"--config.protocol={args.protocol}", f"--config.n={args.n}",
            "--config.epochs=4", "--config.eval_every_epochs=4", "--config.checkpoint_every_epochs=4", *extra]
  rows = {"mpi": [], "threads": []}
  for r in range(args.repeats):
    for name, launcher in (("threads", ()), ("mpi", (mpiexec, "-n", str(args.ranks)))):
      final, wall = train_final([f"--config.executor={name}", *common], launcher)
      rows[name].append(final["samples_per_s"])
      print(f"repeat {r + 1}: {name}: {final['samples_per_s']:.0f} samples/s, wall {wall:.1f} s, "
            f"⟨σ⟩ {final['staleness_mean']:.2f}, test error {100 * final['test_error']:.2f} %"
            + (f", pushes per rank {final['pushes_per_rank']}" if name == "mpi" else ""), flush=True)
  ping = subprocess.run([mpiexec, "-n", "2", sys.executable, os.path.abspath(__file__), "mpi-pingpong"],
                        capture_output=True, text=True, env=_without_xla_flags())
  if ping.returncode != 0:
    raise SystemExit(f"mpi-pingpong failed: {ping.stderr[-500:]}")
  trip = json.loads(ping.stdout.strip().splitlines()[-1])
  mpi, threads = statistics.median(rows["mpi"]), statistics.median(rows["threads"])
  return {"figure": "mpi_over_threads_samples_per_s", "value": round(mpi / threads, 3),
          "mpi_samples_per_s": [round(v, 1) for v in rows["mpi"]],
          "threads_samples_per_s": [round(v, 1) for v in rows["threads"]], "ranks": args.ranks,
          "learners": args.learners, **trip, "cpu_count": os.cpu_count()}


def steady_samples_per_s(records: list[dict]) -> float:
  """Samples per second between the first and the last evaluation record (start-up left out)."""
  first, last = records[0], records[-1]
  return (last["samples"] - first["samples"]) / (last["wall_s"] - first["wall_s"])


def train_records(overrides: list[str]) -> list[dict]:
  """Every metrics record of ``python launch/train.py`` in a fresh workdir."""
  with tempfile.TemporaryDirectory() as tmp:
    workdir = os.path.join(tmp, "run")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), "--workdir", workdir,
                           *overrides, "--config.progress=False"], env=_without_xla_flags(), capture_output=True,
                          text=True)
    if proc.returncode != 0:
      raise SystemExit(f"train.py {' '.join(overrides)} failed (exit {proc.returncode}): {proc.stderr[-500:]}")
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return [json.loads(line) for line in f]


def bench_ray(args: argparse.Namespace, extra: list[str]) -> dict:
  """executor=ray (actors of each ``args.per_actor`` learners) vs threads: steady samples/s, same λ and μ."""
  common = [f"--config.learners={args.learners}", f"--config.protocol={args.protocol}", f"--config.n={args.n}",
            "--config.epochs=4", "--config.eval_every_epochs=1", "--config.checkpoint_every_epochs=4", *extra]
  cells = {"threads": ["--config.executor=threads"]}
  cells.update({f"ray_{p}_per_actor": ["--config.executor=ray", f"--config.ray_learners_per_actor={p}"]
                for p in args.per_actor})
  rows: dict[str, list[float]] = {name: [] for name in cells}
  for r in range(args.repeats):
    for name, overrides in cells.items():
      records = train_records([*overrides, *common])
      rows[name].append(steady_samples_per_s(records))
      print(f"repeat {r + 1}: {name}: {rows[name][-1]:.0f} samples/s, ⟨σ⟩ {records[-1]['staleness_mean']:.2f}, "
            f"test error {100 * records[-1]['test_error']:.2f} %", flush=True)
  threads = statistics.median(rows["threads"])
  return {"figure": "ray_over_threads_samples_per_s",
          "value": {name: round(statistics.median(v) / threads, 3) for name, v in rows.items() if name != "threads"},
          "samples_per_s": {name: [round(x, 1) for x in v] for name, v in rows.items()},
          "learners": args.learners, "cpu_count": os.cpu_count()}


ELASTIC_EVENTS = "leave 4-7 at run 1/3; join 4-7 at run 2/3"
ELASTIC_AWAY = (1 / 3, 2 / 3)


def bench_elastic(args: argparse.Namespace, extra: list[str]) -> dict:
  """Fixed λ vs half the learners away for the middle third, simulated, ``args.repeats`` seeds each."""
  from launch import elastic_report
  epochs = args.epochs
  common = ["--config.executor=simulated", "--config.sim_profile=heterogeneous", f"--config.learners={args.learners}",
            f"--config.epochs={epochs:g}", f"--config.lr_boundaries_epochs=({epochs * 2 / 3:g},{epochs * 7 / 8:g})",
            f"--config.checkpoint_every_epochs={epochs:g}", *extra]
  cells = {"fixed λ = 8": [], f"elastic: {ELASTIC_EVENTS}": [f"--config.elastic_events={ELASTIC_EVENTS}"]}
  runs: dict[str, list[list[dict]]] = {name: [] for name in cells}
  for seed in range(args.repeats):
    for name, overrides in cells.items():
      records = train_records([*common, f"--config.seed={seed}", *overrides])
      runs[name].append(records)
      print(f"seed {seed}: {name}: test error {100 * records[-1]['test_error']:.2f} %, simulated time "
            f"{records[-1]['sim_time']:.0f} s, ⟨σ⟩ {records[-1]['staleness_mean']:.2f}", flush=True)
  pairs = list(runs.items())
  rows = elastic_report.summary(pairs)
  figure = elastic_report.plot(pairs, ELASTIC_AWAY, os.path.join(ROOT, "docs", "benchmarks", "elastic.png"))
  print(elastic_report.table(rows), end="")
  return {"figure": "elastic_sim_time_ratio", "value": round(rows[1]["sim_time"] / rows[0]["sim_time"], 3),
          "rows": rows, "png": os.path.relpath(figure, ROOT), "events": ELASTIC_EVENTS}


def mpi_pingpong(round_trips: int = 200) -> dict:
  """Under ``mpiexec -n 2``: rank 1 sends push-sized messages, rank 0 answers each with a weights-sized one."""
  sys.path.insert(0, ROOT)
  import numpy as np
  import jax
  from jax.flatten_util import ravel_pytree
  from configs import default
  from sajax import models
  from sajax.executors import mpi, mpi_wire as wire
  config = default.get_config()
  params = models.init_params(models.create_model(config.model, 10), jax.random.PRNGKey(0), (28, 28, 1))
  flat = np.asarray(ravel_pytree(params)[0])
  comm = mpi.world()
  push = wire.encode(wire.PUSH, learner=1, version=0, payload=flat)
  weights = wire.encode(wire.WEIGHTS, version=0, payload=flat)
  times = []
  for _ in range(round_trips + 10):
    if comm.Get_rank() == 1:
      start = time.perf_counter()
      mpi.send(comm, push, 0, wire.TAG_TO_SERVER)
      mpi.receive(comm, wire.TAG_TO_LEARNERS, stop=lambda: False, source=0)
      times.append(time.perf_counter() - start)
    else:
      mpi.receive(comm, wire.TAG_TO_SERVER, stop=lambda: False)
      mpi.send(comm, weights, 1, wire.TAG_TO_LEARNERS)
  times = comm.bcast(times[10:], root=1)   # this summary only; the executor itself never pickles
  return {"bytes_per_push": int(push.size), "bytes_per_weights": int(weights.size),
          "push_round_trip_ms_median": round(1000 * statistics.median(times), 3),
          "push_round_trip_ms_p90": round(1000 * sorted(times)[int(0.9 * len(times))], 3)}


def mpi_pingpong_rank() -> int:
  from mpi4py import MPI
  return MPI.COMM_WORLD.Get_rank()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("figure", choices=["default", "p1", "p2", "p3", "accuracy", "mpi", "mpi-pingpong",
                                                   "psmem", "simloop", "tax", "ray", "ray-trip", "elastic"])
  parser.add_argument("--ranks", type=int, default=3)
  parser.add_argument("--per-actor", type=int, nargs="+", default=[1], help="ray: learners per Ray actor")
  parser.add_argument("--max-epochs-factor", type=float, default=3.0,
                      help="p3: asynchronous sides run at most this many times SSGD's epochs")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--learners", type=int, default=None, help="λ (p1: 8, p2: 32)")
  parser.add_argument("--batch", type=int, default=None, help="μ (p1: 16, p2: 4)")
  parser.add_argument("--devices", type=int, default=None,
                      help="CPU-emulated devices (p2, simloop: 8; tax: learner devices, default min(λ, cores))")
  parser.add_argument("--protocol", default="softsync")
  parser.add_argument("--n", type=int, default=2)
  parser.add_argument("--model", default="cifar10_full")
  parser.add_argument("--models", nargs="+", default=None, help="tax: models to time (small_cnn cifar10_full)")
  parser.add_argument("--steps", type=int, default=40, help="gradient steps per learner per repeat")
  parser.add_argument("--epochs", type=float, default=10.0, help="elastic: epochs of each run")
  args, extra = parser.parse_known_args()
  args.devices = args.devices or (None if args.figure == "tax" else 8)
  args.learners = args.learners or {"p2": 32, "psmem": 30, "simloop": 32}.get(args.figure, 8)
  args.batch = args.batch or (4 if args.figure in ("p2", "simloop") else 16)
  if args.figure == "default":
    result = bench_default(args.repeats, extra)
  elif args.figure == "accuracy":
    result = bench_accuracy(extra)
  elif args.figure == "mpi":
    result = bench_mpi(args, extra)
  elif args.figure == "ray":
    result = bench_ray(args, extra)
  elif args.figure in ("ray-trip", "elastic"):
    sys.path.insert(0, ROOT)
    from launch import bench_raytrip
    result = bench_raytrip.run(args, extra) if args.figure == "ray-trip" else bench_elastic(args, extra)
  elif args.figure == "mpi-pingpong":
    result = mpi_pingpong()
    if mpi_pingpong_rank() != 0:
      return
  else:
    sys.path.insert(0, ROOT)
    from launch.train import COLLECTIVE_TIMEOUT_FLAG   # imports no jax: the flags below still apply
    from launch.train import threads_learner_devices
    devices = {"p1": args.learners + 1,
               "tax": (args.devices or threads_learner_devices(args.learners)) + 1}.get(args.figure, args.devices)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={devices}"
                               f" {COLLECTIVE_TIMEOUT_FLAG}").strip()
    from launch import bench_p1, bench_p2, bench_p3, bench_psmem, bench_simloop, bench_tax
    result = {"p1": bench_p1, "p2": bench_p2, "p3": bench_p3, "psmem": bench_psmem,
              "simloop": bench_simloop, "tax": bench_tax}[args.figure].run(args, extra)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
