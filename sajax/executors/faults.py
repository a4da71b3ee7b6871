"""Fault injection, so that every row of the fault matrix (docs/reliability.md) runs from the command line.

Two kinds, both keyed by (learner k, k's own step s), so they hit the same gradient in every executor:

* ``fault_learner=k, fault_at_step=s``: learner k raises at its step s (it dies; the run goes on without it,
  c re-derived from the live learners, unless ``fail_fast``);
* ``nan_learners=(k, ...), nan_at_step=s, nan_steps=m``: those learners' gradients at steps s .. s+m−1
  (m = 0: every step from s on) are NaN. The PS drops them; enough in a row is divergence.

The MPI executor's messages are corrupted by :func:`corrupted_message` (``fault_mpi_corrupt_weights``,
``..._permits``, ``..._pushes``: the first k of each kind per rank get a bad magic number;
``fault_mpi_corrupt_version``: the first k weights messages to each rank after the start a version 2⁴⁰ ahead).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from sajax.executors import mpi_wire as wire

CORRUPT_VERSION_OFFSET = 1 << 40   # fault_mpi_corrupt_version: a flipped high bit of the version


@dataclasses.dataclass(frozen=True)
class FaultPlan:
  """Which (learner, step) raises and which gradients are made non-finite."""

  raise_learner: int = -1
  raise_at_step: int = 0
  nan_learners: tuple = ()
  nan_at_step: int = 0
  nan_steps: int = 1

  @classmethod
  def from_config(cls, config: Any) -> "FaultPlan":
    return cls(raise_learner=config.get("fault_learner", -1), raise_at_step=config.get("fault_at_step", 0),
               nan_learners=tuple(config.get("nan_learners", ())), nan_at_step=config.get("nan_at_step", 0),
               nan_steps=config.get("nan_steps", 1))

  def raises(self, learner: int, step: int) -> bool:
    """Whether learner ``learner`` raises at its step ``step``."""
    return learner == self.raise_learner and step == self.raise_at_step

  def nonfinite(self, learner: int, step: int) -> bool:
    """Whether learner ``learner``'s gradient at its step ``step`` is to be made NaN."""
    if learner not in self.nan_learners or step < self.nan_at_step:
      return False
    return self.nan_steps == 0 or step < self.nan_at_step + self.nan_steps

  def error(self, learner: int, step: int) -> RuntimeError:
    return RuntimeError(f"injected fault: learner {learner} raised at its step {step} (config.fault_learner)")


def corrupted_message(buf: np.ndarray, field: str = "magic") -> np.ndarray:
  """A copy of the MPI message ``buf`` with a bad magic number, or (``field="version"``) a version 2⁴⁰ ahead."""
  bad = buf.copy()
  if field == "version":
    bad[:wire.HEADER_BYTES].view(wire.HEADER)["version"] += CORRUPT_VERSION_OFFSET
  else:
    bad[:4] = 0
  return bad
