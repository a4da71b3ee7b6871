"""The figures of launch/reproduce.py's report: the staleness histogram per n, test error against epochs, and
final test error against n (the speedup figure: launch/speedup_report.py). Each takes the report's numbers
(launch/reproduce_report.py) and writes one PNG.
"""

from __future__ import annotations

import os
import statistics
from typing import Iterable

from launch.reproduce import Cell
from launch.reproduce_report import error_text, save_figure


def plot_staleness_by_n(finals: Iterable[dict], folder: str) -> list[tuple[int, str]]:
  """One PNG per n: the staleness histogram summed over each λ's cells (policies, seeds), ⟨σ⟩ and n marked;
  returns (n, path) pairs."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  hists: dict[int, dict[int, dict[int, int]]] = {}
  for f in finals:
    if f["cell"]["policy"] == "ssgd":
      continue
    h = hists.setdefault(f["cell"]["n"], {}).setdefault(f["cell"]["learners"], {})
    for s, count in f.get("staleness_histogram", {}).items():   # none: diverged before its first evaluation
      h[int(s)] = h.get(int(s), 0) + count
  paths = []
  for n, by_lam in sorted(hists.items()):
    by_lam = {lam: h for lam, h in by_lam.items() if h}
    if not by_lam:
      continue
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, (lam, h) in enumerate(sorted(by_lam.items())):
      total = sum(h.values())
      mean = sum(s * c for s, c in h.items()) / total
      xs = range(max(h) + 1)
      ax.step(list(xs), [h.get(x, 0) / total for x in xs], where="mid", color=f"C{i}",
              label=f"λ = {lam}: ⟨σ⟩ = {mean:.2f} (n(λ−1)/λ = {n * (lam - 1) / lam:.2f})")
      ax.axvline(mean, color=f"C{i}", linestyle=":")
    ax.axvline(n, color="k", linestyle="--", label=f"n = {n}")
    ax.set_xlim(-0.5, min(max(max(h) for h in by_lam.values()), 3 * n + 3) + 0.5)
    ax.set_ylim(bottom=0)
    ax.set(xlabel="staleness σ = i − j (dotted: ⟨σ⟩)", ylabel="fraction of gradients",
           title=f"{n}-softsync: staleness of accepted gradients")
    ax.legend(fontsize=8)
    paths.append((n, save_figure(fig, os.path.join(folder, f"staleness_n{n}.png"))))
    plt.close(fig)
  return paths


def plot_error_curves(histories: dict[tuple[int, int, str], list[list[dict]]], path: str) -> str:
  """Test error (mean over seeds) against epochs, one panel per λ, one line per (n, policy) and SSGD."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker
  lams = sorted({k[0] for k in histories}) or [None]   # None: no run finished, one empty panel
  colors = {n: f"C{i}" for i, n in enumerate(sorted({k[1] for k in histories if k[2] != "ssgd"}))}
  fig, axes = plt.subplots(1, len(lams), figsize=(4.5 * len(lams), 3.8), squeeze=False)
  for ax, lam in zip(axes[0], lams):
    for (l, n, policy), runs in sorted(histories.items()):
      runs = [r for r in runs if r]          # a run that diverged before its first evaluation has no curve
      if l != lam or not runs:
        continue
      length = min(len(r) for r in runs)
      epochs = [runs[0][i]["epoch"] for i in range(length)]
      errors = [100 * statistics.fmean(r[i]["test_error"] for r in runs) for i in range(length)]
      label, style = ("SSGD", dict(color="k", linewidth=2)) if policy == "ssgd" else (
          f"n = {n}, {policy}", dict(color=colors[n], linestyle="-" if policy == "inverse" else "--"))
      ax.plot(epochs, errors, label=label, **style)
    if lam is None:
      ax.text(0.5, 0.5, "no run finished", transform=ax.transAxes, ha="center")
      continue
    ax.set(yscale="log", xlabel="epoch", ylabel="test error (%)",
           title=f"λ = {lam}, μ = {Cell(lam, 0, 'ssgd', 0).batch}")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
  save_figure(fig, path)
  plt.close(fig)
  return path


def plot_error_vs_n(agg: dict, path: str) -> str:
  """The paper's accuracy figure: final test error over the trained seeds against n, one panel per λ, inverse and
  constant with their 95 % interval bars (none for one seed; cut at 0 %), SSGD as a band (mean ± half-width), a
  mean over fewer seeds than ran marked 'k of n seeds', and the cells with no trained seed listed under the panel."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  lams = sorted({lam for lam, _, _ in agg})
  fig, axes = plt.subplots(1, len(lams), figsize=(4.5 * len(lams), 4.3), squeeze=False)
  for ax, lam in zip(axes[0], lams):
    ssgd = agg.get((lam, 0, "ssgd"))
    if ssgd and ssgd["error"] is not None:
      mean, half = ssgd["error"][0], ssgd["half"] or 0.0
      ax.axhspan(max(mean - half, 0.0), mean + half, color="k", alpha=0.12)
      ax.axhline(mean, color="k", linewidth=2, label=f"SSGD {error_text(ssgd)}")
    for policy, style in (("inverse", dict(color="C0", marker="o")), ("constant", dict(color="C3", marker="s",
                                                                                           linestyle="--"))):
      rows = sorted((n, a) for (l, n, p), a in agg.items() if l == lam and p == policy and a["error"] is not None)
      if rows:
        ax.errorbar([n for n, _ in rows], [a["error"][0] for _, a in rows],
                    yerr=[[min(a["half"] or 0.0, a["error"][0]) for _, a in rows],   # cut at 0 %
                          [a["half"] or 0.0 for _, a in rows]], capsize=3, label=policy, **style)
        for n, a in rows:                       # a mean over fewer seeds than ran: say over how many
          if a["outcomes"]:
            ax.annotate(f"{len(a['by_seed'])} of {a['seeds']} seeds", (n, a["error"][0]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points", color=style["color"])
    gone = sorted(f"{p} n = {n}: " + ", ".join(f"{k} of {a['seeds']} {word}" for word, k in a["outcomes"].items())
                  for (l, n, p), a in agg.items() if l == lam and a["error"] is None)
    if gone:                                    # no point to draw: say so under the panel
      ax.text(0.0, -0.18, "no seed trained: " + "\n".join(gone), transform=ax.transAxes, va="top", fontsize=7)
    ns = sorted({n for (l, n, p) in agg if l == lam and p != "ssgd"})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set(xlabel="n (n-softsync; n = λ is async)", ylabel="final test error (%)",
           title=f"λ = {lam}, μ = {Cell(lam, 0, 'ssgd', 0).batch}")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:      # nothing drawn when no cell of this λ finished
      ax.legend(fontsize=8)
  save_figure(fig, path)
  plt.close(fig)
  return path
