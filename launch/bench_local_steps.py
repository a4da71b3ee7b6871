"""Benchmark: one round of H inner steps (asynchronous local-SGD) as sajax runs it (H jitted inner steps and a
jitted Δ, :func:`sajax.local_steps.make_local_update`) against one compiled ``lax.scan`` over the H stacked
batches, rolled and fully unrolled, for the default small CNN on mnist5k, on one device.

All three compute the same Δ = θ_j − θ_local (the largest gap is reported). Reported: milliseconds per round of
each (median of the repeats, alternating), and each scan's ratio to the loop (median over repeats).
``python launch/bench_local_steps.py --steps 4 --batch 16``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from sajax import data, local_steps, models, steps


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--steps", type=int, default=4, help="H")
  p.add_argument("--batch", type=int, default=16, help="μ")
  p.add_argument("--inner", default="sgd", help="sgd | adamw")
  p.add_argument("--rounds", type=int, default=30, help="rounds per repeat")
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args(argv)
  dataset = data.load_dataset("mnist5k")
  model = models.create_model("small_cnn", dataset.num_classes)
  loss_fn = steps.make_loss_fn(model, data.make_preprocess(dataset))
  params = models.init_params(model, jax.random.PRNGKey(0), dataset.input_shape)
  inner = local_steps.inner_direction(args.inner, momentum=0.5 if args.inner == "sgd" else 0.0)
  state0 = inner.init(params)
  H, mu = args.steps, args.batch
  images, labels = dataset.train.gather(np.arange(H * mu))
  images = images.reshape((H, mu) + images.shape[1:])
  labels = np.asarray(labels, np.int32).reshape(H, mu)
  key, lr = jax.random.PRNGKey(1), np.float32(0.05)
  step_ids = np.arange(H, dtype=np.uint32)

  looped = local_steps.make_local_update(loss_fn, inner)

  def make_scan(unroll):
    @jax.jit
    def scanned(params, state, images, labels, steps):
      def step(carry, batch):
        local, state = carry
        x, y, s = batch
        grads = jax.grad(loss_fn)(local, x, y, jax.random.fold_in(key, s))
        direction, state = inner.update(grads, state, local)
        return (jax.tree.map(lambda p, u: p - lr * u, local, direction), state), None
      (local, _), _ = jax.lax.scan(step, (params, state), (images, labels, steps), unroll=unroll)
      return jax.tree.map(lambda a, b: a - b, params, local)
    return scanned

  variants = {"loop": lambda: looped(params, state0, images, labels, key, step_ids, lr)[0]}
  for name, unroll in (("scan", 1), ("unrolled_scan", True)):
    fn = make_scan(unroll)
    variants[name] = lambda fn=fn: fn(params, state0, images, labels, step_ids)

  def time_rounds(fn) -> float:
    out = None
    start = time.perf_counter()
    for _ in range(args.rounds):
      out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / args.rounds * 1e3

  outs = {name: fn() for name, fn in variants.items()}
  gap = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for name in ("scan", "unrolled_scan")
            for x, y in zip(jax.tree.leaves(outs[name]), jax.tree.leaves(outs["loop"])))
  ms = {name: [] for name in variants}
  for _ in range(args.repeats):
    for name, fn in variants.items():
      ms[name].append(time_rounds(fn))
  result = {"steps": H, "batch": mu, "inner": args.inner, "max_delta_gap": gap,
            **{f"{name}_ms": statistics.median(v) for name, v in ms.items()},
            **{f"{name}_over_loop": statistics.median([a / b for a, b in zip(ms[name], ms["loop"])])
               for name in ("scan", "unrolled_scan")}}
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
