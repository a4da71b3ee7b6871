"""``python launch/bench.py psmem [--learners 30 --model cifar10_full]``: parameter-server memory per update.

Drives one :class:`sajax.ParameterServer` with hardsync over λ learners (c = λ, the largest c there is) on the
model's flat parameter vector (d floats) and measures the bytes of live device buffers just before the c-th
push, beyond θ and the optimizer state:

* ``stacked``: the PS without a known policy (``policy=None``) keeps the c gradients and stacks them inside the
  update (the behaviour before the running sum: O(c·d));
* ``running``: the PS with the ``inverse`` scale policy keeps one running sum Σ s(σ_l)·g_l (O(d)).

Each pushed gradient is a fresh array that the caller drops after the push, as a learner does. Also prints,
for AlexNet (d from the model), what c·d float32 would be at the same λ.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sajax
from sajax import models


def _param_count(model: str, input_shape: tuple, classes: int) -> int:
  net = models.create_model(model, classes)
  shapes = jax.eval_shape(lambda: models.init_params(net, jax.random.PRNGKey(0), input_shape))
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))


def _live_bytes() -> int:
  return sum(x.nbytes for x in jax.live_arrays())


def extra_bytes(learners: int, dim: int, policy: Any) -> int:
  """Live bytes beyond θ and the optimizer state after c − 1 pushes (the most the PS holds)."""
  tx = sajax.staleness_aware(optax.sgd(0.01, momentum=0.9), policy="inverse")
  ps = sajax.ParameterServer(jnp.zeros((dim,), jnp.float32), tx, sajax.Protocol.hardsync(learners), policy=policy)
  version = ps.pull()[0]
  for k in range(learners):          # one full update first: every function compiled, the buffers settled
    ps.push(k, version, jnp.full((dim,), 1e-3, jnp.float32), finite=True)
  jax.block_until_ready(ps.params)
  base = _live_bytes()
  version = ps.pull()[0]
  for k in range(learners - 1):
    g = jnp.full((dim,), 1e-3 * (k + 1), jnp.float32)
    ps.push(k, version, g, finite=True)
    del g
  jax.block_until_ready(jax.live_arrays())
  held = _live_bytes() - base
  ps.push(learners - 1, version, jnp.full((dim,), 1e-3, jnp.float32), finite=True)
  return held


def run(args: Any, extra: list[str]) -> dict:
  del extra
  shapes = {"small_cnn": ((28, 28, 1), 10), "cifar10_full": ((32, 32, 3), 10), "alexnet": ((227, 227, 3), 1000)}
  dim = _param_count(args.model, *shapes[args.model])
  stacked = extra_bytes(args.learners, dim, None)
  running = extra_bytes(args.learners, dim, "inverse")
  alexnet = _param_count("alexnet", *shapes["alexnet"])
  print(f"| {args.model} (d = {dim:,}), λ = c = {args.learners} | {stacked / 2**20:.2f} MiB | "
        f"{running / 2**20:.2f} MiB | {stacked / max(running, 1):.1f}× |")
  print(f"AlexNet (d = {alexnet:,}) at c = {args.learners}: c·d float32 = {args.learners * alexnet * 4 / 2**30:.2f} GiB "
        f"stacked, d float32 = {alexnet * 4 / 2**20:.0f} MiB running")
  return {"figure": "psmem", "value": running / max(stacked, 1), "stacked_bytes": stacked, "running_bytes": running,
          "dim": dim, "learners": args.learners, "alexnet_dim": alexnet}
