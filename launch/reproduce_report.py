"""The report of launch/reproduce.py: statistics over seeds, the P4 verdicts, the markdown and the PNGs (the
speedup figure: launch/speedup_report.py).

Pure functions of the finished cells' ``final.json`` records and metrics histories (see launch/reproduce.py
for the grid: λ learners of μ = ⌈128/λ⌉, n-softsync, the ``inverse``/``constant`` policies and SSGD).

Uncertainty: a cell's test error over its seeds is reported as the mean with a 95 % Student-t
interval (mean ± t₀.₉₇₅,ₖ₋₁ · sd/√k for k seeds). P4 compares each inverse cell with its λ's SSGD on the *paired*
differences d_s = error(inverse, seed s) − error(SSGD, seed s): both runs of a seed share the initial weights
and the data order, so the pairing removes most of the seed-to-seed spread. The verdict is three-valued
against the margin of 0.5 point: **within** when the interval of the mean difference lies at or below +0.5
(inverse is at most 0.5 point worse, or better), **worse** when it lies wholly above +0.5, **undecided** when it
straddles +0.5 (or there is one seed, hence no interval).
"""

from __future__ import annotations

import math
import os
import re
import statistics
from typing import Iterable, Sequence

from launch.grid_runner import outcome_counts, unfinished
from launch.reproduce import (BASE_CONFIGS, DATASETS, LEARNERS, NS, P4_POINTS, SIM_JITTER, TRAIN_SIZES, Cell,
                              base_config, gradients_of, grid, scaled_boundaries, updates_of)

CONFIDENCE = 0.95
MAX_SEEDS = 1000        # seeds_to_decide gives up beyond this
VERDICTS = ("within", "worse", "undecided")
NOTE_START, NOTE_END = "<!-- note -->", "<!-- /note -->"   # a hand-written block a rewritten report keeps


def kept_note(path: str) -> str:
  """The hand-written block between ``<!-- note -->`` and ``<!-- /note -->`` of the report at ``path`` ('' if
  none, or no report yet): what a person wrote about the results stays when the report is written again."""
  if not os.path.exists(path):
    return ""
  with open(path) as f:
    m = re.search(re.escape(NOTE_START) + r"(.*?)" + re.escape(NOTE_END), f.read(), re.S)
  return m.group(1).strip() if m else ""


# ---- statistics over seeds (pure) ---------------------------------------------------------------------
def mean_sd(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for one value)."""
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
  """Student t's two-sided quantile t_{(1+confidence)/2, df} (12.71 for df = 1, 2.78 for df = 4 at 95 %)."""
  if df < 1:
    raise ValueError(f"df={df!r} is invalid; allowed: an integer >= 1")
  from scipy import stats
  return float(stats.t.ppf((1 + confidence) / 2, df))


def half_width(sd: float, k: int) -> float | None:
  """The 95 % interval's half-width t_{0.975, k−1} · sd/√k of a mean over k seeds; None for one seed."""
  return t_quantile(k - 1) * sd / math.sqrt(k) if k > 1 else None


def seeds_to_decide(mean: float, sd: float, bound: float = P4_POINTS, have: int = 1) -> int | None:
  """An estimate: the fewest seeds k > ``have`` whose interval t_{0.975, k−1} · sd/√k would exclude ``bound``,
  if the mean difference and its sd stayed as observed. None when no k ≤ MAX_SEEDS would (mean on the bound)."""
  gap = abs(mean - bound)
  for k in range(max(have + 1, 2), MAX_SEEDS + 1):
    if t_quantile(k - 1) * sd / math.sqrt(k) < gap:
      return k
  return None


def aggregate(finals: Iterable[dict]) -> dict[tuple[int, int, str], dict]:
  """Per cell key (λ, n, policy): test error in % (mean, sd, 95 % half-width, per seed), train loss, ⟨σ⟩ over
  the seeds that finished, how many ``diverged``, and ``outcomes``: the count of each way a seed did not finish
  (diverged, learners failed, timed out; :func:`launch.grid_runner.unfinished`). Error, loss and ⟨σ⟩ are None
  when no seed finished."""
  by_key: dict[tuple, list[dict]] = {}
  for f in finals:
    c = f["cell"]
    by_key.setdefault((c["learners"], c["n"], c["policy"]), []).append(f)
  out = {}
  for key, fs in by_key.items():
    done = [f for f in fs if f.get("test_error") is not None]
    errors = [100 * f["test_error"] for f in done]
    sigmas = [f["staleness_mean"] for f in done]
    out[key] = {"error": mean_sd(errors) if done else None, "half": half_width(mean_sd(errors)[1], len(done)) if done
                else None, "by_seed": {f["cell"]["seed"]: 100 * f["test_error"] for f in done},
                "loss": mean_sd([f["train_loss"] for f in done]) if done else None,
                "staleness": statistics.fmean(sigmas) if sigmas else None, "seeds": len(fs),
                "diverged": sum(unfinished(f) == "diverged" for f in fs), "outcomes": outcome_counts(fs)}
  return out


def paired_difference(a: dict, ssgd: dict) -> dict:
  """inverse − SSGD over the seeds both ran (points): mean, sd, half-width (None for one pair), pairs, lo, hi."""
  diffs = [a["by_seed"][s] - ssgd["by_seed"][s] for s in sorted(set(a["by_seed"]) & set(ssgd["by_seed"]))]
  mean, sd = mean_sd(diffs)
  half = half_width(sd, len(diffs))
  lo, hi = (mean - half, mean + half) if half is not None else (None, None)
  return {"mean": mean, "sd": sd, "half": half, "pairs": len(diffs), "lo": lo, "hi": hi}


def verdict(diff: dict, points: float = P4_POINTS) -> str:
  """within (interval at or below +points), worse (wholly above), undecided (straddles it, or one pair)."""
  if diff["half"] is None:
    return "undecided"
  if round(diff["hi"], 6) <= points:     # no float noise at the edge
    return "within"
  return "worse" if round(diff["lo"], 6) > points else "undecided"


def p4_verdicts(agg: dict, points: float = P4_POINTS) -> list[dict]:
  """Per inverse cell with an SSGD run of a same seed: the paired difference, its verdict, the seeds that would
  decide an undecided one (an estimate), and notes on why a cell is not within."""
  out = []
  for (lam, n, policy), a in sorted(agg.items()):
    ssgd = agg.get((lam, 0, "ssgd"))
    if policy != "inverse" or ssgd is None:
      continue
    none = dict.fromkeys(("mean", "sd", "half", "lo", "hi"), None)
    if not ssgd["by_seed"]:  # nothing to compare with
      out.append({"learners": lam, "n": n, "delta": None, **{k: None for k in ("sd", "half", "lo", "hi")},
                  "pairs": 0, "verdict": "undecided", "seeds_needed": None,
                  "why": "no SSGD reference: " + (f"SSGD diverged in all {ssgd['seeds']} seeds"
                                                  if set(_outcomes(ssgd)) == {"diverged"} else
                                                  f"no SSGD seed finished ({_outcomes_text(ssgd)})")})
      continue
    if a["diverged"]:        # a diverged seed is not within anything: worse, whatever the others did
      shared = set(a["by_seed"]) & set(ssgd["by_seed"])
      diff = paired_difference(a, ssgd) if shared else none
      out.append({"learners": lam, "n": n, "delta": diff["mean"], **{k: diff[k] for k in ("sd", "half", "lo", "hi")},
                  "pairs": diff.get("pairs", 0), "verdict": "worse", "seeds_needed": None,
                  "why": f"diverged in {a['diverged']} of {a['seeds']} seeds"})
      continue
    if not set(a["by_seed"]) & set(ssgd["by_seed"]):
      if a.get("outcomes"):   # its seeds timed out or their learners failed: nothing to judge, say why
        out.append({"learners": lam, "n": n, "delta": None, **{k: None for k in ("sd", "half", "lo", "hi")},
                    "pairs": 0, "verdict": "undecided", "seeds_needed": None, "why": f"left out: {_outcomes_text(a)}"})
      continue
    diff = paired_difference(a, ssgd)
    result = verdict(diff, points)
    needed = None
    if result == "undecided" and diff["pairs"] > 1:
      needed = seeds_to_decide(diff["mean"], diff["sd"], points, have=diff["pairs"])
    notes = [f"left out: {_outcomes_text(a)}"] if a.get("outcomes") else []   # timed out, learners failed
    if result != "within":
      if diff["pairs"] == 1:
        notes.append("one seed: no interval (use --seeds 0 1 2)")
      if diff["mean"] > 0 and a["loss"][0] > 1.1 * ssgd["loss"][0]:
        notes.append(f"under-trained: train loss {a['loss'][0]:.4f} vs SSGD {ssgd['loss'][0]:.4f} "
                     f"(steps α0/σ with ⟨σ⟩ = {a['staleness']:.2f})")
      elif diff["mean"] > 0:
        notes.append(f"train loss on par ({a['loss'][0]:.4f} vs {ssgd['loss'][0]:.4f}): a generalisation gap")
    out.append({"learners": lam, "n": n, "delta": diff["mean"], **{k: diff[k] for k in ("sd", "half", "lo", "hi",
               "pairs")}, "verdict": result, "seeds_needed": needed, "why": "; ".join(notes)})
  return out


def verdict_counts(verdicts: Sequence[dict]) -> str:
  """'3 within, 1 worse, 2 undecided'."""
  return ", ".join(f"{sum(v['verdict'] == name for v in verdicts)} {name}" for name in VERDICTS)


def fit_seconds(points: Sequence[tuple[float, float, float, float]]) -> tuple[float, float, float]:
  """Non-negative least squares (a, b, d) of wall ≈ a · samples + b · gradients + d · updates.

  Over (samples, gradients, updates, wall) of finished runs: a gradient on μ examples costs b + a·μ, and each
  PS update of c gradients d more. Under a varying load the fit puts the time where it can; it is an estimate.
  """
  import numpy as np
  from scipy.optimize import nnls
  coef, _ = nnls(np.array([p[:3] for p in points], float), np.array([p[3] for p in points], float))
  return tuple(float(v) for v in coef)


def error_text(a: dict) -> str:
  """A cell's test error in %: '3.12 ± 0.40' (mean ± 95 % half-width), '3.12' for one seed, 'diverged' (or
  'timed out', 'learners failed') when no seed finished, 'diverged (2 of 2)' for several, and
  '3.12 (1 of 3 diverged)' when some seeds did not finish."""
  outcomes = _outcomes(a)
  if a["error"] is None:
    return ", ".join(word + (f" ({k} of {a['seeds']})" if a["seeds"] > 1 else "") for word, k in outcomes.items())
  text = f"{a['error'][0]:.2f}" + (f" ± {a['half']:.2f}" if a["half"] is not None else "")
  return text + (f" ({_outcomes_text(a)})" if outcomes else "")


def _outcomes(a: dict) -> dict[str, int]:
  """How many seeds of the summary ``a`` ended each unfinished way (older summaries count only ``diverged``)."""
  return a.get("outcomes") or ({"diverged": a["diverged"]} if a.get("diverged") else {})


def _outcomes_text(a: dict) -> str:
  """'1 of 3 diverged, 1 of 3 timed out'."""
  return ", ".join(f"{k} of {a['seeds']} {word}" for word, k in _outcomes(a).items())


def _diff(v: dict) -> str:
  if v["delta"] is None:
    return "–"
  return f"{v['delta']:+.2f}" + (f" ± {v['half']:.2f}" if v["half"] is not None else "")


def _verdict_text(v: dict) -> str:
  if v["verdict"] != "undecided" or v["pairs"] < 2:
    return v["verdict"]
  return f"undecided (≈ {v['seeds_needed']} seeds)" if v["seeds_needed"] else "undecided (on the boundary)"


DESCRIPTIONS = {"mnist5k": "mnist5k (4,000 train / 1,000 test digits)",
                "fashion_mnist": "Fashion-MNIST (60,000 train / 10,000 test images, IDX files)"}


def render_markdown(agg: dict, verdicts: list[dict], *, command: str, epochs: float, seeds: Sequence[int],
                    wall_s: float | None, runs: Sequence[tuple[str, dict]], estimate: str,
                    figures: Sequence[tuple[str, str]], dataset: str = "mnist5k", train_examples: int = 0,
                    extra: Sequence[str] = (), momentum: float | None = None, note: str = "",
                    missing: int = 0) -> str:
  """The report: a hand-written ``note`` (kept between its markers when the report is rewritten), command,
  table (rows n, λ, μ; columns inverse, constant, SSGD, the paired difference and the P4 verdict), P4, timing,
  figures."""
  base = base_config(dataset)
  ci = (" (mean ± half-width of the 95 % Student-t interval over seeds)" if len(seeds) > 1 else
        " (one seed: no interval)")
  subset = f" (the first {train_examples:,} training examples)" if train_examples else ""
  momentum_used = base.momentum if momentum is None else momentum
  changed = "" if momentum is None else (
      f" but for the momentum, {momentum:g} in every cell, SSGD included (a declared second setting; the base "
      f"config's {base.momentum:g} was chosen on SSGD)")
  lines = [
      f"# Reproduction: staleness-aware async SGD vs SSGD (simulated, {dataset})", "",
      NOTE_START, note, NOTE_END, "",
      "Written by `launch/reproduce.py`; every number below comes from this command (each cell's runs are in "
      "`<root>/<cell>/`: `config.json`, `metrics.jsonl`, `final.json`):", "", "```bash", command, "```", ""]
  if missing:
    lines += [f"**Partial report** (`--report-only`, the grid still running): {missing} of the command's "
              f"{missing + len(runs)} runs are not done and are left out of every table and figure; an interval "
              "here is over the seeds done so far.", ""]
  lines += [
      f"{DESCRIPTIONS[dataset]}{subset}, {base.model.replace('_', ' ')}, `executor=simulated` (equal learner "
      f"speeds, lognormal jitter σ = {SIM_JITTER}), configs/{BASE_CONFIGS[dataset]}.py unchanged{changed}: "
      f"α0 = {base.learning_rate:g} for a λμ ≈ 128 mini-batch, momentum {momentum_used:g}, {epochs:g} epochs, "
      f"α ÷{1 / base.lr_decay:g} at epochs {', '.join(f'{b:g}' for b in scaled_boundaries(base, epochs))}; "
      f"seeds {', '.join(map(str, seeds))}. Final test error in %{ci}; SSGD is hardsync (c = λ, σ = 0), one "
      "run per λ and seed, repeated on each of its rows. inverse − SSGD is the mean of the paired differences "
      "(same λ and seed) with its interval.", "",
      "| n | λ | μ | c | ⟨σ⟩ | inverse | constant | SSGD | inverse − SSGD | P4 |",
      "|---|---|---|---|---|---|---|---|---|---|"]
  by_cell = {(v["learners"], v["n"]): v for v in verdicts}
  for (lam, n, policy), a in sorted(agg.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    if policy != "inverse":
      continue
    const, ssgd, v = agg.get((lam, n, "constant")), agg.get((lam, 0, "ssgd")), by_cell.get((lam, n))
    cells = [error_text(x) if x else "–" for x in (a, const, ssgd)]
    cell = Cell(lam, n, policy, 0)
    sigma = "–" if a["staleness"] is None else f"{a['staleness']:.2f}"
    lines.append(f"| {n} | {lam} | {cell.batch} | {cell.c} | {sigma} | {' | '.join(cells)} | "
                 f"{_diff(v) if v else '–'} | {_verdict_text(v) if v else '–'} |")
  lines += ["", f"## P4: every inverse cell within {P4_POINTS} point of SSGD", ""]
  if not verdicts:
    lines.append("No inverse cell with an SSGD baseline of the same seed in this grid.")
  else:
    lines += [f"Over {len(verdicts)} inverse cells: **{verdict_counts(verdicts)}**. A cell is *within* when the "
              f"95 % interval of its paired difference inverse − SSGD lies at or below +{P4_POINTS} point, *worse* "
              f"when it lies wholly above, *undecided* when it straddles +{P4_POINTS} (or one seed gives no "
              "interval). For an undecided cell, ≈ k seeds is an estimate: the fewest seeds whose interval would "
              "exclude the boundary if the mean difference and its sd stayed as observed.", ""]
    lines += [f"- n = {v['n']}, λ = {v['learners']}: " + ("no paired difference" if v["delta"] is None else
                                                          f"{v['delta']:+.2f} points")
              + (f", 95 % interval [{v['lo']:+.2f}, {v['hi']:+.2f}] over {v['pairs']} seeds (sd {v['sd']:.2f})"
                 if v["half"] is not None else "") + f" — **{_verdict_text(v)}**"
              + (f"; {v['why']}" if v["why"] else "") for v in verdicts if v["verdict"] != "within"]
  if epochs < base.epochs:
    lines += ["", f"These runs have {epochs:g} epochs, the full grid {base.epochs:g} (the base config's schedule): "
              "P4 is judged there; here, the train losses in the table of every run show whether a gap is "
              "under-training."]
  total = sum(f["wall_s"] for _, f in runs)
  num = lambda f, key, spec: "–" if f.get(key) is None else format(f[key], spec)   # noqa: E731
  loads = [f["load_avg_1min"] for _, f in runs if "load_avg_1min" in f]
  load = (f" The machine's 1-minute load average when each run ended: {min(loads):.1f} to {max(loads):.1f} on "
          f"{runs[0][1]['cpu_count']} cores (other jobs share it; times grow with the load)." if loads else "")
  lines += ["", "## Time", "", f"The {len(runs)} runs trained for {total:.0f} s in all ({total / 60:.1f} min; each "
            f"run's `wall_s`, in the table at the end).{load} " + (
                "This page was written by `--report-only` from the finished runs." if wall_s is None else
                f"The last invocation took {wall_s:.0f} s (runs already done are not rerun)."),
            "", estimate, "", "## Figures", ""]
  lines += [f"![{title}]({path})" for title, path in figures]
  lines += list(extra)
  lines += ["", "## Every run", "", "| run (folder under the root) | test error % | train loss | ⟨σ⟩ | updates | "
            "training wall |", "|---|---|---|---|---|---|"]
  lines += [f"| `{name}` | {unfinished(f) or format(100 * f['test_error'], '.2f')} | "
            f"{num(f, 'train_loss', '.4f')} | {num(f, 'staleness_mean', '.2f')} | {num(f, 'updates', 'd')} | "
            f"{f['wall_s']:.0f} s |" for name, f in runs]
  return "\n".join(lines) + "\n"


# ---- figures ------------------------------------------------------------------------------------------
def save_figure(fig, path: str) -> str:
  """Saves ``fig`` (tight layout, 90 dpi) to the PNG ``path`` atomically; returns ``path``."""
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
  """The paper's accuracy figure: final test error against n, one panel per λ, inverse and constant with their
  95 % interval bars (none for one seed), SSGD as a band (mean ± half-width)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  lams = sorted({lam for lam, _, _ in agg})
  fig, axes = plt.subplots(1, len(lams), figsize=(4.5 * len(lams), 3.8), squeeze=False)
  for ax, lam in zip(axes[0], lams):
    ssgd = agg.get((lam, 0, "ssgd"))
    if ssgd and ssgd["error"] is not None:
      mean, half = ssgd["error"][0], ssgd["half"] or 0.0
      ax.axhspan(mean - half, mean + half, color="k", alpha=0.12)
      ax.axhline(mean, color="k", linewidth=2, label=f"SSGD {error_text(ssgd)}")
    for policy, style in (("inverse", dict(color="C0", marker="o")), ("constant", dict(color="C3", marker="s",
                                                                                           linestyle="--"))):
      rows = sorted((n, a) for (l, n, p), a in agg.items() if l == lam and p == policy and a["error"] is not None)
      if rows:
        ax.errorbar([n for n, _ in rows], [a["error"][0] for _, a in rows],
                    yerr=[a["half"] or 0.0 for _, a in rows], capsize=3, label=policy, **style)
    gone = sorted(f"{p} n = {n} ({error_text(a)})" for (l, n, p), a in agg.items() if l == lam and a["error"] is None)
    if gone:                                    # no point to draw: say so on the panel
      ax.text(0.02, 0.98, "no final error: " + ", ".join(gone), transform=ax.transAxes, va="top", fontsize=7)
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


def estimate_text(points: Sequence[tuple[float, float, float, float]], epochs: float, dataset: str = "mnist5k",
                  command_cells: Sequence[Cell] = (), train_examples: int = 0) -> str:
  """The full grid's predicted time at ``epochs`` (the default with --quick) from this run's cells' times, and
  that of ``command_cells`` (the command's own runs, on ``train_examples`` of the set) when given."""
  if not points:
    return "No run finished, so there is no time estimate for the full grid."
  a, b, d = fit_seconds(points)
  full, size = grid(LEARNERS, NS, [0], dataset), TRAIN_SIZES[dataset]
  seconds = sum(a * epochs * size + b * gradients_of(c, epochs) + d * updates_of(c, epochs) for c in full)
  flags = ("" if dataset == DATASETS[0] else f" --dataset {dataset}") + (
      "" if epochs == base_config(dataset).epochs else f" --epochs {epochs:g}")
  return (f"Full grid estimate on this machine (`python launch/reproduce.py{flags}`: {epochs:g} epochs, λ ∈ "
          f"{{{', '.join(map(str, LEARNERS))}}}, {len(full)} cells per seed): **{seconds / 3600:.1f} h per seed** "
          f"({3 * seconds / 3600:.1f} h for `--seeds 0 1 2`), from a fit of this run's times: {1e3 * a:.3f} ms "
          f"per training example + {1e3 * b:.2f} ms per mini-batch gradient + {1e3 * d:.2f} ms per PS update "
          f"(a run sees epochs · {size:,} examples in epochs · {size:,} / μ gradients and 1/c as many updates)."
          + (_command_estimate(command_cells, (a, b, d), epochs, dataset, train_examples) if command_cells else ""))


def _command_estimate(cells: Sequence[Cell], fit: tuple[float, float, float], epochs: float, dataset: str,
                      train_examples: int) -> str:
  a, b, d = fit
  size = min(train_examples, TRAIN_SIZES[dataset]) if train_examples else TRAIN_SIZES[dataset]
  seconds = sum(a * epochs * size + b * gradients_of(c, epochs, train_examples)
                + d * updates_of(c, epochs, train_examples) for c in cells)
  return f" This command's {len(cells)} runs: **{seconds / 3600:.2f} h** by the same fit."
