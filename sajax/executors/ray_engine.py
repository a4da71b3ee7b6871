"""``executor="ray"``: λ learners in Ray actors, the one ParameterServer core in the process that runs the job.

    learner actors (ray_actors.LearnerActor)             this process (the driver): the threads PS loop
      learner k: pull (j, θ_j) from its actor ◀────────── weights(i, ref): ray.put(θ_i) once per version,
      → grad on the actor's device → actor queue           the ObjectRef shared by every live actor
      take() → (draws, [(k, j, loss, finite, flat g)]) ──▶ receiver thread → queue → ParameterServer.push

The PS side is exactly the threads executor (:class:`~sajax.executors.threads.ThreadedEngine`) without local
learners, as MPI's rank 0 is: c, σ, the update, SSP's gate, deaths, checkpoints, evaluation and Ctrl-C are the
PS core's and the run's. Learner actors run the shared learner loop (:mod:`~sajax.executors.learners`), one
actor per ``ray_learners_per_actor`` learners, each on a GPU of its own where the cluster has enough (an equal
share where fewer; JAX then allocates on demand), on CPU otherwise. Gradients and weights cross as float32
ndarrays through Ray's object store; every other value is a built-in (no object of ours is pickled).

Why the PS lives in the driver and not in an actor of its own: the run it drives owns the workdir (checkpoints,
metrics, the one-line errors), the Ctrl-C handler (checkpoint, exit 130) and the caller's callbacks, which an
actor process cannot have; an actor would have to send θ back for every evaluation and checkpoint. Killing the
PS is killing this process; rerunning the same command resumes from the last checkpoint, as under threads.

Every live actor is sent each new θ_i as soon as it is published (one ``ray.put`` per version, whatever the
number of actors; a version published while the previous one was being sent is skipped), so its learners pull
the newest weights they can, as threads learners do; under ssp a permitted learner's actor is sent a permission
naming the current version, and the learner starts once those weights are there. Each draw of a learner's stream is
reported with the next ``take`` (and at every checkpoint, :meth:`RayEngine.checkpoint_arrays`), so a resumed
run never draws a step again. An actor that dies (its process killed, its node lost) is reported as the death
of each of its learners, and the run goes on with the others (c re-derived), as for a learner that raises.

On one machine the run starts a local Ray itself (and shuts it down at the end; killed, it takes that Ray with it:
:mod:`~sajax.executors.ray_local`); ``config.ray_address="auto"``, an address, or ``RAY_ADDRESS`` joins a
running cluster (:func:`connect`).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
from typing import Any, Optional

import numpy as np

from sajax import config as config_lib
from sajax.executors import ray_actors, ray_local
from sajax.executors.common import LearnersFailed, SentVersions
from sajax.executors.learners import Death, Join, Push
from sajax.executors.threads import SHUTDOWN_WAIT_S, ThreadedEngine

log = logging.getLogger("sajax")
PyTree = Any
START_WAIT_S = 600.0   # how long the PS waits for every learner actor to build its run and compile
PROBE_S = 10.0         # how long a cluster's head has to accept a connection before ray.init is called


def connect(config: Any) -> bool:
  """Joins Ray for ``config`` (before anything is written to the workdir); returns whether it started a local
  Ray, which :func:`disconnect` then shuts down. An initialised Ray (the caller's) is used as it is.

  ``config.ray_address``: ``""`` starts a local Ray (or joins ``RAY_ADDRESS`` when set), ``"auto"`` the cluster
  this node belongs to (``ray start``), ``host:port`` or ``ray://host:port`` that head. Raises ConfigError (one
  line) without ray installed, or when no cluster answers there.
  """
  try:
    import ray
  except ImportError:
    raise config_lib.ConfigError("executor 'ray' needs ray; allowed: after pip install 'sajax[ray]', or another "
                                 "executor") from None
  if ray.is_initialized():
    return False
  given = config.get("ray_address", "")
  address = given or os.environ.get("RAY_ADDRESS") or None
  before = ray_local.own_children()
  try:
    if address and address != "auto":
      probe(address)    # ray.init retries an address where nothing listens for minutes
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
  except Exception as e:  # noqa: BLE001 - ray raises ConnectionError, ValueError or RuntimeError here
    reason = " ".join(str(e).split())[:300]
    named = f"config.ray_address={given!r}" if given else f"RAY_ADDRESS={address!r}"
    raise config_lib.ConfigError(f"{named}: no Ray cluster could be joined ({type(e).__name__}: {reason}); "
                                 "allowed: '' (a local Ray, or RAY_ADDRESS), 'auto' (the cluster of `ray start` "
                                 "on this node), or host:port of a cluster's head") from None
  ray_local.start(before)   # a local Ray (processes ray.init started): it ends with this process, even killed
  return True


def probe(address: str, timeout_s: float = PROBE_S) -> None:
  """Raises ConnectionError unless something accepts a TCP connection at ``address`` (host:port, optionally
  ray://) within ``timeout_s``."""
  host, _, port = address.removeprefix("ray://").rpartition(":")
  try:
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
      pass
  except (OSError, ValueError) as e:
    raise ConnectionError(f"nothing answers at {address} ({e})") from None


def disconnect() -> None:
  import ray
  ray.shutdown()
  ray_local.stop()


def actor_blocks(learners: int, per_actor: int) -> list[list[int]]:
  """Learners 0..λ−1 in contiguous blocks of ``per_actor`` (the last may be smaller): one actor each."""
  return [list(range(a, min(a + per_actor, learners))) for a in range(0, learners, per_actor)]


def actor_options(gpus: float, actors: int) -> dict:
  """Ray resources of one learner actor: a GPU of its own where the cluster has ``gpus`` ≥ ``actors``, an equal
  share (4 decimals, Ray's precision) where fewer, none otherwise (CPU). On a GPU JAX allocates on demand, so
  actors sharing one (and the PS on the driver's) do not each take 75 % of its memory."""
  if gpus <= 0:
    return {}
  share = 1.0 if gpus >= actors else math.floor(gpus / actors * 1e4) / 1e4
  return {"num_gpus": share, "runtime_env": {"env_vars": {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}}}


def one_line(error: BaseException) -> str:
  """A Ray error as one line: the remote exception's type and message, without Ray's traceback."""
  cause = getattr(error, "cause", None)
  error = cause if isinstance(cause, BaseException) else error
  lines = [line for line in str(error).splitlines() if line.strip()]
  text = lines[-1] if lines and type(error).__name__ not in lines[-1] else " ".join(str(error).split())
  return f"{type(error).__name__}: {' '.join(text.split())[:300]}"


class RayEngine(ThreadedEngine):
  """The PS loop of :class:`ThreadedEngine` with no local learner; learners run in Ray actors (module docstring)."""

  def __init__(self, run: Any) -> None:
    import ray
    self.ray = ray
    super().__init__(run, local_learners=[])
    self.blocks = actor_blocks(self.learners, int(run.config.get("ray_learners_per_actor", 1)))
    self.blocks += [[k] for k in sorted(self.deaths.alive) if k >= self.learners]   # joined before a checkpoint
    self.local = None                                    # any free id may join, in an actor of its own
    # elastic_replace: a dead learner's actor is gone, so its replacement is a new actor, prepared in the
    # background (seconds): the death is a leave now (c re-derived), the fresh learner a join once it is ready.
    self._replace, self.deaths.replace = self.deaths.replace, False
    self.owner = {k: a for a, block in enumerate(self.blocks) for k in block}
    self.actors: dict[int, Any] = {}                     # actor index -> handle, while it lives
    self._lock = threading.Condition()
    self._sent = -1                                      # the last version sent to every live actor
    self._lost: set[int] = set()                         # actors that ended (their learners are dead)
    self._held = SentVersions(list(range(self.deaths.slots)), self.published.version)
    self._ready: dict[int, Any] = {}                     # learner k -> the prepared actor that joins with it
    self._added: list[int] = []                          # actor indices the receiver has not taken from yet
    self._closing = False
    self.pushes = [0] * len(self.blocks)

  # ---- start and stop ---------------------------------------------------------------------------------
  def _start_actors(self) -> None:
    ray, run = self.ray, self.run
    live = [a for a, block in enumerate(self.blocks) if any(k in self.deaths.alive for k in block)]
    options = actor_options(ray.cluster_resources().get("GPU", 0), len(live))
    cls = ray_actors.remote_class(ray, options)
    config = run.config.to_dict()
    self.actors = {a: cls.remote(config, run.workdir, self.blocks[a]) for a in live}
    dead = sorted(set(range(self.learners)) - self.deaths.alive)
    version, params = self.published.value
    ref = ray.put(np.asarray(params))
    self._held.sent(version, params)
    self._sent = version
    prepared = {a: actor.prepare.remote({str(k): run.streams[k].get_state() for k in self.blocks[a]}, dead,
                                        version, ref, self._restored_rows(self.blocks[a]))
                for a, actor in self.actors.items()}
    _, missing = ray.wait(list(prepared.values()), num_returns=len(prepared), timeout=START_WAIT_S)
    if missing:
      late = [a for a, r in prepared.items() if r in missing]
      raise LearnersFailed(f"Ray learner actor(s) {late} did not start within {START_WAIT_S:g} s")
    where = []
    for a, r in prepared.items():
      try:
        where.append(ray.get(r))
      except ray.exceptions.RayError as e:
        raise LearnersFailed(f"Ray learner actor {a} (learners {self.blocks[a]}) failed to start: "
                             f"{one_line(e)}") from None
    ray.get([actor.start.remote() for actor in self.actors.values()])
    run.log(f"ray: {len(self.actors)} learner actor(s) ({'; '.join(where)}), PS on {self.ps_device}, "
            f"protocol {self.protocol.name} (c = {self.ps.gradients_per_update})")

  # ---- elastic membership: a new actor per joining learner -------------------------------------------------
  def add_learner(self, learner: Optional[int] = None) -> int:
    """Adds a learner in a new Ray actor (thread-safe); returns its id. The actor builds its run and compiles
    in the background; the learner joins (c re-derived) once it is ready, on the then current weights."""
    k = self._reserve(learner)
    threading.Thread(target=self._prepare_joiner, args=(k, False), name=f"ray-join-{k}", daemon=True).start()
    return k

  def _prepare_joiner(self, k: int, replacement: bool) -> None:
    ray = self.ray
    try:
      options = actor_options(ray.cluster_resources().get("GPU", 0), len(self.actors) + 1)
      actor = ray_actors.remote_class(ray, options).remote(self.run.config.to_dict(), self.run.workdir, [k])
      version, params = self.published.value
      ray.get(actor.prepare.remote({str(k): self.run.streams[k].get_state()}, [], version,
                                   ray.put(np.asarray(params)), {}), timeout=START_WAIT_S)
    except Exception as e:  # noqa: BLE001 - a learner that cannot join is said in one line; the run goes on
      with self._api:
        self._joining.discard(k)
      self.run.log(f"learner {k} could not join: its Ray actor failed to start ({one_line(e)})")
      return
    with self._lock:
      self._ready[k] = actor
    self._put(Join(k, "replaced by a new Ray actor" if replacement else "joined (a new Ray actor)"))

  def _membership(self, item: Any, current: Any) -> None:
    super()._membership(item, current)
    if isinstance(item, Death) and self._replace and not self.stop.is_set():
      with self._api:
        self._joining.add(item.learner)
      threading.Thread(target=self._prepare_joiner, args=(item.learner, True), name=f"ray-join-{item.learner}",
                       daemon=True).start()

  def _start_learner(self, k: int, fresh: bool) -> None:
    """A joining learner's actor, ready: it takes part from now on (weights, permits, takes)."""
    with self._lock:
      actor = self._ready.pop(k)
    version, params = self.published.value
    with self._lock:
      a = len(self.blocks)
      self.blocks.append([k])
      self.owner[k] = a
      self.pushes.append(0)
      self.actors[a] = actor
      self._added.append(a)
    actor.start.remote(version, self.ray.put(np.asarray(params)))

  def remove_learner(self, learner: int, reason: str = "remove_learner") -> None:
    """Under Ray a learner leaves with its actor: ``ray.kill`` the actor (``executor.actors``); its learners are
    reported dead (a leave), and c is re-derived."""
    raise ValueError(f"learner={learner!r} cannot be removed one by one under Ray; allowed: ray.kill(its actor "
                     f"executor.actors[{self.owner.get(learner, '?')}]), which is its learners' leave")

  def _restored_rows(self, block: list[int]) -> dict:
    """local_steps > 1: the inner states a resumed run's checkpoint holds for ``block`` (flat float32 rows)."""
    arrays = self.run.restored_arrays
    if self.run.local is None or "inner_state" not in arrays:
      return {}
    return {k: np.asarray(arrays["inner_state"][k], np.float32) for k in block if arrays["inner_state_saved"][k]}

  def _stop_actors(self) -> None:
    """Stops every actor's learners (collecting their last draws, inner states and deaths), then ends them."""
    with self._lock:
      self._closing = True
      self._lock.notify_all()
    if self.actors:
      self._settle()   # the final checkpoint comes after this: it must hold the last draws
      refs = {a: actor.stop.remote(SHUTDOWN_WAIT_S) for a, actor in self.actors.items()}
      ready, _ = self.ray.wait(list(refs.values()), num_returns=len(refs), timeout=SHUTDOWN_WAIT_S + 30)
      for a, r in refs.items():
        try:
          draws, deaths = self.ray.get(r) if r in ready else ([], [])
        except self.ray.exceptions.RayError:
          continue
        self._drawn(draws)
        for record in deaths:
          self.deaths.record(record[1], record[2])
      for actor in self.actors.values():
        try:
          self.ray.kill(actor)
        except Exception as e:  # noqa: BLE001 - Ray itself may be gone (a Ctrl-C reaches its processes too)
          log.debug("ray.kill: %s", e)
    self.actors = {}

  # ---- the PS loop --------------------------------------------------------------------------------------
  def run_loop(self) -> tuple[PyTree, PyTree]:
    io = []
    try:
      self._start_actors()
      io = [threading.Thread(target=self._receiver, name="ray-receive", daemon=True),
            threading.Thread(target=self._sender, name="ray-send", daemon=True)]
      for t in io:
        t.start()
      return super().run_loop()
    finally:
      self._stop_actors()
      for t in io:
        t.join(timeout=SHUTDOWN_WAIT_S)

  def _started_line(self, threads: list) -> str:
    return f"ray: the PS loop started, {len(self.deaths.alive)} learners alive"

  def _receiver(self) -> None:
    """Keeps one ``take`` outstanding per live actor and hands what comes back to the PS queue. Should it fail
    itself, no gradient would come again: every live learner is reported dead, so the run ends in one line."""
    try:
      self._receive()
    except Exception as e:  # noqa: BLE001 - reported as the learners' deaths, never a silent hang
      log.debug("ray receiver failed", exc_info=True)
      for k in sorted(self.deaths.alive):
        self._put(Death(k, f"the PS process stopped receiving from Ray ({one_line(e)})"))

  def _receive(self) -> None:
    ray = self.ray
    pending = {actor.take.remote(): a for a, actor in self.actors.items()}
    while (pending or self._joining or self._ready) and not self.stop.is_set():
      with self._lock:
        added, self._added = self._added, []
      pending.update({self.actors[a].take.remote(): a for a in added})
      if not pending:
        self.stop.wait(0.1)
        continue
      ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
      for ref in ready:
        a = pending.pop(ref)
        try:
          draws, records = ray.get(ref)
        except ray.exceptions.RayError as e:   # the actor died, or its take raised: its learners are dead
          self._actor_lost(a, e)
          continue
        self._drawn(draws)
        for record in records:
          self._accept(a, record)
        if not self.stop.is_set():
          pending[self.actors[a].take.remote()] = a

  def _actor_lost(self, a: int, error: BaseException) -> None:
    why = f"its Ray actor {a} ended ({one_line(error)})"
    with self._lock:
      self._lost.add(a)
    for k in self.blocks[a]:
      if k in self.deaths.alive:
        self._put(Death(k, why))

  def _drawn(self, draws: list) -> None:
    for k, step in draws:
      self.run.streams[k].drawn_elsewhere(int(step))

  def _accept(self, a: int, record: tuple) -> None:
    if self.stop.is_set():
      return                          # in flight when the run ended: discarded
    if record[0] == "death":
      _, k, error, kept = record
      self._put(Death(k, error, kept))
      return
    _, k, version, loss, finite, grads, batches = record
    self.pushes[a] += 1
    stale = self._held.stale_params(k, version, self.deaths.alive) if self.ps.needs_stale_params else None
    self._put(Push(k, version, grads, finite, loss, stale, batches))

  def _sender(self) -> None:
    """Sends every live actor the newest θ_i as soon as it is published: one ``ray.put`` per version, its
    ObjectRef shared by all (Ray moves it once per node). Versions published while one was being sent are
    skipped: an actor's learners pull the newest they hold, as threads learners pull the newest published.

    Sending only to the actors that pushed (MPI's rule) made a learner start each gradient on the weights it was
    sent after its previous push: async with λ = 3 gave ⟨σ⟩ = 5.7 against about 2 under threads."""
    while True:
      with self._lock:
        self._lock.wait_for(lambda: self._closing or self.published.version > self._sent, timeout=0.5)
        if self._closing:
          return
        version, params = self.published.value
        if version <= self._sent:
          continue
        self._sent = version
        actors = [actor for a, actor in self.actors.items() if a not in self._lost]
        if self.ps.needs_stale_params:
          self._held.sent(version, params)
      ref = self.ray.put(np.asarray(params))
      for actor in actors:
        actor.weights.remote(version, ref)

  def _publish(self) -> None:
    super()._publish()
    with self._lock:
      self._lock.notify_all()

  def _permit(self, learners: list[int]) -> None:
    """SSP: learner k's actor is told it may start one gradient on the current version i or newer (published
    before any permit, so on its way to every actor)."""
    for k in learners:
      a = self.owner[k]
      if a in self.actors and a not in self._lost:
        self.actors[a].permit.remote(k, self.ps.version)

  # ---- the executor interface ---------------------------------------------------------------------------
  def _settle(self) -> None:
    """The actors' draws so far and (local steps) their learners' inner states, for a checkpoint."""
    refs = {a: actor.settle.remote() for a, actor in self.actors.items()}
    for a, r in refs.items():
      try:
        draws, rows = self.ray.get(r, timeout=SHUTDOWN_WAIT_S)
      except (self.ray.exceptions.RayError, TimeoutError):
        continue                        # a dead actor: its learners' deaths reach the PS loop
      self._drawn(draws)
      self.pool.inner_states.update({int(k): row for k, row in rows.items()})

  def checkpoint_arrays(self) -> dict:
    self._settle()
    return super().checkpoint_arrays()

  def telemetry(self) -> dict:
    out = super().telemetry()
    out["pushes_per_actor"] = list(self.pushes)
    return out


def run_ray(run: Any) -> tuple[PyTree, PyTree]:
  """The ray executor: returns the final (params, opt_state)."""
  return RayEngine(run).run_loop()
