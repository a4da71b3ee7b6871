"""launch/compare_policies.py's numbers and report: the ranking of the staleness policies (issue #11).

Pure functions over finished runs (``(cell, final.json, metrics history)``, a cell being compare_policies's
``PolicyCell``): per profile and row, the final test error over seeds (mean, 95 % Student-t half-width), the
paired difference against SSGD (same seed) and which rows are *decidedly* better than which (the interval of
their paired differences wholly on one side of 0), the simulated time to the SSGD target (SSGD's mean final
error + :data:`TARGET_POINTS`), ⟨σ⟩, max σ and the fraction of gradients dropped; then docs/policies.md and its
figure of test error against simulated time.
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING, Optional, Sequence

from launch.grid_runner import outcome_counts, unfinished
from launch.reproduce import P4_POINTS
from launch.reproduce_report import (NOTE_END, NOTE_START, error_text, half_width, mean_sd, paired_difference,
                                     save_figure, verdict)

if TYPE_CHECKING:
  from launch.compare_policies import PolicyCell

TARGET_POINTS = P4_POINTS  # the target: SSGD's final error + 0.5 point
EVALS = 10                          # evaluations per run: the resolution of the time to target
SSGD, SSP = "ssgd", "ssp"
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


# ---- the numbers (pure) -----------------------------------------------------------------------------------
def time_to_target(history: Sequence[dict], target: float) -> Optional[float]:
  """Simulated time of the first evaluation whose test error (in %) is at or below ``target``; None if none."""
  for r in history:
    if r.get("test_error") is not None and 100 * r["test_error"] <= target + 1e-9:
      return float(r["sim_time"])
  return None


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


def summarize(runs: Sequence[tuple[PolicyCell, dict, list[dict]]], points: float = TARGET_POINTS) -> dict:
  """Per (profile, variant name): final test error in % over the seeds that did not diverge (mean, sd, 95 %
  half-width, per seed), diverged seeds, the time to the profile's SSGD target (mean over seeds that reached it,
  how many did), ⟨σ⟩ (mean over seeds), max σ, the fraction dropped, and the histories. Plus per profile
  ``(profile, None)``: the target (SSGD's mean final error + ``points``), None without SSGD runs."""
  groups: dict[tuple[str, str], list[tuple[PolicyCell, dict, list[dict]]]] = {}
  for cell, final, history in runs:
    groups.setdefault((cell.profile, cell.variant.name), []).append((cell, final, history))
  out: dict = {}
  for (profile, name), rs in groups.items():
    finished = [(c.seed, 100 * f["test_error"]) for c, f, _ in rs if f.get("test_error") is not None]
    errors = [e for _, e in finished]
    stats = mean_sd(errors) if errors else (math.nan, 0.0)
    out[(profile, name)] = {
        "variant": rs[0][0].variant, "error": stats, "half": half_width(stats[1], len(errors)) if errors else None,
        "by_seed": dict(finished), "seeds": len(rs), "diverged": sum(unfinished(f) == "diverged" for _, f, _ in rs),
        "outcomes": outcome_counts([f for _, f, _ in rs]),
        **_staleness([f for _, f, _ in rs]),
        "dropped": dropped_fraction([f for _, f, _ in rs]), "histories": [h for _, _, h in rs]}
  for profile in {p for p, _ in groups}:
    ssgd = out.get((profile, SSGD))
    target = ssgd["error"][0] + points if ssgd and ssgd["by_seed"] else None
    out[(profile, None)] = target
    for (p, name), s in list(out.items()):
      if p == profile and name is not None:
        times = [time_to_target(h, target) for h in s["histories"]] if target is not None else []
        reached = [t for t in times if t is not None]
        s["time"] = statistics.fmean(reached) if reached else None
        s["reached"] = len(reached)
  return out


def _staleness(finals: Sequence[dict]) -> dict:
  """⟨σ⟩ (mean over runs) and max σ of the runs that evaluated at least once (None if none did)."""
  seen = [f for f in finals if "staleness_mean" in f]
  if not seen:
    return {"sigma_mean": None, "sigma_max": None}
  return {"sigma_mean": statistics.fmean(f["staleness_mean"] for f in seen),
          "sigma_max": max(f["staleness_max"] for f in seen)}


def rank(summary: dict, profile: str) -> list[dict]:
  """The rows of ``profile`` by final error (rows with a diverged seed last), each with ``better_than``: the rows
  it is decidedly better than (the 95 % interval of the paired differences other − this lies above 0), and
  ``vs_ssgd``: the paired difference this − SSGD with ``decided`` (better, worse, or undecided)."""
  rows = [s for (p, name), s in summary.items() if p == profile and name is not None]
  rows.sort(key=lambda s: (s["diverged"] > 0, s["error"][0] if s["by_seed"] else math.inf, s["variant"].name))
  ssgd = summary.get((profile, SSGD))
  out = []
  for s in rows:
    name = s["variant"].name
    beats = [o["variant"].name for o in rows if o is not s and _decides(o, s)]
    row = {**s, "better_than": beats, "vs_ssgd": None}
    if ssgd and name != SSGD and set(s["by_seed"]) & set(ssgd["by_seed"]):
      decided = "worse" if _decides(s, ssgd) else "better" if _decides(ssgd, s) else "undecided"
      row["vs_ssgd"] = {**paired_difference(s, ssgd), "decided": decided}
    out.append(row)
  return out


def _decides(worse: dict, better: dict) -> bool:
  """Whether the 95 % interval of the paired differences worse − better (seeds both finished, at least two) lies
  wholly above 0."""
  if len(set(worse["by_seed"]) & set(better["by_seed"])) < 2:
    return False
  return verdict(paired_difference(worse, better), 0.0) == "worse"


# ---- the report ---------------------------------------------------------------------------------------------
def _time_text(s: dict, ssgd: Optional[dict]) -> tuple[str, str]:
  if s.get("time") is None:
    return "not reached", "–"
  part = "" if s["reached"] == s["seeds"] else f" ({s['reached']} of {s['seeds']} seeds)"
  ratio = f"{ssgd['time'] / s['time']:.2f}×" if ssgd and ssgd.get("time") and s["variant"].name != SSGD else "–"
  return f"{s['time']:.1f}{part}", ratio


def _number(value, spec: str) -> str:
  """``value`` formatted with ``spec``, or '–' when it is None (a run that diverged before evaluating)."""
  return "–" if value is None else format(value, spec)


def table_lines(rows: Sequence[dict], constants: dict, ssgd: Optional[dict], missing: Sequence[str] = ()) -> list[str]:
  """The ranking table of one profile; ``missing``: rows not run (SSP without its protocol)."""
  lines = ["| rank | row | constants | test error % | − SSGD (paired) | decidedly better than | time to target | "
           "SSGD time ÷ | ⟨σ⟩ | max σ | dropped |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  for i, s in enumerate(rows, 1):
    name = s["variant"].name
    # error_text says '(k of n diverged)' when some seeds finished; a row with none gets the counts here
    error = error_text(s) if s["by_seed"] else "– (" + ", ".join(
        f"{word} in {k} of {s['seeds']} seeds" for word, k in s["outcomes"].items()) + ")"
    v = s["vs_ssgd"]
    vs = "–" if v is None else f"{v['mean']:+.2f}" + (f" ± {v['half']:.2f}" if v["half"] is not None else "") + (
        f" ({v['decided']})" if v["decided"] != "undecided" else "")
    time_text, ratio = _time_text(s, ssgd)
    dropped = "–" if s["dropped"] is None else f"{100 * s['dropped']:.1f} %"
    lines.append(f"| {i} | **{name}** | {constants.get(name, '')} | {error} | {vs} | "
                 f"{', '.join(s['better_than']) or '–'} | {time_text} | {ratio} | "
                 f"{_number(s['sigma_mean'], '.1f')} | {_number(s['sigma_max'], 'd')} | {dropped} |")
  lines += [f"| – | **{name}** | {constants.get(name, '')} | {NOT_RUN} | | | | | | | |" for name in missing]
  return lines


def equal_time_lines(rows: Sequence[dict], ssgd: Optional[dict]) -> list[str]:
  """A sentence: when the async rows' runs end (mean simulated time of their last evaluations) and SSGD's mean
  test error at that time, against the best async row's final error."""
  ends = [h[-1]["sim_time"] for s in rows if s["variant"].name != SSGD for h in s["histories"] if h]
  curve = mean_curve(ssgd["histories"]) if ssgd else []
  error = error_at(curve, statistics.fmean(ends)) if ends and curve else None
  if error is None:
    return []
  best = next((s for s in rows if s["variant"].name != SSGD and s["by_seed"]), None)
  return [f"Equal simulated time: the async runs end at ≈ {statistics.fmean(ends):.0f} s; SSGD's mean test error "
          f"then is {error:.1f} %" + (f" (the best async row, {best['variant'].name}, ends at "
          f"{best['error'][0]:.2f} %)" if best else "") + f"; SSGD ends at {curve[-1][0]:.0f} s with "
          f"{curve[-1][1]:.2f} %.", ""]


def render_markdown(summary: dict, *, profiles: Sequence[str], constants: dict, command: str, note: str,
                    setting: str, seeds: Sequence[int], wall_s: float, figure: str,
                    runs: Sequence[tuple[str, dict]], missing: Sequence[str] = (), trained: int = 0) -> str:
  """docs/policies.md: the note (why this setting), the command, one ranking table per profile, the constants
  and their sources, the figure, the time and load, and every run."""
  lines = ["# Staleness policies ranked: async λ = 30 under slow learners (simulated)", "",
           NOTE_START, note, NOTE_END, "",
           "Written by `launch/compare_policies.py`; every number below comes from this command (each run is in "
           "`<root>/<run>/`: `config.json`, `metrics.jsonl`, `final.json`):", "", "```bash", command, "```", "",
           setting, ""]
  for profile in profiles:
    target = summary.get((profile, None))
    ssgd = summary.get((profile, SSGD))
    rows = rank(summary, profile)
    lines += [f"## Profile `{profile}`", ""]
    if not rows:
      lines += ["No run of this profile.", ""]
      continue
    lines += [f"SSGD target: {target:.2f} % test error (SSGD's mean final error + {TARGET_POINTS} point)."
              if target is not None else "No SSGD run: no target.", ""]
    lines += table_lines(rows, constants, ssgd, missing) + [""] + equal_time_lines(rows, ssgd)
  lines += [
      "Columns: final test error, mean ± half-width of the 95 % Student-t interval over seeds; − SSGD: the mean "
      "of the paired differences row − SSGD (same seed) with its interval, *(better)*/*(worse)* only where the "
      "interval excludes 0; *decidedly better than*: the rows whose paired differences with this one have an "
      "interval wholly above 0 (no verdict anywhere else: the order of the other rows is within the noise of "
      f"{len(seeds)} seeds); time to target: simulated seconds (a learner of factor 1 takes 1 s per gradient) "
      f"to the first of the {EVALS} evaluations at or below the target, mean over the seeds that reached it; "
      "SSGD time ÷: SSGD's time to the target over this row's (above 1: faster than SSGD); ⟨σ⟩: mean staleness "
      "of the accepted gradients (mean over seeds), max σ over all seeds; dropped: gradients refused for their "
      "σ or non-finite, over all pushed.", "", "## Constants", "", "| row | constants | from |", "|---|---|---|"]
  lines += [f"| {name} | {c} | {SOURCES.get(name, 'see sajax/policies.py')} |" for name, c in constants.items()]
  total = sum(f.get("wall_s", 0.0) for _, f in runs)
  loads = [f["load_avg_1min"] for _, f in runs if "load_avg_1min" in f]
  lines += ["", "## Time and load", "",
            f"The {len(runs)} runs trained for {total:.0f} s in all ({total / 60:.1f} min of their `wall_s`); "
            + (f"the invocation that wrote this page trained {trained} of them in {wall_s:.0f} s (runs already "
               "done are not rerun)." if trained else "the invocation that wrote this page trained none of them "
               "(all were done) and only wrote the report.")
            + (f" The machine's 1-minute load average when each run ended: {min(loads):.1f} to {max(loads):.1f} "
               f"(median {statistics.median(loads):.1f}) on {runs[0][1].get('cpu_count')} cores, shared with "
               "other jobs." if loads else ""), "", "## Test error against simulated time", "",
            f"![test error against simulated time]({figure})", "", "## Every run", "",
            "| run (folder under the root) | test error % | ⟨σ⟩ | max σ | dropped | sim time | training wall |",
            "|---|---|---|---|---|---|---|"]
  for name, f in runs:
    error = unfinished(f) or f"{100 * f['test_error']:.2f}"
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
    rows = [s for (p, name), s in sorted(summary.items(), key=lambda kv: str(kv[0])) if p == profile and name]
    for i, s in enumerate(sorted(rows, key=lambda s: s["variant"].name)):
      curve = mean_curve(s["histories"])
      if not curve:
        continue
      times, errors = zip(*curve)
      name = s["variant"].name
      style = dict(color="k", linewidth=2.2) if name == SSGD else dict(color=f"C{i % 10}",
                                                                     linestyle=styles[i // 10 % 4])
      ax.plot(times, errors, marker=".", label=name, **style)
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
    ax.legend(fontsize=7, ncol=2)
  save_figure(fig, path)
  plt.close(fig)
  return path
