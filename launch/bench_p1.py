"""Benchmark P1: the threads engine against the bare gradient steps of the same learner threads.

Both sides use the same learners (λ threads, learner k on device k mod D), the same μ, the same jitted loss
(the paper's cifar10_full net with crop+flip augmentation, on random 32×32×3 uint8 images) and the same
per-learner samplers. The baseline is what the learners would do with no parameter server at all: pull
nothing, push nothing, just gradient steps. The engine's rate is taken between its 10th update and its last
update before the final evaluation, so compilation and the final evaluation/checkpoint are not counted.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import sys
import time

import jax
import numpy as np

from sajax import config as config_lib, data, models, steps, trainer
from sajax.executors import threads


def _dataset(n: int = 4096, seed: int = 0) -> data.Dataset:
  rng = np.random.default_rng(seed)
  train = data.Split(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int32))
  test = data.Split(train.images[:64], train.labels[:64])
  return data.Dataset("random32", train, test, 10, (32, 32, 3), "crop_flip", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def _config(args, dataset: data.Dataset):
  import importlib.util
  import os
  spec = importlib.util.spec_from_file_location(
      "default_config", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                                     "default.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.dataset, config.model = "cifar10", args.model
  config.executor, config.protocol, config.n = "threads", args.protocol, args.n
  config.learners, config.batch_per_learner = args.learners, args.batch
  config.learning_rate, config.momentum, config.lr_boundaries_epochs = 0.001, 0.9, ()
  config.epochs = args.steps * args.learners * args.batch / len(dataset.train)
  config.eval_every_epochs = config.checkpoint_every_epochs = config.epochs
  config.eval_batch_size = 64
  config.progress = False
  return config


def baseline_rate(args, dataset: data.Dataset, model, loss_fn, params) -> tuple[int, float]:
  """λ threads doing only jitted gradient steps on their devices: (samples, seconds)."""
  devices, _ = threads.learner_devices(args.learners)
  grad = jax.jit(jax.value_and_grad(loss_fn))
  samplers = data.learner_samplers(len(dataset.train), args.batch, args.learners, seed=1)
  local = [jax.device_put(params, d) for d in devices]
  keys = [jax.device_put(jax.random.PRNGKey(k), d) for k, d in enumerate(devices)]
  for k in range(args.learners):  # compile and warm every device first
    images, labels = dataset.train.gather(next(samplers[k]))
    jax.block_until_ready(grad(local[k], images, labels, keys[k]))

  def learner(k):
    for step in range(args.steps):
      images, labels = dataset.train.gather(next(samplers[k]))
      loss, g = grad(local[k], images, labels, jax.random.fold_in(keys[k], step))
      jax.block_until_ready(g)

  workers = [threading.Thread(target=learner, args=(k,)) for k in range(args.learners)]
  start = time.perf_counter()
  for w in workers:
    w.start()
  for w in workers:
    w.join()
  return args.learners * args.steps * args.batch, time.perf_counter() - start


def run_rate(config, dataset: data.Dataset, executor) -> tuple[int, float]:
  """``executor`` on a whole Run of ``config``: (samples, seconds) from its 10th to its last update before the
  end, so compilation and the final evaluation/checkpoint are not counted."""
  config_lib.validate(config)
  marks = []
  with tempfile.TemporaryDirectory() as workdir:
    trainer.prepare_workdir(config, workdir)
    run = trainer.Run(config, workdir, dataset, callbacks=[lambda r: marks.append((time.perf_counter(), r.samples))])
    params, opt_state = executor(run)
    run.finish(params, opt_state)
  if len(marks) < 12:
    print(f"error: the run made {len(marks)} updates; the rate needs at least 12 (10 to warm up, 2 to time); "
          "allowed: a larger --steps", file=sys.stderr)
    raise SystemExit(2)
  (t0, s0), (t1, s1) = marks[9], marks[-2]
  return s1 - s0, t1 - t0


def engine_rate(args, dataset: data.Dataset) -> tuple[int, float]:
  """The threads engine on a whole Run: (samples, seconds) from its 10th to its last update before the end."""
  return run_rate(_config(args, dataset), dataset, threads.run_threads)


def run(args, extra: list[str] = ()) -> dict:
  del extra
  dataset = _dataset()
  model = models.create_model(args.model, 10)
  params = models.init_params(model, jax.random.PRNGKey(0), (32, 32, 3))
  loss_fn = steps.make_loss_fn(model, data.make_preprocess(dataset))
  rates: dict[str, list[float]] = {"baseline": [], "engine": []}
  for r in range(args.repeats):
    for name in ("baseline", "engine"):
      samples, seconds = (baseline_rate(args, dataset, model, loss_fn, params) if name == "baseline"
                          else engine_rate(args, dataset))
      rates[name].append(samples / seconds)
      print(f"repeat {r + 1}/{args.repeats} {name}: {samples / seconds:.0f} samples/s", flush=True)
  ratios = [e / b for e, b in zip(rates["engine"], rates["baseline"])]
  return {"figure": "p1", "value": round(statistics.median(ratios), 3),
          "range": [round(min(ratios), 3), round(max(ratios), 3)], "ratios": [round(x, 3) for x in ratios],
          "samples_per_s": {k: [round(v, 1) for v in vs] for k, vs in rates.items()},
          "model": args.model, "learners": args.learners, "batch_per_learner": args.batch, "protocol": args.protocol,
          "n": args.n, "devices": len(jax.local_devices()), "backend": jax.default_backend()}
