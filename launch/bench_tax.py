"""Benchmark: the "async tax", the threads executor's samples/s ÷ pmap SSGD's, same model, λμ and devices.

Both sides train through a whole :class:`sajax.trainer.Run` in this one process, on the same D CPU-emulated
devices: the threads executor with λ learner threads of μ (n-softsync, the ``inverse`` policy, the parameter
server on one more device), and pmap SSGD with the same global batch λμ split over the λ learner devices. A
rate is taken between a run's 10th update and its last update before the final evaluation, so compilation
and the final evaluation/checkpoint are not counted (launch/bench_p1.run_rate). Repeats alternate the two
sides; the figure is the median of the per-repeat ratios, with their range.

Models: ``small_cnn`` on mnist5k (the default run's model and data) and ``cifar10_full`` on random 32×32×3
images (the paper's CIFAR10 net, as in P1 and P2).
"""

from __future__ import annotations

import statistics

import jax

from launch.bench_p1 import _dataset, run_rate
from sajax import data, sync
from sajax.executors import threads


def _config(model: str, executor: str, learners: int, batch: int, updates: int, num_train: int, n: int):
  from configs import default
  config = default.get_config()
  if model == "cifar10_full":
    config.dataset, config.model = "cifar10", "cifar10_full"
    config.learning_rate, config.momentum = 0.001, 0.9
    config.eval_batch_size = 64
  config.executor, config.protocol, config.n = executor, "softsync" if executor == "threads" else "hardsync", n
  config.learners, config.batch_per_learner = learners, batch
  config.lr_boundaries_epochs = ()
  c = max(1, learners // n) if executor == "threads" else learners
  config.epochs = updates * c * batch / num_train
  config.eval_every_epochs = config.checkpoint_every_epochs = config.epochs
  config.progress = False
  return config


def tax(model: str, args) -> dict:
  """Alternating repeats of both sides for one model; per-repeat samples/s and the ratio's median and range."""
  dataset = data.load_dataset("mnist5k") if model == "small_cnn" else _dataset()
  learners, batch = args.learners, args.batch
  sides = {
      "pmap": (_config(model, "pmap", learners, batch, args.steps, len(dataset.train), 1), sync.run_ssgd),
      "threads": (_config(model, "threads", learners, batch, args.steps * max(1, args.n), len(dataset.train),
                          args.n), threads.run_threads)}
  rates: dict[str, list[float]] = {name: [] for name in sides}
  for r in range(args.repeats):
    for name, (config, executor) in sides.items():
      samples, seconds = run_rate(config, dataset, executor)
      rates[name].append(samples / seconds)
      print(f"{model} repeat {r + 1}/{args.repeats} {name}: {samples / seconds:.0f} samples/s", flush=True)
  ratios = [t / p for t, p in zip(rates["threads"], rates["pmap"])]
  return {"value": round(statistics.median(ratios), 3), "range": [round(min(ratios), 3), round(max(ratios), 3)],
          "ratios": [round(x, 3) for x in ratios],
          "samples_per_s": {k: [round(v, 1) for v in vs] for k, vs in rates.items()}}


def run(args, extra: list[str] = ()) -> dict:
  del extra
  models = args.models or ["small_cnn", "cifar10_full"]
  results = {model: tax(model, args) for model in models}
  return {"figure": "tax", "value": results[models[0]]["value"], "by_model": results,
          "learners": args.learners, "batch_per_learner": args.batch, "n": args.n,
          "devices": len(jax.local_devices()), "backend": jax.default_backend()}
