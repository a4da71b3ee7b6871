"""The elastic benchmark's table and figure (``python launch/bench.py elastic``, docs/benchmarks.md).

Pure functions of the runs' metrics.jsonl records (one list per run and seed) and matplotlib: no training here.
A run is a ``(name, [records of seed 0, records of seed 1, ...])`` pair; every record holds ``sim_time``,
``updates``, ``test_error`` and ``staleness_mean`` (the simulated executor's telemetry).
"""

from __future__ import annotations

import os
import statistics
from typing import Sequence


def time_at_update(records: Sequence[dict], update: float) -> float:
  """Simulated time at PS update ``update``, interpolated linearly between evaluation records (0 at 0)."""
  points = [(0, 0.0)] + [(r["updates"], r["sim_time"]) for r in records]
  for (u0, t0), (u1, t1) in zip(points, points[1:]):
    if u0 <= update <= u1:
      return t0 if u1 == u0 else t0 + (t1 - t0) * (update - u0) / (u1 - u0)
  return points[-1][1]


def error_at_time(records: Sequence[dict], time: float) -> float:
  """Test error of the last evaluation at or before simulated time ``time`` (the first one if none is)."""
  before = [r for r in records if r["sim_time"] <= time + 1e-9]
  return (before[-1] if before else records[0])["test_error"]


def summary(runs: Sequence[tuple[str, list[list[dict]]]]) -> list[dict]:
  """Per run, over its seeds: median (and range) of the final test error, of the simulated time to the end, and
  the median test error at the first run's median end time (the same simulated budget for every run)."""
  budget = statistics.median(records[-1]["sim_time"] for records in runs[0][1])
  rows = []
  for name, seeds in runs:
    final = [s[-1]["test_error"] for s in seeds]
    ends = [s[-1]["sim_time"] for s in seeds]
    rows.append({"run": name, "seeds": len(seeds), "test_error": statistics.median(final),
                 "test_error_range": (min(final), max(final)), "sim_time": statistics.median(ends),
                 "sim_time_range": (min(ends), max(ends)),
                 "error_at_budget": statistics.median(error_at_time(s, budget) for s in seeds),
                 "budget": budget, "updates": seeds[0][-1]["updates"],
                 "staleness_mean": statistics.median(s[-1]["staleness_mean"] for s in seeds)})
  return rows


def table(rows: Sequence[dict]) -> str:
  """The markdown table of :func:`summary`'s rows."""
  budget = rows[0]["budget"]
  lines = [f"| run | seeds | final test error (range) | simulated time to the end (range) | test error at "
           f"t = {budget:.0f} s | updates | ⟨σ⟩ |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    lo, hi = r["test_error_range"]
    t_lo, t_hi = r["sim_time_range"]
    lines.append(f"| {r['run']} | {r['seeds']} | {100 * r['test_error']:.2f} % ({100 * lo:.2f}–{100 * hi:.2f}) | "
                 f"{r['sim_time']:.0f} s ({t_lo:.0f}–{t_hi:.0f}) | {100 * r['error_at_budget']:.2f} % | "
                 f"{r['updates']} | {r['staleness_mean']:.2f} |")
  return "\n".join(lines) + "\n"


def plot(runs: Sequence[tuple[str, list[list[dict]]]], away: tuple[float, float], path: str) -> str:
  """Test error against simulated time, one line per seed of each run; the updates of ``away`` (the elastic
  run's leave and join, as fractions of its updates) shaded at their simulated times in the elastic run."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7.5, 4.2))
  for i, (name, seeds) in enumerate(runs):
    for j, records in enumerate(seeds):
      ax.plot([0] + [r["sim_time"] for r in records], [90] + [100 * r["test_error"] for r in records],
              color=f"C{i}", alpha=0.85, linewidth=1.5, label=name if j == 0 else None)
  elastic = runs[-1][1][0]
  total = elastic[-1]["updates"]
  start, end = (time_at_update(elastic, f * total) for f in away)
  ax.axvspan(start, end, color="grey", alpha=0.15, label="half the learners away (elastic run)")
  ax.set(xlabel="simulated time (s)", ylabel="test error (%)", ylim=(0, 20),
         title="λ = 8, heterogeneous speeds: half the learners leave at ⅓ of the run, rejoin at ⅔")
  ax.title.set_fontsize(9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
