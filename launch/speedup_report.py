"""The paper's speedup figure in simulated time, for launch/reproduce.py's ``--speedup`` runs (Zhang et al. 2016).

Time to a target test error (the λ = 1 run's final error + 0.5 point, and the looser +2 and +5 of
:data:`LOOSER_POINTS`) against λ ∈ {1, 2, 4, 8, 16, 30} for hardsync (SSGD), 1-softsync and async with the
``inverse`` rule, under reproduce.py's learner-speed model (a gradient of μ examples costs a fixed push time plus
a time ∝ μ, a lognormal jitter, one straggler): the rows, the markdown section and the log-log PNG. Pure
functions of the runs' cells and metrics histories.
"""

from __future__ import annotations

import statistics
from typing import Sequence

from launch.reproduce import P4_POINTS, SIM_JITTER, Cell
from launch.reproduce_report import save_figure
from launch.seed_stats import time_to_target

PROTOCOL_OF = {"ssgd": "hardsync (SSGD)", "n1": "1-softsync, inverse", "async": "async, inverse"}
# Looser targets (λ = 1's final error + these points) shown beside the main one (+ P4_POINTS). Added after the
# Fashion-MNIST runs at momentum 0.9, where no asynchronous run reached the main target: the figure was then
# empty for exactly the protocols it is about. A fixed ladder, the same for every dataset and setting.
LOOSER_POINTS = (2.0, 5.0)


def protocol_of(cell: dict) -> str:
  """A speedup cell's protocol name: hardsync (SSGD), 1-softsync or async (n = λ > 1)."""
  if cell["policy"] == "ssgd":
    return PROTOCOL_OF["ssgd"]
  return PROTOCOL_OF["async"] if cell["n"] == cell["learners"] else PROTOCOL_OF["n1"]


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
      by.setdefault((protocol, cell["learners"]), []).append(time_to_target(h, target))
  t1 = statistics.fmean(t for t in by.get((PROTOCOL_OF["ssgd"], 1), []) if t is not None) if all(
      t is not None for t in by.get((PROTOCOL_OF["ssgd"], 1), [None])) else None
  rows = []
  for (protocol, lam), times in sorted(by.items()):
    mean = statistics.fmean(times) if all(t is not None for t in times) else None
    rows.append({"protocol": protocol, "learners": lam, "times": times, "mean": mean,
                 "speedup": t1 / mean if t1 and mean else None})
  return target, rows


def speedup_ladder(runs: Sequence[tuple[dict, list[dict]]], ladder: Sequence[float] = (P4_POINTS, *LOOSER_POINTS)
                   ) -> list[tuple[float, float, list[dict]]]:
  """(points, target %, rows) of :func:`speedup_rows` at each of ``ladder``'s points above the λ = 1 runs' final
  error, the main target first; [] when no λ = 1 run finished (no target at all) or ``ladder`` is empty."""
  entries = [(points, *speedup_rows(runs, points)) for points in ladder]
  return [] if not entries or entries[0][1] is None else entries


def plot_speedup(ladder: Sequence[tuple[float, float, Sequence[dict]]], path: str) -> str:
  """Simulated time to each target error against λ (log-log), a panel per target, a line per protocol; ideal:
  T(1)/λ."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(ladder), figsize=(4.2 * len(ladder) + 1, 4), squeeze=False)
  for ax, (_, target, rows) in zip(axes[0], ladder):
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
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  save_figure(fig, path)
  plt.close(fig)
  return path


def speedup_markdown(ladder: Sequence[tuple[float, float, Sequence[dict]]], figure: str) -> list[str]:
  """The speedup section: the speed model, the table of times to the main target, the looser targets' times
  and speedups, the figure."""
  from launch.reproduce import EXAMPLE_TIME, PUSH_TIME, STRAGGLER_SLOWDOWN
  (points, target, rows), looser = ladder[0], ladder[1:]
  batch = lambda lam: Cell(lam, 0, "ssgd", 0).batch   # noqa: E731
  lines = ["", "## Speedup in simulated time", "",
           f"Learner-speed model: a gradient of μ examples costs {PUSH_TIME:g} s (push) + μ × {EXAMPLE_TIME:.6g} s "
           f"(128 examples: {128 * EXAMPLE_TIME:g} s), times a mean-1 lognormal factor (σ = {SIM_JITTER}); for λ ≥ 2 "
           f"learner 0 computes {STRAGGLER_SLOWDOWN:g}× slower. Target: the λ = 1 run's final test error + "
           f"{points:g} point = **{target:.2f} %**; time = simulated seconds when the test error first reaches it, "
           "linear between the last evaluation above it and the first at or below it; – when a seed never "
           "reached it. Speedup = T(λ = 1) / T(λ). One seed per run "
           "(the grid's first).", "",
           "| protocol | λ | μ | time to target (s), per seed | mean | speedup |", "|---|---|---|---|---|---|"]
  for r in rows:
    per_seed = ", ".join("–" if t is None else f"{t:.0f}" for t in r["times"])
    mean = "–" if r["mean"] is None else f"{r['mean']:.0f}"
    speedup = "–" if r["speedup"] is None else f"{r['speedup']:.2f}×"
    lines.append(f"| {r['protocol']} | {r['learners']} | {batch(r['learners'])} | {per_seed} | {mean} | {speedup} |")
  if looser:
    lines += ["", "Looser targets (the same runs; the λ = 1 run's final error "
              + " and ".join(f"+{p:g}" for p, _, _ in looser) + " points: "
              + ", ".join(f"{t:.2f} %" for _, t, _ in looser) + "): mean time to target in simulated s (speedup).",
              "", "| protocol | λ | μ | " + " | ".join(f"{t:.2f} %" for _, t, _ in looser) + " |",
              "|---|---|---|" + "---|" * len(looser)]
    by = [{(r["protocol"], r["learners"]): r for r in rs} for _, _, rs in looser]
    for r in rows:
      key = (r["protocol"], r["learners"])
      cells = ["–" if b[key]["mean"] is None else
               f"{b[key]['mean']:.0f} ({b[key]['speedup']:.2f}×)" if b[key]["speedup"] else f"{b[key]['mean']:.0f}"
               for b in by]
      lines.append(f"| {r['protocol']} | {r['learners']} | {batch(r['learners'])} | " + " | ".join(cells) + " |")
  return lines + ["", f"![speedup]({figure})"]
