"""The learner loop shared by the threads and MPI executors: λ host threads, each bound to a device.

    learner k (thread, device k mod D)
    (j, θ_j) ← published → θ_j on my device (once per (device, version)) → (indices, step) ← my stream →
    jit grad on μ examples → g to the PS side → put(Push(k, j, g, finite, loss, θ_j))
    hardsync: wait for a version newer than j, unless g was non-finite (the PS drops it: recompute at once)
    ssp: before each gradient, wait for a permission from the PS side (:meth:`Published.take`)
    local_steps = H > 1: H mini-batches, H inner steps from θ_j (sajax.local_steps), push Δ = θ_j − θ_local as g

Only *where* a push goes differs between executors (``put``: the PS queue in-process; a queue drained to
MPI rank 0 on other ranks) and *where* weights and ssp permissions come from (:class:`Published`). Faults are
injected here, by (learner, step), from :class:`~sajax.executors.faults.FaultPlan`. A learner that raises puts
a :class:`Death` (its traceback appended to the workdir's ``errors.log``) and ends; the run decides what follows
and reports it in one line.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
import traceback
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from sajax import local_steps
from sajax.executors.faults import FaultPlan
from sajax.server import all_finite
from sajax.steps import one_per_process
from sajax.workdir import keep_traceback


log = logging.getLogger("sajax")
PyTree = Any


@dataclasses.dataclass
class Push:
  """One gradient on its way to the PS: learner k's flat g computed on version j (θ_j kept only for
  policies that read it)."""

  learner: int
  version: int
  grads: Any
  finite: bool
  loss: Any
  stale_params: Any = None
  batches: Optional[int] = None    # mini-batches of μ behind it (DyLU's H_k); None: the run's H


@dataclasses.dataclass
class Death:
  """Learner k raised: why (one line), and the file that holds its traceback (None: none kept)."""

  learner: int
  error: str
  traceback_file: Optional[str] = None


@dataclasses.dataclass
class Left:
  """Learner k left the run (removed, or a scheduled leave) after finishing its in-flight gradient."""

  learner: int
  reason: str


@dataclasses.dataclass
class Join:
  """A learner joins: start learner k (a free id) on the current weights."""

  learner: int
  reason: str = "joined"
  replacement: bool = False   # a fresh learner in a dead learner's slot (already live in the membership)


class _Quit:
  """``is_set()``: the run stops, or learner k was asked to leave (what a learner's waits for a permission
  watch)."""

  def __init__(self, stop: threading.Event, leaving: dict, learner: int) -> None:
    self.stop, self.leaving, self.learner = stop, leaving, learner

  def is_set(self) -> bool:
    return self.stop.is_set() or self.learner in self.leaving


class Published:
  """What the PS side hands learners: the weights they pull, ``(version, flat θ)``, replaced as one value, and
  under ssp the permissions to start a gradient, with one condition to wait on.

  A permission for learner k names a version: k starts only once weights at least that new are here. The PS
  side grants it after publishing the update that released k (if any), so in one process that always holds;
  on an MPI rank the permission may arrive before those weights, and k waits for them (s = 0 with c = λ then
  still gives σ = 0). Each learner holds at most one permission: it is granted one per push the PS processed.
  """

  def __init__(self, version: Optional[int] = None, params: Any = None) -> None:
    self.value: Optional[tuple[int, Any]] = None if version is None else (version, params)
    self.changed = threading.Condition()
    self._permits: dict[int, int] = {}   # learner k -> the version it must at least pull

  @property
  def version(self) -> int:
    return -1 if self.value is None else self.value[0]

  def set(self, version: int, params: Any) -> None:
    with self.changed:
      self.value = (version, params)
      self.changed.notify_all()

  def set_newer(self, version: int, params: Any) -> bool:
    """Publishes (version, params) only if newer than the version held, checked and set as one step (returns
    whether it did): weights that arrive out of order, from concurrent calls, never take a learner back to an
    older θ. A learner's pushes then name non-decreasing versions j, which
    :class:`~sajax.executors.common.SentVersions` relies on."""
    with self.changed:
      if version <= self.version:
        return False
      self.value = (version, params)
      self.changed.notify_all()
      return True

  def wait_newer(self, version: int, stop: threading.Event) -> None:
    """Blocks until a version newer than ``version`` is published, or ``stop`` is set."""
    with self.changed:
      self.changed.wait_for(lambda: self.version > version or stop.is_set())

  def grant(self, learners: list[int], version: int) -> None:
    """SSP: ``learners`` may each start one gradient, on weights of version ``version`` or newer."""
    with self.changed:
      for k in learners:
        self._permits[k] = version
      self.changed.notify_all()

  def take(self, learner: int, stop: threading.Event) -> bool:
    """SSP: blocks until learner k holds a permission and the weights it names are here (then uses it up and
    returns True), or until ``stop`` is set (returns False)."""
    def ready() -> bool:
      needed = self._permits.get(learner)
      return stop.is_set() or (needed is not None and self.version >= needed)
    with self.changed:
      self.changed.wait_for(ready)
      if stop.is_set():
        return False
      del self._permits[learner]
      return True

  def wake(self) -> None:
    with self.changed:
      self.changed.notify_all()


class SnapshotCache:
  """The latest weights on each learner device: one transfer per (device, version), shared by learners
  (the threads and MPI learner loop, and the simulated executor)."""

  def __init__(self) -> None:
    self._lock = threading.Lock()
    self._latest: dict[Any, tuple[int, PyTree]] = {}

  def get(self, device: jax.Device, version: int, params: PyTree) -> PyTree:
    with self._lock:
      cached = self._latest.get(device)
      if cached is not None and cached[0] == version:
        return cached[1]
      local = jax.device_put(params, device)
      self._latest[device] = (version, local)
      return local


@one_per_process
def make_tree_grad_step(loss_fn: Callable) -> Callable:
  """``(θ_j, images, labels, key, step) -> (loss, g, finite)`` on pytrees, compiled, run where θ_j lives;
  ``key`` is learner k's own, into which the step is folded, as in :func:`make_grad_step`. One per ``loss_fn``
  in a process (:func:`sajax.steps.one_per_process`): runs of the same model share its programs."""
  def step(params, images, labels, key, step):
    loss, grads = jax.value_and_grad(loss_fn)(params, images, labels, jax.random.fold_in(key, step))
    return loss, grads, all_finite(grads)
  return jax.jit(step)


@one_per_process
def flat_loss(loss_fn: Callable, unravel: Callable) -> Callable:
  """``loss_fn`` on a flat θ (the vector the threads, MPI and Ray learners pull), one per (loss_fn, unravel)."""
  return lambda flat_params, *batch: loss_fn(unravel(flat_params), *batch)


@one_per_process
def make_grad_step(loss_fn: Callable, unravel: Callable) -> Callable:
  """``(flat θ_j, images, labels, key, step) -> (loss, flat g, finite)``, run on the device θ_j lives on, without
  waiting; ``key`` is learner k's own (``fold_in(run key, k)``), into which the step is folded.

  Two compiled calls: :func:`make_tree_grad_step` on the unflattened θ_j, then the flattening of g. On XLA CPU,
  flattening inside the gradient's program slowed it by about 1 ms per call for the small CNN (the concatenate
  fused into the backward pass), more than the separate call costs (launch/bench.py simloop).
  """
  tree_step = make_tree_grad_step(flat_loss(loss_fn, unravel))

  def grad_step(flat_params, images, labels, key, step):
    loss, grads, finite = tree_step(flat_params, images, labels, key, step)
    return loss, flatten(grads), finite
  return grad_step


@jax.jit
def flatten(tree: PyTree) -> jax.Array:
  """``tree``'s leaves as one flat vector, in ``ravel_pytree``'s order."""
  return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def unravel_of(tree: PyTree) -> Callable[[jax.Array], PyTree]:
  """``ravel_pytree(tree)[1]``, the inverse of :func:`flatten` for trees shaped like ``tree``, without computing
  anything: ``ravel_pytree`` concatenates the leaves op by op, one small program per leaf shape that every
  process compiles or loads at start-up. Its unravel closes over static shapes and dtypes only, so trees of the
  same structure, shapes and dtypes share one (and the programs traced from it, :func:`make_grad_step`)."""
  leaves, treedef = jax.tree.flatten(tree)
  return _unravel_of(treedef, tuple((tuple(np.shape(x)), jnp.result_type(x)) for x in leaves))


@one_per_process
def _unravel_of(treedef: Any, leaves: tuple) -> Callable[[jax.Array], PyTree]:
  unravels = []
  like = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in leaves])
  jax.eval_shape(lambda t: unravels.append(ravel_pytree(t)[1]), like)
  return unravels[0]


class Learners:
  """This process's learner threads around one run.

  Args:
    run: the :class:`sajax.trainer.Run` (data, streams, loss, key, config).
    devices: learner id -> its device, for the learners this process runs.
    published: where the weights come from.
    put: hands a :class:`Push` or :class:`Death` on (blocking while the queue is full, until ``stop``).
    stop: set when the run ends.
    to_server: where a flat gradient goes before ``put`` (the PS device, or host memory for MPI).
    keep_stale: whether a push carries θ_j (the PS's policy reads it).
    on_draw: called with (k, s) once learner k drew its step s, before computing on it (an MPI rank tells
      rank 0, whose checkpoints hold every learner's stream).
    inner_states: with ``local_steps`` > 1, learner k -> the inner-optimizer state it resumes with (host arrays,
      flat like θ; a checkpoint's, :func:`sajax.local_steps.restore_states`); a learner without one starts fresh.

  With ``local_steps`` = H > 1 (``run.local``) a learner draws H mini-batches per push, runs the H inner steps
  of :func:`sajax.local_steps.make_local_update` from θ_j and pushes Δ = θ_j − θ_local in place of g; its inner
  state stays in :attr:`inner_states` (learner k -> the state after its last round, on its device). With DyLU
  (``dynamic_local_steps``) a round is H_k steps, from the learners' measured seconds per step (:attr:`rounds`).
  """

  def __init__(self, run: Any, devices: dict, published: Published, put: Callable[[Any], None],
               stop: threading.Event, *, to_server: Callable[[Any], Any], keep_stale: bool = False,
               on_draw: Optional[Callable[[int, int], None]] = None,
               inner_states: Optional[dict[int, Any]] = None) -> None:
    self.run, self.devices, self.published, self.put, self.stop = run, devices, published, put, stop
    self.to_server, self.keep_stale, self.on_draw = to_server, keep_stale, on_draw
    self.protocol = run.protocol
    self.gated = run.protocol.max_spread is not None
    self.faults = FaultPlan.from_config(run.config)
    self.unravel = unravel_of(run.params)
    self.grad_step = make_grad_step(run.loss_fn, self.unravel)
    self.local = run.local
    if self.local is not None:
      self.local_update = local_steps.make_local_update(flat_loss(run.loss_fn, self.unravel), self.local.inner)
    self.inner_states: dict[int, Any] = dict(inner_states or {})
    # H per round, or DyLU's H_k from the learners' measured seconds per inner step.
    self.rounds = local_steps.RoundLengths(self.local.steps, self.local.dynamic) if self.local is not None else None
    self.cache = SnapshotCache()
    self.threads: list[threading.Thread] = []
    self.leaving: dict[int, str] = {}       # learner k -> why it was asked to leave (elastic membership)
    self._running: dict[int, threading.Thread] = {}

  def start(self) -> list[threading.Thread]:
    for k in list(self.devices):
      self._spawn(k)
    return self.threads

  def _spawn(self, k: int) -> None:
    t = threading.Thread(target=self._loop, args=(k,), name=f"learner-{k}", daemon=True)
    self.threads.append(t)
    self._running[k] = t
    t.start()

  def add(self, k: int, device: Any, fresh: bool = False) -> None:
    """Starts learner k on ``device`` (a join, or a fresh learner replacing a dead one: ``fresh`` drops its
    inner-optimizer state). Its data stream is learner k's, going on from where it is."""
    self.devices[k] = device
    self.leaving.pop(k, None)
    if fresh:
      self.inner_states.pop(k, None)
    self._spawn(k)

  def leave(self, k: int, reason: str) -> None:
    """Asks learner k to leave: it finishes the gradient it computes (pushes it), under hardsync waits for that
    round's update, and puts :class:`Left` at its next loop start (or while it waits for an ssp permission)."""
    self.leaving[k] = reason
    self.published.wake()

  def running(self, k: int) -> bool:
    """Whether learner k's thread is still running."""
    t = self._running.get(k)
    return t is not None and t.is_alive()

  def warm_up(self) -> None:
    """Compiles the gradient step on each learner device (on real data; no stream advanced)."""
    run = self.run
    images, labels = run.dataset.train.gather(np.arange(run.config.batch_per_learner))
    params = self.published.value[1]
    for device in set(self.devices.values()):
      local, key = jax.device_put(params, device), jax.device_put(run.key, device)
      if self.local is None:
        out = self.grad_step(local, images, np.asarray(labels, np.int32), key, np.uint32(0))
      else:
        h = self.local.steps
        out = self.local_update(local, self.local.inner.init(local), np.stack([images] * h),
                                np.stack([np.asarray(labels, np.int32)] * h), key, np.zeros(h, np.uint32), 0.0)
      jax.block_until_ready(out)

  def _draw(self, k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Learner k's next mini-batch and step, told to ``on_draw``; raises the injected fault of that step."""
    images, labels, step = self.run.next_batch(k)
    if self.on_draw is not None:
      self.on_draw(k, step)
    if self.faults.raises(k, step):
      raise self.faults.error(k, step)
    return images, labels, step

  def _loop(self, k: int) -> None:
    device = self.devices[k]
    key = jax.device_put(jax.random.fold_in(self.run.key, k), device)
    quit = _Quit(self.stop, self.leaving, k)
    try:
      while not quit.is_set():
        if self.gated and not self.published.take(k, quit):
          break
        version, params = self.published.value
        local = self.cache.get(device, version, params)
        if self.local is None:
          images, labels, step = self._draw(k)
          # numpy inputs are uncommitted: they follow θ_j onto the learner's device.
          loss, grads, finite = self.grad_step(local, images, np.asarray(labels, np.int32), key, np.uint32(step))
          nonfinite = self.faults.nonfinite(k, step)
        else:
          images, labels, steps = local_steps.stack_batches([self._draw(k) for _ in range(self.rounds.steps_for(k))])
          state = self.inner_states.get(k)
          state = self.local.inner.init(local) if state is None else jax.device_put(state, device)
          started = time.perf_counter()
          grads, self.inner_states[k], loss, finite = self.local_update(
              local, state, images, labels, key, steps, self.local.learning_rate(version))
          self.rounds.record(k, time.perf_counter() - started if bool(finite) else 0.0, len(steps))
          nonfinite = any(self.faults.nonfinite(k, int(s)) for s in steps)
        if nonfinite:
          grads, finite = jnp.full_like(grads, jnp.nan), False
        finite = bool(finite)
        self.put(Push(k, version, self.to_server(grads), finite, loss, params if self.keep_stale else None,
                      None if self.local is None else len(steps)))
        if self.protocol.learners_wait and finite:
          self.published.wait_newer(version, self.stop)   # a leaving learner too: its round completes first
      if k in self.leaving and not self.stop.is_set():
        self.put(Left(k, self.leaving[k]))
    except Exception as e:  # noqa: BLE001 - a learner's failure is reported, the run goes on
      # The PS side reports it in one line (common.Membership); the traceback goes to the workdir's errors.log
      # (on MPI ranks > 0, which write nothing, only to the debug log).
      detail = " ".join(f"{type(e).__name__}: {e}".split())
      try:
        kept = keep_traceback(self.run.workdir, f"learner {k}", traceback.format_exc()) if self.run.outputs else None
      except OSError:   # the workdir cannot be written: the death must still be reported, or hardsync waits for k
        kept = None
      log.debug("learner %d died: %s\n%s", k, detail, traceback.format_exc())
      self.put(Death(k, detail, kept))


def join_learners(threads: list, q: queue.Queue, on_death: Callable[[Death], None], wait_s: float) -> None:
  """Waits up to ``wait_s`` for stopping learner threads, draining ``q`` meanwhile (gradients in flight are
  discarded, deaths handed to ``on_death``); warns about any thread still running."""
  # A learner stops at its next check of ``stop``, after the gradient (or first compilation) it is in: under
  # load a compilation took over 30 s. A second Ctrl-C interrupts the wait.
  deadline = time.monotonic() + wait_s
  while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
    try:
      while True:
        item = q.get_nowait()
        if isinstance(item, Death):
          on_death(item)
    except queue.Empty:
      pass
    for t in threads:
      t.join(timeout=0.05)
  stuck = [t.name for t in threads if t.is_alive()]
  if stuck:
    log.warning("%d learner thread(s) still running after %.0f s, left behind: %s", len(stuck), wait_s,
                ", ".join(stuck))
