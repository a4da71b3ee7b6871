"""``executor="threads"``: the paper's system on one host — λ learner threads, a bounded queue, one PS.

The picture (Podracer/Sebulba's three nouns)::

    learner k (thread, device k mod D)                 queue (bounded)         PS loop (main thread)
    pull (j, θ_j) → θ_j on my device (once per          ───────────────▶        ParameterServer.push
    (device, version)) → jit grad on μ examples →       (k, j, g, finite)       → one jitted update every
    g to the PS device → put                                                     c gradients → publish θ_i

Learners never wait under softsync/async; under hardsync a learner waits for the next version before it
pulls again. The PS loop stops when epochs × N samples have been applied; gradients still in flight are
discarded. A learner that raises is reported and the run goes on with the others, c re-derived from the
live learners (so hardsync cannot deadlock), unless ``fail_fast`` is set.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
import traceback
from typing import Any, Optional

import jax
import numpy as np

from sajax.executors import common
from sajax.protocol import Protocol
from jax.flatten_util import ravel_pytree

from sajax.server import ParameterServer, all_finite, flat_transform

log = logging.getLogger("sajax")
SHUTDOWN_WAIT_S = 600   # how long a stopping run waits for its learner threads
PyTree = Any


@dataclasses.dataclass
class _Push:
  learner: int
  version: int
  grads: PyTree
  finite: bool
  loss: jax.Array


@dataclasses.dataclass
class _Death:
  learner: int
  error: str


def learner_devices(learners: int, devices: Optional[list] = None) -> tuple[list, jax.Device]:
  """Learner k's device (k mod D over the devices the learners use) and the PS device.

  The PS gets a device of its own when there are more devices than learners, else it shares device 0.
  """
  devices = devices or jax.local_devices()
  if len(devices) > learners:
    return [devices[k] for k in range(learners)], devices[learners]
  return [devices[k % len(devices)] for k in range(learners)], devices[0]


class _SnapshotCache:
  """The latest weights on each learner device: one transfer per (device, version), shared by learners.

  Only the newest version is kept per device, so no snapshot outlives its last reader.
  """

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


class ThreadedEngine:
  """Drives one :class:`sajax.trainer.Run` with λ learner threads around a :class:`ParameterServer`."""

  def __init__(self, run: Any, devices: Optional[list] = None, local_learners: Optional[list] = None) -> None:
    flat_params = self._init_learners(run, devices, local_learners)
    config = run.config
    self.ps = ParameterServer(flat_params, flat_transform(run.tx, self.unravel), self.protocol,
                              device=self.ps_device, policy=config.policy)
    if run.restored_meta.get("server"):
      self.ps.restore({"params": flat_params, "opt_state": run.opt_state}, run.restored_meta["server"])
    self.published = (self.ps.version, self.ps.params)   # read by learners as one atomic attribute
    self.alive = set(range(self.learners))
    self.deaths: dict[int, str] = {}
    self.fail_fast = bool(config.get("fail_fast", False))
    self._pending_losses: list = []
    run.staleness_summary = self.telemetry
    run.executor_meta = lambda: {"server": self.ps.state_meta()}

  def _init_learners(self, run: Any, devices: Optional[list], local_learners: Optional[list]) -> jax.Array:
    """The learner side: this process's learners (default all λ), their devices, queue, snapshot cache."""
    self.run = run
    config = run.config
    self.learners = config.learners
    self.protocol: Protocol = run.protocol
    self.local_learners = list(range(self.learners)) if local_learners is None else list(local_learners)
    local_devices, self.ps_device = learner_devices(len(self.local_learners), devices)
    self.devices = dict(zip(self.local_learners, local_devices))
    # Weights and gradients travel as one flat vector: one transfer per (device, version) and per push.
    flat_params, self.unravel = ravel_pytree(run.params)
    self.queue: queue.Queue = queue.Queue(maxsize=max(2, self.learners))
    self.stop = threading.Event()
    self.version_changed = threading.Condition()
    self.cache = _SnapshotCache()
    # Fault injection for fault-tolerance experiments: learner `fault_learner` raises at its step `fault_at_step`.
    self.fault_learner = config.get("fault_learner", -1)
    self.fault_step = config.get("fault_at_step", 0)
    self._grad_step = self._make_grad_step(run.loss_fn, self.unravel)
    return flat_params

  def _to_server(self, grads: jax.Array) -> Any:
    """Where a learner's flat gradient goes before it is queued: the PS device."""
    return jax.device_put(grads, self.ps_device)

  def _publish(self) -> None:
    """Makes the PS's current (i, θ_i) the one learners pull, and wakes learners waiting for it."""
    with self.version_changed:
      self.published = (self.ps.version, self.ps.params)
      self.version_changed.notify_all()

  @staticmethod
  def _make_grad_step(loss_fn, unravel):
    """``(flat θ_j, images, labels, key, step) -> (loss, flat g, finite)``, run on the learner's device."""
    def step(flat_params, images, labels, key, step):
      rng = jax.random.fold_in(key, step)
      loss, grads = jax.value_and_grad(loss_fn)(unravel(flat_params), images, labels, rng)
      flat_grads = ravel_pytree(grads)[0]
      return loss, flat_grads, all_finite(flat_grads)
    return jax.jit(step)

  # ---- learners -------------------------------------------------------------------------------------
  def _put(self, item: Any) -> None:
    """Puts ``item`` on the bounded queue, waiting while it is full, unless the run stops meanwhile."""
    while not self.stop.is_set():
      try:
        self.queue.put(item, timeout=0.1)
        return
      except queue.Full:
        continue

  def _learner(self, k: int) -> None:
    device = self.devices[k]
    key = jax.device_put(jax.random.fold_in(self.run.key, k), device)
    step = 0
    try:
      while not self.stop.is_set():
        version, params = self.published
        local = self.cache.get(device, version, params)
        images, labels = self.run.next_batches([k])
        if k == self.fault_learner and step == self.fault_step:
          raise RuntimeError(f"injected fault: learner {k} raised at its step {step} (config.fault_learner)")
        # numpy inputs are uncommitted: they follow θ_j onto the learner's device.
        loss, grads, finite = self._grad_step(local, images, np.asarray(labels, np.int32), key, np.uint32(step))
        grads = self._to_server(grads)
        item = _Push(k, version, grads, bool(finite), loss)
        step += 1
        self._put(item)
        if self.protocol.learners_wait:
          with self.version_changed:
            self.version_changed.wait_for(lambda: self.published[0] > version or self.stop.is_set())
    except Exception as e:  # noqa: BLE001 - a learner's failure is reported, the run goes on
      detail = f"{type(e).__name__}: {e}"
      log.error("learner %d died: %s\n%s", k, detail, traceback.format_exc(limit=3))
      self._put(_Death(k, detail))

  # ---- the PS loop -----------------------------------------------------------------------------------
  def run_loop(self) -> tuple[PyTree, PyTree]:
    threads = [threading.Thread(target=self._learner, args=(k,), name=f"learner-{k}", daemon=True)
               for k in self.local_learners]
    for t in threads:
      t.start()
    self.run.log(f"threads: {len(threads)} learners on {len(set(self.devices.values()))} device(s), PS on "
                 f"{self.ps_device}, protocol {self.protocol.name} (c = {self.ps.gradients_per_update})")
    current = lambda: (self.unravel(self.ps.params), self.ps.opt_state)  # noqa: E731
    try:
      while not self.run.done:
        item = self.queue.get()
        if isinstance(item, _Death):
          self._on_death(item)
          continue
        result = self.ps.push(item.learner, item.version, item.grads, finite=item.finite)
        if not result.dropped:
          self._pending_losses.append(item.loss)
        if result.applied_update:
          losses, self._pending_losses = self._pending_losses, []
          # θ_i is published as soon as its update is dispatched, not once computed: waiting for it here made
          # learners start sooner (P1 0.88 -> 0.94) but serialised the PS on its own updates, so the queue
          # backed up and ⟨σ⟩ drifted far above n (7.4 for n = 4, 12.9 for n = 8). See docs/benchmarks.md.
          self._publish()
          self.run.after_update(losses, gradients=len(losses), current_state=current)
    except KeyboardInterrupt:
      self.run.interrupted(current)   # the checkpoint first: a second Ctrl-C may cut the shutdown's wait short
      self._shutdown(threads)
      raise
    except BaseException:
      self._shutdown(threads)   # fail_fast or a PS error: no learner thread may outlive the run
      raise
    self._shutdown(threads)
    return current()

  def _record_death(self, death: _Death) -> None:
    self.alive.discard(death.learner)
    self.deaths[death.learner] = death.error

  def _on_death(self, death: _Death) -> None:
    self._record_death(death)
    if self.fail_fast:
      raise RuntimeError(f"learner {death.learner} failed ({death.error}) and fail_fast is set")
    if not self.alive:
      raise RuntimeError(f"every learner died; the last: learner {death.learner}: {death.error}")
    live = len(self.alive)
    n = min(self.protocol.n, live)
    c = Protocol.from_name(self.protocol.name, live, n).gradients_per_update
    self.run.log(f"learner {death.learner} died ({death.error}); going on with {live} learners, c = {c}")
    if self.ps.set_gradients_per_update(c):
      self._publish()

  def _shutdown(self, threads: list) -> None:
    self.stop.set()
    with self.version_changed:
      self.version_changed.notify_all()
    # A learner stops at its next check of ``stop``, after the gradient (or first compilation) it is in: under
    # load a compilation took over 30 s, so wait up to SHUTDOWN_WAIT_S. A second Ctrl-C interrupts the wait.
    deadline = time.monotonic() + SHUTDOWN_WAIT_S
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
      try:
        while True:
          item = self.queue.get_nowait()   # in-flight gradients are discarded; deaths are still recorded
          if isinstance(item, _Death):
            self._record_death(item)
      except queue.Empty:
        pass
      for t in threads:
        t.join(timeout=0.05)
    stuck = [t.name for t in threads if t.is_alive()]
    if stuck:
      log.warning("%d learner thread(s) still running after %d s, left behind: %s", len(stuck), SHUTDOWN_WAIT_S,
                  ", ".join(stuck))

  # ---- telemetry -------------------------------------------------------------------------------------
  def telemetry(self) -> dict:
    return common.telemetry(self.ps, learners_alive=len(self.alive), queue_depth=self.queue.qsize(),
                            deaths=self.deaths)


def run_threads(run: Any) -> tuple[PyTree, PyTree]:
  """The threads executor: returns the final (params, opt_state)."""
  return ThreadedEngine(run).run_loop()
