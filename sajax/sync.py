"""The SSGD baseline (``executor="pmap"``): classic synchronous data parallelism with ``jax.pmap``.

Each update takes one mini-batch of μ from every one of the λ learners' samplers (a global batch of λμ),
splits it over the local devices, averages the gradients over the devices and applies the same
staleness-aware optimizer with σ = 0, i.e. hardsync with c = λ. One jitted call per mini-batch: on CPU a
whole epoch inside ``lax.scan`` was measured 10–30× slower.

The average adds the devices' gradients in device order (0, 1, 2, ...), so a run's numbers do not depend on
how its devices are spread over processes. In one process ``lax.pmean`` already does (XLA CPU's in-process
all-reduce adds the participants in rank order; measured bitwise equal). Across processes XLA CPU uses gloo's
ring all-reduce, which starts each chunk's sum at a different rank, so there it is an all-gather and a
fixed-order sum (d copies of the gradients per device, hence only there). The order matters beyond rounding:
most ulp-sized differences in the first steps stay that small, but some move the whole run; one ulp of noise on
the initial weights moved the smoke test's epoch-1 loss from 1.946744 to 1.947042 or 1.948410.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sajax import steps

PyTree = Any
AXIS = "devices"


def pmap_devices(global_batch: int, devices: list | None = None) -> list:
  """The most local devices (at most all of them) that split a global batch of λμ evenly."""
  devices = devices or jax.local_devices()
  d = max(k for k in range(1, len(devices) + 1) if global_batch % k == 0)
  return devices[:d]


def process_devices(global_batch: int) -> tuple[list, list, int]:
  """Several processes (``jax.distributed``): the same number k of devices from each of the P processes, the
  most that split λμ evenly over k·P; returns (all of them in process order, this process's, the index of its
  first shard of the global batch)."""
  per_process = [sorted((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)
                 for p in range(jax.process_count())]
  count = min(len(devices) for devices in per_process)
  fits = [k for k in range(1, count + 1) if global_batch % (k * len(per_process)) == 0]
  if not fits:
    raise ValueError(f"global batch λμ = {global_batch} does not split over {len(per_process)} processes; "
                     f"allowed: λμ divisible by the number of processes")
  k = max(fits)
  return [d for devices in per_process for d in devices[:k]], per_process[jax.process_index()][:k], \
      jax.process_index() * k


def ordered_mean(tree: PyTree, axis_name: str) -> PyTree:
  """The mean over the devices of ``axis_name``, added in device order ((x0 + x1) + x2) + ... on every
  device: an all-gather, then a fixed-order sum, whatever order the all-reduce underneath would add in."""

  def mean(x):
    xs = jax.lax.all_gather(x, axis_name)
    total = xs[0]
    for i in range(1, xs.shape[0]):
      total = total + xs[i]
    return total / xs.shape[0]

  return jax.tree.map(mean, tree)


@steps.one_per_process
def make_ssgd_step(loss_fn: steps.LossFn, tx: optax.GradientTransformationExtraArgs, devices: Sequence,
                   ordered: bool = False) -> Callable[..., tuple[PyTree, PyTree, jax.Array]]:
  """``step(params, opt_state, images, labels, rng) -> (params, opt_state, loss)``, pmapped over ``devices``.

  ``params``/``opt_state`` are replicated, ``images``/``labels`` sharded on a leading device axis and
  ``rng`` is one key (each device folds in its index, so augmentation differs per shard). ``ordered``: average
  with :func:`ordered_mean` instead of ``lax.pmean`` (for devices in several processes; see the module doc).
  """
  average = (lambda tree: ordered_mean(tree, AXIS)) if ordered else (lambda tree: jax.lax.pmean(tree, AXIS))

  def step(params, opt_state, images, labels, rng):
    rng = jax.random.fold_in(rng, jax.lax.axis_index(AXIS))
    loss, grads = jax.value_and_grad(loss_fn)(params, images, labels, rng)
    grads, loss = average((grads, loss))
    updates, opt_state = tx.update(grads, opt_state, params, staleness=jnp.zeros((), jnp.int32))
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.pmap(step, axis_name=AXIS, in_axes=(0, 0, 0, 0, None), devices=devices, donate_argnums=(0, 1))


def run_ssgd(run: Any) -> tuple[PyTree, PyTree]:
  """Drives a :class:`sajax.trainer.Run` with the pmap SSGD executor; returns the final (params, opt_state)."""
  config = run.config
  global_batch = config.learners * config.batch_per_learner
  if jax.process_count() > 1:   # under mpiexec: every process draws the global batch, feeds its own shards
    devices, local, first = process_devices(global_batch)
  else:
    devices = local = pmap_devices(global_batch)
    first = 0
  d = len(devices)
  step = make_ssgd_step(run.loss_fn, run.tx, tuple(devices), ordered=jax.process_count() > 1)   # one per process
  params = steps.replicate(run.params, local)
  opt_state = steps.replicate(run.opt_state, local)
  run.log(f"SSGD over {d} device(s) in {jax.process_count()} process(es): global batch λμ = {global_batch}")
  if config.protocol != "hardsync":
    run.log(f"executor=pmap is synchronous SGD: protocol={config.protocol!r} is ignored (σ = 0 throughout)")

  def current_state():
    if jax.process_count() == 1:
      return steps.unreplicate(params), steps.unreplicate(opt_state)
    # Several processes: plain single-device arrays (orbax refuses host-local slices of a global array).
    first = lambda x: jnp.asarray(np.asarray(x.addressable_data(0))[0])  # noqa: E731
    return jax.tree.map(first, params), jax.tree.map(first, opt_state)

  previous_loss = None
  try:
    while not run.done:
      images, labels = run.next_batches(range(config.learners))
      shard = lambda a: a.reshape((d, -1) + a.shape[1:])[first:first + len(local)]  # noqa: E731
      rng = jax.random.fold_in(run.key, run.updates)
      params, opt_state, loss = step(params, opt_state, shard(images), shard(np.asarray(labels, np.int32)), rng)
      # At most two steps in flight: an unbounded queue of pmapped steps with all-reduces can starve XLA
      # CPU's thread pool and deadlock its collective rendezvous (seen with 8 emulated devices on 2 cores).
      if previous_loss is not None:
        previous_loss.block_until_ready()
      previous_loss = loss
      run.after_update(loss[0], gradients=config.learners, current_state=current_state)
  except KeyboardInterrupt:
    run.interrupted(current_state)
    raise
  return current_state()
