"""The report of launch/local_sgd.py: what was declared, per λ the rows against SSGD, the simulated time and bytes
to SSGD's error + 0.5 point, which weighting suits pseudo-gradients, the curves, every run.

Pure functions of the runs, each ``(cell, final record or None when not done, metrics history)``, plus the figure.
The statistics are launch/row_summary.py's, each row against the SSGD row of its λ: mean and 95 % Student-t
interval over the trained seeds (a collapsed or diverged seed counted apart), the paired difference row − SSGD and
its verdict against +0.5 point with Holm's adjustment over the page's tests, and the medians (censored seeds kept)
of ``sim_time`` and ``bytes_moved`` when the test error first reaches the target, interpolated between evaluations.
"""

from __future__ import annotations

import statistics
from typing import Optional, Sequence

from launch import grid_runner, reproduce, row_summary
from launch.local_sgd import (ASYNC_OUTER, DATASET, DILOCO_OUTER, DYLU_STEPS, GOAL_POINTS, MEASURED_EPOCHS,
                              MEASURED_RUN_S, MESSAGE_BYTES, POLYNOMIAL_A, PROFILE, ROW_OF, ROWS, SIM_BANDWIDTH,
                              SIM_LATENCY, SSGD, STEPS, TRAIN_EXAMPLES, WEIGHTINGS, LocalCell)
from launch.reproduce_report import (NOTE_END, NOTE_START, error_text, outcome_rule, outcomes_text, run_error_text,
                                     save_figure)
from launch.seed_stats import ALPHA, FAILED, paired_difference

WAITING = "waiting"
BYTES = "bytes_moved"
is_done = row_summary.is_done


def row_label(name: str) -> str:
  """A row's name in the tables."""
  row = ROW_OF[name]
  if name == SSGD:
    return "SSGD (hardsync, H = 1)"
  if row.steps == 1:
    return f"async SGD (H = 1, {row.policy})"
  if row.protocol == "hardsync":
    return f"DiLoCo (hardsync, H = {row.steps})"
  weighting = {"polynomial": f"polynomial (1 + σ)^−{POLYNOMIAL_A:g}"}.get(row.policy, row.policy)
  return (f"DyLU (H = {row.steps}, {row.policy})" if row.dynamic else
          f"async local-SGD (H = {row.steps}, {weighting})")


def bytes_text(value: float) -> str:
  """'12.34 GB', '850 MB' (decimal units)."""
  return f"{value / 1e9:.2f} GB" if value >= 1e9 else f"{value / 1e6:.0f} MB"


def gradients(lam: int, epochs: float, train_examples: int) -> float:
  """Mini-batch gradients (inner steps) one run at λ computes, whatever its row: epochs · N / μ."""
  return reproduce.gradients_of(reproduce.Cell(lam, 0, "ssgd", 0, DATASET), epochs, train_examples)


def estimate_s(runs: Sequence[LocalCell], epochs: float) -> Optional[float]:
  """The CPU seconds of ``runs`` by :data:`MEASURED_RUN_S`: the measured λ nearest each run's, per gradient; None
  without a measurement."""
  measured = {lam: s for lam, s in MEASURED_RUN_S.items() if s > 0}
  if not measured:
    return None
  per = {lam: s / gradients(lam, MEASURED_EPOCHS, TRAIN_EXAMPLES) for lam, s in measured.items()}
  return sum(per[min(per, key=lambda m: abs(m - c.learners))] * gradients(c.learners, epochs, c.train_examples)
             for c in runs)


# ---- the numbers (pure) -------------------------------------------------------------------------------------
def summaries(runs: Sequence[tuple], learners: Sequence[int], classes: int) -> list[dict]:
  """One :func:`launch.row_summary.summarize` per λ of ``learners``: rows against that λ's SSGD + 0.5 point, in
  simulated seconds and bytes moved."""
  return [row_summary.summarize([r for r in runs if r[0].learners == lam], classes, key=lambda c: (c.row,),
                                reference=(SSGD,), points=GOAL_POINTS, measures=(row_summary.SIM_TIME, BYTES))
          for lam in learners]


def weighting_rule(summary: dict, steps: int) -> dict:
  """The declared rule for the weightings of :data:`WEIGHTINGS` at H = ``steps``: ranked by mean final error over
  their trained seeds, a weighting with a collapsed or diverged seed after every one without; ``best`` is the
  first when each other's paired difference (other − first, seeds both trained) has a 95 % interval wholly above 0
  (None otherwise, or while a weighting has no trained seed). Each entry: row, mean, failed, diff (to the first)."""
  ranked = []
  for w in WEIGHTINGS:
    a = summary["groups"].get((f"local-h{steps}-{w}",), {}).get("agg")
    if a is None:
      return {"ranked": [], "best": None}
    failed = sum(k for o, k in a["outcomes"].items() if o in FAILED)
    ranked.append({"row": w, "mean": a["error"][0] if a["error"] else None, "failed": failed, "agg": a})
  ranked.sort(key=lambda r: (r["failed"] > 0, float("inf") if r["mean"] is None else r["mean"]))
  first = ranked[0]
  for r in ranked[1:]:
    both = set(r["agg"]["by_seed"]) & set(first["agg"]["by_seed"])
    r["diff"] = paired_difference(r["agg"], first["agg"]) if both else None
  separated = first["mean"] is not None and not first["failed"] and all(
      r["failed"] or (r["diff"] and r["diff"]["lo"] is not None and r["diff"]["lo"] > 0) for r in ranked[1:])
  return {"ranked": ranked, "best": first["row"] if separated else None}


def answers(summary: dict, lam: int) -> list[str]:
  """What λ's table says: the rows sooner and cheaper to the target than SSGD, and the weighting rule per H."""
  ssgd = summary["groups"].get((SSGD,))
  if summary["target"] is None:
    return [f"- λ = {lam}: no trained SSGD run yet, so no target."]
  lines = []
  for measure, word, fmt in ((row_summary.SIM_TIME, "time", lambda v: f"{v:.0f} s"), (BYTES, "bytes", bytes_text)):
    reached = [(g["to_target"][measure]["median"], k[0]) for k, g in summary["groups"].items()
               if g["to_target"][measure]["median"] is not None]
    if not reached:
      lines.append(f"- λ = {lam}, {word}: no row's median reached the target yet.")
      continue
    best, name = min(reached)
    ref = ssgd["to_target"][measure]["median"] if ssgd else None
    lines.append(f"- λ = {lam}, {word} to the target: least for **{row_label(name)}**, median {fmt(best)}"
                 + (f", SSGD's ÷ {ref / best:.2f}" if ref and best > 0 else " (SSGD's median: none)")
                 + f"; {len(reached)} of {len(summary['groups'])} rows have a median.")
  for h in STEPS:
    rule = weighting_rule(summary, h)
    if not rule["ranked"]:
      lines.append(f"- λ = {lam}, H = {h}: a weighting has no run done yet.")
      continue
    order = "; ".join(f"{r['row']} " + ("–" if r["mean"] is None else f"{r['mean']:.2f} %")
                      + (f" ({r['failed']} seed(s) collapsed or diverged)" if r["failed"] else "")
                      + (f", {r['diff']['mean']:+.2f} [{r['diff']['lo']:+.2f}, {r['diff']['hi']:+.2f}]"
                         if r.get("diff") and r["diff"]["lo"] is not None else "") for r in rule["ranked"])
    lines.append(f"- λ = {lam}, H = {h}, weighting: " + (f"**{rule['best']}** is right by the rule" if rule["best"]
                                                          else "no weighting is separated by the rule")
                 + f" (mean final error; other − first, paired 95 % interval: {order}).")
  return lines


# ---- the page ---------------------------------------------------------------------------------------------
def table(summary: dict, verdict_of: dict, index: int) -> list[str]:
  """One λ's table: a line per row of :data:`ROWS`, SSGD first."""
  lines = ["| row | seeds done | test error % | not trained | − SSGD (paired) | vs SSGD + 0.5 | "
           "sim time to target (s) | SSGD time ÷ | bytes to target | SSGD bytes ÷ | ⟨σ⟩ |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  ssgd = summary["groups"].get((SSGD,))
  notes = []
  for row in ROWS:
    g = summary["groups"].get((row.name,))
    if g is None:
      continue
    label, a, v = row_label(row.name), g["agg"], verdict_of.get((index, row.name))
    if a is None:
      lines.append(f"| {label} | 0 of {g['cells']} | {WAITING} | | | | | | | | |")
      continue
    error = error_text({**a, "outcomes": {}}) if a["error"] else "–"
    apart = outcomes_text(a) if a["outcomes"] else "–"
    time_text, time_ratio = row_summary.to_target_text(g, ssgd)
    bytes_cell, bytes_ratio = row_summary.to_target_text(g, ssgd, BYTES, bytes_text)
    sigma = "–" if a["staleness"] is None else f"{a['staleness']:.1f}"
    if row.name == SSGD:
      verdict, diff = "(the reference)", ""
    elif v is None:
      verdict, diff = "waiting for SSGD", "–"
    else:
      verdict, diff = f"{row_summary.verdict_text(v)}; Holm: {row_summary.holm_text(v)}", row_summary.diff_text(v)
      notes += [f"- {label}: {v['why']}"] if v["why"] else []
    lines.append(f"| {label} | {g['done']} of {g['cells']} | {error} | {apart} | {diff} | {verdict} | {time_text} | "
                 f"{time_ratio} | {bytes_cell} | {bytes_ratio} | {sigma} |")
  return lines + ([""] + notes if notes else [])


def row_text(name: str) -> str:
  """What a row runs, for the declaration."""
  row = ROW_OF[name]
  if name == SSGD:
    return "hardsync (c = λ, σ = 0), a gradient per push, the config's SGD (α0, momentum) at the PS"
  if row.steps == 1:
    return f"c = 1, a gradient per push, the paper's {row.policy} rule α0/σ, the config's SGD at the PS"
  if row.protocol == "hardsync":
    return f"hardsync, H = {row.steps} inner steps per push, outer {DILOCO_OUTER} (lr 0.7, momentum 0.9)"
  weighting = f"polynomial (1 + σ)^−{POLYNOMIAL_A:g}" if row.policy == "polynomial" else row.policy
  return (f"c = 1, H_k = max(1, ⌊{row.steps}·v_k/v_fastest⌋), weighting {row.policy} ((1 + σ)^−0.5), outer "
          f"{row.outer}" if row.dynamic else f"c = 1, H = {row.steps}, weighting {weighting}, outer {row.outer}")


def declaration(*, learners: Sequence[int], seeds: Sequence[int], epochs: float, train_examples: int,
                classes: int, runs: Sequence[LocalCell]) -> list[str]:
  """The section written before any run, every number from the command's constants and flags."""
  from sajax.executors import speed
  base = reproduce.base_config(DATASET)
  subset = (f"the first {train_examples:,} training images" if train_examples else
            f"all {reproduce.TRAIN_SIZES[DATASET]:,} training images")
  boundaries = ", ".join(f"{b:g}" for b in reproduce.scaled_boundaries(base, epochs)) or "(none)"
  factors = ", ".join(f"{f:g}" for f in speed.HETEROGENEOUS_FACTORS)
  step = statistics.fmean(speed.HETEROGENEOUS_FACTORS)
  tau = SIM_LATENCY + MESSAGE_BYTES / SIM_BANDWIDTH
  mus = ", ".join(f"λ = {lam}: μ = {LocalCell(SSGD, lam, 0).batch}" for lam in learners)
  estimate = estimate_s(runs, epochs)
  measured = ", ".join(f"λ = {lam}: {s:.0f} s" for lam, s in MEASURED_RUN_S.items() if s > 0)
  return [
      "## Declared before any run", "",
      "Written from the command's constants and flags (launch/local_sgd.py), so recomputed on every rewrite; on "
      "this page before the first run. The sections after it report whatever comes out.", "",
      f"- **Setting.** Fashion-MNIST, configs/fashion_mnist.py unchanged: α0 = {base.learning_rate:g} for a λμ ≈ "
      f"{reproduce.BATCH_TOTAL} mini-batch, momentum {base.momentum:g}, α ÷{1 / base.lr_decay:g} at epochs "
      f"{boundaries}, {epochs:g} epochs, chosen on SSGD alone; nothing tuned per row. λ ∈ "
      f"{{{', '.join(map(str, learners))}}} ({mus}); {subset}, the 10,000 test images; {reproduce.EVALS} "
      f"evaluations per run (every {epochs / reproduce.EVALS:g} epoch). Every row sees the same examples: a push "
      "of H inner steps carries H·μ of them, epochs count examples, so every run computes the same "
      "epochs · N / μ mini-batch gradients. Simulated executor under the "
      f"`{PROFILE}` speed profile in every cell, SSGD included (learner k takes the k-th of {factors} s per "
      f"gradient, cycled, times a mean-1 lognormal jitter σ = {reproduce.SIM_JITTER:g}).",
      f"- **Communication.** Each pull of θ and each push of a gradient or Δ moves the CNN's M = "
      f"{MESSAGE_BYTES:,} bytes over the learner's own link of B = {SIM_BANDWIDTH / 1e6:g} MB per simulated "
      f"second with L = {SIM_LATENCY:g} s latency: τ = L + M/B = {tau:.3f} s per message, so a pull plus a push "
      f"costs 2τ = {2 * tau:.2f} s, about one mean gradient step ({step:.4g} s). Why: communication then costs "
      "as much as computation, the regime local steps are for; were it free no row could gain time by pushing "
      "less, were it far dearer every row's time would be its count of pushes. The same link in every row; the "
      "bytes count every pull and push (a dropped one too).",
      "- **Rows** (per λ): " + "; ".join(f"**{row_label(r.name)}**: {row_text(r.name)}" for r in ROWS) + ". "
      f"Inner optimizer of the local-SGD rows: SGD at α0, no inner momentum, constant (sajax/local_steps.py's "
      f"defaults). Outer {DILOCO_OUTER} (DiLoCo) and {ASYNC_OUTER} (Liu et al. 2024; the momentum step once per "
      "N = λ pushes) at lr 0.7, momentum 0.9, the rate following the step schedule; DyLU at H = "
      f"{DYLU_STEPS}. {len(ROWS)} rows × {len(learners)} λ × {len(seeds)} seeds ({', '.join(map(str, seeds))}) = "
      f"{len(runs)} runs, seed-major (every run of a seed before the next seed).",
      "- **Cost.** " + (f"One full-size run ({MEASURED_EPOCHS:g} epochs, {TRAIN_EXAMPLES:,} images) trained in "
                        f"{measured} on this machine (2 cores shared with a background grid); at that rate, per "
                        f"gradient, the {len(runs)} runs take ≈ **{estimate / 3600:.1f} h** of CPU time."
                        if estimate else
                        "No run measured yet: no estimate."),
      f"- **Target.** Per λ, SSGD's mean final test error over its trained seeds + {GOAL_POINTS:g} point. A run's "
      "simulated time and bytes moved to the target: when its test error first reaches it, linear between the "
      "two evaluations around it (the bytes at the same point); per row the median over the seeds done, a seed "
      "that never reached it counted as later than any that did (censored: no median when half or more never "
      "did), and how many reached it. SSGD time ÷ and SSGD bytes ÷: SSGD's median over the row's (above 1: the "
      "row saves).",
      f"- **Against SSGD.** Each row's paired difference row − SSGD (same seed, both trained) with its 95 % "
      f"interval: *within* when it lies at or below +{GOAL_POINTS:g} point, *worse* when wholly above, "
      "*undecided* when it straddles it; also after Holm's adjustment over the page's tests (one per row and λ, "
      f"the paired t test against +{GOAL_POINTS:g}, decided where the adjusted p-value is at most {ALPHA:.2g}). "
      + outcome_rule(classes),
      f"- **Which weighting for pseudo-gradients.** At each λ and H ∈ {{{', '.join(map(str, STEPS))}}}, the "
      f"weightings {', '.join(WEIGHTINGS)} are ranked by mean final error (one with a collapsed or diverged seed "
      "after every one without); the first is *right* when each other's paired difference other − first has a "
      "95 % interval wholly above 0; otherwise the page says none is separated.", ""]


def render(runs: Sequence[tuple], *, learners: Sequence[int], seeds: Sequence[int], epochs: float,
           train_examples: int, command: str, note: str, classes: int, trained: int, wall_s: float,
           figure: str) -> str:
  """docs/local_sgd.md: the note, the command, the declaration, progress, a table per λ, the answers, the
  figure, every run."""
  per_lam = summaries(runs, learners, classes)
  verdict_of = row_summary.verdicts(per_lam, GOAL_POINTS)
  done = sum(map(is_done, runs))
  lines = ["# Asynchronous local-SGD against SSGD at equal accuracy (Fashion-MNIST, simulated)", "",
           NOTE_START, note, NOTE_END, "",
           "Written by `launch/local_sgd.py`; every number below comes from this command (each run is in "
           "`<root>/<run>/`: `config.json`, `metrics.jsonl`, `final.json`; `--report-only` rewrites this page from "
           "the runs done so far):", "", "```bash", command, "```", ""]
  lines += declaration(learners=learners, seeds=seeds, epochs=epochs, train_examples=train_examples,
                       classes=classes, runs=[c for c, _, _ in runs])
  complete = [str(s) for s in seeds if all(is_done(r) for r in runs if r[0].seed == s)]
  walls = [f["wall_s"] for _, f, _ in runs if f is not None and not grid_runner.unfinished(f) and "wall_s" in f]
  lines += ["## Progress", "", f"**{done} of {len(runs)} runs done**" + (
      f" (seeds complete: {', '.join(complete)})" if complete else "") + f"; a row shows the seeds it has, "
      f"*{WAITING}* when it has none."
      + (row_summary.time_to_go(walls, len(runs) - done) + "." if walls and done < len(runs) else "")
      + (f" The invocation that wrote this page trained {trained} run(s) in {wall_s:.0f} s." if trained else
         " The invocation that wrote this page trained none."), ""]
  for index, (lam, s) in enumerate(zip(learners, per_lam)):
    lines += [f"## λ = {lam} (μ = {LocalCell(SSGD, lam, 0).batch})", "",
              "SSGD's target: " + (f"{s['target']:.2f} % (its mean final error + {GOAL_POINTS:g} point)."
                                   if s["target"] is not None else "none yet (no trained SSGD run)."), ""]
    lines += table(s, verdict_of, index) + [""]
  lines += ["Columns: test error, mean ± half-width of the 95 % Student-t interval over the trained seeds; not "
            "trained: seeds that collapsed or diverged (never averaged); − SSGD: mean of the paired differences "
            "± half-width [95 % interval]; then its verdict against +0.5 point (and after Holm); time and bytes to "
            "target: medians (how many seeds reached it); ⟨σ⟩: mean staleness of the pushes.", "",
            "## What the grid answers", "",
            "At equal accuracy (the target), which row needs the least simulated time and the fewest bytes, and "
            "which staleness weighting suits pseudo-gradients; over the seeds done"
            + ("." if done == len(runs) else " so far (the grid is not complete: this may change)."), ""]
  for lam, s in zip(learners, per_lam):
    lines += answers(s, lam)
  lines += ["", "## Test error against simulated time and bytes", "",
            f"![test error against simulated time and bytes moved, mean over trained seeds]({figure})", "",
            "## Every run", "", "| run (folder under the root) | test error % | train loss | ⟨σ⟩ | sim time (s) | "
            "bytes moved | training wall |", "|---|---|---|---|---|---|---|"]
  num = lambda f, key, spec: "–" if f.get(key) is None else format(f[key], spec)   # noqa: E731
  for cell, f, _ in runs:
    if f is not None:
      moved = "–" if f.get(BYTES) is None else bytes_text(f[BYTES])
      lines.append(f"| `{cell.name(epochs)}` | {run_error_text(f, classes)} | {num(f, 'train_loss', '.4f')} | "
                   f"{num(f, 'staleness_mean', '.2f')} | {num(f, 'sim_time', '.0f')} | {moved} | "
                   f"{num(f, 'wall_s', '.0f')} s |")
  if not done:
    lines.append("| (no run done yet) | | | | | | |")
  return "\n".join(lines) + "\n"


# ---- the figure -------------------------------------------------------------------------------------------
def plot_curves(runs: Sequence[tuple], path: str, classes: int = 10) -> str:
  """Per λ, test error (mean over the trained seeds) against simulated time and against bytes moved, one line
  per row, SSGD in black, the target dashed."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  learners = list(dict.fromkeys(c.learners for c, _, _ in runs))
  fig, axes = plt.subplots(max(1, len(learners)), 2, figsize=(11, 3.8 * max(1, len(learners))), squeeze=False)
  for (ax_t, ax_b), lam, s in zip(axes, learners, summaries(runs, learners, classes)):
    drawn = 0
    for i, row in enumerate(ROWS):
      curves = [h for h in s["groups"].get((row.name,), {}).get("trained_histories", []) if h]
      if not curves:
        continue
      length = min(len(h) for h in curves)
      mean = lambda key, scale=1.0: [scale * statistics.fmean(h[j][key] for h in curves)  # noqa: E731
                                     for j in range(length)]
      style = dict(color="k", linewidth=2) if row.name == SSGD else dict(color=f"C{(i - 1) % 10}")
      label = f"{row_label(row.name)} ({len(curves)})"
      ax_t.plot(mean("sim_time"), mean("test_error", 100), label=label, **style)
      ax_b.plot(mean(BYTES, 1e-9), mean("test_error", 100), label=label, **style)
      drawn += 1
    for ax, xlabel in ((ax_t, "simulated time (s)"), (ax_b, "bytes moved (GB)")):
      if s["target"] is not None:
        ax.axhline(s["target"], color="grey", linestyle="--", linewidth=1)
      if not drawn:
        ax.text(0.5, 0.5, "no trained run yet", transform=ax.transAxes, ha="center")
      ax.set(xlabel=xlabel, ylabel="test error (%)", title=f"λ = {lam}")
      ax.grid(alpha=0.3)
      if drawn:
        ax.set_xscale("log")
        ax.set_ylim(top=min(40, ax.get_ylim()[1]))
    if drawn:
      ax_b.legend(fontsize=6)
  save_figure(fig, path)
  plt.close(fig)
  return path
