"""``executor="simulated"``: deterministic, discrete-event asynchrony driving the same ParameterServer core.

Each learner's time per gradient comes from a speed model (``sim_*`` config keys): ``base_time``, a lognormal
``jitter``, a fraction of ``stragglers`` slowed ``slowdown``×, optional per-learner ``speeds``, and an
exponential (Poisson-arrival) option. Events run in simulated-time order, ties broken by learner id. A
learner pulls (j, θ_j) when it starts and pushes its gradient when it finishes, so staleness comes from the
event order alone; under hardsync a learner that pushed waits for the next version, so a round lasts as long
as its slowest learner; under ssp a learner that pushed asks the run's :class:`~sajax.protocol.SpreadGate`
(the same rule as the threads and MPI executors) and waits, if more than s accepted gradients ahead of the
slowest live learner, until that one's push or death releases it. The same config and seed give the same
run, bit for bit (only wall-clock fields differ), whatever the machine's load.

Gradients are computed ahead of the clock: a learner's snapshot θ_j and mini-batch are known when it pulls,
so its gradient is dispatched then (JAX runs it asynchronously on learner k's device, ``k mod D``) and is
waited for only at its push, λ events later on average. The host meanwhile applies other learners' pushes, so
devices and parameter server overlap, as in a real cluster. Parameters, gradients and the PS update stay
pytrees: flattening g (inside or after its compiled step) and unflattening θ_j cost more on XLA CPU than they
save (launch/bench.py simloop: 0.84× the plain loop with flat vectors, 1.07× with pytrees). Each device
keeps one copy of the newest version pulled on it, so a version crosses to a device once however many of its
learners pull it. A gradient depends only on (θ_j, batch, learner, step), never on when it was
dispatched, so the simulation is exact.

Checkpoints hold the whole simulation: the event queue, the speed model's RNG state, each learner's version,
step and dispatched-but-not-pushed gradient, and the PS with the gradients it holds toward its next update.
With ``local_steps`` = H > 1 a learner's round (H mini-batches, H inner steps, Δ; :mod:`sajax.local_steps`) is
dispatched at its pull like a gradient and takes H gradients' time (DyLU, ``dynamic_local_steps``: learner k's
H_k, from the speed model's mean times); its Δ is the gradient in flight, and its inner-optimizer state (after
that round) is saved too (λ·d more floats for SGD with momentum, 2λ·d for AdamW). A Ctrl-C stops the run between two events (not only between two updates), and a run stopped and resumed ends
bit-identical to an uninterrupted one. The price is checkpoint size: up to
λ flat gradients (λ·d floats; 2λ·d for a policy that reads θ_j) beside θ and the optimizer state, e.g. 13 MB
for the small CNN with λ = 8, but 7 GB for AlexNet with λ = 30.
"""

from __future__ import annotations

import heapq
from typing import Any, Optional

import jax
import numpy as np

from sajax import elastic, local_steps
from sajax.executors import common
from sajax.executors.comm import CommModel
from sajax.executors.faults import FaultPlan
from sajax.executors.learners import SnapshotCache, make_tree_grad_step, unravel_of
from sajax.executors.speed import SpeedModel
from sajax.server import ParameterServer

PyTree = Any


class SimulatedEngine(common.Executor):
  """Drives a :class:`sajax.trainer.Run` through simulated time around one :class:`ParameterServer`.

  Learner k's state: the version j it holds (None while it waits for a hardsync round or once dead), its
  dispatched gradient (loss, g, finite) and the step it was computed at (learner k's stream in the run holds
  the step count, which with k seeds its augmentation and dropout).
  """

  def __init__(self, run: Any, devices: Optional[list] = None) -> None:
    self.run = run
    config = run.config
    self.learners = learners = config.learners
    self.speed = SpeedModel.from_config(config)
    self.comm = CommModel.from_config(config, run.params)   # each pull and push: sim_latency + M / sim_bandwidth
    if self.speed.speeds and len(self.speed.speeds) != learners:
      raise ValueError(f"config.sim_speeds has {len(self.speed.speeds)} entries; allowed: one per learner "
                       f"({learners})")
    self.devices = common.compute_devices(devices)[:learners]   # on CPU by default ≤ 1 per core
    self.unravel = unravel_of(run.params)          # checkpoints hold in-flight gradients as flat vectors
    self.ps = ParameterServer(run.params, run.tx, run.protocol, device=self.devices[0], policy=run.policy,
                              divergence_after=config.get("divergence_after", 100))
    self.deaths = common.Membership.from_config(config, run.protocol, run.log)
    self.slots = slots = self.deaths.slots      # learner ids 0..slots−1 (elastic_max_learners; default λ)
    self.faults = FaultPlan.from_config(config)
    self.losses = common.restore_server(self.ps, run, {"params": run.params, "opt_state": run.opt_state})
    self.batches = common.restored_batches(run, self.losses)   # mini-batches of μ behind self.losses' pushes
    self.deaths.restore(run.restored_meta.get("dead", {}), self.ps, run.restored_meta.get("members"))
    self.gate = common.spread_gate(run.protocol, self.ps, self.deaths, run.restored_meta.get("ssp"))
    self.grad_step = make_tree_grad_step(run.loss_fn)
    self.local = run.local                        # local_steps > 1: H inner steps and Δ per push
    self.inner: dict[int, PyTree] = {}            # learner k -> its inner-optimizer state after its last round
    # H per round, or DyLU's H_k from the speed model's mean times (fixed for the run)
    self.rounds = local_steps.RoundLengths(1)
    if self.local is not None:
      self.local_update = local_steps.make_local_update(run.loss_fn, self.local.inner)
      self.inner = local_steps.restore_states(run.restored_arrays, self.local.inner.init(run.params))
      self.rounds = local_steps.RoundLengths(self.local.steps, self.local.dynamic,
                                             self.speed.step_times(slots))
      if self.local.dynamic:
        run.log(f"DyLU: inner steps per push H_k = {self.rounds.table(range(learners))} (H = {self.local.steps})")
    self._keys = [jax.device_put(jax.random.fold_in(run.key, k), self.devices[self._device_of(k)])
                  for k in range(slots)]
    self.cache = SnapshotCache()                  # the newest θ_j pulled on each device, moved there once
    self.version: list[Optional[int]] = [None] * slots
    self.result: list[Optional[tuple]] = [None] * slots      # (loss, g on the learner's device, finite)
    self.steps = [0] * slots                                  # the step of each learner's current gradient
    self.events: list[tuple[float, int]] = []     # (finish time, learner): a heap, ties broken by learner id
    self.waiting: list[int] = []
    self.schedule = elastic.run_schedule(config, run.total_updates, run.updates)   # elastic_events to come
    self.rng = np.random.default_rng([config.seed, 7919])
    self.sim_time = 0.0
    if "events" in run.restored_meta:
      self._restore(run.restored_meta, run.restored_arrays)
    else:
      self.sim_time = float(run.restored_meta.get("sim_time", 0.0))
      for k in self.gate.start() if self.gate is not None else sorted(self.deaths.alive):
        self._start(k, self.sim_time)
    run.attach(self)

  # ---- learners ---------------------------------------------------------------------------------------------
  def _device_of(self, k: int) -> int:
    return k % len(self.devices)

  def _start(self, learner: int, now: float) -> None:
    """Learner ``learner`` pulls (j, θ_j) at simulated time ``now``, its gradient is dispatched, and it will
    push at now + its duration + the pull's and the push's transfer times (:mod:`sajax.executors.comm`)."""
    version, params = self.ps.pull(learner=learner)
    self.version[learner] = version
    self.result[learner] = self._dispatch(learner, version, params)
    duration = self.speed.duration(self.rng, learner, self.learners, self.rounds.steps_for(learner))
    heapq.heappush(self.events, (now + duration + self.comm.cycle_time, learner))

  def _dispatch(self, learner: int, version: int, params: PyTree) -> tuple:
    """Starts learner ``learner``'s gradient on θ_j (``version``) and its next mini-batch; returns without
    waiting (loss, g, finite are device arrays)."""
    device = self.devices[self._device_of(learner)]
    local = self.cache.get(device, version, params)
    if self.local is not None:
      return self._dispatch_local(learner, version, local, device)
    images, labels, step = self.run.next_batch(learner)
    self.steps[learner] = step
    loss, grads, finite = self.grad_step(local, images, labels, self._keys[learner], step)
    if self.faults.nonfinite(learner, step):
      grads, finite = jax.tree.map(lambda g: g * np.float32(np.nan), grads), np.False_
    return loss, grads, finite

  def _dispatch_local(self, learner: int, version: int, local: PyTree, device: Any) -> tuple:
    """local_steps = H > 1: learner ``learner``'s H inner steps from θ_j on its next H mini-batches, dispatched;
    returns (loss, Δ, finite) as :meth:`_dispatch` does for a gradient, and keeps its new inner state."""
    images, labels, steps = local_steps.stack_batches([self.run.next_batch(learner)
                                                         for _ in range(self.rounds.steps_for(learner))])
    self.steps[learner] = int(steps[0])
    state = self.inner.get(learner)
    state = self.local.inner.init(local) if state is None else jax.device_put(state, device)
    delta, self.inner[learner], loss, finite = self.local_update(local, state, images, labels, self._keys[learner],
                                                                 steps, self.local.learning_rate(version))
    if any(self.faults.nonfinite(learner, int(s)) for s in steps):
      delta, finite = jax.tree.map(lambda g: g * np.float32(np.nan), delta), np.False_
    return loss, delta, finite

  def _raised(self, learner: int) -> Optional[int]:
    """The step of learner ``learner``'s current push (H steps with local_steps) at which it raises, or None."""
    first = self.steps[learner]
    return next((s for s in range(first, first + self.rounds.steps_for(learner)) if self.faults.raises(learner, s)),
                None)

  # ---- the event loop -----------------------------------------------------------------------------------------
  def run_loop(self) -> tuple[PyTree, PyTree]:
    current = lambda: (self.ps.params, self.ps.opt_state)  # noqa: E731
    try:
      # Resumed with fewer learners: the gradients buffered may already be c (those of learners now gone).
      if self.ps.buffered and self.ps.set_gradients_per_update(self.ps.gradients_per_update):
        self._updated(current)
      while not self.run.done:
        self.sim_time, k = heapq.heappop(self.events)
        loss, grads, finite = self.result[k]
        version = self.version[k]
        self.result[k] = self.version[k] = None
        released = []                              # learners the SSP gate lets start now
        raised = self._raised(k)
        if raised is not None:   # the learner raised instead of pushing: it is gone
          self.ps.release(version)
          error = self.faults.error(k, raised)
          applied = self.deaths.died(k, f"{type(error).__name__}: {error}", self.ps)   # as a learner thread says it
          if self.gate is not None:
            released = self.gate.died(k)
          if self.deaths.replace:        # a fresh learner in its slot, now
            released = released + self.gate.joined(k) if self.gate is not None else [k]
        else:
          result = self.ps.push(k, version, grads, finite=bool(finite))
          applied = result.applied_update
          if not result.dropped:
            self.losses.append(loss)
            self.batches += self.rounds.steps_for(k)
          if self.gate is not None:
            released = self.gate.pushed(k, accepted=not result.dropped)
          elif self.run.protocol.learners_wait and not result.dropped:
            self.waiting.append(k)   # a dropped gradient's learner recomputes at once: the round needs it
          else:
            self._start(k, self.sim_time)
        for w in released:
          self._start(w, self.sim_time)
        if applied:
          self._updated(current)
        self.run.stop_if_requested()   # a Ctrl-C stops between two events, even with gradients buffered
    except KeyboardInterrupt:
      self.run.interrupted(current)
      raise
    return current()

  def _updated(self, current: Any) -> None:
    """After an update: the hardsync round's learners start on the new weights, the run reports the update, then
    the ``elastic_events`` due after it take effect (so no learner has pushed toward the next update yet: under
    hardsync a leave never completes a round early, σ stays 0)."""
    for w in sorted(self.waiting):
      self._start(w, self.sim_time)
    self.waiting = []
    done, self.losses = self.losses, []
    batches, self.batches = self.batches, 0
    self.run.after_update(done, gradients=len(done), current_state=current, batches=batches)
    for kind, learners in elastic.due(self.schedule, self.run.updates):
      for k in learners:
        if self.run.done:
          return
        if self._join(k) if kind == "join" else self._leave(k, "elastic_events"):
          self._updated(current)

  def _join(self, k: int) -> bool:
    """Learner k joins at the current simulated time (a no-op for a live one): it pulls the current weights
    (under ssp when the gate lets it, at once: its count starts at the minimum). Returns False (a join never
    applies an update)."""
    if k in self.deaths.alive:
      return False
    self.deaths.join(k, self.ps, "joined (elastic_events)")
    for w in self.gate.joined(k) if self.gate is not None else [k]:
      self._start(w, self.sim_time)
    return False

  def _leave(self, k: int, reason: str) -> bool:
    """Learner k leaves at the current simulated time (a no-op for one not live). A gradient it is computing
    is abandoned (never pushed). Returns whether c re-derived for the live learners applied an update."""
    if k not in self.deaths.alive:
      return False
    if self.version[k] is not None:          # computing: abandon its gradient
      self.events = [e for e in self.events if e[1] != k]
      heapq.heapify(self.events)
      self.ps.release(self.version[k])
      self.version[k] = self.result[k] = None
    applied = self.deaths.leave(k, reason, self.ps)
    for w in self.gate.died(k) if self.gate is not None else []:
      self._start(w, self.sim_time)
    return applied

  # ---- the executor interface: telemetry and checkpoints ---------------------------------------------------
  def telemetry(self) -> dict:
    out = common.telemetry(self.ps, learners_alive=len(self.deaths.alive), queue_depth=0,
                           deaths=self.deaths.errors, gate=self.gate, members=self.deaths)
    if self.rounds.dynamic:   # DyLU: each learner's H_k (fixed by the speed model)
      out["inner_steps"] = self.rounds.table(range(self.slots))
    out.update(sim_time=round(self.sim_time, 6), **self.comm.telemetry(
        self.ps.stats, died=len(self.deaths.errors), in_flight=sum(v is not None for v in self.version)))
    return out

  def checkpoint_arrays(self) -> dict:
    """Every learner's unpushed gradient (and θ_j when the policy reads it) as flat numpy vectors (waits for
    the dispatched gradients); called before :meth:`checkpoint_meta` when a checkpoint is saved."""
    d = sum(int(np.size(x)) for x in jax.tree.leaves(self.ps.params))
    grads = np.zeros((self.slots, d), np.float32)
    loss = np.zeros(self.slots, np.float32)
    finite = np.zeros(self.slots, bool)
    for k, r in enumerate(self.result):
      if r is not None:
        loss[k], grads[k], finite[k] = r[0], _flat(r[1]), r[2]
    arrays = {"grads": grads, "loss": loss, "finite": finite, **common.pending_checkpoint(self.ps, self.losses)}
    if self.local is not None:
      arrays.update(local_steps.state_arrays(self.inner, self.slots))
    if self.ps.needs_stale_params:
      arrays["stale_params"] = np.stack([_flat(self.ps.snapshot(v)) if v is not None else np.zeros(d, np.float32)
                                         for v in self.version])
    return arrays

  def checkpoint_meta(self) -> dict:
    meta = {"server": self.ps.state_meta(), "dead": self.deaths.to_json(), "members": self.deaths.state(),
            "sim_time": self.sim_time,
            "events": [list(e) for e in self.events],
            "version": self.version, "computed": [r is not None for r in self.result], "steps": self.steps,
            "waiting": self.waiting, "rng": self.rng.bit_generator.state, "pending_batches": self.batches}
    if self.gate is not None:
      meta["ssp"] = {**self.gate.to_json(), "waiting": sorted(self.gate.waiting)}
    return meta

  def _restore(self, meta: dict, arrays: dict) -> None:
    """The saved simulation. Learners the run no longer has (resumed with a smaller λ) are dropped with their
    gradient in flight; learners it has and the checkpoint does not (a larger λ) start fresh now."""
    alive = self.deaths.alive
    self.sim_time = float(meta["sim_time"])
    self.events = [(float(t), int(k)) for t, k in meta["events"] if int(k) in alive]
    heapq.heapify(self.events)     # saved in heap order; a filtered heap is heapified again
    kept = min(len(meta["version"]), self.slots)
    self.version[:kept], self.steps[:kept] = list(meta["version"])[:kept], list(meta["steps"])[:kept]
    self.waiting = [int(k) for k in meta["waiting"] if int(k) in alive]
    if self.gate is not None:
      self.gate.waiting = {int(k) for k in meta["ssp"]["waiting"] if int(k) in alive}
    self.rng.bit_generator.state = meta["rng"]
    for k, computed in enumerate(meta["computed"][:kept]):
      if self.version[k] is None:
        continue
      if k not in alive:
        self.version[k] = None
        continue
      if not computed:
        raise ValueError(f"checkpoint of the simulation holds learner {k} with an uncomputed gradient; "
                         "allowed: checkpoints saved by sajax (in-flight gradients are saved computed)")
      device = self.devices[self._device_of(k)]
      self.result[k] = (arrays["loss"][k], jax.device_put(self.unravel(arrays["grads"][k]), device),
                        bool(arrays["finite"][k]))
      if self.ps.needs_stale_params:
        self.ps.hold_snapshot(self.version[k], jax.device_put(self.unravel(arrays["stale_params"][k]),
                                                              self.ps.device))
    idle = [k for k in sorted(alive) if self.version[k] is None and k not in self.waiting
            and (self.gate is None or k not in self.gate.waiting)]
    for k in idle:                 # new in this run: a fresh learner on the current weights
      for w in self.gate.joined(k) if self.gate is not None else [k]:
        self._start(w, self.sim_time)


def _flat(tree: PyTree) -> np.ndarray:
  """``tree``'s leaves as one float32 host vector, in ``ravel_pytree``'s order."""
  return np.concatenate([np.ravel(np.asarray(x, np.float32)) for x in jax.tree.leaves(tree)])


def run_simulated(run: Any) -> tuple[PyTree, PyTree]:
  """The simulated executor: returns the final (params, opt_state)."""
  return SimulatedEngine(run).run_loop()
