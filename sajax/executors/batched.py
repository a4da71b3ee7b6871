"""Many learners' gradients in one compiled call: (snapshot, batch) pairs spread over the local devices.

The simulated executor knows every in-flight learner's snapshot θ_j as soon as it pulls, so it need not
compute gradients one event at a time. Learner k lives on device ``k mod D``, which keeps the recent versions
its learners pulled in a :class:`VersionRing` of R flat parameter vectors; one call of
:func:`make_batched_gradients` computes, on every device at once, the gradient of each of K *slots* (a
learner's ring entry and its own mini-batch of μ), K being the most pending learners on one device.

How the K slots of a device are batched is chosen per backend, behind :func:`make_batched_gradients`
(``how="auto"``), by measurement:

- ``"unrolled"`` (CPU): a Python loop over the K slots inside the jitted function. On XLA CPU this matched the
  pmap SSGD step per sample, while ``jax.vmap`` over per-learner weights turned convolutions into grouped
  convolutions and ran 4–5× slower per sample (docs/benchmarks.md, P2).
- ``"vmap"`` (GPU/TPU): one vmapped gradient over the K (weights, batch) pairs; on accelerators batched
  grouped convolutions are usually fast (not measured here: this machine has no accelerator).

A slot's result depends only on its own inputs (no reduction across slots), so how learners happen to be
grouped into calls does not change a gradient (tests/test_simulated.py checks this bit for bit through a
one-entry ring, which forces other groupings): this is what lets the simulation resume bit for bit.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

PyTree = Any
BATCHING = ("auto", "unrolled", "vmap")


def default_batching(platform: str) -> str:
  """The measured choice of slot batching for a backend: ``unrolled`` on CPU, ``vmap`` elsewhere."""
  return "unrolled" if platform == "cpu" else "vmap"


def make_batched_gradients(loss_fn: Callable, unravel: Callable, devices: Sequence[jax.Device],
                           how: str = "auto") -> Callable:
  """One compiled call computing the gradients of up to D·K learners on their own snapshots.

  Returns ``grads(ring, index, images, labels, learner, step, key) -> (loss, flat_grads, finite)``, pmapped
  over ``devices``: per device, ``ring`` is (R, d), ``index`` (K,) the ring entry of each slot, ``images``
  (K, μ, ...), ``labels`` (K, μ), ``learner``/``step`` (K,) ints (the augmentation/dropout key of learner
  k's s-th gradient is ``fold_in(fold_in(key, k), s)``, as in every executor); ``key`` is broadcast.
  Outputs per device: ``loss`` (K,), ``flat_grads`` (K, d), ``finite`` (K,). K may change between calls
  (one compilation per K). Every slot is computed: callers fill unused slots with any valid input and
  ignore their outputs (``lax.cond`` to skip them ran 6× slower on XLA CPU).
  """
  if how not in BATCHING:
    raise ValueError(f"batching={how!r} is invalid; allowed: {', '.join(BATCHING)}")
  how = default_batching(devices[0].platform) if how == "auto" else how

  def one(ring, index, images, labels, learner, step, key):
    rng = jax.random.fold_in(jax.random.fold_in(key, learner), step)
    loss, grads = jax.value_and_grad(loss_fn)(unravel(ring[index]), images, labels, rng)
    flat = ravel_pytree(grads)[0]
    return loss, flat, jnp.all(jnp.isfinite(flat))

  def per_device(ring, index, images, labels, learner, step, key):
    if how == "vmap":
      return jax.vmap(one, in_axes=(None, 0, 0, 0, 0, 0, None))(ring, index, images, labels, learner, step, key)
    outs = [one(ring, index[i], images[i], labels[i], learner[i], step[i], key) for i in range(index.shape[0])]
    return tuple(jnp.stack(x) for x in zip(*outs))

  return jax.pmap(per_device, in_axes=(0, 0, 0, 0, 0, 0, None), devices=list(devices))


# Module-level, so every ring and every run shares one compiled function per (device, shape): XLA CPU
# executables are not freed, and compiling them per run exhausted the process's memory maps after ~20 runs.
_write_entry = jax.jit(lambda ring, i, x: ring.at[0, i].set(x), donate_argnums=0)


# A device's (1, K, d) output shard as K vectors on that device.
unstack_slots = jax.jit(lambda x: tuple(x[0, i] for i in range(x.shape[1])))


class VersionRing:
  """The recent parameter versions a device's learners pulled: R flat vectors in one (R, d) device array.

  An entry is *needed* while a learner on this device holds that version and its gradient is not computed
  yet. :meth:`slot_for` returns the entry of a version, writing it into a free entry (one transfer per
  (device, version)); when all R entries are needed it returns None and the caller must first compute the
  pending gradients (the simulated executor's documented rule: a too-old snapshot forces a batched call,
  it is never silently replaced or approximated).
  """

  def __init__(self, device: jax.Device, size: int, dim: int, dtype: Any) -> None:
    self.device = device
    self.size = size
    self.array = jax.device_put(jnp.zeros((1, size, dim), dtype), device)
    self.versions: list[Optional[int]] = [None] * size

  def slot_for(self, version: int, flat_params: jax.Array, needed: set[int]) -> Optional[int]:
    """The ring entry holding ``version`` (written now if absent), or None when every entry is needed."""
    if version in self.versions:
      return self.versions.index(version)
    free = [i for i, v in enumerate(self.versions) if v is None or v not in needed]
    if not free:
      return None
    # Reuse the entry of the oldest version no longer needed, so entries are recycled in version order.
    i = min(free, key=lambda e: -1 if self.versions[e] is None else self.versions[e])
    self.array = _write_entry(self.array, np.int32(i), jax.device_put(flat_params, self.device))
    self.versions[i] = version
    return i


def ring_size(learners: int, gradients_per_update: int, learners_on_device: int) -> int:
  """R, sized from the protocol: versions a device may need between two batched calls.

  Between two calls at most λ gradients are pushed (each learner's second push needs a new call), so at most
  ⌈λ/c⌉ updates happen and ⌈λ/c⌉ + 1 versions are pulled; a device never needs more entries than it has
  learners (each holds one version). R = min(⌈λ/c⌉ + 1, learners on the device).
  """
  return max(1, min(-(-learners // gradients_per_update) + 1, learners_on_device))
