"""``executor="mpi"``: λ learners spread over the ``mpiexec`` ranks, the one ParameterServer core on rank 0.

    rank r > 0: learner threads on local devices          rank 0: learner threads + the threads PS loop
      learner k: pull (j, θ_j) from the rank's cache  ──PUSH (k, j, loss | flat g)──▶  receiver thread → queue
      → grad → queue → main thread sends it to rank 0                                  → ParameterServer.push
      receiver thread ◀──WEIGHTS (i | flat θ_i), once per version the rank needs────  sender thread

Rank 0 runs exactly the threads executor (:class:`~sajax.executors.threads.ThreadedEngine`) for its own block
of learners; gradients of the other ranks' learners arrive as MPI messages (:mod:`mpi_wire`: a 40-byte header
and the raw float32 vector, never pickled) and join the same queue, so c, σ and the update are the PS core's.
After a push, rank r is sent the newest θ_i as soon as it is newer than the last version it was sent: weights
go to a rank once per version it needs, shared by its learners, not once per learner. Rank 0 alone reads and
writes the workdir; on resume it restores, then sends every rank its version, θ, its learners' streams
(sampler position and step) and which of them are dead. Every rank runs the same learner loop
(:mod:`~sajax.executors.learners`); a rank > 0 is :class:`~sajax.executors.mpi_learner_rank.LearnerRank`.
For a policy that reads θ_j, rank 0 keeps (by reference) each version it sent until no remote learner can still
hold it.

Streams and resume: a remote learner that draws its step s tells rank 0 at once (DRAW k s, before it computes
on it), and rank 0's copy of k's stream moves past s; messages from one rank arrive in order, so a gradient
never reaches the PS before its draw. A checkpoint therefore holds every step whose draw rank 0 had received,
including the steps still being computed (their gradients are lost, as a threads learner's in-flight step is),
so a resumed run never draws them again. Only a draw not yet taken by rank 0's receiver while it saves (on the wire, or
waiting while the receiver is blocked on a full PS queue) counts as made after the checkpoint, exactly like a local draw just after it, and is drawn again on resume.

What a rank accepts: besides size, magic, kind, length, learner range and whole-number counts (a permit's
serial, a draw's step: never NaN/Inf), every version is checked against what rank 0 can have sent
(:func:`mpi_wire.check_weights_version`): rank 0 sends a rank strictly newer weights each time, so an older
version is corrupt (the same one again is a repeat after a RESEND, ignored); before START only the SETUP's
version; after it no version (weights or permit) past the run's last update (every update applies at least one
gradient of μ: epochs × N / μ, + c for the last update's overshoot); under hardsync, while the rank has a live
learner, at most one version past the weights it holds (the next update needs its gradient). A message that
fails a check is logged and rejected, and the rank asks for the newest weights and its outstanding permits again
(RESEND). Not detected (the wire has no checksum): a version corrupted to another value within those bounds
under async, softsync or ssp; rank 0 then rejects that rank's pushes as newer than the PS until newer weights
reach it.

Under ssp, rank 0 holds the run's one :class:`~sajax.protocol.SpreadGate`, since only the PS knows which pushes
it accepted: after each push it processes (and each death) the gate names the learners that may start, and a
learner on another rank is sent a PERMIT (learner k, the current version i); its rank is queued for θ_i as after
a push, and the learner starts once it holds both (:meth:`~sajax.executors.learners.Published.take`), so s = 0
with c = λ gives σ = 0 here too. The price: a remote learner waits one round trip to rank 0 after every push.
A PERMIT is never lost: each carries learner k's serial number (1, 2, …), rank 0 keeps it until k's next push
(or death) arrives and sends it again when the rank asks for a RESEND (it rejected some message, perhaps that
one), and the rank ignores a serial it has already granted, so a resent permit never lets k start twice.

How a job ends when something goes wrong (every end is one line ``rank N: ...`` and exit code 5,
:data:`~sajax.executors.mpi_comm.EXIT_RANK_FAILED`; rerunning the same command resumes from the last
checkpoint): an exception on any rank (``rank N: Type: message; ending the job (...)``, its traceback in
``<workdir>/errors.log``); a rank that does not answer within ``mpi_timeout_s`` during start-up, shutdown,
a send, or the handshake at exit, or that sends nothing for as long mid-run while the PS, making no update,
waits for its gradients (the line names it); a PUSH that rank 0 rejects as malformed under hardsync or
ssp (it cannot tell whose it was and every learner would wait for it; under async or softsync the run goes on
without that gradient); rank 0 itself silent for ``mpi_timeout_s`` (it sends a rank it has told nothing for a
quarter of that an ALIVE, so a busy rank 0 is told from a stopped one; the line comes from the rank > 0).

MPI calls poll with a short sleep instead of blocking: MPICH's blocking calls spin a core, which learner
threads on a few cores cannot spare.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback
from typing import Any, Optional

import numpy as np

from sajax.executors import mpi_comm, mpi_wire as wire
from sajax.executors.learners import Death, Left, Push
from sajax.executors.mpi_comm import receive, send, world
from sajax.executors.mpi_learner_rank import LearnerRank
from sajax.executors.threads import ThreadedEngine
from sajax.executors.common import LearnersFailed, SentVersions
from sajax.executors.faults import corrupted_message
from sajax.server import DivergenceError

log = logging.getLogger("sajax")
PyTree = Any
DEFAULT_WAIT_S = mpi_comm.DEFAULT_WAIT_S   # waits for another rank (a first compilation under load is slow)


# ---- rank 0 ----------------------------------------------------------------------------------------------
SERVER_EXPECTS = frozenset({wire.PUSH, wire.DEATH, wire.FAIL, wire.DONE, wire.READY, wire.RESEND, wire.DRAW,
                            wire.LEAVE})


class ServerRank(ThreadedEngine):
  """Rank 0: the threads engine for its own learners, plus MPI receive/send threads for the other ranks'."""

  def __init__(self, run: Any, comm) -> None:
    self.comm, self.ranks = comm, comm.Get_size()
    self.blocks = wire.learner_blocks(run.config.learners, self.ranks)
    super().__init__(run, local_learners=list(self.blocks[0]))
    self.owner = {k: r for r, block in enumerate(self.blocks) for k in block}
    self.dim = int(self.published.value[1].size)
    self.wait_s = float(run.config.get("mpi_timeout_s", DEFAULT_WAIT_S))
    self.rejected = 0
    self._lock = threading.Condition()
    self._control: list[tuple[int, np.ndarray]] = []   # (rank, message) sent before any weights
    self._want: set[int] = set()                        # ranks that pushed since they were last sent θ
    self._sent = {r: -1 for r in range(1, self.ranks)}  # the last version each rank was sent
    self._corrupt = {r: int(run.config.get("fault_mpi_corrupt_weights", 0)) for r in range(1, self.ranks)}
    self._corrupt_permits = {r: int(run.config.get("fault_mpi_corrupt_permits", 0)) for r in range(1, self.ranks)}
    self._corrupt_version = {r: int(run.config.get("fault_mpi_corrupt_version", 0)) for r in range(1, self.ranks)}
    self._permit_serial = {k: 0 for r in range(1, self.ranks) for k in self.blocks[r]}
    self._outstanding: dict[int, np.ndarray] = {}      # ssp: learner k -> its PERMIT not yet followed by a push
    self._done: set[int] = set()
    self._ready: set[int] = set()
    self._closing = self._abandoned = self._started = False
    self._encoded: tuple[int, Optional[np.ndarray]] = (-1, None)
    # θ_j of the versions sent, for a policy that reads it (older ones released as remote learners move on).
    self._held = SentVersions([k for r in range(1, self.ranks) for k in self.blocks[r]], self.published.version)
    # The watch for a rank that stopped answering mid-run (_stalled): when each rank was last heard from, when
    # the PS last updated, the version each remote learner last pushed on.
    self._heard = {r: time.monotonic() for r in range(1, self.ranks)}
    self._told = dict(self._heard)   # when each rank was last sent anything (ALIVE when it is a while ago)
    self._last_update = self._next_watch = time.monotonic()
    self._pushed_on: dict[int, int] = {}
    mpi_comm.set_error_log(run.workdir)

  def run_loop(self) -> tuple[PyTree, PyTree]:
    dead = sorted(set(range(self.learners)) - self.deaths.alive)
    for r in range(1, self.ranks):
      streams = {str(k): self.run.streams[k].get_state() for k in self.blocks[r]}
      self._control.append((r, wire.encode(wire.SETUP, version=self.published.version,
                                           text=json.dumps({"streams": streams, "dead": dead}))))
      self._want.add(r)
    io = [threading.Thread(target=self._receiver, name="mpi-receive", daemon=True),
          threading.Thread(target=self._sender, name="mpi-send", daemon=True)]
    for t in io:
      t.start()
    self.run.log(f"mpi: {self.ranks} ranks, learners per rank {[len(b) for b in self.blocks]}, PS on rank 0")
    interrupted = False
    try:
      self.pool.warm_up()
      with self._lock:   # every rank has compiled its step: no rank's first pushes arrive many versions late
        if not self._lock.wait_for(lambda: len(self._ready | self._done) == self.ranks - 1, timeout=self.wait_s):
          missing = sorted(set(range(1, self.ranks)) - self._ready - self._done)
          raise RuntimeError(f"rank(s) {missing} did not report ready within {self.wait_s:g} s "
                             "(config.mpi_timeout_s)")
        self._control += [(r, wire.encode(wire.START)) for r in range(1, self.ranks)]
        self._started, self._last_update = True, time.monotonic()
        self._heard = {r: self._last_update for r in range(1, self.ranks)}
        self._lock.notify_all()
      return super().run_loop()
    except KeyboardInterrupt:
      interrupted = True
      raise
    except (DivergenceError, LearnersFailed):
      raise                      # an orderly end with one line (exit 3 or 4): the other ranks stop as if finished
    except BaseException as e:
      if self.ranks > 1:
        mpi_comm.fatal_error(mpi_comm.ending_line(e), traceback.format_exc())
      raise
    finally:
      self._stop_ranks(interrupted, io)

  def _stop_ranks(self, interrupted: bool, io: list) -> None:
    """Tells every rank to stop and keeps receiving (and discarding) until each says it is done, for at most
    ``mpi_timeout_s``; then names the ranks that never did."""
    with self._lock:
      for r in range(1, self.ranks):
        self._control.append((r, wire.encode(wire.STOP, value=1.0 if interrupted else 0.0)))
      self._closing = True
      self._lock.notify_all()
      if not self._lock.wait_for(lambda: len(self._done) == self.ranks - 1, timeout=self.wait_s):
        missing = sorted(set(range(1, self.ranks)) - self._done)
        reason = f"rank(s) {missing} did not stop within {self.wait_s:g} s (config.mpi_timeout_s)"
        log.warning("rank 0: %s; finishing without them", reason)
        mpi_comm.stopped_waiting_for(reason)   # the exit then ends the job with one line, never waits for them
        self._abandoned = True
        self._lock.notify_all()
    for t in io:
      t.join(timeout=self.wait_s)

  def _receiver(self) -> None:
    while len(self._done) < self.ranks - 1 and not self._abandoned:
      got = receive(self.comm, wire.TAG_TO_SERVER, stop=lambda: self._abandoned or self._watch())
      if got is None:
        return
      self._accept(*got)

  def _accept(self, source: int, buf: np.ndarray) -> None:
    """One message from rank ``source``: checked (a malformed one is counted and logged; under a protocol
    that waits for every gradient it ends the job), then acted on."""
    self._heard[source] = time.monotonic()
    try:
      msg = wire.decode(buf, dim=self.dim, learners=self.learners, expect=SERVER_EXPECTS)
      if msg.kind in wire.LEARNER_KINDS and self.owner[msg.learner] != source:
        raise wire.WireError(f"learner {msg.learner} belongs to rank {self.owner[msg.learner]}, not {source}")
      if msg.kind == wire.PUSH and msg.version > self.published.version:
        raise wire.WireError(f"version {msg.version} is newer than the PS version {self.published.version}")
    except wire.WireError as e:
      self.rejected += 1
      log.error("rank 0: rejected a malformed message from rank %d (%d bytes): %s", source, buf.size, e)
      if self.protocol.learners_wait or self.protocol.max_spread is not None:
        mpi_comm.fatal_error(   # it may have been a gradient every learner now waits for: end, never hang
            f"a malformed message from rank {source} may have been a gradient that protocol "
            f"{self.protocol.name} waits for; ending the job ({mpi_comm.RESUME_HINT})")
      return
    if msg.kind == wire.FAIL:   # rank `source` printed why; its traceback goes to the error log
      mpi_comm.write_error_log(f"rank {source}", msg.text)
      mpi_comm.abort()
    elif msg.kind == wire.DRAW:   # counted even after the run stopped: the final checkpoint is past it
      self.run.streams[msg.learner].drawn_elsewhere(int(msg.value))
    elif msg.kind in (wire.DONE, wire.READY, wire.RESEND):
      with self._lock:
        if msg.kind == wire.RESEND:    # it rejected a message: the newest θ and its outstanding permits again
          self._sent[source] = -1
          self._want.add(source)
          self._control += [(source, self._outstanding[k]) for k in self.blocks[source] if k in self._outstanding]
        else:
          (self._done if msg.kind == wire.DONE else self._ready).add(source)
        self._lock.notify_all()
    elif self.stop.is_set():
      return                                    # in flight when the run ended: discarded
    elif msg.kind in (wire.DEATH, wire.LEAVE):
      with self._lock:
        self._outstanding.pop(msg.learner, None)
      self._put(Death(msg.learner, msg.text) if msg.kind == wire.DEATH else Left(msg.learner, msg.text))
    else:
      finite = bool(np.isfinite(msg.payload).all())
      with self._lock:   # the pushing learner pulls next: send its rank θ as soon as there is a newer one
        self._outstanding.pop(msg.learner, None)   # ssp: it used its permit
        if finite:   # a dropped gradient is recomputed at once: under hardsync the PS still waits for that learner
          self._pushed_on[msg.learner] = msg.version
        self._want.add(source)
        self._lock.notify_all()
        stale = self._stale_params(msg.learner, msg.version)
      self._put(Push(msg.learner, msg.version, msg.payload, finite, msg.value, stale))

  def _watch(self) -> bool:
    """At most once a second: ends the job with one line if :meth:`_stalled` names ranks. True once ending."""
    now = time.monotonic()
    if now >= self._next_watch:
      self._next_watch = now + 1.0
      silent = self._stalled(now)
      if silent:
        mpi_comm.fatal_error(
            f"no update for {self.wait_s:g} s and rank(s) {silent}, whose gradients the PS waits for, sent "
            f"nothing for as long (config.mpi_timeout_s): stopped answering; ending the job ({mpi_comm.RESUME_HINT})")
        self._abandoned = True
    return self._abandoned

  def _stalled(self, now: float) -> list[int]:
    """The ranks that stopped answering mid-run: once the PS has made no update for ``mpi_timeout_s``, those
    silent for as long with a live learner the PS waits for (hardsync: one that has not pushed on the current
    version; ssp: one holding a permit; async, softsync: any). A rank whose learners all wait for rank 0 is
    silent by right and never named."""
    if not self._started or self.stop.is_set() or self._closing or now - self._last_update < self.wait_s:
      return []
    alive, version = self.deaths.alive, self.published.version

    def awaited(k: int) -> bool:
      if self.protocol.learners_wait:
        return self._pushed_on.get(k, -1) < version
      return k in self._outstanding if self.protocol.max_spread is not None else True
    return [r for r in range(1, self.ranks) if now - self._heard[r] >= self.wait_s
            and any(k in alive and awaited(k) for k in self.blocks[r])]

  def _stale_params(self, learner: int, version: int) -> Any:
    """θ_j of a remote push (policies that read it), releasing versions no remote learner can hold now."""
    if not self.ps.needs_stale_params:
      return None
    return self._held.stale_params(learner, version, self.deaths.alive)

  def _sender(self) -> None:
    while True:
      with self._lock:
        def ready():
          version = self.published.version
          return self._control or any(self._sent[r] < version for r in self._want) or self._abandoned or (
              self._closing and len(self._done) == self.ranks - 1)
        self._lock.wait_for(ready, timeout=0.5)
        self._control += [(r, wire.encode(wire.ALIVE)) for r in self._quiet(time.monotonic())]
        if self._control:
          dest, buf = self._control.pop(0)
        else:
          if self._abandoned or (self._closing and len(self._done) == self.ranks - 1):
            return
          version, params = self.published.value
          due = sorted(r for r in self._want if self._sent[r] < version)
          if not due or self._closing:
            continue
          dest = due[0]
          self._want.discard(dest)
          self._sent[dest] = version
          if self.ps.needs_stale_params:
            self._held.sent(version, params)
          buf = self._weights_message(version, params)
          if self._corrupt[dest] > 0:
            self._corrupt[dest] -= 1
            buf = corrupted_message(buf)
          elif self._corrupt_version[dest] > 0 and self._started:   # mid-run, where a bad version did harm
            self._corrupt_version[dest] -= 1
            buf = corrupted_message(buf, "version")
      self._told[dest] = time.monotonic()
      send(self.comm, buf, dest, wire.TAG_TO_LEARNERS)

  def _quiet(self, now: float) -> list[int]:
    """The ranks that were sent nothing for ``mpi_timeout_s`` / 4 during the run: they get an ALIVE, so a rank
    waiting for rank 0 (weights, a permit) can tell a rank 0 that is busy (a long evaluation) from one that
    stopped answering."""
    if not self._started or self._closing or self._abandoned:
      return []
    quiet = [r for r in range(1, self.ranks) if now - self._told[r] >= self.wait_s / 4]
    for r in quiet:
      self._told[r] = now
    return quiet

  def _weights_message(self, version: int, params: Any) -> np.ndarray:
    if self._encoded[0] != version:   # encoded once per version, whatever the number of ranks
      self._encoded = (version, wire.encode(wire.WEIGHTS, version=version, payload=np.asarray(params)))
    return self._encoded[1]

  def _publish(self) -> None:
    super()._publish()
    self._last_update = time.monotonic()
    with self._lock:
      self._lock.notify_all()

  def _permit(self, learners: list[int]) -> None:
    """SSP: rank 0's own learners are permitted in process; another rank's get a PERMIT naming the current
    version and k's next serial (kept until k pushes, resent on RESEND), and their rank is sent that version's
    weights unless it has them."""
    super()._permit([k for k in learners if self.owner[k] == 0])
    remote = [k for k in learners if self.owner[k] != 0]
    if remote:
      with self._lock:
        for k in remote:
          rank = self.owner[k]
          self._permit_serial[k] += 1
          buf = wire.encode(wire.PERMIT, learner=k, version=self.ps.version, value=float(self._permit_serial[k]))
          self._outstanding[k] = buf
          if self._corrupt_permits[rank] > 0:
            self._corrupt_permits[rank] -= 1
            buf = corrupted_message(buf)
          self._control.append((rank, buf))
          self._want.add(rank)
        self._lock.notify_all()

  def telemetry(self) -> dict:
    out = super().telemetry()
    per = self.ps.stats.per_learner
    out["pushes_per_rank"] = [sum(per[k].count + per[k].dropped for k in block if k in per)
                              for block in self.blocks]
    out["messages_rejected"] = self.rejected
    return out


def run_mpi(run: Any) -> tuple[PyTree, PyTree]:
  """The mpi executor: on rank 0 returns the final (params, opt_state); on other ranks, once rank 0 stops."""
  comm = world()
  if comm.Get_rank() == 0:
    return ServerRank(run, comm).run_loop()
  return LearnerRank(run, comm).run_loop()
