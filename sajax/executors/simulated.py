"""``executor="simulated"``: deterministic, discrete-event asynchrony driving the same ParameterServer core.

Each learner's time per gradient comes from a speed model (``sim_*`` config keys): ``base_time``, a lognormal
``jitter``, a fraction of ``stragglers`` slowed ``slowdown``×, optional per-learner ``speeds``, and an
exponential (Poisson-arrival) option. Events run in simulated-time order, ties broken by learner id. A
learner pulls (j, θ_j) when it starts and pushes its gradient when it finishes, so staleness comes from the
event order alone; under hardsync a learner that pushed waits for the next version, so a round lasts as long
as its slowest learner. The same config and seed give the same run, bit for bit (only wall-clock fields
differ), whatever the machine's load.

This first version computes one gradient per event on the PS device; batching the learners whose snapshots
are known into one compiled call is the next step. Resuming from a checkpoint restarts every learner from the
restored version at the restored simulated time: the run goes on correctly, but not bit-identically to an
uninterrupted one (the event queue, the RNG and the learners' snapshots are not checkpointed yet).
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Any

import jax
import numpy as np

from sajax.executors import common
from sajax.server import ParameterServer

PyTree = Any


@dataclasses.dataclass(frozen=True)
class SpeedModel:
  """Seconds of simulated time a learner takes per gradient."""

  base_time: float = 1.0
  jitter: float = 0.0          # σ of a lognormal factor (0: none)
  stragglers: float = 0.0      # fraction of the λ learners (the lowest ids) that are slow
  slowdown: float = 4.0        # how much slower a straggler is
  poisson: bool = False        # exponential times (Poisson arrivals) with the same mean
  speeds: tuple = ()           # optional per-learner time factors, overriding stragglers

  @classmethod
  def from_config(cls, config: Any) -> "SpeedModel":
    return cls(base_time=config.get("sim_base_time", 1.0), jitter=config.get("sim_jitter", 0.0),
               stragglers=config.get("sim_stragglers", 0.0), slowdown=config.get("sim_slowdown", 4.0),
               poisson=config.get("sim_poisson", False), speeds=tuple(config.get("sim_speeds", ())))

  def factor(self, learner: int, learners: int) -> float:
    """Learner k's fixed time factor (1 for a normal learner)."""
    if self.speeds:
      return float(self.speeds[learner])
    return self.slowdown if learner < round(self.stragglers * learners) else 1.0

  def duration(self, rng: np.random.Generator, learner: int, learners: int) -> float:
    t = self.base_time * self.factor(learner, learners)
    if self.poisson:
      t *= rng.exponential(1.0)
    if self.jitter:
      t *= rng.lognormal(0.0, self.jitter)
    return float(t)


class SimulatedEngine:
  """Drives a :class:`sajax.trainer.Run` through simulated time around one :class:`ParameterServer`."""

  def __init__(self, run: Any) -> None:
    self.run = run
    config = run.config
    self.learners = config.learners
    self.speed = SpeedModel.from_config(config)
    if self.speed.speeds and len(self.speed.speeds) != self.learners:
      raise ValueError(f"config.sim_speeds has {len(self.speed.speeds)} entries; allowed: one per learner "
                       f"({self.learners})")
    self.ps = ParameterServer(run.params, run.tx, run.protocol, policy=config.policy)
    if run.restored_meta.get("server"):
      self.ps.restore({"params": run.params, "opt_state": run.opt_state}, run.restored_meta["server"])
    self.rng = np.random.default_rng([config.seed, 7919])
    self.sim_time = float(run.restored_meta.get("sim_time", 0.0))
    self.events: list[tuple[float, int]] = []     # (finish time, learner): ties broken by learner id
    self.held: dict[int, tuple[int, PyTree]] = {}  # learner -> (version j, θ_j) it is computing on
    self.steps = [0] * self.learners
    self.waiting: list[int] = []
    self.grad = jax.jit(jax.value_and_grad(run.loss_fn))
    run.staleness_summary = self.telemetry
    run.executor_meta = lambda: {"server": self.ps.state_meta(), "sim_time": self.sim_time}

  def _start(self, learner: int, now: float) -> None:
    self.held[learner] = self.ps.pull(learner=learner)
    heapq.heappush(self.events, (now + self.speed.duration(self.rng, learner, self.learners), learner))

  def run_loop(self) -> tuple[PyTree, PyTree]:
    current = lambda: (self.ps.params, self.ps.opt_state)  # noqa: E731
    for k in range(self.learners):
      self._start(k, self.sim_time)
    losses = []
    try:
      while not self.run.done:
        self.sim_time, k = heapq.heappop(self.events)
        version, params = self.held.pop(k)
        images, labels = self.run.next_batches([k])
        key = jax.random.fold_in(jax.random.fold_in(self.run.key, k), self.steps[k])
        self.steps[k] += 1
        loss, grads = self.grad(params, images, np.asarray(labels, np.int32), key)
        result = self.ps.push(k, version, grads)
        if not result.dropped:
          losses.append(loss)
        if self.run.protocol.learners_wait:
          self.waiting.append(k)
          if result.applied_update:
            for w in sorted(self.waiting):
              self._start(w, self.sim_time)
            self.waiting = []
        else:
          self._start(k, self.sim_time)
        if result.applied_update:
          done, losses = losses, []
          self.run.after_update(done, gradients=len(done), current_state=current)
    except KeyboardInterrupt:
      self.run.interrupted(current)
      raise
    return current()

  def telemetry(self) -> dict:
    out = common.telemetry(self.ps, learners_alive=self.learners, queue_depth=0)
    out["sim_time"] = round(self.sim_time, 6)
    return out


def run_simulated(run: Any) -> tuple[PyTree, PyTree]:
  """The simulated executor: returns the final (params, opt_state)."""
  return SimulatedEngine(run).run_loop()
