"""launch/compare_policies.py's numbers and report: the ranking of the staleness policies (issue #11).

Pure functions over finished runs (``(cell, final.json, metrics history)``, a cell being compare_policies's
``PolicyCell``): per profile and row, the final test error over the seeds that trained (mean, 95 % Student-t
half-width; a seed that collapsed or diverged is counted apart, launch/seed_stats.py), the paired difference
against SSGD (same seed) and which rows are *decidedly* better than which: a two-sided paired t test per pair of
rows, Holm–Bonferroni adjusted over every pair the page compares (:func:`comparisons`; rows added to the page,
such as the rules at α0/λ, add pairs to that family). Also the simulated time to the SSGD target (SSGD's mean
final error + :data:`TARGET_POINTS`; interpolated between evaluations, the median over seeds with those that never
reached it censored), ⟨σ⟩, max σ and the fraction of gradients dropped; then docs/policies.md and its figure of
test error against simulated time. A grid still running renders honestly: a row whose seeds have not all run is
marked waiting (``waiting (0 of 3 seeds)`` when none has), averages only the runs it has, and is compared with
none until its seeds are in.
"""

from __future__ import annotations

import itertools
import statistics
from typing import TYPE_CHECKING, Optional, Sequence

from launch.reproduce import P4_POINTS
from launch.reproduce_report import (CLASSES, NOTE_END, NOTE_START, error_text, failed_seeds, outcome_of,
                                     outcome_rule, run_error_text, save_figure)
from launch.seed_stats import (ALPHA, TRAINED, censored_median, count_outcomes, half_width, holm, mean_sd,
                               paired_difference, time_to_target)

if TYPE_CHECKING:
  from launch.compare_policies import PolicyCell

TARGET_POINTS = P4_POINTS  # the target: SSGD's final error + 0.5 point
SSGD, SSP = "ssgd", "ssp"
LR_OVER_LAMBDA = "-lr_over_lambda"   # a row's name suffix: the rule at α0/λ (launch/compare_policies.py)
NOT_RUN = "not run (protocol not available)"

SOURCES = {   # where each policy's constants come from (sajax/policies.py has the formulas)
    "inverse": "Zhang et al., IJCAI 2016 (α0/σ)",
    "constant": "plain ASGD (staleness ignored)",
    "polynomial": "FedAsync (Xie et al. 2019); a = 0.5 from async local-SGD (Liu et al. 2024)",
    "exponential": "no paper fixes β; sajax's default",
    "hinge": "FedAsync (Xie et al. 2019), its experiments' a, b",
    "delay_adaptive": "Mishchenko et al., NeurIPS 2022 (threshold λ)",
    "drop": "Ringmaster ASGD (Maranjyan et al. 2025); no default R: ours, 2λ",
    "dc_asgd": "DC-ASGD (Zheng et al., ICML 2017); MXNet's default λ",
    "dc_asgd_adaptive": "DC-ASGD-a (Zheng et al., ICML 2017), the paper's setting",
    "gap_aware": "Gap-Aware (Barkai et al., ICLR 2020); β, ε of the authors' group's code",
    SSGD: "hardsync, c = λ (the baseline)",
    SSP: "Stale Synchronous Parallel (Ho et al., NIPS 2013), plain SGD",
}
SCALED_SOURCE = "at α0/λ: SSGD's step per example, the linear-scaling rule (Goyal et al. 2017)"


def base_name(name: str) -> str:
  """The rule a row runs: ``constant`` for both ``constant`` and ``constant-lr_over_lambda``."""
  return name[:-len(LR_OVER_LAMBDA)] if name.endswith(LR_OVER_LAMBDA) else name


def row_label(name: str) -> str:
  """What the page calls a row: its name, or ``constant (α0/λ)`` for ``constant-lr_over_lambda``."""
  return name if base_name(name) == name else f"{base_name(name)} (α0/λ)"


def source_text(name: str) -> str:
  """Where a row's constants (and, for an α0/λ row, its step) come from."""
  source = SOURCES.get(base_name(name), "see sajax/policies.py")
  return source if base_name(name) == name else f"{source}; {SCALED_SOURCE}"


# ---- the numbers (pure) -----------------------------------------------------------------------------------
def mean_curve(histories: Sequence[Sequence[dict]]) -> list[tuple[float, float]]:
  """(simulated time, test error in %) per evaluation, each the mean over the runs, up to the shortest run's
  last evaluation (runs without any are left out)."""
  runs = [h for h in histories if h]
  length = min((len(h) for h in runs), default=0)
  return [(statistics.fmean(h[j]["sim_time"] for h in runs), 100 * statistics.fmean(h[j]["test_error"] for h in runs))
          for j in range(length)]


def error_at(curve: Sequence[tuple[float, float]], t: float) -> Optional[float]:
  """The curve's test error at simulated time ``t``, linear between evaluations; None outside the curve."""
  for (t0, e0), (t1, e1) in zip(curve, curve[1:]):
    if t0 <= t <= t1:
      return e0 + (e1 - e0) * (t - t0) / (t1 - t0) if t1 > t0 else e1
  return curve[0][1] if len(curve) == 1 and curve[0][0] == t else None


def dropped_fraction(finals: Sequence[dict]) -> Optional[float]:
  """Dropped gradients (non-finite or refused for their σ) over all pushed, summed over runs; None when no run
  recorded its pushes (each diverged before its first evaluation)."""
  dropped = sum(f.get("gradients_dropped", 0) + f.get("gradients_stale_dropped", 0) for f in finals)
  accepted = sum(sum(f.get("staleness_histogram", {}).values()) for f in finals)
  return dropped / (dropped + accepted) if dropped + accepted else None


def summarize(runs: Sequence[tuple[PolicyCell, dict, list[dict]]], points: float = TARGET_POINTS,
              classes: int = CLASSES, waiting: Sequence[PolicyCell] = ()) -> dict:
  """Per (profile, variant name): final test error in % over the seeds that trained (mean, sd, 95 % half-width,
  per seed; None when none did), each seed's outcome and their counts (collapsed, diverged, ...), the times to
  the profile's SSGD target per seed (None: never reached it, censored), their censored median and how many
  reached it, ⟨σ⟩ (mean over seeds), max σ, the fraction dropped, and the histories (all; the trained seeds'
  apart, for mean curves), and ``waiting``: how many of its cells in ``waiting`` (not run yet) it has; a row with
  only waiting cells has ``seeds`` 0 and no numbers. Plus per profile ``(profile, None)``: the target (SSGD's mean
  final error over its trained seeds + ``points``), None without a trained SSGD seed."""
  groups: dict[tuple[str, str], list[tuple[PolicyCell, dict, list[dict]]]] = {}
  for cell, final, history in runs:
    groups.setdefault((cell.profile, cell.variant.name), []).append((cell, final, history))
  out: dict = {}
  for (profile, name), rs in groups.items():
    outcome = {c.seed: outcome_of(f, classes) for c, f, _ in rs}
    trained = [(c.seed, 100 * f["test_error"], h) for c, f, h in rs if outcome[c.seed] == TRAINED]
    stats = mean_sd([e for _, e, _ in trained]) if trained else None
    out[(profile, name)] = {
        "variant": rs[0][0].variant, "error": stats, "half": half_width(stats[1], len(trained)) if stats else None,
        "by_seed": {s: e for s, e, _ in trained}, "seeds": len(rs), "outcome_by_seed": outcome,
        "outcomes": count_outcomes(outcome.values()), **_staleness([f for _, f, _ in rs]),
        "dropped": dropped_fraction([f for _, f, _ in rs]), "histories": [h for _, _, h in rs],
        "trained_histories": [h for _, _, h in trained], "waiting": 0}
  for cell in waiting:
    row = out.setdefault((cell.profile, cell.variant.name), {
        "variant": cell.variant, "error": None, "half": None, "by_seed": {}, "seeds": 0, "outcome_by_seed": {},
        "outcomes": {}, "sigma_mean": None, "sigma_max": None, "dropped": None, "histories": [],
        "trained_histories": [], "waiting": 0})
    row["waiting"] += 1
  for profile in {p for p, _ in out}:
    ssgd = out.get((profile, SSGD))
    target = ssgd["error"][0] + points if ssgd and ssgd["by_seed"] else None
    out[(profile, None)] = target
    for (p, name), s in list(out.items()):
      if p == profile and name is not None:
        s["times"] = [time_to_target(h, target) for h in s["histories"]] if target is not None else []
        s["time"] = censored_median(s["times"])
        s["reached"] = sum(t is not None for t in s["times"])
  return out


def _staleness(finals: Sequence[dict]) -> dict:
  """⟨σ⟩ (mean over runs) and max σ of the runs that evaluated at least once (None if none did)."""
  seen = [f for f in finals if "staleness_mean" in f]
  if not seen:
    return {"sigma_mean": None, "sigma_max": None}
  return {"sigma_mean": statistics.fmean(f["staleness_mean"] for f in seen),
          "sigma_max": max(f["staleness_max"] for f in seen)}


def failed(s: dict) -> int:
  """How many seeds of the row ``s`` collapsed or diverged (a row with any is compared with no row)."""
  return len(failed_seeds(s))


def comparable(s: dict) -> bool:
  """Whether the row ``s`` enters the family of comparisons: no seed collapsed or diverged, none still waiting."""
  return not failed(s) and not s.get("waiting")


def comparisons(summary: dict) -> dict[tuple[str, str, str], dict]:
  """The family of paired comparisons the report makes: per profile, every pair of rows (a, b) with a < b by
  name, neither with a collapsed or diverged seed nor a seed waiting for its run (:func:`comparable`), and at
  least two seeds both trained; each the paired difference a − b (:func:`launch.seed_stats.paired_difference`,
  with its two-sided t-test p-value) plus ``p_holm``, its Holm–Bonferroni adjusted p-value over the whole family
  (every profile)."""
  rows = {key: s for key, s in summary.items() if key[1] is not None and comparable(s)}
  family = {}
  for (pa, a), (pb, b) in itertools.combinations(sorted(rows), 2):
    if pa == pb and len(set(rows[(pa, a)]["by_seed"]) & set(rows[(pb, b)]["by_seed"])) >= 2:
      family[(pa, a, b)] = paired_difference(rows[(pa, a)], rows[(pb, b)])
  for diff, p in zip(family.values(), holm([d["p"] for d in family.values()])):
    diff["p_holm"] = p
  return family


def better(family: dict, profile: str, a: str, b: str) -> bool:
  """Whether row ``a`` is decidedly better (lower error) than ``b``: their comparison's Holm-adjusted p-value
  is at most α = 0.05 and the paired difference a − b is below 0."""
  key, sign = ((profile, a, b), 1) if a < b else ((profile, b, a), -1)
  diff = family.get(key)
  return diff is not None and diff["p_holm"] <= ALPHA and sign * diff["mean"] < 0


def rank(summary: dict, profile: str, family: Optional[dict] = None) -> list[dict]:
  """The rows of ``profile`` by final error over their trained seeds (rows with a collapsed or diverged seed
  after the others, rows with seeds still waiting after those), each with ``better_than``: the rows it is
  decidedly better than (:func:`better`), and ``vs_ssgd``: the paired difference this − SSGD with ``decided``
  (better, worse, undecided; None for a row compared with none: a collapsed or diverged seed, or a seed waiting,
  in it or in SSGD) and ``p_holm``. ``family``: :func:`comparisons` (default: of ``summary``)."""
  family = comparisons(summary) if family is None else family
  rows = [s for (p, name), s in summary.items() if p == profile and name is not None]
  rows.sort(key=lambda s: (s["waiting"] > 0, failed(s) > 0, s["error"][0] if s["by_seed"] else float("inf"),
                           s["variant"].name))
  ssgd = summary.get((profile, SSGD))
  out = []
  for s in rows:
    name = s["variant"].name
    row = {**s, "better_than": [o["variant"].name for o in rows if better(family, profile, name, o["variant"].name)],
           "vs_ssgd": None}
    if ssgd and name != SSGD and set(s["by_seed"]) & set(ssgd["by_seed"]):
      key = (profile, *sorted((name, SSGD)))
      tested = family.get(key)
      decided = (None if tested is None and not (comparable(s) and comparable(ssgd)) else
                 "better" if better(family, profile, name, SSGD) else
                 "worse" if better(family, profile, SSGD, name) else "undecided")
      row["vs_ssgd"] = {**paired_difference(s, ssgd), "decided": decided,
                        "p_holm": tested["p_holm"] if tested else None}
    out.append(row)
  return out


# ---- the report ---------------------------------------------------------------------------------------------
def _time_text(s: dict, ssgd: Optional[dict]) -> tuple[str, str]:
  if not s.get("times"):
    return "–", "–"
  counts = f"{s['reached']} of {s['seeds']} reached"
  if s["time"] is None:
    return ("not reached" if not s["reached"] else "–") + f" ({counts})", "–"
  ratio = f"{ssgd['time'] / s['time']:.2f}×" if ssgd and ssgd.get("time") and s["variant"].name != SSGD else "–"
  return f"{s['time']:.1f} ({counts})", ratio


def _number(value, spec: str) -> str:
  """``value`` formatted with ``spec``, or '–' when it is None (a run that diverged before evaluating)."""
  return "–" if value is None else format(value, spec)


def _vs_text(v: Optional[dict]) -> str:
  if v is None:
    return "–"
  text = f"{v['mean']:+.2f}" + (f" ± {v['half']:.2f}" if v["half"] is not None else "")
  if v["p_holm"] is None:
    return text + (" (not compared)" if v["decided"] is None else "")
  return text + f" ({v['decided'] + ', ' if v['decided'] != 'undecided' else ''}Holm p = {v['p_holm']:.2g})"


def row_error_text(s: dict) -> str:
  """A row's test error (:func:`launch.reproduce_report.error_text`), 'waiting (0 of 3 seeds)' when none of its
  seeds has run, and '…; 2 of 3 seeds waiting' when some have not."""
  if not s["seeds"]:
    return f"waiting (0 of {s['waiting']} seeds)"
  waiting = s.get("waiting", 0)
  return error_text(s) + (f"; {waiting} of {s['seeds'] + waiting} seeds waiting" if waiting else "")


def table_lines(rows: Sequence[dict], constants: dict, ssgd: Optional[dict], missing: Sequence[str] = ()) -> list[str]:
  """The ranking table of one profile (a row none of whose seeds has run has no rank); ``missing``: rows not run
  (SSP without its protocol)."""
  lines = ["| rank | row | constants | test error % | − SSGD (paired) | decidedly better than | time to target | "
           "SSGD time ÷ | ⟨σ⟩ | max σ | dropped |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  for i, s in enumerate(rows, 1):
    name = s["variant"].name
    time_text, ratio = _time_text(s, ssgd)
    dropped = "–" if s["dropped"] is None else f"{100 * s['dropped']:.1f} %"
    lines.append(f"| {i if s['seeds'] else '–'} | **{row_label(name)}** | {constants.get(name, '')} | "
                 f"{row_error_text(s)} | {_vs_text(s['vs_ssgd'])} | "
                 f"{', '.join(map(row_label, s['better_than'])) or '–'} | {time_text} | {ratio} | "
                 f"{_number(s['sigma_mean'], '.1f')} | {_number(s['sigma_max'], 'd')} | {dropped} |")
  lines += [f"| – | **{row_label(name)}** | {constants.get(name, '')} | {NOT_RUN} | | | | | | | |"
            for name in missing]
  return lines


def equal_time_lines(rows: Sequence[dict], ssgd: Optional[dict]) -> list[str]:
  """A sentence: when the async rows' runs end (mean simulated time of their last evaluations) and SSGD's mean
  test error (over its trained seeds) at that time, against the best async row's final error."""
  ends = [h[-1]["sim_time"] for s in rows if s["variant"].name != SSGD for h in s["histories"] if h]
  curve = mean_curve(ssgd["trained_histories"]) if ssgd else []
  error = error_at(curve, statistics.fmean(ends)) if ends and curve else None
  if error is None:
    return []
  best = next((s for s in rows if s["variant"].name != SSGD and s["by_seed"]), None)
  return [f"Equal simulated time: the async runs end at ≈ {statistics.fmean(ends):.0f} s; SSGD's mean test error "
          f"then is {error:.1f} %" + (f" (the best async row, {row_label(best['variant'].name)}, ends at "
          f"{best['error'][0]:.2f} %)" if best else "") + f"; SSGD ends at {curve[-1][0]:.0f} s with "
          f"{curve[-1][1]:.2f} %.", ""]


def render_markdown(summary: dict, *, profiles: Sequence[str], constants: dict, command: str, note: str,
                    setting: str, seeds: Sequence[int], wall_s: float, figure: str,
                    runs: Sequence[tuple[str, dict]], missing: Sequence[str] = (), trained: int = 0,
                    classes: int = CLASSES, alphas: Optional[dict] = None, waiting: int = 0) -> str:
  """docs/policies.md: the note (why this setting), the command, one ranking table per profile, the constants
  (``constants``; ``alphas``: each row's step) and their sources, the figure, the time and load, and every run
  (``runs``: those done; ``waiting``: how many of the command's runs are not)."""
  lines = ["# Staleness policies ranked: async λ = 30 under slow learners (simulated)", "",
           NOTE_START, note, NOTE_END, "",
           "Written by `launch/compare_policies.py`; every number below comes from this command (each run is in "
           "`<root>/<run>/`: `config.json`, `metrics.jsonl`, `final.json`):", "", "```bash", command, "```", "",
           setting, ""]
  family = comparisons(summary)
  decided = [key for key, d in family.items() if d["p_holm"] <= ALPHA]
  lines += [
      f"**Multiple comparisons.** The page makes {len(family)} paired comparisons: every pair of rows of a profile "
      "(both profiles together) neither of which has a collapsed or diverged seed (nor a seed still waiting for "
      "its run), each a two-sided paired t test of the difference in final test error over the seeds both "
      f"trained. A pair is decided only where its Holm–Bonferroni adjusted p-value over all {len(family)} is at "
      f"most {ALPHA:.2g} (a family-wise error rate of 5 %): {len(decided)} of the {len(family)} are. The family "
      "grows with the rows the page reports (the rules at α0/λ add their pairs once their seeds are in), and a "
      "larger family asks a smaller p-value of each pair. The ± intervals are each comparison's own 95 % "
      f"interval, not adjusted. {outcome_rule(classes)} A row with such a seed is ranked after the others and "
      "compared with none.", ""]
  if waiting:
    lines += [f"**Partial grid.** {waiting} of the command's {waiting + len(runs)} runs are not done yet: this "
              "page was written from the runs done so far (`--report-only`). A row with seeds still waiting "
              "says how many, averages only the runs it has, is ranked after the rows whose seeds are all in and "
              "is compared with none: the family above counts only the pairs that can be decided now.", ""]
  for profile in profiles:
    target = summary.get((profile, None))
    ssgd = summary.get((profile, SSGD))
    rows = rank(summary, profile, family)
    lines += [f"## Profile `{profile}`", ""]
    if not rows:
      lines += ["No run of this profile.", ""]
      continue
    here = sum(key[0] == profile for key in family)
    lines += [(f"SSGD target: {target:.2f} % test error (SSGD's mean final error + {TARGET_POINTS} point)."
               if target is not None else "No SSGD run trained: no target.")
              + f" {sum(key[0] == profile for key in decided)} of this profile's {here} comparisons are decided.", ""]
    lines += table_lines(rows, constants, ssgd, missing) + [""] + equal_time_lines(rows, ssgd)
  evals = sorted(len(h) for s in summary.values() if isinstance(s, dict) for h in s["histories"] if h)
  evaluated = "" if not evals else f" (the runs here evaluated {evals[0]}" + (
      f" to {evals[-1]}" if evals[-1] != evals[0] else "") + " times)"
  lines += [
      "Columns: final test error, mean ± half-width of the 95 % Student-t interval over the trained seeds; − SSGD: "
      "the mean of the paired differences row − SSGD (same seed) with its 95 % interval and Holm-adjusted p-value, "
      "*better*/*worse* only where that p-value is at most 0.05; *decidedly better than*: the rows this one beats "
      f"by the same rule (no verdict anywhere else: the order of the other rows is within the noise of "
      f"{len(seeds)} seeds); time to target: simulated seconds (a learner of factor 1 takes 1 s per gradient) "
      "until the test error first reaches the target, linear between the last evaluation above it and the first "
      f"at or below it{evaluated}; the median over all seeds, a seed that never reached it counting as slower "
      "than any that did (no median when half or more never did), and how many reached it; SSGD time ÷: SSGD's "
      "median time over this "
      "row's (above 1: faster than SSGD); ⟨σ⟩: mean staleness of the accepted gradients (mean over seeds), max σ "
      "over all seeds; dropped: gradients refused for their σ or non-finite, over all pushed.", "", "## Constants",
      "", "| row | α | constants | from |", "|---|---|---|---|"]
  lines += [f"| {row_label(name)} | {(alphas or {}).get(name, '')} | {c} | {source_text(name)} |"
            for name, c in constants.items()]
  total = sum(f.get("wall_s", 0.0) for _, f in runs)
  loads = [f["load_avg_1min"] for _, f in runs if "load_avg_1min" in f]
  lines += ["", "## Time and load", "",
            f"The {len(runs)} runs trained for {total:.0f} s in all ({total / 60:.1f} min of their `wall_s`)"
            + (f"; {waiting} more wait for their runs" if waiting else "") + "; "
            + (f"the invocation that wrote this page trained {trained} of them in {wall_s:.0f} s (runs already "
               "done are not rerun)." if trained else "the invocation that wrote this page trained none of them "
               f"({'`--report-only`' if waiting else 'all were done'}) and only wrote the report.")
            + (f" The machine's 1-minute load average when each run ended: {min(loads):.1f} to {max(loads):.1f} "
               f"(median {statistics.median(loads):.1f}) on {runs[0][1].get('cpu_count')} cores, shared with "
               "other jobs." if loads else ""), "", "## Test error against simulated time", "",
            f"![test error against simulated time]({figure})", "", "## Every run", "",
            "| run (folder under the root) | test error % | ⟨σ⟩ | max σ | dropped | sim time | training wall |",
            "|---|---|---|---|---|---|---|"]
  for name, f in runs:
    error = run_error_text(f, classes)
    lines.append(f"| `{name}` | {error} | {_number(f.get('staleness_mean'), '.2f')} | "
                 f"{_number(f.get('staleness_max'), 'd')} | "
                 f"{f.get('gradients_dropped', 0) + f.get('gradients_stale_dropped', 0)} | "
                 f"{_number(f.get('sim_time'), '.0f')} | {f.get('wall_s', 0.0):.0f} s |")
  return "\n".join(lines) + "\n"


def plot_error_vs_time(summary: dict, profiles: Sequence[str], path: str) -> str:
  """One panel per profile: test error (mean over seeds per evaluation) against simulated time (mean over seeds),
  one line per row, SSGD in black, the target dotted."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker
  fig, axes = plt.subplots(1, len(profiles), figsize=(6.5 * len(profiles), 4.6), squeeze=False)
  styles = ["-", "--", "-.", ":"]
  for ax, profile in zip(axes[0], profiles):
    rows = [s for (p, name), s in sorted(summary.items(), key=lambda kv: str(kv[0]))
            if p == profile and name and s["seeds"]]             # a row still waiting for every seed: no line
    for i, s in enumerate(sorted(rows, key=lambda s: s["variant"].name)):
      curve = mean_curve(s["trained_histories"])
      if not curve:
        continue
      times, errors = zip(*curve)
      name = s["variant"].name
      style = dict(color="k", linewidth=2.2) if name == SSGD else dict(color=f"C{i % 10}",
                                                                     linestyle=styles[i // 10 % 4])
      ax.plot(times, errors, marker=".", label=row_label(name), **style)
    target = summary.get((profile, None))
    if target is not None:
      ax.axhline(target, color="grey", linestyle=":", label=f"SSGD target {target:.1f} %")
    ax.set(xscale="log", yscale="log", xlabel="simulated time (s, log)", ylabel="test error (%, log)",
           title=f"profile {profile}")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:        # a grid with no run done yet has no line
      ax.legend(fontsize=7, ncol=2)
  save_figure(fig, path)
  plt.close(fig)
  return path
