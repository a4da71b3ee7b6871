"""Benchmark: what one gradient costs in Ray's object store, against what it costs to compute, by model size d.

The ray executor moves θ (d float32) to its learner actors with one ``ray.put`` per PS version and each gradient
(d float32) back as an actor call's return value (sajax/executors/ray_engine.py). Its per-gradient overhead on one
machine is at most one such round trip: ``ray.put(θ)``, an actor receiving it and returning a gradient-sized
array (a fresh copy, as a learner's flattened gradient is), ``ray.get`` of that array. It is timed on a local Ray
(2 CPUs) against the time of one jit-compiled gradient of μ examples on this process's CPU, for the default
config's small CNN and the paper's cifar10_full (mnist-sized and 32×32×3 random inputs) and for synthetic
sizes: a two-layer MLP on 784 inputs whose hidden width gives d ≈ 10⁵, 10⁶, 10⁷. Round trip ÷ gradient ≪ 1
means Ray costs little next to the gradient; ≈ 1 or more, the learners wait on the object store as long as they
compute. Each side: ``--repeats`` repeats (alternating, round trips then gradients per model) of ``--steps``
timed calls after warm-up; the median per repeat, then the median and range of those.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

MLP_SIZES = (100_000, 1_000_000, 10_000_000)   # target d of the synthetic models
MNIST, CIFAR = (28, 28, 1), (32, 32, 3)


def _mlp(d: int):
  """A 784 → h → 10 MLP with h chosen so that it has about ``d`` parameters; (params, apply)."""
  import jax
  import jax.numpy as jnp
  hidden = max(1, round((d - 10) / (784 + 1 + 10)))
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  params = {"w1": jax.random.normal(keys[0], (784, hidden)) * 0.03, "b1": jnp.zeros(hidden),
            "w2": jax.random.normal(keys[1], (hidden, 10)) * 0.03, "b2": jnp.zeros(10)}

  def apply(p, x):
    h = jax.nn.relu(x.reshape(x.shape[0], -1) @ p["w1"] + p["b1"])
    return h @ p["w2"] + p["b2"]
  return params, apply, MNIST


def _flax(name: str):
  import jax
  from sajax import models
  model = models.create_model(name, 10)
  shape = MNIST if name == "small_cnn" else CIFAR
  params = models.init_params(model, jax.random.PRNGKey(0), shape)
  return params, (lambda p, x: model.apply({"params": p}, x)), shape


def models_to_time() -> list[tuple[str, object]]:
  """(name, builder) of every model timed: the two real ones, then the MLPs by d."""
  return ([("small_cnn (default config)", lambda: _flax("small_cnn")), ("cifar10_full", lambda: _flax("cifar10_full"))]
          + [(f"MLP, d ≈ {d:.0e}", (lambda d=d: _mlp(d))) for d in MLP_SIZES])


def gradient_timer(build, batch: int):
  """(d, a function that computes one gradient of ``batch`` examples and waits for it)."""
  import jax
  import optax
  from jax.flatten_util import ravel_pytree
  params, apply, shape = build()
  x = jax.random.normal(jax.random.PRNGKey(1), (batch, *shape))
  y = jax.random.randint(jax.random.PRNGKey(2), (batch,), 0, 10)

  @jax.jit
  def grad(p):
    loss = lambda q: optax.softmax_cross_entropy_with_integer_labels(apply(q, x), y).mean()
    return ravel_pytree(jax.grad(loss)(p))[0]   # flat, as a learner pushes it

  d = int(ravel_pytree(params)[0].size)
  return d, lambda: grad(params).block_until_ready()


class Echo:
  """The learner actor's side of a round trip: θ arrives from the object store, a gradient-sized copy leaves."""

  def gradient_sized(self, theta: np.ndarray) -> np.ndarray:
    return np.array(theta)


def timed(call, steps: int, warmup: int = 2) -> float:
  """Median seconds of ``steps`` calls of ``call`` after ``warmup`` untimed ones."""
  for _ in range(warmup):
    call()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def spread(values: list[float]) -> dict:
  """Median and range of per-repeat medians, in ms."""
  return {"median_ms": round(1000 * statistics.median(values), 3),
          "range_ms": [round(1000 * min(values), 3), round(1000 * max(values), 3)]}


def run(args, extra: list[str] = ()) -> dict:
  del extra
  import logging
  import ray
  ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
  try:
    actor = ray.remote(Echo).remote()
    ray.get(actor.gradient_sized.remote(np.zeros(1, np.float32)))   # the actor's process is up

    def round_trip(theta):
      return lambda: ray.get(actor.gradient_sized.remote(ray.put(theta)))

    rows = []
    for name, build in models_to_time():
      d, gradient = gradient_timer(build, args.batch)
      theta = np.random.default_rng(0).standard_normal(d).astype(np.float32)
      trips, grads = [], []
      for _ in range(args.repeats):
        trips.append(timed(round_trip(theta), args.steps))
        grads.append(timed(gradient, args.steps))
      ratios = [t / g for t, g in zip(trips, grads)]
      rows.append({"model": name, "d": d, "mb": round(4 * d / 1e6, 2), "ray_round_trip": spread(trips),
                   "gradient": spread(grads), "ratio_median": round(statistics.median(ratios), 3),
                   "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)]})
      print(f"{name}: d = {d}, round trip {rows[-1]['ray_round_trip']['median_ms']} ms, gradient "
            f"{rows[-1]['gradient']['median_ms']} ms (μ = {args.batch}), ratio {rows[-1]['ratio_median']}",
            flush=True)
  finally:
    ray.shutdown()
  print("| model | d | θ MB | Ray round trip, ms | gradient, ms | round trip ÷ gradient |\n|---|---|---|---|---|---|")
  for r in rows:
    trip, grad = r["ray_round_trip"], r["gradient"]
    print(f"| {r['model']} | {r['d']:,} | {r['mb']} | {trip['median_ms']:.2f} ({trip['range_ms'][0]:.2f}–"
          f"{trip['range_ms'][1]:.2f}) | {grad['median_ms']:.2f} ({grad['range_ms'][0]:.2f}–{grad['range_ms'][1]:.2f}) "
          f"| {r['ratio_median']} ({r['ratio_range'][0]}–{r['ratio_range'][1]}) |")
  return {"figure": "ray_round_trip_over_gradient", "value": {r["model"]: r["ratio_median"] for r in rows},
          "rows": rows, "batch_per_learner": args.batch, "steps": args.steps, "repeats": args.repeats}
