"""Rows of a declared grid against a reference row: what each row's seeds became, how far from the reference, how
soon they reached its error + a margin. Shared by launch/momentum_remedies_report.py and launch/local_sgd_report.py.

Pure functions of the runs, each ``(cell, final record or None when not done, metrics history)``; a caller says
how cells group into rows (``key``, a tuple) and which group is the reference (SSGD in both pages). The statistics
are launch/seed_stats.py's, through launch/reproduce_report.py's :func:`aggregate` (mean and 95 % Student-t
interval over the trained seeds, a collapsed or diverged seed counted apart) and :func:`p4_verdicts` (the paired
difference row − reference over the seeds both trained, its verdict against +points, the power statement);
:func:`verdicts` adds each one's Holm-adjusted decision over the page's family of such tests. The *to target*
measures are any metric that grows through a run (``sim_time``, ``bytes_moved``): its value when the test error
first reaches the target, linear between evaluations (:func:`launch.seed_stats.time_to_target`), and the median
over seeds with those that never reached it censored (:func:`launch.seed_stats.censored_median`).
"""

from __future__ import annotations

import statistics
from typing import Callable, Optional, Sequence

from launch.reproduce_report import aggregate, p4_verdicts
from launch.seed_stats import ALPHA, MAX_SEEDS, POWER, censored_median, holm, t_test_p, time_to_target

SIM_TIME = "sim_time"


def summarize(runs: Sequence[tuple], classes: int, *, key: Callable[[object], tuple], reference: tuple,
              points: float, measures: Sequence[str] = (SIM_TIME,)) -> dict:
  """Per group ``key(cell)``, in run order: ``cells`` (runs declared), ``done`` (final.json written, a timed-out
  run not), ``agg`` (:func:`aggregate` of the done runs; None when none is), ``histories`` (done runs) and
  ``trained_histories``; then ``target`` (the ``reference`` group's mean final error in % over its trained seeds
  + ``points``; None without one) and per group ``to_target[m]`` for each m of ``measures``: ``values`` (one per
  done run, None: never reached the target), their censored ``median`` and how many ``reached`` it."""
  out: dict = {}
  for cell, final, history in runs:
    g = out.setdefault(key(cell), {"cells": 0, "finals": [], "histories": [], "trained_histories": []})
    g["cells"] += 1
    if final is not None:     # aggregate keys on (λ, n, policy): one group here, whatever the cells' fields
      g["finals"].append({**final, "cell": {"learners": 0, "n": 0, "policy": "", "seed": cell.seed}})
      g["histories"].append(history)
  for g in out.values():
    g["done"] = sum(not f.get("timed_out") for f in g["finals"])     # a timed-out run is to be resumed
    g["agg"] = next(iter(aggregate(g["finals"], classes).values())) if g["finals"] else None
    if g["agg"]:
      trained = set(g["agg"]["by_seed"])
      g["trained_histories"] = [h for f, h in zip(g["finals"], g["histories"]) if f["cell"]["seed"] in trained]
  ref = out.get(reference, {}).get("agg")
  target = ref["error"][0] + points if ref and ref["by_seed"] else None
  for g in out.values():
    g["to_target"] = {}
    for m in measures:
      values = [time_to_target(h, target, m) for h in g["histories"]] if target is not None else []
      g["to_target"][m] = {"values": values, "median": censored_median(values),
                           "reached": sum(v is not None for v in values)}
  return {"groups": out, "target": target, "reference": reference}


def verdicts(summaries: Sequence[dict], points: float) -> dict:
  """Per (index of the summary, *group key) of every non-reference group with a done run and a done reference
  run: the verdict of :func:`launch.reproduce_report.p4_verdicts` (group − reference, paired, against +points),
  plus ``p`` (the two-sided paired t test of the difference against +points; None where no test: one pair, or a
  collapsed/diverged seed), ``p_holm`` (Holm over every tested group of ``summaries``, the page's family) and
  ``holm`` (within or worse where p_holm ≤ 0.05, else undecided; a group not tested keeps its verdict)."""
  out = {}
  for index, s in enumerate(summaries):
    ref = s["groups"].get(s["reference"], {}).get("agg")
    for k, g in s["groups"].items():
      if k == s["reference"] or g["agg"] is None or ref is None:
        continue
      v = p4_verdicts({(1, 1, "inverse"): g["agg"], (1, 0, "ssgd"): ref}, points)[0]   # keys: any one λ
      tested = v["delta"] is not None and v["pairs"] > 1 and not v["failed"]
      v["p"] = t_test_p(v["delta"], v["sd"], v["pairs"], null=points) if tested else None
      out[(index, *k)] = v
  family = [v for v in out.values() if v["p"] is not None]
  for v, p in zip(family, holm([v["p"] for v in family])):
    v["p_holm"] = p
    v["holm"] = ("within" if v["delta"] < points else "worse") if p <= ALPHA else "undecided"
  for v in out.values():
    v.setdefault("p_holm", None)
    v.setdefault("holm", v["verdict"])
  return out


def time_to_go(walls: Sequence[float], to_go: int, finished: str = "runs") -> str:
  """The sentence of a grid report's progress that estimates the time left: the median training time of the
  finished runs (a run paused or slowed by a loaded machine moves it less than it moves the mean) times the runs
  to go. Empty when nothing finished or nothing is left."""
  if not walls or to_go <= 0:
    return ""
  median = statistics.median(walls)
  return (f" The finished {finished} trained for a median of {median:.0f} s each ({min(walls):.0f}–{max(walls):.0f} s); "
          f"at that rate the {to_go} to go take ≈ {to_go * median / 3600:.1f} h")


def is_done(run: tuple) -> bool:
  """Whether a run (cell, final, history) is done: its final.json is written (a timed-out run's record is not)."""
  return run[1] is not None and not run[1].get("timed_out")


# ---- the table cells ----------------------------------------------------------------------------------------
def verdict_text(v: dict) -> str:
  """'within', 'worse', 'undecided (80 % power at 18 seeds)'."""
  if v["verdict"] != "undecided" or v["pairs"] < 2 or v["failed"]:
    return v["verdict"]
  return f"undecided ({100 * POWER:.0f} % power at " + (f"{v['seeds_needed']} seeds)" if v["seeds_needed"] else
                                                        f"> {MAX_SEEDS} seeds)")


def holm_text(v: dict) -> str:
  """'within (p = 0.012)', or why there is no test."""
  if v["p_holm"] is not None:
    return f"{v['holm']} (p = {v['p_holm']:.2g})"
  return f"{v['verdict']} (no test: a seed collapsed or diverged)" if v["failed"] else "– (no test: one pair)"


def diff_text(v: dict) -> str:
  """'+0.12 ± 0.30 [−0.18, +0.42]': the paired difference's mean ± half-width [95 % interval]."""
  if v["delta"] is None:
    return "–"
  return f"{v['delta']:+.2f}" + ("" if v["half"] is None else f" ± {v['half']:.2f} [{v['lo']:+.2f}, {v['hi']:+.2f}]")


def to_target_text(g: dict, ref: Optional[dict], measure: str = SIM_TIME,
                   fmt: Callable[[float], str] = lambda v: f"{v:.0f}") -> tuple[str, str]:
  """(the group's median of ``measure`` to the target with how many seeds reached it, the reference's median ÷
  the group's: above 1 means sooner or less); '–' where there is nothing to show."""
  t = g["to_target"].get(measure)
  if not t or not t["values"]:
    return "–", "–"
  counts = f"{t['reached']} of {len(t['values'])} reached"
  if t["median"] is None:
    return ("not reached" if not t["reached"] else "–") + f" ({counts})", "–"
  r = ref["to_target"].get(measure) if ref else None
  ratio = f"{r['median'] / t['median']:.2f}×" if r and r["median"] and g is not ref and t["median"] > 0 else "–"
  return f"{fmt(t['median'])} ({counts})", ratio
