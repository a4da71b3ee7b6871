"""What every executor shares with the run: the :class:`Executor` interface, the staleness telemetry of a
metrics record, what happens when a learner dies, and the SSP gate built for a run."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

from sajax.protocol import Protocol, SpreadGate
from sajax.server import ParameterServer

log = logging.getLogger("sajax")


def compute_devices(devices: Optional[list] = None, spare: int = 0) -> list:
  """``devices`` if given; otherwise this process's devices, on the CPU platform only the first
  min(D, cores + ``spare``) of them.

  CPU-emulated devices (``--xla_force_host_platform_device_count``) beyond the cores add no compute, and XLA
  compiles a learner's step once per device it runs on: with λ = 8 learners on 8 emulated devices of a 2-core
  machine a threads run compiled the gradient step 8 times (17.5 s to its end, 3.9 s with the compilations
  cached). So by default the executors spread learners over at most one device per core (``spare``: one more
  for the parameter server), what launch/train.py asks for when it sets the device count itself.
  """
  if devices:
    return list(devices)
  devices = jax.local_devices()
  if devices[0].platform == "cpu":
    return devices[:max(1, (os.cpu_count() or 1) + spare)]
  return devices


class LearnersFailed(RuntimeError):
  """The run stopped because a learner raised and ``fail_fast`` is set, or every learner died (one line)."""


class Executor:
  """What :class:`sajax.trainer.Run` asks of the executor attached to it (``run.attach(executor)``).

  The defaults are those of an executor without a parameter server (pmap SSGD: σ = 0, nothing extra to save).
  """

  def telemetry(self) -> dict:
    """Extra fields of each metrics record (staleness statistics, health)."""
    return {"staleness_mean": 0.0, "staleness_max": 0}

  def checkpoint_arrays(self) -> dict:
    """Extra numpy arrays for a checkpoint; called first when saving, so the executor may settle its state."""
    return {}

  def checkpoint_meta(self) -> dict:
    """Extra JSON state for a checkpoint (the PS's version and statistics, live learners, ...)."""
    return {}


def restore_server(ps: ParameterServer, run: Any, arrays: dict) -> list:
  """Restores the PS from a resumed run's checkpoint (``arrays``: its θ and optimizer state in the PS's layout);
  returns the training losses of the gradients it held toward the next update, which the executor reports with
  that update (see :func:`pending_checkpoint`). A fresh run: nothing restored, no losses."""
  if not run.restored_meta.get("server"):
    return []
  ps.restore({**run.restored_arrays, **arrays}, run.restored_meta["server"])
  return list(run.restored_arrays.get("pending_losses", []))


def restored_batches(run: Any, losses: list) -> int:
  """The mini-batches of μ behind the pushes a resumed run's PS held toward its next update (saved in the meta
  as ``pending_batches``; a checkpoint without it: H per push)."""
  return int(run.restored_meta.get("pending_batches", len(losses) * run.local_steps))


def pending_checkpoint(ps: ParameterServer, losses: list) -> dict:
  """The executor's checkpoint arrays for the gradients the PS holds toward the next update: the PS's
  :meth:`~sajax.server.ParameterServer.pending_arrays` and their training losses (float32, in order). Saved so
  that a run stopped between two updates resumes with the same statistics (and SSP counts), the same
  next update, and the same reported loss as the uninterrupted run."""
  arrays = ps.pending_arrays()
  if arrays:
    arrays["pending_losses"] = np.asarray([float(x) for x in losses], np.float32)
  return arrays


def telemetry(ps: ParameterServer, *, learners_alive: int, queue_depth: int,
              deaths: Mapping[int, str] | None = None, gate: Optional[SpreadGate] = None,
              members: Optional["Membership"] = None) -> dict:
  """Staleness statistics of the accepted pushes so far, per learner, and the executor's health (and, under
  ssp, s and the largest spread at which a learner started, ``ssp_max_spread`` ≤ s); with ``members``, the
  membership (:meth:`Membership.telemetry`) and c in force (``gradients_per_update``)."""
  stats = ps.stats
  per = {str(k): {"count": s.count, "min": s.min, "mean": round(s.mean, 4), "max": s.max, "dropped": s.dropped,
                  "stale_dropped": s.stale_dropped}
         for k, s in sorted(stats.per_learner.items())}
  out = {
      "staleness_mean": stats.mean, "staleness_max": stats.max, "staleness_min": stats.min,
      "staleness_histogram": {str(k): v for k, v in sorted(stats.histogram.items())},
      "staleness_per_learner": per, "gradients_dropped": stats.dropped,
      "gradients_stale_dropped": stats.stale_dropped,
      "learners_alive": learners_alive, "queue_depth": queue_depth,
      "gradients_per_update": ps.gradients_per_update,
  }
  if members is not None:
    out.update(members.telemetry())
  if gate is not None:
    out.update(gate.telemetry())
  if deaths:
    out["learners_dead"] = {str(k): v for k, v in sorted(deaths.items())}
  return out


class Membership:
  """The live learners of a run and its membership record: who died (and why), who left, who joined, the fewest
  and most live at once. Every change re-derives c through the PS core
  (:meth:`~sajax.server.ParameterServer.set_live_learners`, the protocol's one rule); executors only report the
  changes, through :meth:`died`, :meth:`leave` and :meth:`join`.

  The rule, the same in every executor: a learner that raises is reported and the run goes on with the live
  ones, c re-derived from them (so hardsync never waits for a dead learner), unless ``fail_fast``; with
  ``replace`` (``elastic_replace``) a fresh learner takes its slot at once (the executor starts it). A leave or
  death that leaves fewer than ``min_live`` (``elastic_min_learners``) live ends the run with one line
  (:class:`LearnersFailed`).

  Args:
    learners: λ, the learners the run starts with (ids 0..λ−1).
    protocol: gives c for a live count.
    slots: learner ids 0..slots−1 may be live (``elastic_max_learners``; default λ).
  """

  def __init__(self, learners: int, protocol: Protocol, *, fail_fast: bool = False,
               say: Callable[[str], None] = log.info, min_live: int = 1, slots: Optional[int] = None,
               replace: bool = False) -> None:
    self.protocol, self.fail_fast, self.say = protocol, fail_fast, say
    self.learners, self.slots = learners, max(learners, slots or learners)
    self.min_live, self.replace = min_live, replace
    self.alive: set[int] = set(range(learners))
    self.errors: dict[int, str] = {}        # learner k -> why it died (while it stays dead)
    self.replaced: dict[int, str] = {}      # learner k -> why the learner it replaced died
    self.joins = self.leaves = 0
    self.fewest = self.most = learners

  @classmethod
  def from_config(cls, config: Any, protocol: Protocol, say: Callable[[str], None]) -> "Membership":
    """The membership of a run of ``config`` (``fail_fast`` and the ``elastic_*`` keys)."""
    from sajax import elastic
    return cls(config.learners, protocol, fail_fast=bool(config.get("fail_fast", False)), say=say,
               min_live=int(config.get("elastic_min_learners", 1)), slots=elastic.max_learners(config),
               replace=bool(config.get("elastic_replace", False)))

  def record(self, learner: int, error: str) -> None:
    """Notes a death without acting on it (deaths seen while a run shuts down)."""
    self.alive.discard(learner)
    self.errors[learner] = error

  def died(self, learner: int, error: str, ps: ParameterServer, traceback_file: Optional[str] = None) -> bool:
    """Records a death and sets the PS's c for the live learners; returns whether that applied an update. With
    ``replace`` the learner stays live (its slot): the caller starts a fresh one there (:attr:`replace`).

    Says it in one line (or raises :class:`LearnersFailed` with one line), naming ``traceback_file`` when the
    learner's traceback was kept there."""
    where = f"; traceback in {traceback_file}" if traceback_file else ""
    if self.fail_fast:
      self.record(learner, error)
      raise LearnersFailed(f"learner {learner} failed ({error}) and fail_fast is set{where}")
    if self.replace:
      self.replaced[learner] = error
      self.leaves, self.joins = self.leaves + 1, self.joins + 1
      self.say(f"learner {learner} died ({error}); a fresh learner takes its place{where}")
      return False
    self.record(learner, error)
    self.leaves += 1
    if not self.alive:
      raise LearnersFailed(f"every learner died; the last: learner {learner}: {error}{where}")
    self._check_enough(f"learner {learner} died ({error}){where}")
    self._changed()
    self.say(f"learner {learner} died ({error}); going on with {len(self.alive)} learners, "
             f"c = {self.gradients_per_update()}{where}")
    return ps.set_live_learners(len(self.alive))

  def leave(self, learner: int, reason: str, ps: ParameterServer) -> bool:
    """Learner k left (removed, or a scheduled leave): c re-derived; returns whether that applied an update."""
    if learner not in self.alive:
      return False
    self.alive.discard(learner)
    self.leaves += 1
    self._check_enough(f"learner {learner} left ({reason})")
    self._changed()
    self.say(f"learner {learner} left ({reason}); going on with {len(self.alive)} learners, "
             f"c = {self.gradients_per_update()}")
    return ps.set_live_learners(len(self.alive))

  def join(self, learner: int, ps: ParameterServer, reason: str = "joined") -> bool:
    """Learner k joins (a new learner, or one back in a slot it left): c re-derived; returns whether that
    applied an update (never: c only grows with the live count). Raises ValueError for a live or unknown id."""
    if learner in self.alive or not 0 <= learner < self.slots:
      raise ValueError(f"learner={learner!r} cannot join; allowed: a learner id 0..{self.slots - 1} that is not "
                       f"live (live: {sorted(self.alive)})")
    self.alive.add(learner)
    self.errors.pop(learner, None)
    self.joins += 1
    self._changed()
    self.say(f"learner {learner} {reason}; going on with {len(self.alive)} learners, c = {self.gradients_per_update()}")
    return ps.set_live_learners(len(self.alive))

  def free_slot(self) -> Optional[int]:
    """The lowest learner id that is not live (None: all ``slots`` are)."""
    return next((k for k in range(self.slots) if k not in self.alive), None)

  def _check_enough(self, what: str) -> None:
    if len(self.alive) < self.min_live:
      raise LearnersFailed(f"{what}: {len(self.alive)} learner(s) live, fewer than elastic_min_learners = "
                           f"{self.min_live}")

  def _changed(self) -> None:
    self.fewest, self.most = min(self.fewest, len(self.alive)), max(self.most, len(self.alive))

  def gradients_per_update(self) -> int:
    """c for the live learners (:meth:`~sajax.Protocol.gradients_for`)."""
    return self.protocol.gradients_for(max(1, len(self.alive)))

  def telemetry(self) -> dict:
    """The membership fields of a metrics record."""
    out = {"learners_live": sorted(self.alive), "learners_joined": self.joins, "learners_left": self.leaves,
           "learners_live_min": self.fewest, "learners_live_max": self.most}
    if self.replaced:
      out["learners_replaced"] = {str(k): v for k, v in sorted(self.replaced.items())}
    return out

  def to_json(self) -> dict:
    """The deaths (saved as the checkpoint's ``dead``, as before elastic membership)."""
    return {str(k): v for k, v in sorted(self.errors.items())}

  def state(self) -> dict:
    """The rest of the record, for a checkpoint's ``members``."""
    return {"learners": self.learners, "alive": sorted(self.alive), "joins": self.joins, "leaves": self.leaves,
            "fewest": self.fewest, "most": self.most, "replaced": {str(k): v for k, v in self.replaced.items()}}

  def restore(self, saved: Mapping[str, str], ps: ParameterServer, members: Optional[Mapping] = None) -> None:
    """The membership of a checkpointed run, and c for its live learners (set without applying: a buffered set
    of ≥ c gradients is applied with the next push).

    Resumed with the λ it was saved with, it goes on exactly: the dead stay dead, joined learners stay live.
    Resumed with another λ, the live set is 0..λ−1: learners the new run does not have left, new ones joined
    (counted so), every death record of a learner that is now live dropped."""
    members = dict(members or {})
    self.joins, self.leaves = int(members.get("joins", 0)), int(members.get("leaves", 0))
    self.fewest, self.most = int(members.get("fewest", self.learners)), int(members.get("most", self.learners))
    self.replaced = {int(k): v for k, v in members.get("replaced", {}).items()}
    if int(members.get("learners", self.learners)) == self.learners:
      if "alive" in members:
        self.alive = {int(k) for k in members["alive"] if int(k) < self.slots}
      for k, error in saved.items():
        if int(k) < self.slots:
          self.record(int(k), error)
    else:
      before = {int(k) for k in members.get("alive", ())}
      self.leaves += len(before - self.alive)
      self.joins += len(self.alive - before)
      self.say(f"resumed with λ = {self.learners} learners (saved with {members['learners']}): learners "
               f"{sorted(self.alive)} live")
    self._changed()
    if self.errors or members:
      ps.gradients_per_update = self.gradients_per_update()


Deaths = Membership   # its name before elastic membership


def spread_gate(protocol: Protocol, ps: ParameterServer, deaths: Membership,
                saved: Optional[Mapping] = None) -> Optional[SpreadGate]:
  """The run's :class:`~sajax.protocol.SpreadGate` under ssp (None otherwise): its counts of accepted pushes
  are the PS's per-learner statistics (so a resumed run goes on from them), its live learners ``deaths``'s;
  ``saved``: the gate's own checkpointed telemetry."""
  if protocol.max_spread is None:
    return None
  per = ps.stats.per_learner
  gate = SpreadGate(protocol.learners, protocol.max_spread,
                    counts=[per[k].count if k in per else 0 for k in range(protocol.learners)], alive=deaths.alive)
  gate.restore(saved or {})
  return gate


class SentVersions:
  """θ_j of the versions sent to learners in other processes (MPI ranks, Ray actors), for a policy that reads
  θ_j: a remote learner holds a version no older than the one it last pushed on (or the first it was sent), so
  versions older than every live remote learner's are released. References, never copies (the PS's arrays).
  Thread-safe: a sender thread records what it sends while a receiver thread looks pushes up (Ray)."""

  def __init__(self, learners: list[int], version: int) -> None:
    self._versions: dict[int, Any] = {}
    self._holds = {k: version for k in learners}
    self._lock = threading.Lock()

  def sent(self, version: int, params: Any) -> None:
    """``params`` (θ of ``version``) went to some learners."""
    with self._lock:
      self._versions[version] = params

  def stale_params(self, learner: int, version: int, alive: set[int]) -> Any:
    """θ_j of learner k's push on version j, releasing the versions no live remote learner can hold now."""
    with self._lock:
      self._holds[learner] = version
      oldest = min((v for k, v in self._holds.items() if k in alive), default=version)
      for v in [v for v in self._versions if v < oldest]:
        del self._versions[v]
      return self._versions[version]
