"""Per-learner streams: learner k's seeded mini-batch sampler and its step counter, advanced together.

Learner k's s-th gradient uses the s-th mini-batch of μ from its own sampler and the key
``fold_in(fold_in(key, k), s)`` for augmentation and dropout, in every executor. Both advance in one locked
step and are checkpointed together, so a resumed run continues each learner's samples *and* keys where they
stopped, whichever thread draws them and whenever the checkpoint is taken.
"""

from __future__ import annotations

import threading
from typing import Any, Iterator

import numpy as np


class LearnerStream:
  """Learner k's (mini-batch indices, step) stream around its sampler (``next`` and ``get/set_state``)."""

  def __init__(self, sampler: Iterator[np.ndarray]) -> None:
    self.sampler = sampler
    self.step = 0
    self._elsewhere = 0           # draws made by another process (MPI), applied to the sampler lazily
    self._lock = threading.Lock()

  def next(self) -> tuple[np.ndarray, int]:
    """The next μ example indices and the step they belong to."""
    with self._lock:
      self._catch_up()
      indices, step = next(self.sampler), self.step
      self.step += 1
    return indices, step

  def drawn_elsewhere(self) -> None:
    """Counts one draw made by this learner in another process (rank 0 mirrors remote MPI learners)."""
    with self._lock:
      self._elsewhere += 1
      self.step += 1

  def get_state(self) -> dict:
    """The sampler's position and the step count, as JSON (for checkpoints)."""
    with self._lock:
      self._catch_up()
      return {"sampler": self.sampler.get_state(), "step": self.step}

  def set_state(self, state: dict) -> None:
    """Resumes where :meth:`get_state` was taken (a bare sampler state, from older checkpoints, means step 0)."""
    with self._lock:
      if "sampler" in state:
        self.sampler.set_state(state["sampler"])
        self.step = int(state["step"])
      else:
        self.sampler.set_state(state)
        self.step = 0
      self._elsewhere = 0

  def _catch_up(self) -> None:
    while self._elsewhere:
      next(self.sampler)
      self._elsewhere -= 1


def learner_streams(samplers: list[Any]) -> list[LearnerStream]:
  """One :class:`LearnerStream` per learner's sampler."""
  return [LearnerStream(s) for s in samplers]
