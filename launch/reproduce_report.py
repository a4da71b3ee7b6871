"""The report of launch/reproduce.py: aggregation over seeds, the P4 verdicts, the markdown and the PNGs.

Pure functions of the finished cells' ``final.json`` records and metrics histories (see launch/reproduce.py
for the grid: λ learners of μ = ⌈128/λ⌉, n-softsync, the ``inverse``/``constant`` policies and SSGD).
"""

from __future__ import annotations

import os
import statistics
from typing import Iterable, Sequence

from launch.reproduce import (EPOCHS, LEARNERS, MNIST5K_TRAIN, NS, P4_POINTS, SIM_JITTER, Cell, gradients_of, grid,
                              updates_of)


# ---- aggregation (pure) -------------------------------------------------------------------------------
def mean_sd(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for one value)."""
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(finals: Iterable[dict]) -> dict[tuple[int, int, str], dict]:
  """Per cell key (λ, n, policy): test error and train loss (mean, sd over seeds, in % for errors), ⟨σ⟩."""
  by_key: dict[tuple, list[dict]] = {}
  for f in finals:
    c = f["cell"]
    by_key.setdefault((c["learners"], c["n"], c["policy"]), []).append(f)
  out = {}
  for key, fs in by_key.items():
    out[key] = {"error": mean_sd([100 * f["test_error"] for f in fs]),
                "loss": mean_sd([f["train_loss"] for f in fs]),
                "staleness": statistics.fmean(f["staleness_mean"] for f in fs), "seeds": len(fs)}
  return out


def p4_verdicts(agg: dict, points: float = P4_POINTS) -> list[dict]:
  """Per inverse cell: Δ = its error − its λ's SSGD error (points), within = |Δ| ≤ ``points``, and why not."""
  out = []
  for (lam, n, policy), a in sorted(agg.items()):
    ssgd = agg.get((lam, 0, "ssgd"))
    if policy != "inverse" or ssgd is None:
      continue
    delta = a["error"][0] - ssgd["error"][0]
    spread = max(a["error"][1], ssgd["error"][1])
    within = round(abs(delta), 6) <= points   # errors are multiples of 0.1 point: no float noise at the edge
    why = ""
    if not within:
      notes = []
      if a["seeds"] == 1:
        notes.append("one seed (single runs on 1,000 test digits differ by up to ±0.5–0.7 point; use --seeds 0 1 2)")
      elif spread >= abs(delta) / 2:
        notes.append(f"seed sd {spread:.2f} is of the order of the gap")
      if delta > 0 and a["loss"][0] > 1.1 * ssgd["loss"][0]:
        notes.append(f"under-trained: train loss {a['loss'][0]:.4f} vs SSGD {ssgd['loss'][0]:.4f} "
                     f"(steps α0/σ with ⟨σ⟩ = {a['staleness']:.2f})")
      elif delta > 0:
        notes.append(f"train loss on par ({a['loss'][0]:.4f} vs {ssgd['loss'][0]:.4f}): a generalisation gap")
      else:
        notes.append("better than SSGD")
      why = "; ".join(notes)
    out.append({"learners": lam, "n": n, "delta": delta, "within": within, "why": why})
  return out


def fit_seconds(points: Sequence[tuple[float, float, float, float]]) -> tuple[float, float, float]:
  """Non-negative least squares (a, b, d) of wall ≈ a · samples + b · gradients + d · updates.

  Over (samples, gradients, updates, wall) of finished runs: a gradient on μ examples costs b + a·μ, and each
  PS update of c gradients d more. Under a varying load the fit puts the time where it can; it is an estimate.
  """
  import numpy as np
  from scipy.optimize import nnls
  coef, _ = nnls(np.array([p[:3] for p in points], float), np.array([p[3] for p in points], float))
  return tuple(float(v) for v in coef)


def _pct(ms: tuple[float, float], seeds: int) -> str:
  return f"{ms[0]:.2f}" + (f" ± {ms[1]:.2f}" if seeds > 1 else "")


def render_markdown(agg: dict, verdicts: list[dict], *, command: str, epochs: float, seeds: Sequence[int],
                    wall_s: float, runs: Sequence[tuple[str, dict]], estimate: str,
                    figures: Sequence[tuple[str, str]]) -> str:
  """The report: command, table (rows n, λ, μ; columns inverse, constant, SSGD), P4, timing, figures."""
  sd = " ± sd over seeds" if len(seeds) > 1 else ""
  lines = [
      "# Reproduction: staleness-aware async SGD vs SSGD (simulated, mnist5k)", "",
      "Written by `launch/reproduce.py`; every number below comes from this command (each cell's runs are in "
      "`<root>/<cell>/`: `config.json`, `metrics.jsonl`, `final.json`):", "", "```bash", command, "```", "",
      f"mnist5k (4,000 train / 1,000 test digits), small CNN, `executor=simulated` (equal learner speeds, "
      f"lognormal jitter σ = {SIM_JITTER}), α0 = 0.05 for a λμ ≈ 128 mini-batch, momentum 0.5, "
      f"{epochs:g} epochs, "
      f"α ÷10 at ⅔ and ⅞ of them; seeds {', '.join(map(str, seeds))}. Final test error in %{sd}; "
      "SSGD is hardsync (c = λ, σ = 0), one run per λ, repeated on each of its rows.", "",
      "| n | λ | μ | c | ⟨σ⟩ | inverse | constant | SSGD | inverse − SSGD |",
      "|---|---|---|---|---|---|---|---|---|"]
  for (lam, n, policy), a in sorted(agg.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    if policy != "inverse":
      continue
    const, ssgd = agg.get((lam, n, "constant")), agg.get((lam, 0, "ssgd"))
    cells = [_pct(x["error"], x["seeds"]) if x else "–" for x in (a, const, ssgd)]
    delta = f"{a['error'][0] - ssgd['error'][0]:+.2f}" if ssgd else "–"
    cell = Cell(lam, n, policy, 0)
    lines.append(f"| {n} | {lam} | {cell.batch} | {cell.c} | {a['staleness']:.2f} | "
                 f"{' | '.join(cells)} | {delta} |")
  failing = [v for v in verdicts if not v["within"]]
  lines += ["", f"## P4: every inverse cell within {P4_POINTS} point of SSGD", ""]
  if not verdicts:
    lines.append("No inverse cell with an SSGD baseline in this grid.")
  elif not failing:
    lines.append(f"**Met**: all {len(verdicts)} inverse cells are within {P4_POINTS} point of their λ's SSGD.")
  else:
    lines += [f"**Not met** for {len(failing)} of {len(verdicts)} inverse cells:", ""]
    lines += [f"- n = {v['n']}, λ = {v['learners']}: {v['delta']:+.2f} points — {v['why']}" for v in failing]
  if epochs < EPOCHS:
    lines += ["", f"These runs have {epochs:g} epochs, the full grid {EPOCHS:g} (configs/default.py's schedule): P4 is "
              "judged there; here, the train losses in the table of every run show whether a gap is under-training."]
  total = sum(f["wall_s"] for _, f in runs)
  loads = [f["load_avg_1min"] for _, f in runs if "load_avg_1min" in f]
  load = (f" The machine's 1-minute load average when each run ended: {min(loads):.1f} to {max(loads):.1f} on "
          f"{runs[0][1]['cpu_count']} cores (other jobs share it; times grow with the load)." if loads else "")
  lines += ["", "## Time", "", f"The {len(runs)} runs trained for {total:.0f} s in all ({total / 60:.1f} min; each "
            f"run's `wall_s`, in the table at the end).{load} The last invocation took {wall_s:.0f} s (runs already "
            "done are not rerun).", "", estimate, "", "## Figures", ""]
  lines += [f"![{title}]({path})" for title, path in figures]
  lines += ["", "## Every run", "", "| run (folder under the root) | test error % | train loss | ⟨σ⟩ | updates | "
            "training wall |", "|---|---|---|---|---|---|"]
  lines += [f"| `{name}` | {100 * f['test_error']:.2f} | {f['train_loss']:.4f} | {f['staleness_mean']:.2f} | "
            f"{f['updates']} | {f['wall_s']:.0f} s |" for name, f in runs]
  return "\n".join(lines) + "\n"


# ---- figures ------------------------------------------------------------------------------------------
def _save(fig, path: str) -> str:
  tmp = path[:-4] + ".tmp.png"
  fig.tight_layout()
  fig.savefig(tmp, dpi=90)
  os.replace(tmp, path)
  return path


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
    for s, count in f["staleness_histogram"].items():
      h[int(s)] = h.get(int(s), 0) + count
  paths = []
  for n, by_lam in sorted(hists.items()):
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
    paths.append((n, _save(fig, os.path.join(folder, f"staleness_n{n}.png"))))
    plt.close(fig)
  return paths


def plot_error_curves(histories: dict[tuple[int, int, str], list[list[dict]]], path: str) -> str:
  """Test error (mean over seeds) against epochs, one panel per λ, one line per (n, policy) and SSGD."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker
  lams = sorted({k[0] for k in histories})
  colors = {n: f"C{i}" for i, n in enumerate(sorted({k[1] for k in histories if k[2] != "ssgd"}))}
  fig, axes = plt.subplots(1, len(lams), figsize=(4.5 * len(lams), 3.8), squeeze=False)
  for ax, lam in zip(axes[0], lams):
    for (l, n, policy), runs in sorted(histories.items()):
      if l != lam:
        continue
      length = min(len(r) for r in runs)
      epochs = [runs[0][i]["epoch"] for i in range(length)]
      errors = [100 * statistics.fmean(r[i]["test_error"] for r in runs) for i in range(length)]
      label, style = ("SSGD", dict(color="k", linewidth=2)) if policy == "ssgd" else (
          f"n = {n}, {policy}", dict(color=colors[n], linestyle="-" if policy == "inverse" else "--"))
      ax.plot(epochs, errors, label=label, **style)
    ax.set(yscale="log", xlabel="epoch", ylabel="test error (%)",
           title=f"λ = {lam}, μ = {Cell(lam, 0, 'ssgd', 0).batch}")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
  _save(fig, path)
  plt.close(fig)
  return path


def estimate_text(points: Sequence[tuple[float, float, float, float]], epochs: float) -> str:
  """The full grid's predicted time at ``epochs`` (the default with --quick) from this run's cells' times."""
  a, b, d = fit_seconds(points)
  full = grid(LEARNERS, NS, [0])
  seconds = sum(a * epochs * MNIST5K_TRAIN + b * gradients_of(c, epochs) + d * updates_of(c, epochs) for c in full)
  flag = "" if epochs == EPOCHS else f" --epochs {epochs:g}"
  return (f"Full grid estimate on this machine (`python launch/reproduce.py{flag}`: {epochs:g} epochs, λ ∈ "
          f"{{{', '.join(map(str, LEARNERS))}}}, {len(full)} cells per seed): **{seconds / 3600:.1f} h per seed** "
          f"({3 * seconds / 3600:.1f} h for `--seeds 0 1 2`), from a fit of this run's times: {1e3 * a:.3f} ms "
          f"per training example + {1e3 * b:.2f} ms per mini-batch gradient + {1e3 * d:.2f} ms per PS update "
          f"(a run sees epochs · 4,000 examples in epochs · 4,000 / μ gradients and 1/c as many updates).")
