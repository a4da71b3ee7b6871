"""Benchmark P2: time per sample of the simulated executor (λ = 32 async learners) ÷ the pmap SSGD baseline.

Both sides train the paper's cifar10_full net (crop+flip augmentation, random 32×32×3 uint8 images) on the
same local devices through a whole :class:`sajax.trainer.Run`: the simulated executor with λ learners of μ
(async: c = 1, one PS update per gradient, each gradient dispatched at its learner's pull), and pmap
SSGD at the same global batch λμ. A rate is taken between a run's 10th update and its last update before the
final evaluation, so compilation and the final evaluation/checkpoint are not counted. Repeats alternate the
two sides and are pooled.
"""

from __future__ import annotations

import jax

from launch.bench_p1 import _dataset, run_rate
from sajax import sync
from sajax.executors import simulated


def _config(executor: str, learners: int, batch: int, updates: int, num_train: int):
  from configs import default
  config = default.get_config()
  config.dataset, config.model = "cifar10", "cifar10_full"
  config.executor, config.protocol, config.n = executor, "async" if executor == "simulated" else "hardsync", 1
  config.learners, config.batch_per_learner = learners, batch
  config.learning_rate, config.momentum, config.lr_boundaries_epochs = 0.001, 0.9, ()
  config.epochs = updates * learners * batch / num_train
  config.eval_every_epochs = config.checkpoint_every_epochs = config.epochs
  config.eval_batch_size = 64
  config.progress = False
  return config


def rate(config, dataset) -> tuple[int, float]:
  """(samples, seconds) of a whole run, from its 10th update to its last update before the end."""
  return run_rate(config, dataset, simulated.run_simulated if config.executor == "simulated" else sync.run_ssgd)


def run(args, extra: list[str] = ()) -> dict:
  del extra
  dataset = _dataset()
  devices = len(jax.local_devices())
  global_batch = args.learners * args.batch
  sides = {"ssgd": _config("pmap", devices, global_batch // devices, args.steps, len(dataset.train))}
  # async: one PS update per gradient, so λ updates per λμ samples
  sides["simulated"] = _config("simulated", args.learners, args.batch, args.steps * args.learners,
                               len(dataset.train))
  totals = {name: [0, 0.0] for name in sides}
  for r in range(args.repeats):
    for name, config in sides.items():
      samples, seconds = rate(config, dataset)
      totals[name][0] += samples
      totals[name][1] += seconds
      print(f"repeat {r + 1}/{args.repeats} {name}: {1e3 * seconds / samples:.3f} ms per sample", flush=True)
  per_sample = {name: t / s for name, (s, t) in totals.items()}
  return {"figure": "p2", "value": round(per_sample["simulated"] / per_sample["ssgd"], 3),
          "ms_per_sample": {k: round(1e3 * v, 4) for k, v in per_sample.items()}, "model": "cifar10_full",
          "learners": args.learners, "batch_per_learner": args.batch, "global_batch": global_batch,
          "devices": devices, "backend": jax.default_backend()}
