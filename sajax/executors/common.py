"""What every parameter-server executor reports: the staleness telemetry of a metrics record."""

from __future__ import annotations

from typing import Mapping

from sajax.server import ParameterServer


def telemetry(ps: ParameterServer, *, learners_alive: int, queue_depth: int,
              deaths: Mapping[int, str] | None = None) -> dict:
  """Staleness statistics of the accepted pushes so far, per learner, and the executor's health."""
  stats = ps.stats
  per = {str(k): {"count": s.count, "min": s.min, "mean": round(s.mean, 4), "max": s.max, "dropped": s.dropped}
         for k, s in sorted(stats.per_learner.items())}
  out = {
      "staleness_mean": stats.mean, "staleness_max": stats.max, "staleness_min": stats.min,
      "staleness_histogram": {str(k): v for k, v in sorted(stats.histogram.items())},
      "staleness_per_learner": per, "gradients_dropped": stats.dropped,
      "learners_alive": learners_alive, "queue_depth": queue_depth,
      "gradients_per_update": ps.gradients_per_update,
  }
  if deaths:
    out["learners_dead"] = {str(k): v for k, v in sorted(deaths.items())}
  return out
