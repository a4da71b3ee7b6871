"""Staleness statistics of the parameter server: a histogram of σ = i − j over accepted pushes, per learner, and the
pushes dropped apart (non-finite, or refused by the policy for their σ). Plain data, saved with checkpoints."""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass
class LearnerStats:
  """Staleness of one learner's accepted pushes, and its dropped ones."""

  count: int = 0
  total: int = 0
  min: Optional[int] = None
  max: Optional[int] = None
  dropped: int = 0
  stale_dropped: int = 0

  @property
  def mean(self) -> float:
    return self.total / self.count if self.count else 0.0


@dataclasses.dataclass
class StalenessStats:
  """Running statistics over accepted pushes (dropped ones are counted apart)."""

  histogram: dict = dataclasses.field(default_factory=dict)     # σ -> number of accepted gradients
  count: int = 0
  total: int = 0
  max: int = 0
  dropped: int = 0             # non-finite gradients
  stale_dropped: int = 0       # gradients the policy refused for their σ (``drop``)
  per_learner: dict = dataclasses.field(default_factory=dict)   # learner -> LearnerStats

  @property
  def mean(self) -> float:
    return self.total / self.count if self.count else 0.0

  @property
  def min(self) -> int:
    return min(self.histogram) if self.histogram else 0

  def record(self, learner: int, staleness: int) -> None:
    self.histogram[staleness] = self.histogram.get(staleness, 0) + 1
    self.count += 1
    self.total += staleness
    self.max = max(self.max, staleness)
    s = self.per_learner.setdefault(learner, LearnerStats())
    s.count += 1
    s.total += staleness
    s.min = staleness if s.min is None else min(s.min, staleness)
    s.max = staleness if s.max is None else max(s.max, staleness)

  def record_dropped(self, learner: int) -> None:
    self.dropped += 1
    self.per_learner.setdefault(learner, LearnerStats()).dropped += 1

  def record_stale_dropped(self, learner: int) -> None:
    self.stale_dropped += 1
    self.per_learner.setdefault(learner, LearnerStats()).stale_dropped += 1

  def to_json(self) -> dict:
    return {"histogram": {str(k): v for k, v in sorted(self.histogram.items())}, "count": self.count,
            "total": self.total, "max": self.max, "dropped": self.dropped, "stale_dropped": self.stale_dropped,
            "per_learner": {str(k): dataclasses.asdict(v) for k, v in sorted(self.per_learner.items())}}

  @classmethod
  def from_json(cls, d: dict) -> "StalenessStats":
    return cls(histogram={int(k): v for k, v in d["histogram"].items()}, count=d["count"], total=d["total"],
               max=d["max"], dropped=d["dropped"], stale_dropped=d.get("stale_dropped", 0),
               per_learner={int(k): LearnerStats(**v) for k, v in d["per_learner"].items()})
