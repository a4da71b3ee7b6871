"""``executor="threads"``: the paper's system on one host — λ learner threads, a bounded queue, one PS.

The picture (Podracer/Sebulba's three nouns)::

    learners (threads, :mod:`~sajax.executors.learners`)     queue (bounded)       PS loop (main thread)
    pull (j, θ_j) → grad on my device → g to the PS device  ──────────────▶       ParameterServer.push
    → put (k, j, g, finite)                                  (k, j, g, finite)     → one jitted update every
                                                                                   c gradients → publish θ_i

Learners never wait under softsync/async; under hardsync a learner waits for the next version before it
pulls again (unless its gradient was non-finite: the PS drops it, so the learner recomputes at once). Under
ssp the PS loop holds the run's :class:`~sajax.protocol.SpreadGate`: after each push it processes (and each
death) it publishes any new θ_i, then permits the learners the gate lets start; a learner waits for its
permission before each gradient. The PS loop stops when epochs × N samples have been applied; gradients still
in flight are discarded. A learner that raises is reported and the run goes on with the others, c re-derived
from the live learners (so hardsync cannot deadlock, and it leaves the ssp minimum), unless ``fail_fast`` is
set. Divergence (too many non-finite gradients in a row)
ends the run from the PS core. A Ctrl-C wakes the PS loop's (blocking) wait for the queue, so one Ctrl-C stops
(checkpoint, exit 130) even a run whose learners have all stalled.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Optional

import jax

from sajax import elastic, local_steps
from sajax.executors import common
from sajax.executors.learners import Death, Join, Learners, Published, Push, flatten, join_learners, unravel_of
from sajax.server import ParameterServer, flat_transform
from sajax.steps import jit_once

log = logging.getLogger("sajax")
SHUTDOWN_WAIT_S = 600   # how long a stopping run waits for its learner threads
_WAKE = object()        # put on the queue to wake a waiting PS loop when a stop is requested (Ctrl-C)
PyTree = Any


def learner_devices(learners: int, devices: Optional[list] = None) -> tuple[list, jax.Device]:
  """Learner k's device (k mod D over the devices the learners use) and the PS device.

  The PS gets a device of its own when there are more devices than learners, or, with CPU-emulated devices
  fewer than the learners (the launcher asks for min(λ, cores) + 1 of them), the last one; otherwise it
  shares device 0. Without ``devices``, on CPU at most cores + 1 of them (:func:`sajax.executors.common.compute_devices`).
  """
  devices = common.compute_devices(devices, spare=1)
  if len(devices) > learners:
    return [devices[k] for k in range(learners)], devices[learners]
  if devices[0].platform == "cpu" and 1 < len(devices) < learners:
    return [devices[k % (len(devices) - 1)] for k in range(learners)], devices[-1]
  return [devices[k % len(devices)] for k in range(learners)], devices[0]


def bounded_put(q: queue.Queue, item: Any, stop: threading.Event) -> None:
  """Puts ``item`` on the bounded queue ``q``, waiting while it is full, unless ``stop`` is set meanwhile."""
  while not stop.is_set():
    try:
      q.put(item, timeout=0.1)
      return
    except queue.Full:
      continue


class ThreadedEngine(common.Executor):
  """Drives one :class:`sajax.trainer.Run` with λ learner threads around a :class:`ParameterServer`.

  ``local_learners``: the learners this process runs (default all λ; MPI rank 0 runs its block and receives
  the others' pushes into the same queue). With ``local_steps`` > 1 its checkpoints hold the inner-optimizer
  state of each of these learners after its last push (learners on other MPI ranks: none; they resume fresh).
  """

  def __init__(self, run: Any, devices: Optional[list] = None, local_learners: Optional[list] = None) -> None:
    self.run = run
    config = run.config
    self.learners = config.learners
    self.protocol = run.protocol
    local = list(range(self.learners)) if local_learners is None else list(local_learners)
    self.local = set(local) if local_learners is not None else None   # None: every learner id is ours
    local_devices, self.ps_device = learner_devices(len(local), devices)
    self._spare_devices = local_devices or [self.ps_device]     # where joining learners go: k mod their number
    # Weights and gradients travel as one flat vector: one transfer per (device, version) and per push.
    flat_params, self.unravel = flatten(run.params), jit_once(unravel_of(run.params))   # one program
    self.ps = ParameterServer(flat_params, flat_transform(run.tx, self.unravel), self.protocol,
                              device=self.ps_device, policy=run.policy,
                              divergence_after=config.get("divergence_after", 100))
    self.deaths = common.Membership.from_config(config, self.protocol, run.log)
    self._pending_losses: list = common.restore_server(self.ps, run, {"params": flat_params,
                                                                      "opt_state": run.opt_state})
    # mini-batches of μ behind the buffered pushes (c·H, or the sum of DyLU's H_k)
    self._pending_batches = common.restored_batches(run, self._pending_losses)
    self.deaths.restore(run.restored_meta.get("dead", {}), self.ps, run.restored_meta.get("members"))
    self.gate = common.spread_gate(self.protocol, self.ps, self.deaths, run.restored_meta.get("ssp"))
    self.events = elastic.run_schedule(config, run.total_updates, run.updates)
    self._joining: set[int] = set()          # ids add_learner reserved, not yet joined by the PS loop
    self._api = threading.Lock()
    self._loop_thread: Optional[threading.Thread] = None
    self.queue: queue.Queue = queue.Queue(maxsize=max(2, self.learners))
    self.stop = threading.Event()
    run.on_stop_request(self._wake)
    self.published = Published(self.ps.version, self.ps.params)
    live = {k: local_devices[local.index(k)] for k in local if k in self.deaths.alive}
    if self.local is None:   # learners that joined beyond λ before a checkpoint: live again on resume
      live.update({k: self._spare_devices[k % len(self._spare_devices)] for k in sorted(self.deaths.alive)
                   if k not in live})
    self.pool = Learners(run, live, self.published,
                         self._put, self.stop, to_server=lambda g: jax.device_put(g, self.ps_device),
                         keep_stale=self.ps.needs_stale_params, inner_states=self._restored_inner_states(flat_params))
    run.attach(self)

  def _restored_inner_states(self, flat_params: Any) -> dict:
    """local_steps > 1: the inner states the checkpoint holds (each learner's after its last push before it)."""
    if self.run.local is None:
      return {}
    return local_steps.restore_states(self.run.restored_arrays, self.run.local.inner.init(flat_params))

  def _put(self, item: Any) -> None:
    bounded_put(self.queue, item, self.stop)

  def _publish(self) -> None:
    """Makes the PS's current (i, θ_i) the one learners pull, and wakes learners waiting for it."""
    self.published.set(self.ps.version, self.ps.params)

  def _permit(self, learners: list[int]) -> None:
    """SSP: ``learners`` may each start one gradient, on the current version or newer."""
    if learners:
      self.published.grant(learners, self.ps.version)

  # ---- the PS loop -----------------------------------------------------------------------------------
  def run_loop(self) -> tuple[PyTree, PyTree]:
    self._loop_thread = threading.current_thread()
    threads = self.pool.start()
    self.run.log(self._started_line(threads))
    current = lambda: (self.unravel(self.ps.params), self.ps.opt_state)  # noqa: E731
    if self.gate is not None:
      self._permit(self.gate.start())
    try:
      while not self.run.done:
        item = self._next_item()
        if isinstance(item, Push):
          self._push(item, current)
        else:
          self._membership(item, current)
    except KeyboardInterrupt:
      self.run.interrupted(current)   # the checkpoint first: a second Ctrl-C may cut the shutdown's wait short
      self._shutdown(threads)
      raise
    except BaseException:
      self._shutdown(threads)   # fail_fast, divergence or a PS error: no learner thread may outlive the run
      raise
    self._shutdown(threads)
    return current()

  def _started_line(self, threads: list) -> str:
    devices = set(self.pool.devices.values())
    return (f"threads: {len(threads)} learners on {len(devices)} device(s), PS on {self.ps_device}, "
            f"protocol {self.protocol.name} (c = {self.ps.gradients_per_update})")

  def _next_item(self) -> Any:
    """The next Push or Death from the queue. The wait blocks (a timed wait in 0.2 s steps made the whole run
    1.38× slower, measured in pairs with farm-bench); a stop request wakes it (:meth:`_wake`), so that a Ctrl-C
    stops the run even when no gradient comes (every learner stalled)."""
    while True:
      item = self.queue.get()
      if item is not _WAKE:
        return item
      self.run.stop_if_requested()

  def _wake(self) -> None:
    """Wakes the PS loop if it waits on an empty queue. Called from the Ctrl-C handler, which may interrupt the
    main thread while it holds the queue's lock: the put is made by a thread of its own, never by the handler."""
    def put() -> None:
      try:
        self.queue.put(_WAKE, timeout=1.0)
      except queue.Full:
        pass   # items are waiting: the loop reaches its next update, where the stop is taken
    threading.Thread(target=put, name="wake-ps", daemon=True).start()

  # ---- elastic membership: the PS loop applies every change -------------------------------------------------
  def _membership(self, item: Any, current: Any) -> None:
    """A Death, Left or Join from the queue: the membership and c change (the PS core), the SSP gate learns it,
    and a replacement or a joining learner starts."""
    released: list[int] = []
    if isinstance(item, Join):
      with self._api:
        self._joining.discard(item.learner)
      applied = False if item.replacement else self.deaths.join(item.learner, self.ps, item.reason)
      self._start_learner(item.learner, fresh=item.replacement)
      released = self.gate.joined(item.learner) if self.gate is not None else []
    else:
      if isinstance(item, Death):
        applied = self.deaths.died(item.learner, item.error, self.ps, item.traceback_file)
      else:
        applied = self.deaths.leave(item.learner, item.reason, self.ps)
      released = self.gate.died(item.learner) if self.gate is not None else []
      if isinstance(item, Death) and self.deaths.replace:
        self._start_learner(item.learner, fresh=True)
        released += self.gate.joined(item.learner) if self.gate is not None else []
    if applied:
      self._after_update(current, released)
    else:
      self._permit(released)

  def _start_learner(self, k: int, fresh: bool) -> None:
    """Starts a thread for learner k (joined, or a fresh one replacing a dead k) on the current weights."""
    self.pool.add(k, self.pool.devices.get(k, self._spare_devices[k % len(self._spare_devices)]), fresh)

  def _apply_events(self) -> None:
    """The ``elastic_events`` due after the update just applied: a join starts learners now; a leave asks them
    to leave (each finishes its gradient, then its Left comes through the queue)."""
    for kind, learners in elastic.due(self.events, self.run.updates):
      for k in learners:
        if kind == "join" and k not in self.deaths.alive and not self.pool.running(k):
          self._membership(Join(k, "joined (elastic_events)"), lambda: (self.unravel(self.ps.params),
                                                                         self.ps.opt_state))
        elif kind == "leave" and k not in self.pool.devices and self.local is not None:
          continue        # a learner on another MPI rank: that rank applies the leave
        elif kind == "leave" and k in self.deaths.alive and k not in self.pool.leaving:
          self.pool.leave(k, "elastic_events")
        else:
          self.run.log(f"elastic_events: {kind} {k} after update {self.run.updates} skipped (learner {k} is "
                       f"{'live' if k in self.deaths.alive else 'not live'} or still leaving)")

  def add_learner(self, learner: Optional[int] = None) -> int:
    """Adds a learner to the running job (thread-safe: call it from any thread); returns its id. It takes
    ``learner`` or the lowest free id below ``elastic_max_learners``, and starts, on the current weights, once the
    PS loop takes the request (c is re-derived then). Raises ValueError when no id is free or ``learner`` is live."""
    k = self._reserve(learner)
    if threading.current_thread() is self._loop_thread:   # a callback of the run: the PS loop itself
      self._membership(Join(k, "joined (add_learner)"), lambda: (self.unravel(self.ps.params), self.ps.opt_state))
    else:
      self._put(Join(k, "joined (add_learner)"))
    return k

  def _reserve(self, learner: Optional[int]) -> int:
    """A free learner id (``learner``, or the lowest), reserved for a join until the PS loop takes it."""
    with self._api:
      taken = self.deaths.alive | self._joining | {k for k in range(self.deaths.slots) if self.pool.running(k)}
      free = [k for k in range(self.deaths.slots) if k not in taken]
      if learner is None and not free:
        raise ValueError(f"no learner id is free; allowed: at most elastic_max_learners = {self.deaths.slots} "
                         "learners live")
      k = free[0] if learner is None else learner
      if k not in free or (self.local is not None and k not in self.local):
        raise ValueError(f"learner={learner!r} cannot join; allowed: a free id of {free} (live or leaving: "
                         f"{sorted(taken)})")
      self._joining.add(k)
    return k

  def remove_learner(self, learner: int, reason: str = "remove_learner") -> None:
    """Asks learner ``learner`` to leave the running job (thread-safe). It finishes the gradient it is computing
    and pushes it (under hardsync it waits for that round's update, so σ stays 0), then leaves; c is re-derived
    when the PS loop takes its leave. Fewer than ``elastic_min_learners`` live then ends the run (one line,
    :class:`~sajax.executors.common.LearnersFailed`). Raises ValueError for a learner that is not live here."""
    with self._api:
      if learner not in self.deaths.alive or learner in self.pool.leaving or learner not in self.pool.devices:
        raise ValueError(f"learner={learner!r} cannot leave; allowed: a live learner of this process "
                         f"({sorted(k for k in self.deaths.alive if k in self.pool.devices)})")
      self.pool.leave(learner, reason)

  def _push(self, item: Push, current: Any) -> None:
    result = self.ps.push(item.learner, item.version, item.grads, finite=item.finite,
                          stale_params=item.stale_params)
    if not result.dropped:
      self._pending_losses.append(item.loss)
      self._pending_batches += self.run.local_steps if item.batches is None else item.batches
    released = self.gate.pushed(item.learner, accepted=not result.dropped) if self.gate is not None else []
    if result.applied_update:
      self._after_update(current, released)
    else:
      self._permit(released)

  def _after_update(self, current: Any, released: list[int]) -> None:
    # θ_i is published as soon as its update is dispatched, not once computed: waiting for it here made
    # learners start sooner (P1 0.88 -> 0.94) but serialised the PS on its own updates, so the queue
    # backed up and ⟨σ⟩ drifted far above n (7.4 for n = 4, 12.9 for n = 8). See docs/benchmarks.md.
    losses, self._pending_losses = self._pending_losses, []
    batches, self._pending_batches = self._pending_batches, 0
    self._publish()
    self._permit(released)   # after publishing: a learner the update released pulls it (s = 0, c = λ: σ = 0)
    self.run.after_update(losses, gradients=len(losses), current_state=current, batches=batches)
    if self.events:
      self._apply_events()

  def _shutdown(self, threads: list) -> None:
    self.stop.set()
    self.published.wake()
    join_learners(self.pool.threads or threads, self.queue,
                  lambda death: self.deaths.record(death.learner, death.error), SHUTDOWN_WAIT_S)

  # ---- the executor interface -------------------------------------------------------------------------
  def telemetry(self) -> dict:
    out = common.telemetry(self.ps, learners_alive=len(self.deaths.alive), queue_depth=self.queue.qsize(),
                           deaths=self.deaths.errors, gate=self.gate, members=self.deaths)
    if self.pool.rounds is not None and self.pool.rounds.dynamic:   # DyLU: each learner's H_k now (measured)
      out["inner_steps"] = self.pool.rounds.table(sorted(self.pool.devices))
    return out

  def checkpoint_arrays(self) -> dict:
    arrays = common.pending_checkpoint(self.ps, self._pending_losses)
    if self.run.local is not None:
      arrays.update(local_steps.state_arrays(dict(self.pool.inner_states), self.learners))
    return arrays

  def checkpoint_meta(self) -> dict:
    meta = {"server": self.ps.state_meta(), "dead": self.deaths.to_json(), "members": self.deaths.state(),
            "pending_batches": self._pending_batches}
    if self.gate is not None:
      meta["ssp"] = self.gate.to_json()
    return meta


def run_threads(run: Any) -> tuple[PyTree, PyTree]:
  """The threads executor: returns the final (params, opt_state)."""
  return ThreadedEngine(run).run_loop()
