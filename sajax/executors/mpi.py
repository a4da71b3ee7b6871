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
writes the workdir; on resume it restores, then sends every rank its version, θ and its learners' sampler
states. A malformed message is logged and rejected; a rank that fails tells rank 0, which ends the job
(``MPI_Abort``); rerunning the same command resumes from the last checkpoint.

MPI calls poll with a short sleep instead of blocking: MPICH's blocking calls spin a core, which learner
threads on a few cores cannot spare.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import traceback
from typing import Any, Optional

import jax
import numpy as np

from sajax.executors import mpi_comm, mpi_wire as wire
from sajax.executors.mpi_comm import receive, send, world
from sajax.executors.threads import ThreadedEngine, _Death, _Push

log = logging.getLogger("sajax")
PyTree = Any


# ---- rank 0 ----------------------------------------------------------------------------------------------
class _MirroredSampler:
  """Rank 0's copy of a remote learner's sampler, advanced by one batch per push received from it, so the
  checkpoint holds every learner's position in its stream."""

  def __init__(self, sampler: Any) -> None:
    self.sampler, self.drawn, self._applied = sampler, 0, 0

  def get_state(self) -> dict:
    while self._applied < self.drawn:
      next(self.sampler)
      self._applied += 1
    return self.sampler.get_state()


class ServerRank(ThreadedEngine):
  """Rank 0: the threads engine for its own learners, plus MPI receive/send threads for the other ranks'."""

  def __init__(self, run: Any, comm) -> None:
    self.comm, self.ranks = comm, comm.Get_size()
    self.blocks = wire.learner_blocks(run.config.learners, self.ranks)
    super().__init__(run, local_learners=list(self.blocks[0]))
    self.owner = {k: r for r, block in enumerate(self.blocks) for k in block}
    self.dim = int(self.published[1].size)
    for r in range(1, self.ranks):
      for k in self.blocks[r]:
        run.samplers[k] = _MirroredSampler(run.samplers[k])
    self.rejected = 0
    self._lock = threading.Condition()
    self._control: list[tuple[int, np.ndarray]] = []   # (rank, message) sent before any weights
    self._want: set[int] = set()                        # ranks that pushed since they were last sent θ
    self._sent = {r: -1 for r in range(1, self.ranks)}  # the last version each rank was sent
    self._done: set[int] = set()
    self._ready: set[int] = set()
    self._closing = False
    self._encoded: tuple[int, Optional[np.ndarray]] = (-1, None)
    run.staleness_summary = self.telemetry

  def run_loop(self) -> tuple[PyTree, PyTree]:
    version = self.published[0]
    for r in range(1, self.ranks):
      states = {str(k): self.run.samplers[k].get_state() for k in self.blocks[r]}
      self._control.append((r, wire.encode(wire.SETUP, version=version, text=json.dumps(states))))
      self._want.add(r)
    io = [threading.Thread(target=self._receiver, name="mpi-receive", daemon=True),
          threading.Thread(target=self._sender, name="mpi-send", daemon=True)]
    for t in io:
      t.start()
    self.run.log(f"mpi: {self.ranks} ranks, learners per rank {[len(b) for b in self.blocks]}, PS on rank 0")
    interrupted = True
    try:
      _warm_up(self)
      with self._lock:   # every rank has compiled its step: no rank's first pushes arrive many versions late
        self._lock.wait_for(lambda: len(self._ready | self._done) == self.ranks - 1)
        self._control += [(r, wire.encode(wire.START)) for r in range(1, self.ranks)]
        self._lock.notify_all()
      out = super().run_loop()
      interrupted = False
      return out
    except KeyboardInterrupt:
      raise
    except BaseException:
      if self.ranks > 1:
        mpi_comm.fatal_error(f"rank 0 failed, ending the job:\n{traceback.format_exc().rstrip()}")
      raise
    finally:
      self._stop_ranks(interrupted, io)

  def _stop_ranks(self, interrupted: bool, io: list) -> None:
    """Tells every rank to stop, keeps receiving (and discarding) until each says it is done."""
    with self._lock:
      for r in range(1, self.ranks):
        self._control.append((r, wire.encode(wire.STOP, value=1.0 if interrupted else 0.0)))
      self._closing = True
      self._lock.notify_all()
      self._lock.wait_for(lambda: len(self._done) == self.ranks - 1)
    for t in io:
      t.join()

  def _publish(self) -> None:
    super()._publish()
    with self._lock:
      self._lock.notify_all()

  def _receiver(self) -> None:
    expect = frozenset({wire.PUSH, wire.DEATH, wire.FAIL, wire.DONE, wire.READY})
    while len(self._done) < self.ranks - 1:
      source, buf = receive(self.comm, wire.TAG_TO_SERVER, stop=lambda: False)
      try:
        msg = wire.decode(buf, dim=self.dim, learners=self.learners, expect=expect)
        if msg.kind in (wire.PUSH, wire.DEATH) and self.owner[msg.learner] != source:
          raise wire.WireError(f"learner {msg.learner} belongs to rank {self.owner[msg.learner]}, not {source}")
        if msg.kind == wire.PUSH and msg.version > self.published[0]:
          raise wire.WireError(f"version {msg.version} is newer than the PS version {self.published[0]}")
      except wire.WireError as e:
        self.rejected += 1
        log.error("rank 0: rejected a malformed message from rank %d (%d bytes): %s", source, buf.size, e)
        continue
      if msg.kind == wire.FAIL:
        mpi_comm.fatal_error(f"rank {source} failed, ending the job (rerun the same command to resume from the last "
               f"checkpoint):\n{msg.text}")
      elif msg.kind in (wire.DONE, wire.READY):
        with self._lock:
          (self._done if msg.kind == wire.DONE else self._ready).add(source)
          self._lock.notify_all()
      elif self.stop.is_set():
        continue                                  # in flight when the run ended: discarded
      elif msg.kind == wire.DEATH:
        self._put(_Death(msg.learner, msg.text))
      else:
        with self._lock:   # the pushing learner pulls next: send its rank θ as soon as there is a newer one
          self._want.add(source)
          self._lock.notify_all()
        self.run.samplers[msg.learner].drawn += 1
        finite = bool(np.isfinite(msg.payload).all())
        self._put(_Push(msg.learner, msg.version, msg.payload, finite, msg.value))

  def _sender(self) -> None:
    while True:
      with self._lock:
        def ready():
          version = self.published[0]
          return self._control or any(self._sent[r] < version for r in self._want) or (
              self._closing and len(self._done) == self.ranks - 1)
        self._lock.wait_for(ready, timeout=0.5)
        if self._control:
          dest, buf = self._control.pop(0)
        else:
          if self._closing and len(self._done) == self.ranks - 1:
            return
          version, params = self.published
          due = sorted(r for r in self._want if self._sent[r] < version)
          if not due or self._closing:
            continue
          dest = due[0]
          self._want.discard(dest)
          self._sent[dest] = version
          buf = None
      if buf is None:
        buf = self._weights_message(version, params)
      send(self.comm, buf, dest, wire.TAG_TO_LEARNERS)

  def _weights_message(self, version: int, params: jax.Array) -> np.ndarray:
    if self._encoded[0] != version:   # encoded once per version, whatever the number of ranks
      self._encoded = (version, wire.encode(wire.WEIGHTS, version=version, payload=np.asarray(params)))
    return self._encoded[1]

  def telemetry(self) -> dict:
    out = super().telemetry()
    per = self.ps.stats.per_learner
    out["pushes_per_rank"] = [sum(per[k].count + per[k].dropped for k in block if k in per)
                              for block in self.blocks]
    out["messages_rejected"] = self.rejected
    return out


# ---- ranks > 0 ---------------------------------------------------------------------------------------------
class LearnerRank(ThreadedEngine):
  """A rank > 0: its block of learner threads; pushes go to rank 0, weights come from it. No PS here."""

  def __init__(self, run: Any, comm) -> None:
    self.comm, self.rank = comm, comm.Get_rank()
    blocks = wire.learner_blocks(run.config.learners, comm.Get_size())
    flat_params = self._init_learners(run, None, list(blocks[self.rank]))
    # One gradient waits here at most: a deeper local queue would only add staleness (the PS queue bounds it).
    self.queue = queue.Queue(maxsize=1)
    self.dim = int(flat_params.size)
    self.published = None
    self.pushes = 0
    self.rejected = 0
    self.interrupted = False

  def _to_server(self, grads: jax.Array) -> np.ndarray:
    return np.asarray(grads)

  def _next(self, expect: frozenset) -> Optional[wire.Message]:
    got = receive(self.comm, wire.TAG_TO_LEARNERS, stop=lambda: False, source=0)
    try:
      return wire.decode(got[1], dim=self.dim, learners=self.learners, expect=expect)
    except wire.WireError as e:
      self.rejected += 1
      log.error("rank %d: rejected a malformed message from rank 0 (%d bytes): %s", self.rank, got[1].size, e)
      return None

  def run_loop(self) -> tuple[PyTree, PyTree]:
    setup = None
    while setup is None:
      setup = self._next(frozenset({wire.SETUP}))
    for k, state in json.loads(setup.text).items():
      self.run.samplers[int(k)].set_state(state)
    while self.published is None and not self.stop.is_set():
      self._handle(self._next(frozenset({wire.WEIGHTS, wire.STOP})))
    if not self.stop.is_set():
      _warm_up(self)
      send(self.comm, wire.encode(wire.READY), 0, wire.TAG_TO_SERVER)
    while not self.stop.is_set():   # START, or STOP when rank 0 failed to start
      msg = self._next(frozenset({wire.START, wire.WEIGHTS, wire.STOP}))
      if msg is not None and msg.kind == wire.START:
        break
      self._handle(msg)
    receiver = threading.Thread(target=self._receiver, name="mpi-receive", daemon=True)
    receiver.start()
    threads = [threading.Thread(target=self._learner, args=(k,), name=f"learner-{k}", daemon=True)
               for k in self.local_learners]
    for t in threads:
      t.start()
    while not self.stop.is_set():
      try:
        item = self.queue.get(timeout=0.05)
      except queue.Empty:
        continue
      if isinstance(item, _Death):
        buf = wire.encode(wire.DEATH, learner=item.learner, text=item.error)
      else:
        buf = wire.encode(wire.PUSH, learner=item.learner, version=item.version, value=float(item.loss),
                          payload=item.grads)
        self.pushes += 1
      send(self.comm, buf, 0, wire.TAG_TO_SERVER)
    self._shutdown(threads)
    receiver.join()
    send(self.comm, wire.encode(wire.DONE), 0, wire.TAG_TO_SERVER)
    self.run.rank_summary = {"learners": self.local_learners, "pushes": self.pushes,
                             "messages_rejected": self.rejected}
    if self.interrupted:
      raise KeyboardInterrupt
    return self.run.params, self.run.opt_state

  def _receiver(self) -> None:
    while not self.stop.is_set():
      self._handle(self._next(frozenset({wire.WEIGHTS, wire.STOP})))

  def _handle(self, msg: Optional[wire.Message]) -> None:
    """WEIGHTS: the version the rank's learners pull from now on; STOP: the run is over."""
    if msg is not None:
      if msg.kind == wire.STOP:
        self.interrupted = msg.value != 0
        self.stop.set()
      with self.version_changed:
        if msg.kind == wire.WEIGHTS:
          self.published = (msg.version, msg.payload)
        self.version_changed.notify_all()


def _warm_up(engine: ThreadedEngine) -> None:
  """Compiles the gradient step on each of this rank's learner devices (on real data, no sampler advanced)."""
  run = engine.run
  images, labels = run.dataset.train.gather(np.arange(run.config.batch_per_learner))
  params = engine.published[1]
  for device in set(engine.devices.values()):
    out = engine._grad_step(jax.device_put(params, device), images, np.asarray(labels, np.int32),
                            jax.device_put(run.key, device), np.uint32(0))
    jax.block_until_ready(out)


def run_mpi(run: Any) -> tuple[PyTree, PyTree]:
  """The mpi executor: on rank 0 returns the final (params, opt_state); on other ranks, once rank 0 stops."""
  comm = world()
  if comm.Get_rank() == 0:
    return ServerRank(run, comm).run_loop()
  return LearnerRank(run, comm).run_loop()
