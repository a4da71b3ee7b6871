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

Gradients are not computed one event at a time: every learner's snapshot is known when it pulls, so when a
push needs a gradient not computed yet, the gradients of *all* learners holding an uncomputed snapshot are
computed in one compiled call over (snapshot, batch) pairs spread over the local devices
(:mod:`sajax.executors.batched`). Each device keeps the versions its learners pulled in a bounded
:class:`~sajax.executors.batched.VersionRing` of R entries, R = min(⌈λ/c⌉ + 1, learners per device) from the
protocol (``sim_ring`` caps it). The rule for a snapshot that no longer fits: when a pull finds every entry
of its device's ring still needed, the pending gradients are computed first (a *ring flush*, counted in
``sim_ring_flushes``), so a gradient is always computed on exactly the version its learner pulled. A
gradient's value does not depend on which call computed it, so batching never changes a run.

Checkpoints hold the whole simulation: the event queue, the speed model's RNG state, each learner's version,
step and computed-but-not-pushed gradient (pending gradients are computed before saving), and the PS. A run
stopped and resumed therefore ends bit-identical to an uninterrupted one. The price is checkpoint size: up to
λ flat gradients (λ·d floats; 2λ·d for a policy that reads θ_j) beside θ and the optimizer state, e.g. 13 MB
for the small CNN with λ = 8, but 7 GB for AlexNet with λ = 30.
"""

from __future__ import annotations

import heapq
from typing import Any, Optional

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from sajax.executors import batched, common
from sajax.executors.faults import FaultPlan
from sajax.executors.speed import SpeedModel
from sajax.server import ParameterServer, flat_transform

PyTree = Any


class SimulatedEngine(common.Executor):
  """Drives a :class:`sajax.trainer.Run` through simulated time around one :class:`ParameterServer`.

  Learner k's state: the version j it holds (None while it waits for a hardsync round or once dead), its ring
  entry, its gradient once computed and the step it was computed at (learner k's stream in the run holds the
  step count, which with k seeds its augmentation and dropout).
  """

  def __init__(self, run: Any, devices: Optional[list] = None) -> None:
    self.run = run
    config = run.config
    self.learners = learners = config.learners
    self.speed = SpeedModel.from_config(config)
    if self.speed.speeds and len(self.speed.speeds) != learners:
      raise ValueError(f"config.sim_speeds has {len(self.speed.speeds)} entries; allowed: one per learner "
                       f"({learners})")
    self.devices = list(devices or jax.local_devices())[:learners]
    self.per_device = -(-learners // len(self.devices))       # learners per device (learner k: device k mod D)
    flat_params, unravel = ravel_pytree(run.params)
    self.unravel = unravel
    self.ps = ParameterServer(flat_params, flat_transform(run.tx, unravel), run.protocol, device=self.devices[0],
                              policy=run.policy, divergence_after=config.get("divergence_after", 100))
    self.deaths = common.Deaths(learners, run.protocol, fail_fast=bool(config.get("fail_fast", False)),
                                say=run.log)
    self.faults = FaultPlan.from_config(config)
    if run.restored_meta.get("server"):
      self.ps.restore({"params": flat_params, "opt_state": run.opt_state}, run.restored_meta["server"])
      self.deaths.restore(run.restored_meta.get("dead", {}), self.ps)
    self.gate = common.spread_gate(run.protocol, self.ps, self.deaths, run.restored_meta.get("ssp"))
    size = batched.ring_size(learners, self.ps.gradients_per_update, self.per_device)
    size = min(size, config.get("sim_ring", 0) or size)
    self.rings = [batched.VersionRing(d, size, flat_params.size, flat_params.dtype) for d in self.devices]
    self._ring_sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(self.devices), ("devices",)),
                                                     jax.sharding.PartitionSpec("devices"))
    self.grads = batched.make_batched_gradients(run.loss_fn, unravel, self.devices,
                                                how=config.get("sim_batching", "auto"))
    self.version: list[Optional[int]] = [None] * learners
    self.entry = [0] * learners
    self.result: list[Optional[tuple]] = [None] * learners   # (loss, flat g on the learner's device, finite)
    self.steps = [0] * learners                               # the step of each learner's current gradient
    self.events: list[tuple[float, int]] = []     # (finish time, learner): a heap, ties broken by learner id
    self.waiting: list[int] = []
    self.rng = np.random.default_rng([config.seed, 7919])
    self.sim_time = 0.0
    self.calls = self.flushes = 0
    self._stale: dict[int, Any] = {}
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

  def _pending(self) -> list[int]:
    return [k for k in range(self.learners) if self.version[k] is not None and self.result[k] is None]

  def _start(self, learner: int, now: float) -> None:
    """Learner ``learner`` pulls (j, θ_j) at simulated time ``now`` and will push at now + its duration."""
    version, params = self.ps.pull(learner=learner)
    d = self._device_of(learner)
    needed = {self.version[k] for k in self._pending() if self._device_of(k) == d}
    entry = self.rings[d].slot_for(version, params, needed)
    if entry is None:                      # every entry holds a still-needed version: compute those first
      self.flushes += 1
      self._compute_pending()
      entry = self.rings[d].slot_for(version, params, set())
    self.version[learner], self.entry[learner], self.result[learner] = version, entry, None
    heapq.heappush(self.events, (now + self.speed.duration(self.rng, learner, self.learners), learner))

  def _compute_pending(self) -> None:
    """The gradients of every learner holding an uncomputed snapshot, in one batched call: each device
    takes its own pending learners (by id) in its first slots; K is the most on one device."""
    pending = self._pending()
    if not pending:
      return
    D = len(self.devices)
    on_device = [[k for k in pending if self._device_of(k) == d] for d in range(D)]
    K = max(len(ks) for ks in on_device)
    batches = {}
    for k in pending:
      images_k, labels_k, self.steps[k] = self.run.next_batch(k)
      batches[k] = (images_k, labels_k)
    first_images, first_labels = batches[pending[0]]
    images = np.zeros((D, K, *np.shape(first_images)), np.asarray(first_images).dtype)
    labels = np.zeros((D, K, *np.shape(first_labels)), np.int32)
    index, learner, step = (np.zeros((D, K), np.int32) for _ in range(3))
    for d, ks in enumerate(on_device):
      for s, k in enumerate(ks):
        images[d, s], labels[d, s] = batches[k]
        index[d, s], learner[d, s], step[d, s] = self.entry[k], k, self.steps[k]
    ring = jax.make_array_from_single_device_arrays(
        (D, *self.rings[0].array.shape[1:]), self._ring_sharding, [r.array for r in self.rings])
    loss, flat, finite = self.grads(ring, index, images, labels, learner, step, self.run.key)
    loss, finite = np.asarray(loss), np.asarray(finite)
    shards = {shard.device: shard.data for shard in flat.addressable_shards}
    for d, ks in enumerate(on_device):
      if ks:
        vectors = batched.unstack_slots(shards[self.devices[d]])
        for s, k in enumerate(ks):
          if self.faults.nonfinite(k, self.steps[k]):
            self.result[k] = (loss[d, s], vectors[s] * np.float32(np.nan), False)
          else:
            self.result[k] = (loss[d, s], vectors[s], bool(finite[d, s]))
    self.calls += 1

  # ---- the event loop -----------------------------------------------------------------------------------------
  def run_loop(self) -> tuple[PyTree, PyTree]:
    current = lambda: (self.unravel(self.ps.params), self.ps.opt_state)  # noqa: E731
    losses = []
    try:
      while not self.run.done:
        self.sim_time, k = heapq.heappop(self.events)
        if self.result[k] is None:
          self._compute_pending()
        loss, grads, finite = self.result[k]
        version = self.version[k]
        self.result[k] = self.version[k] = None
        released = []                              # learners the SSP gate lets start now
        if self.faults.raises(k, self.steps[k]):   # the learner raised instead of pushing: it is gone
          self.ps.release(version)
          applied = self.deaths.died(k, str(self.faults.error(k, self.steps[k])), self.ps)
          if self.gate is not None:
            released = self.gate.died(k)
        else:
          result = self.ps.push(k, version, grads, finite=finite)
          applied = result.applied_update
          if not result.dropped:
            losses.append(loss)
          if self.gate is not None:
            released = self.gate.pushed(k, accepted=not result.dropped)
          elif self.run.protocol.learners_wait and not result.dropped:
            self.waiting.append(k)   # a dropped gradient's learner recomputes at once: the round needs it
          else:
            self._start(k, self.sim_time)
        for w in released:
          self._start(w, self.sim_time)
        if applied:
          for w in sorted(self.waiting):
            self._start(w, self.sim_time)
          self.waiting = []
          done, losses = losses, []
          self.run.after_update(done, gradients=len(done), current_state=current)
    except KeyboardInterrupt:
      self.run.interrupted(current)
      raise
    return current()

  # ---- the executor interface: telemetry and checkpoints ---------------------------------------------------
  def telemetry(self) -> dict:
    out = common.telemetry(self.ps, learners_alive=len(self.deaths.alive), queue_depth=0,
                           deaths=self.deaths.errors, gate=self.gate)
    out.update(sim_time=round(self.sim_time, 6), sim_gradient_calls=self.calls, sim_ring_flushes=self.flushes)
    return out

  def checkpoint_arrays(self) -> dict:
    """Computes the pending gradients, then returns every learner's unpushed gradient (and θ_j when the
    policy reads it) as numpy arrays; called before :meth:`checkpoint_meta` when a checkpoint is saved."""
    self._compute_pending()
    d = self.ps.params.size
    grads = np.zeros((self.learners, d), np.float32)
    loss = np.zeros(self.learners, np.float32)
    finite = np.zeros(self.learners, bool)
    for k, r in enumerate(self.result):
      if r is not None:
        loss[k], grads[k], finite[k] = r[0], np.asarray(r[1]), r[2]
    arrays = {"grads": grads, "loss": loss, "finite": finite}
    if self.ps.needs_stale_params:
      arrays["stale_params"] = np.stack([np.asarray(self.ps.snapshot(v)) if v is not None else np.zeros(d, np.float32)
                                         for v in self.version])
    return arrays

  def checkpoint_meta(self) -> dict:
    meta = {"server": self.ps.state_meta(), "dead": self.deaths.to_json(), "sim_time": self.sim_time,
            "events": [list(e) for e in self.events],
            "version": self.version, "computed": [r is not None for r in self.result], "steps": self.steps,
            "waiting": self.waiting, "rng": self.rng.bit_generator.state, "calls": self.calls,
            "flushes": self.flushes}
    if self.gate is not None:
      meta["ssp"] = {**self.gate.to_json(), "waiting": sorted(self.gate.waiting)}
    return meta

  def _restore(self, meta: dict, arrays: dict) -> None:
    self.sim_time = float(meta["sim_time"])
    self.events = [(float(t), int(k)) for t, k in meta["events"]]    # saved in heap order
    self.version, self.steps, self.waiting = list(meta["version"]), list(meta["steps"]), list(meta["waiting"])
    if self.gate is not None:
      self.gate.waiting = set(meta["ssp"]["waiting"])
    self.rng.bit_generator.state = meta["rng"]
    self.calls, self.flushes = int(meta["calls"]), int(meta["flushes"])
    for k, computed in enumerate(meta["computed"]):
      if self.version[k] is None:
        continue
      if not computed:
        raise ValueError(f"checkpoint of the simulation holds learner {k} with an uncomputed gradient; "
                         "allowed: checkpoints saved by sajax (pending gradients are computed before saving)")
      device = self.devices[self._device_of(k)]
      self.result[k] = (arrays["loss"][k], jax.device_put(arrays["grads"][k], device), bool(arrays["finite"][k]))
      if self.ps.needs_stale_params:
        self.ps.hold_snapshot(self.version[k], jax.device_put(arrays["stale_params"][k], self.ps.device))


def run_simulated(run: Any) -> tuple[PyTree, PyTree]:
  """The simulated executor: returns the final (params, opt_state)."""
  return SimulatedEngine(run).run_loop()
