"""Per-learner streams: learner k's seeded mini-batch sampler (:class:`LearnerSampler`) and its step counter,
advanced together (:class:`LearnerStream`).

Learner k's s-th gradient uses the s-th mini-batch of μ from its own sampler and the key
``fold_in(fold_in(key, k), s)`` for augmentation and dropout, in every executor. Both advance in one locked
step and are checkpointed together, so a resumed run continues each learner's samples *and* keys where they
stopped, whichever thread draws them and whenever the checkpoint is taken.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import Any, Iterator

import grain
import numpy as np


class _EpochBatches:
  """Batch k of one learner's stream: positions kμ..kμ+μ−1 of concatenated per-epoch permutations.

  Epoch e's permutation comes from ``np.random.default_rng((seed, learner, e))``, so every epoch is
  reshuffled and batch k is a pure function of (seed, learner, k): resuming is just "next k".
  """

  def __init__(self, num_examples: int, batch_size: int, seed: int, learner: int) -> None:
    self.n, self.mu, self.key = num_examples, batch_size, (seed % 2**64, learner)
    self._perms: dict[int, np.ndarray] = {}

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      if len(self._perms) >= 2:
        self._perms.pop(min(self._perms))
      self._perms[epoch] = np.random.default_rng((*self.key, epoch)).permutation(self.n)
    return self._perms[epoch]

  def __call__(self, k: int) -> np.ndarray:
    start, stop = k * self.mu, (k + 1) * self.mu
    first, last = start // self.n, (stop - 1) // self.n
    if first == last:
      return self._perm(first)[start - first * self.n:stop - first * self.n]
    pos = np.arange(start, stop, dtype=np.int64)
    epochs = range(first, last + 1)
    return np.concatenate([self._perm(e)[pos[pos // self.n == e] - e * self.n] for e in epochs])


class LearnerSampler:
  """Learner k's own shuffled, seeded stream of mini-batches of μ example indices.

  Every epoch (N consecutive indices of the stream) is a fresh permutation of range(N); a batch may span two
  epochs when μ does not divide N. The stream depends only on (seed, learner). It is a grain
  ``MapDataset`` of batches read by a grain ``DatasetIterator`` (no worker threads: ~10 µs a batch, where
  grain's per-element ``shuffle().repeat().batch(μ)`` costs ~140 µs for μ = 16), so it checkpoints with
  :meth:`get_state` / :meth:`set_state`.
  """

  def __init__(self, num_examples: int, batch_size: int, *, seed: int, learner: int) -> None:
    for what, value in (("num_examples", num_examples), ("batch_size", batch_size)):
      if value < 1:
        raise ValueError(f"{what}={value!r} is invalid; allowed: an integer >= 1")
    if learner < 0:
      raise ValueError(f"learner={learner!r} is invalid; allowed: an integer >= 0")
    self.num_examples, self.batch_size = int(num_examples), int(batch_size)
    self.seed, self.learner = int(seed), int(learner)
    batch_fn = _EpochBatches(self.num_examples, self.batch_size, self.seed, self.learner)
    batches = grain.MapDataset.range(sys.maxsize).map(batch_fn)
    options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    self._iterator = iter(batches.to_iter_dataset(options))

  def __iter__(self) -> LearnerSampler:
    return self

  def __next__(self) -> np.ndarray:
    """The next μ indices into the train split, int64 (μ,)."""
    return next(self._iterator)

  def _identity(self) -> dict:
    return {"num_examples": self.num_examples, "batch_size": self.batch_size, "seed": self.seed,
            "learner": self.learner}

  def get_state(self) -> dict:
    """The position in the stream, as a JSON-serialisable dict (for checkpoints)."""
    stream = json.loads(json.dumps(self._iterator.get_state(), default=_json_default))
    return {**self._identity(), "stream": stream}

  def set_state(self, state: dict) -> None:
    """Resumes exactly where :meth:`get_state` was taken; the stream identity must match."""
    mismatched = {k: (v, state.get(k)) for k, v in self._identity().items() if state.get(k) != v}
    if mismatched:
      raise ValueError(f"sampler state is for another stream: {mismatched} (this sampler, state)")
    self._iterator.set_state(state["stream"])


def _json_default(value: Any) -> Any:
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f"cannot serialise {type(value).__name__} in a sampler state")


def learner_samplers(num_examples: int, batch_size: int, learners: int, seed: int) -> list[LearnerSampler]:
  """One :class:`LearnerSampler` per learner: λ independent streams of μ indices from the run seed."""
  if learners < 1:
    raise ValueError(f"learners={learners!r} is invalid; allowed: an integer >= 1")
  return [LearnerSampler(num_examples, batch_size, seed=seed, learner=k) for k in range(learners)]


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

  def drawn_elsewhere(self, step: int) -> None:
    """This learner drew its step ``step`` in another process (rank 0 mirrors remote MPI learners): the stream
    moves past it, so a checkpoint never hands it out again; an older or repeated step changes nothing."""
    with self._lock:
      if step >= self.step:
        self._elsewhere += step + 1 - self.step
        self.step = step + 1

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
