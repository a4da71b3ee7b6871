"""The learner side of ``executor="ray"`` (:mod:`sajax.executors.ray_engine`): a Ray actor hosting the shared
learner loop (:class:`~sajax.executors.learners.Learners`) for its block of learners, no PS.

    learner k (thread in the actor, on the actor's device): pull (j, θ_j) from the actor's Published → grad
    → local queue → (k, j, loss, finite, flat g as float32 ndarray) returned by ``take`` to the PS process
    ``weights(i, θ_i)``: θ_i arrives as a read-only ndarray from Ray's object store (one ``ray.put`` per version,
    the ObjectRef shared by every actor); ``permit`` (ssp), ``settle`` (draws, inner states), ``stop``

Everything that crosses the process boundary is a built-in value or a numpy array (Ray moves arrays through its
object store, zero-copy on one node); no object of ours is pickled. The actor builds its own
:class:`~sajax.trainer.Run` without outputs (data, model, loss, the learners' streams), like an MPI rank > 0:
it never reads or writes the workdir. Its learners' streams are set from the PS side's (which checkpoints them),
and each draw is reported back (:meth:`LearnerActor.take`, :meth:`LearnerActor.settle`), so a checkpoint never
hands a drawn step out again. This module imports no ray: :func:`remote_class` wraps the class when the ray
executor starts.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Optional

import numpy as np
from jax.flatten_util import ravel_pytree

log = logging.getLogger("sajax")
TAKE_WAIT_S = 0.5   # a take() returns empty after this long without an item, so the PS side's waits stay short


def push_record(item: Any) -> tuple:
  """A :class:`~sajax.executors.learners.Push` or :class:`~sajax.executors.learners.Death` as a tuple of
  built-in values and one float32 ndarray (what a Ray call returns): ``("push", k, j, loss, finite, g,
  batches)`` or ``("death", k, error, traceback_file)``."""
  from sajax.executors.learners import Death
  if isinstance(item, Death):
    return ("death", item.learner, item.error, item.traceback_file)
  grads = np.ascontiguousarray(np.asarray(item.grads), dtype=np.float32).reshape(-1)
  return ("push", item.learner, int(item.version), float(item.loss), bool(item.finite), grads, item.batches)


class LearnerActor:
  """λ_a learners of one run in one process (a Ray actor, or a plain object in tests).

  Args:
    config: the run's config as a plain dict (``ConfigDict.to_dict()``).
    workdir: the run's folder (only named in messages: the actor writes nothing).
    learners: the learner ids k this actor runs.
  """

  def __init__(self, config: dict, workdir: str, learners: list[int]) -> None:
    import ml_collections
    from sajax import data, trainer
    from sajax.executors.learners import Learners, Published
    from sajax.executors.threads import bounded_put, learner_devices

    cfg = ml_collections.ConfigDict(config)
    dataset = data.load_dataset(cfg.dataset, data_dir=cfg.get("data_dir") or None, download=False)
    self.run = trainer.Run(cfg, workdir, dataset, outputs=False)
    self.learners = list(learners)
    self.devices = dict(zip(self.learners, learner_devices(len(self.learners))[0]))
    self.flat_params = ravel_pytree(self.run.params)[0]
    self.queue: queue.Queue = queue.Queue(maxsize=max(1, len(self.learners)))
    self.stop_event = threading.Event()
    self.published = Published()
    self._lock = threading.Lock()
    self._draws: list[tuple[int, int]] = []
    self._make_pool = lambda live, inner: Learners(   # noqa: E731 - the shared learner loop, pushes to our queue
        self.run, live, self.published, lambda item: bounded_put(self.queue, item, self.stop_event),
        self.stop_event, to_server=np.asarray, on_draw=self._drawn, inner_states=inner)
    self.pool: Optional[Learners] = None
    self.threads: list[threading.Thread] = []

  def _drawn(self, learner: int, step: int) -> None:
    with self._lock:
      self._draws.append((learner, step))

  def _draws_so_far(self) -> list[tuple[int, int]]:
    with self._lock:
      draws, self._draws = self._draws, []
    return draws

  # ---- called by the PS side ------------------------------------------------------------------------
  def prepare(self, streams: dict, dead: list[int], version: int, params: np.ndarray,
              inner_states: dict) -> str:
    """Sets the learners' streams (the PS side's, restored from a checkpoint), publishes (j, θ_j), compiles the
    gradient step on the actor's devices (no stream advanced); returns where the learners run."""
    for k, state in streams.items():
      self.run.streams[int(k)].set_state(state)
    live = {k: d for k, d in self.devices.items() if k not in set(dead)}
    inner = {}
    if self.run.local is not None and inner_states:
      unravel = ravel_pytree(self.run.local.inner.init(self.flat_params))[1]
      inner = {int(k): unravel(np.asarray(row)) for k, row in inner_states.items()}
    self.pool = self._make_pool(live, inner)
    self.published.set(version, params)
    self.pool.warm_up()
    devices = sorted({str(d) for d in live.values()})
    return f"learners {sorted(live)} on {', '.join(devices) or 'no device'}"

  def start(self, version: Optional[int] = None, params: Optional[np.ndarray] = None) -> None:
    """Starts the learners, on (i, θ_i) when given and newer than the weights held (an actor that joins a running
    job starts on the current weights)."""
    if version is not None:
      self.published.set_newer(version, params)
    self.threads = self.pool.start()

  def weights(self, version: int, params: np.ndarray) -> None:
    """θ_i from the PS; a version no newer than the one held (calls may overtake each other, on up to 4 threads
    of the actor) is ignored, in one step with the check (:meth:`~sajax.executors.learners.Published.set_newer`)."""
    self.published.set_newer(version, params)

  def permit(self, learner: int, version: int) -> None:
    """SSP: learner k may start one gradient, on weights of version ``version`` or newer."""
    self.published.grant([learner], version)

  def take(self) -> tuple[list, list]:
    """(the draws since the last call, the pushes and deaths waiting here), waiting up to ``TAKE_WAIT_S`` for
    the first item. Draws come first: a gradient never reaches the PS before its draw."""
    items = []
    try:
      items.append(self.queue.get(timeout=TAKE_WAIT_S))
      while True:
        items.append(self.queue.get_nowait())
    except queue.Empty:
      pass
    return self._draws_so_far(), [push_record(item) for item in items]

  def settle(self) -> tuple[list, dict]:
    """For a checkpoint: the draws since the last call and, with local steps, each learner's inner state after
    its last push (flat float32, ``ravel_pytree``'s order)."""
    states = dict(self.pool.inner_states) if self.pool is not None else {}
    rows = {k: np.asarray(ravel_pytree(s)[0], np.float32) for k, s in states.items() if s is not None}
    return self._draws_so_far(), rows

  def stop(self, wait_s: float) -> tuple[list, list]:
    """Stops the learners (gradients in flight are discarded); returns (draws, deaths seen while stopping)."""
    from sajax.executors.learners import join_learners
    self.stop_event.set()
    self.published.wake()
    deaths: list = []
    join_learners(self.threads, self.queue, lambda death: deaths.append(push_record(death)), wait_s)
    return self._draws_so_far(), deaths


def remote_class(ray: Any, options: dict) -> Any:
  """:class:`LearnerActor` as a Ray actor class: threaded (``take`` blocks while ``weights`` and ``permit`` come
  in), no restarts (a dead actor's learners are reported dead, as a learner thread that raised)."""
  return ray.remote(max_concurrency=4, max_restarts=0, **options)(LearnerActor)
