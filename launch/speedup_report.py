"""The paper's speedup figure in simulated time, for launch/reproduce.py's ``--speedup`` runs (Zhang et al. 2016).

Time to a target test error (the λ = 1 run's final error + 0.5 point) against λ ∈ {1, 2, 4, 8, 16, 30} for
hardsync (SSGD), 1-softsync and async with the ``inverse`` rule, under reproduce.py's learner-speed model (a
gradient of μ examples costs a fixed push time plus a time ∝ μ, a lognormal jitter, one straggler): the rows,
the markdown section and the log-log PNG. Pure functions of the runs' cells and metrics histories.
"""

from __future__ import annotations

import statistics
from typing import Sequence

from launch.reproduce import P4_POINTS, SIM_JITTER, Cell
from launch.reproduce_report import save_figure

PROTOCOL_OF = {"ssgd": "hardsync (SSGD)", "n1": "1-softsync, inverse", "async": "async, inverse"}


def protocol_of(cell: dict) -> str:
  """A speedup cell's protocol name: hardsync (SSGD), 1-softsync or async (n = λ > 1)."""
  if cell["policy"] == "ssgd":
    return PROTOCOL_OF["ssgd"]
  return PROTOCOL_OF["async"] if cell["n"] == cell["learners"] else PROTOCOL_OF["n1"]


def time_to(history: Sequence[dict], target_percent: float) -> float | None:
  """Simulated seconds at the first evaluation whose test error is at or below the target; None if never."""
  for record in history:
    if 100 * record["test_error"] <= target_percent:
      return float(record["sim_time"])
  return None


def speedup_rows(runs: Sequence[tuple[dict, list[dict]]],
                 points: float = P4_POINTS) -> tuple[float | None, list[dict]]:
  """(target %, rows): the target is the λ = 1 runs' mean final test error + ``points``; a row per (protocol, λ)
  with the time to target per seed, their mean (None unless every seed reached it) and the speedup over λ = 1.
  A diverged run comes with an empty history (it reaches no target); (None, []) when every λ = 1 run did."""
  base = [100 * h[-1]["test_error"] for cell, h in runs if cell["learners"] == 1 and h]
  if not base:               # the λ = 1 run diverged (its history is empty): no target, no speedup
    return None, []
  target = statistics.fmean(base) + points
  by: dict[tuple[str, int], list] = {}
  for cell, h in runs:
    protocols = list(PROTOCOL_OF.values()) if cell["learners"] == 1 else [protocol_of(cell)]
    for protocol in protocols:                      # λ = 1: one run is every protocol's first point
      by.setdefault((protocol, cell["learners"]), []).append(time_to(h, target))
  t1 = statistics.fmean(t for t in by.get((PROTOCOL_OF["ssgd"], 1), []) if t is not None) if all(
      t is not None for t in by.get((PROTOCOL_OF["ssgd"], 1), [None])) else None
  rows = []
  for (protocol, lam), times in sorted(by.items()):
    mean = statistics.fmean(times) if all(t is not None for t in times) else None
    rows.append({"protocol": protocol, "learners": lam, "times": times, "mean": mean,
                 "speedup": t1 / mean if t1 and mean else None})
  return target, rows


def plot_speedup(rows: Sequence[dict], target: float, path: str) -> str:
  """Simulated time to the target error against λ (log-log), one line per protocol; ideal: T(1)/λ."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for i, protocol in enumerate(PROTOCOL_OF.values()):
    pts = [(r["learners"], r["mean"]) for r in rows if r["protocol"] == protocol and r["mean"] is not None]
    if pts:
      ax.plot(*zip(*pts), marker="o", color=f"C{i}", label=protocol)
  t1 = [r["mean"] for r in rows if r["learners"] == 1 and r["mean"] is not None]
  lams = sorted({r["learners"] for r in rows})
  if t1:
    ax.plot(lams, [t1[0] / lam for lam in lams], color="grey", linestyle=":", label="ideal T(1)/λ")
  ax.set(xscale="log", yscale="log", xlabel="learners λ (μ = ⌈128/λ⌉)",
         ylabel="simulated time to target (s)", title=f"time to {target:.2f} % test error")
  ax.set_xticks(lams, [str(lam) for lam in lams])
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  save_figure(fig, path)
  plt.close(fig)
  return path


def speedup_markdown(target: float, rows: Sequence[dict], figure: str) -> list[str]:
  """The speedup section: the speed model, the table of times to target, the figure."""
  from launch.reproduce import EXAMPLE_TIME, PUSH_TIME, STRAGGLER_SLOWDOWN
  lines = ["", "## Speedup in simulated time", "",
           f"Learner-speed model: a gradient of μ examples costs {PUSH_TIME:g} s (push) + μ × {EXAMPLE_TIME:.6g} s "
           f"(128 examples: {128 * EXAMPLE_TIME:g} s), times a mean-1 lognormal factor (σ = {SIM_JITTER}); for λ ≥ 2 "
           f"learner 0 computes {STRAGGLER_SLOWDOWN:g}× slower. Target: the λ = 1 run's final test error + "
           f"{P4_POINTS} point = **{target:.2f} %**; time = simulated seconds at the first evaluation (every ½ "
           "epoch) at or below it; – when a seed never reached it. Speedup = T(λ = 1) / T(λ). One seed per run "
           "(the grid's first).", "",
           "| protocol | λ | μ | time to target (s), per seed | mean | speedup |", "|---|---|---|---|---|---|"]
  for r in rows:
    per_seed = ", ".join("–" if t is None else f"{t:.0f}" for t in r["times"])
    mean = "–" if r["mean"] is None else f"{r['mean']:.0f}"
    speedup = "–" if r["speedup"] is None else f"{r['speedup']:.2f}×"
    lines.append(f"| {r['protocol']} | {r['learners']} | {Cell(r['learners'], 0, 'ssgd', 0).batch} | {per_seed} | "
                 f"{mean} | {speedup} |")
  return lines + ["", f"![speedup]({figure})"]
