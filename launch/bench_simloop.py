"""Benchmark: the simulated executor against the obvious per-event loop that public async-SGD simulators run.

Both sides train the default small CNN on mnist5k (the default config's α0, momentum and ``inverse`` policy)
with λ asynchronous learners of μ (c = 1: one PS update per gradient), on the same machine, in one process,
alternating repeats.

- **plain loop** (the reference, written here): the event loop of a typical simulator. Learners finish in
  simulated-time order (all equally fast, ties by id); per event, one jitted gradient of μ examples on that
  learner's own stale snapshot θ_j (a pytree on one device), then one jitted staleness-aware update
  (``sajax.staleness_aware`` around SGD with momentum, σ = i − j) and the learner pulls θ_i.
- **simulated executor**: ``executor=simulated`` on a whole :class:`sajax.trainer.Run`, timed between its 10th
  update and its last update before the final evaluation (compilation and the final evaluation excluded).

Reported: samples/s of each side per repeat, their medians, and the ratio simulated ÷ plain per repeat pair
(median and range). ``gradient_only_samples_per_s`` is the bare jitted gradient of μ examples on one device
with nothing else: an upper bound for any per-event loop on this machine.
"""

from __future__ import annotations

import heapq
import statistics
import time

import jax
import numpy as np

from launch.bench_p1 import run_rate
from sajax import data, run_optimizer
from sajax.executors import simulated


def _config(learners: int, batch: int, updates: int, num_train: int):
  from configs import default
  config = default.get_config()
  config.executor, config.protocol, config.n = "simulated", "async", 1
  config.learners, config.batch_per_learner = learners, batch
  config.lr_boundaries_epochs = ()
  config.epochs = updates * batch / num_train
  config.eval_every_epochs = config.checkpoint_every_epochs = config.epochs
  config.progress = False
  return config


def plain_loop_rate(config, dataset: data.Dataset, count: int) -> tuple[int, float]:
  """The reference per-event loop: (samples, seconds) over ``count`` events after ``config.learners`` warm-up
  events (which compile the two jitted functions)."""
  import optax
  from sajax import config as config_lib, models, steps
  λ, μ = config.learners, config.batch_per_learner
  model = models.create_model(config.model, dataset.num_classes)
  loss_fn = steps.make_loss_fn(model, data.make_preprocess(dataset))
  params = models.init_params(model, jax.random.PRNGKey(config.seed), dataset.input_shape)
  tx = run_optimizer.make_optimizer(config, optax.constant_schedule(config.learning_rate), config_lib.policy_of(config))
  opt_state = tx.init(params)
  grad = jax.jit(jax.value_and_grad(loss_fn))

  @jax.jit
  def update(params, opt_state, grads, staleness):
    updates, opt_state = tx.update(grads, opt_state, params, staleness=staleness)
    return optax.apply_updates(params, updates), opt_state

  samplers = data.learner_samplers(len(dataset.train), μ, λ, config.seed)
  key = jax.random.PRNGKey(config.seed)
  version = 0
  held = [(0, params)] * λ                    # each learner's (j, θ_j)
  events = [(1.0, k) for k in range(λ)]       # (finish time, learner)
  step = [0] * λ

  def event():
    nonlocal params, opt_state, version
    now, k = heapq.heappop(events)
    j, theta_j = held[k]
    images, labels = dataset.train.gather(next(samplers[k]))
    _, g = grad(theta_j, images, labels, jax.random.fold_in(jax.random.fold_in(key, k), step[k]))
    params, opt_state = update(params, opt_state, g, np.int32(version - j))
    version += 1
    step[k] += 1
    held[k] = (version, params)
    heapq.heappush(events, (now + 1.0, k))

  for _ in range(λ):
    event()
  jax.block_until_ready(params)
  start = time.perf_counter()
  for _ in range(count):
    event()
  jax.block_until_ready(params)
  return count * μ, time.perf_counter() - start


def gradient_only_rate(config, dataset: data.Dataset, calls: int = 100) -> float:
  """Samples/s of the bare jitted gradient of μ examples on one device, repeated on one batch."""
  from sajax import models, steps
  model = models.create_model(config.model, dataset.num_classes)
  loss_fn = steps.make_loss_fn(model, data.make_preprocess(dataset))
  params = models.init_params(model, jax.random.PRNGKey(0), dataset.input_shape)
  grad = jax.jit(jax.value_and_grad(loss_fn))
  images, labels = dataset.train.gather(np.arange(config.batch_per_learner))
  key = jax.random.PRNGKey(0)
  jax.block_until_ready(grad(params, images, labels, key))
  start = time.perf_counter()
  for _ in range(calls):
    out = grad(params, images, labels, key)
  jax.block_until_ready(out)
  return calls * config.batch_per_learner / (time.perf_counter() - start)


def run(args, extra: list[str] = ()) -> dict:
  del extra
  dataset = data.load_dataset("mnist5k")
  updates = args.steps * args.learners
  config = _config(args.learners, args.batch, updates, len(dataset.train))
  rates: dict[str, list[float]] = {"plain": [], "simulated": []}
  for r in range(args.repeats):
    for name in ("plain", "simulated"):
      samples, seconds = (plain_loop_rate(config, dataset, updates) if name == "plain"
                          else run_rate(config, dataset, simulated.run_simulated))
      rates[name].append(samples / seconds)
      print(f"repeat {r + 1}/{args.repeats} {name}: {samples / seconds:.0f} samples/s", flush=True)
  ratios = [s / p for s, p in zip(rates["simulated"], rates["plain"])]
  return {"figure": "simloop", "value": round(statistics.median(ratios), 3),
          "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
          "samples_per_s": {k: [round(v, 1) for v in vs] for k, vs in rates.items()},
          "median_samples_per_s": {k: round(statistics.median(vs), 1) for k, vs in rates.items()},
          "gradient_only_samples_per_s": round(gradient_only_rate(config, dataset), 1),
          "model": config.model, "learners": args.learners, "batch_per_learner": args.batch,
          "devices": len(jax.local_devices()), "backend": jax.default_backend()}
