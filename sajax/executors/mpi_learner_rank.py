"""A rank > 0 of ``executor="mpi"`` (:mod:`sajax.executors.mpi`): its block of learners, no PS.

    learner k (thread): pull (j, θ_j) from the rank's Published → DRAW (k, s) to rank 0 → grad → local queue
    main thread: local queue → PUSH (k, j, loss | flat g) or DEATH to rank 0
    receive thread: WEIGHTS (i | θ_i), PERMIT (ssp), ALIVE, STOP from rank 0, each checked (mpi_wire) before use

Start-up: SETUP (the learners' streams and the dead), the first weights, compile, READY, then START. Every wait
for rank 0 is bounded: start-up by ``mpi_timeout_s``; each send and the run itself by rank 0's silence, since
rank 0 sends a rank it has told nothing for ``mpi_timeout_s`` / 4 an ALIVE (it may be busy evaluating, its queue
full, so a push waits), and a rank that has heard nothing for 1.5 × ``mpi_timeout_s`` ends the job (RankTimeout,
one line, exit 5). The 1.5: when another rank stops answering, rank 0 (which names it) speaks first. What the rank accepts, and why, is in
:mod:`sajax.executors.mpi`'s docstring.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from typing import Any, Optional

import jax
import numpy as np

from sajax import elastic
from sajax.executors import mpi_comm, mpi_wire as wire
from sajax.executors.faults import corrupted_message
from sajax.executors.learners import Death, Learners, Left, Published, join_learners
from sajax.executors.mpi_comm import receive, send
from sajax.executors.threads import SHUTDOWN_WAIT_S, bounded_put, learner_devices

log = logging.getLogger("sajax")
PyTree = Any
DEFAULT_WAIT_S = mpi_comm.DEFAULT_WAIT_S
RUN_EXPECTS = frozenset({wire.WEIGHTS, wire.STOP, wire.PERMIT, wire.ALIVE})   # what rank 0 sends once started
RANK_0_SILENCE = 1.5   # × mpi_timeout_s: how long a rank > 0 waits for any word from rank 0 (see silence_s)


class LearnerRank:
  """A rank > 0: its block of learner threads (the shared learner loop); pushes go to rank 0, weights come
  from it. No PS here."""

  def __init__(self, run: Any, comm) -> None:
    self.run, self.comm, self.rank = run, comm, comm.Get_rank()
    self.learners = run.config.learners
    self.local = list(wire.learner_blocks(self.learners, comm.Get_size())[self.rank])
    self.devices = dict(zip(self.local, learner_devices(len(self.local))[0]))
    self.dim = sum(int(np.size(x)) for x in jax.tree.leaves(run.params))
    self.wait_s = float(run.config.get("mpi_timeout_s", DEFAULT_WAIT_S))
    # One gradient waits here at most: a deeper local queue would only add staleness (the PS queue bounds it).
    self.queue: queue.Queue = queue.Queue(maxsize=1)
    self.stop = threading.Event()
    self.published = Published()
    self.pushes = self.rejected = 0
    self.corrupt_pushes = int(run.config.get("fault_mpi_corrupt_pushes", 0))
    self.interrupted = False
    self._granted = {k: 0 for k in self.local}   # ssp: the last permit serial granted to each local learner
    # What a version from rank 0 may be (wire.check_weights_version): the setup's until START, then at most
    # the run's last update (every update applies at least one gradient of μ; the last may pass by c − 1).
    self.setup_version: Optional[int] = None
    self.started = False
    self.last_version = run.total_samples // run.config.batch_per_learner + run.protocol.gradients_per_update
    self.hardsync = run.protocol.learners_wait
    self.live: set[int] = set(self.local)
    self.pool: Optional[Learners] = None
    self.leaves = (elastic.run_schedule(run.config, run.total_updates, 0)    # elastic_events (leaves only)
                   if run.config.get("elastic_events", "") else [])
    self.heard = time.monotonic()   # when rank 0 last sent anything (it sends ALIVE every mpi_timeout_s / 4)
    mpi_comm.set_error_log(run.workdir)

  def _next(self, expect: frozenset, what: str, deadline: Optional[float]) -> Optional[wire.Message]:
    """The next message from rank 0 of the kinds ``expect`` (None if it was rejected: RESEND asked)."""
    got = receive(self.comm, wire.TAG_TO_LEARNERS, source=0,
                  stop=lambda: deadline is not None and time.monotonic() > deadline)
    if got is None:
      raise RuntimeError(f"rank {self.rank}: nothing from rank 0 within {self.wait_s:g} s while waiting for "
                         f"{what} (config.mpi_timeout_s)")
    self.heard = time.monotonic()
    try:
      msg = wire.decode(got[1], dim=self.dim, learners=self.learners, expect=expect)
      if msg.kind in (wire.WEIGHTS, wire.PERMIT):
        self._check_version(msg)
      return msg
    except wire.WireError as e:
      self.rejected += 1
      log.error("rank %d: rejected a malformed message from rank 0 (%d bytes): %s; asking again", self.rank,
                got[1].size, e)
      self._send(wire.encode(wire.RESEND))
      return None

  def _check_version(self, msg: wire.Message) -> None:
    """Raises WireError for a weights or permit version rank 0 cannot have sent (module docstring)."""
    last = self.last_version if self.started else self.setup_version
    if msg.kind == wire.PERMIT:
      if msg.version > last:
        raise wire.WireError(f"permit version {msg.version} is past the run's last update {last}; allowed: 0..{last}")
      return
    held = self.published.version if self.published.value is not None else self.setup_version
    wire.check_weights_version(msg.version, held, last, hardsync=self.hardsync and bool(self.live))

  def _leave_due(self, version: int) -> None:
    """``elastic_events`` leaves of this rank's learners due once version i = update i is here: each finishes its
    gradient (under hardsync that round), then its LEAVE goes to rank 0, which re-derives c."""
    for _, learners in elastic.due(self.leaves, version):
      for k in learners:
        if self.pool is not None and k in self.pool.devices and k in self.live:
          self.pool.leave(k, "elastic_events")

  def _drawn(self, learner: int, step: int) -> None:
    """Learner k drew its step s: rank 0's copy of k's stream moves past it (checkpoints never replay it)."""
    self._send(wire.encode(wire.DRAW, learner=learner, value=float(step)))

  def run_loop(self) -> tuple[PyTree, PyTree]:
    deadline = time.monotonic() + self.wait_s
    setup = None
    while setup is None:
      setup = self._next(frozenset({wire.SETUP}), "its setup", deadline)
    self.setup_version = setup.version
    info = json.loads(setup.text)
    for k, state in info["streams"].items():
      self.run.streams[int(k)].set_state(state)
    live = {k: d for k, d in self.devices.items() if k not in set(info["dead"])}
    self.live = set(live)
    pool = self.pool = Learners(self.run, live, self.published,
                                lambda item: bounded_put(self.queue, item, self.stop), self.stop,
                                to_server=np.asarray, on_draw=self._drawn)
    while self.published.value is None and not self.stop.is_set():
      self._handle(self._next(frozenset({wire.WEIGHTS, wire.STOP}), "its first weights", deadline))
    if not self.stop.is_set():
      pool.warm_up()
      self._send(wire.encode(wire.READY))
    deadline = time.monotonic() + self.wait_s
    while not self.stop.is_set():   # START, or STOP when rank 0 failed to start
      msg = self._next(frozenset({wire.START, wire.WEIGHTS, wire.STOP}), "the start", deadline)
      if msg is not None and msg.kind == wire.START:
        self.started = True
        break
      self._handle(msg)
    receiver = threading.Thread(target=self._receiver, name="mpi-receive", daemon=True)
    receiver.start()
    threads = pool.start() if not self.stop.is_set() else []
    while not self.stop.is_set():
      try:
        item = self.queue.get(timeout=0.05)
      except queue.Empty:
        self.check_rank_0_alive(time.monotonic())
        continue
      if isinstance(item, Death):
        self.live.discard(item.learner)
        buf = wire.encode(wire.DEATH, learner=item.learner, text=item.error)
      elif isinstance(item, Left):
        self.live.discard(item.learner)
        buf = wire.encode(wire.LEAVE, learner=item.learner, text=item.reason)
      else:
        buf = wire.encode(wire.PUSH, learner=item.learner, version=item.version, value=float(item.loss),
                          payload=item.grads)
        self.pushes += 1
        if self.pushes <= self.corrupt_pushes:    # fault injection
          buf = corrupted_message(buf)
      self._send(buf)
    self.published.wake()
    join_learners(threads, self.queue, lambda death: None, SHUTDOWN_WAIT_S)
    receiver.join()
    self._send(wire.encode(wire.DONE))
    self.run.rank_summary = {"learners": self.local, "pushes": self.pushes, "messages_rejected": self.rejected}
    if self.interrupted:
      raise KeyboardInterrupt
    return self.run.params, self.run.opt_state

  def _send(self, buf: np.ndarray) -> None:
    """Sends ``buf`` to rank 0, waiting while rank 0 is busy but alive: the send gives up only once rank 0 has sent
    nothing for :attr:`silence_s` (it sends an ALIVE every ``mpi_timeout_s`` / 4 while it tells a rank nothing)."""
    send(self.comm, buf, 0, wire.TAG_TO_SERVER, wait_s=self.silence_s, heard=lambda: self.heard)

  @property
  def silence_s(self) -> float:
    """How long a rank > 0 waits for any word from rank 0: ``RANK_0_SILENCE`` × ``mpi_timeout_s``. Longer than
    rank 0's own bounds, so when another rank stops answering, rank 0, which can name it, ends the job first (a
    stopped rank r also stalls rank 0's one sender thread, so the other ranks stop hearing from rank 0 too)."""
    return RANK_0_SILENCE * self.wait_s

  def check_rank_0_alive(self, now: float) -> None:
    """Raises RankTimeout once rank 0 has sent nothing (not even an ALIVE) for :attr:`silence_s`."""
    if now - self.heard > self.silence_s:
      raise mpi_comm.RankTimeout(f"rank 0 sent nothing for {self.silence_s:g} s ({RANK_0_SILENCE:g} × "
                                 "config.mpi_timeout_s), not even that it is alive: it stopped answering")

  def _receiver(self) -> None:
    while not self.stop.is_set():   # without a bound: the main thread watches self.heard
      self._handle(self._next(RUN_EXPECTS, "weights", None))

  def _handle(self, msg: Optional[wire.Message]) -> None:
    """WEIGHTS: the version the rank's learners pull from now on; PERMIT: learner k may start a gradient (ssp);
    STOP: the run is over."""
    if msg is None:
      return
    if msg.kind == wire.PERMIT:
      if msg.learner in self.local:
        serial = int(msg.value)
        if serial > self._granted[msg.learner]:   # else a resent permit it already has: never grant twice
          self._granted[msg.learner] = serial
          self.published.grant([msg.learner], msg.version)
      else:
        self.rejected += 1
        log.error("rank %d: rejected a permission for learner %d, which runs on another rank", self.rank,
                  msg.learner)
      return
    if msg.kind == wire.STOP:
      self.interrupted = msg.value != 0
      self.stop.set()
      self.published.wake()
    elif msg.kind == wire.WEIGHTS and self.published.set_newer(msg.version, msg.payload):
      self._leave_due(msg.version)
