"""The report of launch/momentum_remedies.py: what was declared, the tables, the time to target, the goal.

Pure functions of the runs, each ``(cell, final record or None when not done, metrics history)``, plus the figure.
The statistics are launch/row_summary.py's, each (row, n) against SSGD: mean and 95 % Student-t interval over the
trained seeds (a collapsed or diverged seed counted apart), the paired difference cell − SSGD over the seeds both
trained, its verdict against +0.5 point, the power statement, and each verdict's Holm-adjusted decision over the
page's family: the two-sided paired t test of the difference against +0.5 (the test the 95 % interval inverts).
"""

from __future__ import annotations

import math
import statistics
from typing import Optional, Sequence

from launch import grid_runner, reproduce, row_summary
from launch.momentum_remedies import (DATASET, GOAL_POINTS, PHASE2_SEEDS, PLAIN, PROFILE, REMEDIES, ROWS, SSGD,
                                      WARMUP, WARMUP_EPOCHS, RemedyCell, ns_of)
from launch.reproduce_report import (NOTE_END, NOTE_START, error_text, outcome_rule, outcomes_text, run_error_text,
                                     save_figure)
from launch.seed_stats import ALPHA, POWER

WAITING = "waiting"


def row_label(row: str, learners: int) -> str:
  """A row's name in the tables, with its constants (the config's defaults, recomputed)."""
  base = reproduce.base_config(DATASET)
  return {SSGD: f"SSGD (hardsync, c = λ = {learners})", PLAIN: "plain momentum",
          "delayed_nesterov": f"delayed Nesterov (N = {base.momentum_rule_period or learners})",
          "compensation": f"compensation (ρ = {base.momentum_rule_staleness_decay:g})",
          "lookahead": f"look-ahead (ρ = {base.momentum_rule_staleness_decay:g})",
          WARMUP: f"warm-up ({WARMUP_EPOCHS:g} epoch, plain momentum)"}[row]


def row_text(row: str, learners: int) -> str:
  """What a row does (sajax/momentum.py, sajax/trainer.py), for the declaration."""
  base = reproduce.base_config(DATASET)
  rho = f"⟨σ⟩ smoothed with ρ = {base.momentum_rule_staleness_decay:g} per gradient"
  return {PLAIN: "m ← βm + ḡ, θ ← θ − αm (the failing reference)",
          "delayed_nesterov": f"the momentum advances once per N = {base.momentum_rule_period or learners} "
                              "gradients (Liu et al. 2024)",
          "compensation": f"β lowered by the momentum asynchrony adds, 1 − 1/(1 + ⟨σ⟩), {rho} (Mitliagkas et al. "
                          "2016)",
          "lookahead": f"the PS publishes the weights' estimated position when the gradient will be applied, {rho} "
                       "(after DANA, Hakimi et al. 2019)",
          WARMUP: f"plain momentum with α ramped linearly over the first {WARMUP_EPOCHS:g} epoch (the warm-up "
                  "probe of docs/momentum_staleness.md)"}[row]


# ---- the numbers (pure: launch/row_summary.py's, grouped by (row, n) against SSGD) -------------------------
def summarize(runs: Sequence[tuple[RemedyCell, Optional[dict], list]], classes: int) -> dict:
  """:func:`launch.row_summary.summarize` per (row, n) against SSGD's error + 0.5 point, in simulated seconds."""
  return row_summary.summarize(runs, classes, key=lambda c: (c.row, c.n), reference=(SSGD, 0), points=GOAL_POINTS)


def verdicts(summaries: Sequence[dict]) -> dict:
  """:func:`launch.row_summary.verdicts` against +0.5 point, keyed (phase index, row, n)."""
  return row_summary.verdicts(summaries, GOAL_POINTS)


is_done = row_summary.is_done


# ---- the page ---------------------------------------------------------------------------------------------
def table(summary: dict, rows: Sequence[tuple[str, int]], verdict_of: dict, phase: int, learners: int) -> list[str]:
  """One table: a line per (row, n) of ``rows``, SSGD first when it is among them."""
  lines = ["| row | seeds done | test error % | not trained | − SSGD (paired) | verdict | after Holm | "
           "time to target (s) | SSGD time ÷ | ⟨σ⟩ |", "|---|---|---|---|---|---|---|---|---|---|"]
  ssgd = summary["groups"].get((SSGD, 0))
  notes = []
  for row, n in rows:
    g = summary["groups"].get((row, n))
    if g is None:
      continue
    label = row_label(row, learners)
    a, v = g["agg"], verdict_of.get((phase, row, n))
    if a is None:
      lines.append(f"| {label} | 0 of {g['cells']} | {WAITING} | | | | | | | |")
      continue
    error = error_text({**a, "outcomes": {}}) if a["error"] else "–"
    apart = outcomes_text(a) if a["outcomes"] else "–"
    time_text, ratio = row_summary.to_target_text(g, ssgd)
    sigma = "–" if a["staleness"] is None else f"{a['staleness']:.1f}"
    if row == SSGD:
      lines.append(f"| {label} | {g['done']} of {g['cells']} | {error} | {apart} | | | | {time_text} | | {sigma} |")
      continue
    verdict = (row_summary.verdict_text(v), row_summary.holm_text(v)) if v else ("waiting for SSGD", "–")
    diff = row_summary.diff_text(v) if v else "–"
    lines.append(f"| {label} | {g['done']} of {g['cells']} | {error} | {apart} | {diff} | "
                 f"{verdict[0]} | {verdict[1]} | {time_text} | {ratio} | {sigma} |")
    if v and v["why"]:
      notes.append(f"- {label}: {v['why']}")
  return lines + ([""] + notes if notes else [])


def declaration(*, learners: int, seeds: Sequence[int], epochs: float, train_examples: int, runs1: int,
                runs2: int, classes: int) -> list[str]:
  """The section written before any run: setting, rows, seeds, the phase-2 rule and the goal, every number from
  the command's constants and flags."""
  from sajax.executors import speed
  base = reproduce.base_config(DATASET)
  ns = ns_of(learners)
  cells = len(ns) * len(ROWS)
  subset = (f"the first {train_examples:,} training images" if train_examples else
            f"all {reproduce.TRAIN_SIZES[DATASET]:,} training images")
  boundaries = ", ".join(f"{b:g}" for b in reproduce.scaled_boundaries(base, epochs)) or "(none)"
  factors = ", ".join(f"{f:g}" for f in speed.HETEROGENEOUS_FACTORS)
  order = ", ".join(REMEDIES)
  two = list(seeds)[:PHASE2_SEEDS]
  return [
      "## Declared before any run", "",
      "Written from the command's constants and flags (launch/momentum_remedies.py), so recomputed on every "
      "rewrite; on this page before the first run. It states the result we are after; the sections below report "
      "whatever comes out.", "",
      f"- **Setting.** Fashion-MNIST, configs/fashion_mnist.py unchanged: α0 = {base.learning_rate:g} for a λμ ≈ "
      f"{reproduce.BATCH_TOTAL} mini-batch, momentum {base.momentum:g}, α ÷{1 / base.lr_decay:g} at epochs "
      f"{boundaries}, {epochs:g} epochs, all chosen on SSGD alone; no hyperparameter tuned per remedy. λ = "
      f"{learners} learners of μ = {math.ceil(reproduce.BATCH_TOTAL / learners)}; {subset} (phase 1), the "
      f"10,000 test images; {reproduce.EVALS} evaluations per run (every {epochs / reproduce.EVALS:g} epoch). "
      f"Simulated executor under the `{PROFILE}` speed profile in every cell, SSGD included (learner k takes the "
      f"k-th of {factors} s per gradient, cycled, times a mean-1 lognormal jitter σ = {reproduce.SIM_JITTER:g}), "
      "so simulated times compare.",
      f"- **Rows.** SSGD (hardsync: c = λ = {learners}, σ = 0, plain momentum); then for each n ∈ "
      f"{{{', '.join(map(str, ns))}}} (n-softsync, c = ⌊λ/n⌋ = {', '.join(str(max(1, learners // n)) for n in ns)}; "
      f"n = λ is async) the paper's inverse policy (α0/σ) with: " + "; ".join(
          f"**{row}**: {row_text(row, learners)}" for row in ROWS) + ". "
      f"{1 + cells} cells × {len(seeds)} seeds ({', '.join(map(str, seeds))}) = {runs1} runs, seed-major (every "
      "cell of a seed before the next seed).",
      f"- **Phase 2.** Once all {runs1} phase-1 runs are done, the rule picks one remedy: among {order} (not "
      f"plain), the one with the lowest mean final test error over the trained seeds of its n = {learners} cell; "
      "a remedy with a collapsed or diverged seed there ranks after every remedy without; ties go to the first "
      f"in that order. Phase 2 runs it at n = λ = {learners} and SSGD, both `{PROFILE}`, on all "
      f"{reproduce.TRAIN_SIZES[DATASET]:,} training images, seeds {', '.join(map(str, two))} ({runs2} runs).",
      f"- **Goal.** Every one of the {cells} phase-1 cells within {GOAL_POINTS:g} point of SSGD at momentum "
      f"{base.momentum:g} (and phase 2's remedy at all the images): a cell is *within* when the 95 % interval of "
      "its paired difference cell − SSGD (the same seed, both trained) lies at or below "
      f"+{GOAL_POINTS:g} point (launch/seed_stats.py's verdict), *worse* when it lies wholly above, *undecided* "
      f"when it straddles +{GOAL_POINTS:g} (with the seeds a paired t test would need for {100 * POWER:.0f} % "
      "power). A cell with a collapsed or diverged seed is never within (worse where SSGD's run of that seed "
      "trained). " + outcome_rule(classes),
      f"- **Several tests.** The page makes one test per cell ({cells} in phase 1, 1 in phase 2): each verdict is "
      f"also given after Holm's adjustment over that family (the two-sided paired t test of the difference "
      f"against +{GOAL_POINTS:g}, which the 95 % interval inverts, decided where its Holm-adjusted p-value is at "
      f"most {ALPHA:.2g}); the statement of where the goal holds gives both counts.",
      f"- **Time to target.** Simulated seconds until a run's test error first reaches SSGD's mean final error "
      f"(same phase) + {GOAL_POINTS:g} point, linear between evaluations; the median over the seeds done, a seed "
      "that never reached it counted as slower than any that did (censored; no median when half or more never "
      "did), and how many reached it.", ""]


def goal_lines(summary: dict, verdict_of: dict, learners: int, complete: bool) -> list[str]:
  """Where the goal was reached and where not, from the verdicts (phase 1's cells)."""
  within, holm_within, short, waiting = [], [], [], []
  keys = [(row, n) for n in ns_of(learners) for row in ROWS]
  for row, n in keys:
    v = verdict_of.get((0, row, n))
    name = f"n = {n} {row}"
    if v is None:
      waiting.append(name)
    elif v["verdict"] == "within":
      within.append(name)
      holm_within += [name] if v["holm"] == "within" else []
    else:
      short.append(f"{name} ({v['verdict']})")
  every = [row for row in ROWS if all(f"n = {n} {row}" in within for n in ns_of(learners))]
  if len(waiting) == len(keys):
    return [f"The goal is decided in no cell yet: all {len(keys)} cells wait for their runs (or SSGD's).", ""]
  lines = [f"**{len(within)} of {len(keys)} cells within {GOAL_POINTS:g} point of SSGD** by the paired 95 % "
           f"interval ({len(holm_within)} after Holm's adjustment over the page's tests)"
           + (f": {', '.join(within)}" if within else "") + "."]
  lines.append(f"Not within: {', '.join(short)}." if short else "No cell is decided not within.")
  if waiting:
    lines.append(f"Waiting (no run, or no SSGD run, done yet): {', '.join(waiting)}.")
  lines.append(f"Rows within at every n: {', '.join(every)}." if every else "No row is within at every n.")
  if not complete:
    lines.append("Phase 1 is not complete: these verdicts are over the seeds done so far and may change.")
  return [" ".join(lines), ""]


def render(phase1: Sequence[tuple], phase2: Sequence[tuple], ranking: Optional[list[dict]], *, learners: int,
           seeds: Sequence[int], epochs: float, train_examples: int, command: str, note: str, classes: int,
           trained: int, wall_s: float, figure: str) -> str:
  """docs/momentum_remedies.md: the note, the commands, the declaration, progress, one table per n, phase 2, the
  goal statement, the figure, every run."""
  s1, s2 = summarize(phase1, classes), summarize(phase2, classes)
  verdict_of = verdicts([s1, s2])
  done1, done2 = sum(map(is_done, phase1)), sum(map(is_done, phase2))
  runs2 = 2 * len(list(seeds)[:PHASE2_SEEDS])
  lines = ["# Momentum remedies for asynchronous learners at momentum 0.9 (Fashion-MNIST, simulated)", "",
           NOTE_START, note, NOTE_END, "",
           "Written by `launch/momentum_remedies.py`; every number below comes from this command (each run is in "
           "`<root>/<run>/`: `config.json`, `metrics.jsonl`, `final.json`). Phase 1, then phase 2 (the same "
           "command without `--phase` does both, phase 2 once phase 1 is done; `--report-only` rewrites this page "
           "from the runs done so far):", "", "```bash", command + " --phase 1", command, "```", ""]
  lines += declaration(learners=learners, seeds=seeds, epochs=epochs, train_examples=train_examples,
                       runs1=len(phase1), runs2=runs2, classes=classes)
  lines += ["## Progress", ""]
  complete = [str(seed) for seed in seeds if all(is_done(r) for r in phase1 if r[0].seed == seed)]
  walls = [f["wall_s"] for _, f, _ in phase1 if f is not None and not grid_runner.unfinished(f) and "wall_s" in f]
  lines.append(f"Phase 1: **{done1} of {len(phase1)} runs done**" + (
      f" (seeds complete: {', '.join(complete)})" if complete else "") + "; a cell shows the seeds it has, "
      f"*{WAITING}* when it has none. Phase 2: " + (
          f"{ranking[0]['row']} (chosen by the rule below), **{done2} of {len(phase2)} runs done**." if ranking else
          f"waits for phase 1 ({len(phase1) - done1} runs to go).")
      + (row_summary.time_to_go(walls, len(phase1) - done1, "phase-1 runs") + " on this machine (a phase-2 run sees all the "
         "images)." if walls and done1 < len(phase1) else "")
      + (f" The invocation that wrote this page trained {trained} run(s) in {wall_s:.0f} s." if trained else
         " The invocation that wrote this page trained none (it wrote the report from the runs done)."))
  lines += ["", "## Phase 1", "", "SSGD's target: " + (f"{s1['target']:.2f} % (its mean final error + "
                                                          f"{GOAL_POINTS:g} point)." if s1["target"] is not None
                                                          else "none yet (no trained SSGD run)."), ""]
  lines += table(s1, [(SSGD, 0)], verdict_of, 0, learners) + [""]
  for n in ns_of(learners):
    lines += [f"### n = {n} (c = {max(1, learners // n)}{', async' if n == learners else ''})", ""]
    lines += table(s1, [(row, n) for row in ROWS], verdict_of, 0, learners) + [""]
  lines += [
      "Columns: test error, mean ± half-width of the 95 % Student-t interval over the trained seeds; not trained: "
      "seeds that collapsed or diverged (never averaged); − SSGD: the mean of the paired differences cell − SSGD "
      "(same seed) ± half-width [95 % interval]; verdict: against +0.5 point by that interval (undecided: with "
      "the seeds an 80 % powered paired t test would need, a planning estimate); after Holm: the same decision by "
      "the Holm-adjusted p-value; time to target: the median simulated seconds (how many seeds reached it); "
      "SSGD time ÷: SSGD's median over this row's (above 1: sooner); ⟨σ⟩: mean staleness.", "",
      "## Phase 2: the best remedy on all the training images", ""]
  if ranking is None:
    lines += [f"Waits for phase 1 ({done1} of {len(phase1)} runs done): the rule is applied once every phase-1 run "
              "is done.", ""]
  else:
    lines += ["The rule's ranking of the n = λ cells: " + "; ".join(
        f"{i}. {r['row']}: " + ("no trained seed" if r["mean"] is None else
                                f"{r['mean']:.2f} % over {r['trained']} trained seed(s)")
        + (f", {r['failed']} of {r['seeds']} collapsed or diverged" if r["failed"] else "")
        for i, r in enumerate(ranking, 1)) + f". Phase 2 runs **{ranking[0]['row']}**.", ""]
    lines += ["SSGD's target (all the images): " + (f"{s2['target']:.2f} %." if s2["target"] is not None else
                                                    "none yet."), ""]
    lines += table(s2, [(SSGD, 0), (ranking[0]["row"], learners)], verdict_of, 1, learners) + [""]
  lines += ["## Where the goal was reached", ""] + goal_lines(s1, verdict_of, learners, done1 == len(phase1))
  if ranking:
    v = verdict_of.get((1, ranking[0]["row"], learners))
    lines += [f"Phase 2 ({ranking[0]['row']} at all the images): " + (
        f"**{v['verdict']}** ({v['holm']} after Holm)." if v else f"{WAITING}."), ""]
  lines += ["## Test error against epochs", "", f"![test error against epochs, mean over trained seeds]({figure})",
            "", "## Every run", "", "| run (folder under the root) | test error % | train loss | ⟨σ⟩ | sim time | "
            "training wall |", "|---|---|---|---|---|---|"]
  num = lambda f, key, spec: "–" if f.get(key) is None else format(f[key], spec)   # noqa: E731
  for cell, f, _ in [*phase1, *phase2]:
    if f is not None:
      lines.append(f"| `{cell.name(epochs)}` | {run_error_text(f, classes)} | {num(f, 'train_loss', '.4f')} | "
                   f"{num(f, 'staleness_mean', '.2f')} | {num(f, 'sim_time', '.0f')} | {num(f, 'wall_s', '.0f')} s |")
  if not done1 + done2:
    lines.append("| (no run done yet) | | | | | |")
  return "\n".join(lines) + "\n"


# ---- the figure -------------------------------------------------------------------------------------------
def plot_curves(phase1: Sequence[tuple], phase2: Sequence[tuple], path: str, classes: int = 10) -> str:
  """Test error (mean over the trained seeds) against epochs, one panel per n of phase 1 and one for phase 2, one
  line per row, SSGD in black in each."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker
  learners = phase1[0][0].learners if phase1 else 0
  panels = [(f"phase 1, n = {n}", phase1, n) for n in ns_of(learners)] + [("phase 2, n = λ", phase2, learners)]
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
  for ax, (title, runs, n) in zip(axes[0], panels):
    groups = summarize(runs, classes)["groups"] if runs else {}
    drawn = 0
    for (row, m), g in groups.items():
      curves = [h for h in g["trained_histories"] if h]
      if (m != n and row != SSGD) or not curves:
        continue
      length = min(len(h) for h in curves)
      epochs = [curves[0][i]["epoch"] for i in range(length)]
      errors = [100 * statistics.fmean(h[i]["test_error"] for h in curves) for i in range(length)]
      style = dict(color="k", linewidth=2) if row == SSGD else dict(color=f"C{ROWS.index(row)}")
      ax.plot(epochs, errors, label=f"{row} ({len(curves)} seeds)", **style)
      drawn += 1
    if not drawn:
      ax.text(0.5, 0.5, "no trained run yet", transform=ax.transAxes, ha="center")
    ax.set(xlabel="epoch", ylabel="test error (%)", title=title)
    ax.grid(alpha=0.3, which="both")
    if drawn:
      ax.set_yscale("log")
      ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
      ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
      ax.legend(fontsize=7)
  save_figure(fig, path)
  plt.close(fig)
  return path
