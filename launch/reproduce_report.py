"""The report of launch/reproduce.py: statistics over seeds, the P4 verdicts, the markdown and the PNGs (the
speedup figure: launch/speedup_report.py; the statistics themselves: launch/seed_stats.py).

Pure functions of the finished cells' ``final.json`` records and metrics histories (see launch/reproduce.py
for the grid: λ learners of μ = ⌈128/λ⌉, n-softsync, the ``inverse``/``constant`` policies and SSGD).

A seed whose run collapsed (train loss within 0.01 of ln(classes), or test error at chance) or diverged is an
outcome of its own, counted ("collapsed in 1 of 3 seeds"), never averaged: a cell's test error is the mean
over its *trained* seeds with a 95 % Student-t interval (mean ± t₀.₉₇₅,ₖ₋₁ · sd/√k for k seeds), and says over
how many. P4 compares each inverse cell with its λ's SSGD on the *paired* differences d_s = error(inverse,
seed s) − error(SSGD, seed s) over the seeds both trained: both runs of a seed share the initial weights and the
data order, so the pairing removes most of the seed-to-seed spread. The verdict is three-valued against the
margin of 0.5 point: **within** when the interval of the mean difference lies at or below +0.5, **worse** when
it lies wholly above +0.5 or a seed collapsed or diverged where SSGD's trained, **undecided** otherwise (it
straddles +0.5, one seed, or a seed failed in both). A cell with a collapsed or diverged seed is never within.
"""

from __future__ import annotations

import math
import os
import re
import statistics
from typing import Callable, Iterable, Sequence

from launch.grid_runner import unfinished
from launch.reproduce import (BASE_CONFIGS, DATASETS, LEARNERS, NS, P4_POINTS, SIM_JITTER, TRAIN_SIZES, Cell,
                              base_config, gradients_of, grid, scaled_boundaries, updates_of)
from launch.seed_stats import (FAILED, LOSS_TOLERANCE, MAX_SEEDS, POWER, TRAINED, chance_floor, count_outcomes,
                               half_width, mean_sd, paired_difference, seed_outcome, seeds_for_power, verdict)

CLASSES = 10            # both datasets of the grid (the commands pass the loaded dataset's count)
VERDICTS = ("within", "worse", "undecided")
NOTE_START, NOTE_END = "<!-- note -->", "<!-- /note -->"   # a hand-written block a rewritten report keeps


def kept_note(path: str) -> str:
  """The hand-written block between ``<!-- note -->`` and ``<!-- /note -->`` of the report at ``path`` ('' if
  none, or no report yet): what a person wrote about the results stays when the report is written again.

  Raises ValueError (one line: the commands exit 2 before training) when the note has a number
  (:func:`note_numbers`): a note says what the numbers mean, the command writes every number, so none goes stale
  when the runs or the statistics change."""
  if not os.path.exists(path):
    return ""
  with open(path) as f:
    m = re.search(re.escape(NOTE_START) + r"(.*?)" + re.escape(NOTE_END), f.read(), re.S)
  note = m.group(1).strip() if m else ""
  numbers = note_numbers(note)
  if numbers:
    raise ValueError(f"the hand-written note of {path} has {len(numbers)} number(s) the command does not "
                     f"recompute (first: {', '.join(repr(n) for n in numbers[:3])}); allowed: a note without "
                     "numbers (words, names such as α0 or conv2, link targets); the tables carry the numbers")
  return note


def note_numbers(note: str) -> list[str]:
  """The numbers in a note: runs of digits (with their decimal point, thousands commas, exponent) not glued to the
  end of a word, outside markdown link targets: '30' in 'λ = 30', '2026' in a date, '5.6e33'; not α0, conv2, m05."""
  text = re.sub(r"\]\([^)]*\)", "]()", note)
  return re.findall(r"(?<!\w)\d(?:[\d.,]*\d)?(?:[eE][+-]?\d+)?", text)


# ---- statistics over seeds (the pure functions are launch/seed_stats.py's) --------------------------------
def outcome_of(final: dict, classes: int = CLASSES) -> str:
  """What a cell's run became: 'trained', 'collapsed', 'diverged', 'learners failed' or 'timed out'."""
  return seed_outcome(final.get("test_error"), final.get("train_loss"), classes, unfinished(final))


def aggregate(finals: Iterable[dict], classes: int = CLASSES) -> dict[tuple[int, int, str], dict]:
  """Per cell key (λ, n, policy): test error in % over the seeds that *trained* (mean, sd, 95 % half-width, per
  seed), their train loss, ⟨σ⟩ over the seeds that finished, each seed's outcome (:func:`outcome_of`) and
  ``outcomes``: how many seeds ended each way but trained. Error and loss are None when no seed trained."""
  by_key: dict[tuple, list[dict]] = {}
  for f in finals:
    c = f["cell"]
    by_key.setdefault((c["learners"], c["n"], c["policy"]), []).append(f)
  out = {}
  for key, fs in by_key.items():
    outcome = {f["cell"]["seed"]: outcome_of(f, classes) for f in fs}
    done = [f for f in fs if outcome[f["cell"]["seed"]] == TRAINED]
    errors = [100 * f["test_error"] for f in done]
    sigmas = [f["staleness_mean"] for f in fs if f.get("test_error") is not None and "staleness_mean" in f]
    out[key] = {"error": mean_sd(errors) if done else None,
                "half": half_width(mean_sd(errors)[1], len(done)) if done else None,
                "by_seed": {f["cell"]["seed"]: 100 * f["test_error"] for f in done},
                "loss": mean_sd([f["train_loss"] for f in done]) if done else None,
                "staleness": statistics.fmean(sigmas) if sigmas else None, "seeds": len(fs),
                "outcome_by_seed": outcome, "outcomes": count_outcomes(outcome.values())}
  return out


def failed_seeds(a: dict) -> list:
  """The seeds of the summary ``a`` that collapsed or diverged."""
  return [s for s, o in a["outcome_by_seed"].items() if o in FAILED]


def p4_verdicts(agg: dict, points: float = P4_POINTS) -> list[dict]:
  """Per inverse cell with an SSGD cell of its λ: the paired difference over the seeds both trained, its
  verdict, the seeds a paired t test needs for 80 % power at the observed difference (undecided cells), and
  notes on why a cell is not within. A collapsed or diverged seed makes the cell *worse* where SSGD's run of
  that seed trained, and never *within*."""
  out = []
  for (lam, n, policy), a in sorted(agg.items()):
    ssgd = agg.get((lam, 0, "ssgd"))
    if policy != "inverse" or ssgd is None:
      continue
    row = {"learners": lam, "n": n, "delta": None, **dict.fromkeys(("sd", "half", "lo", "hi")), "pairs": 0,
           "verdict": "undecided", "seeds_needed": None, "failed": len(failed_seeds(a))}
    notes = [outcomes_text(a, lambda word: word in FAILED)] if row["failed"] else []
    if any(w not in FAILED for w in a["outcomes"]):       # timed out, learners failed: missing, not a result
      notes.append("left out: " + outcomes_text(a, lambda word: word not in FAILED))
    if not ssgd["by_seed"]:
      out.append({**row, "why": f"no SSGD reference: SSGD {outcomes_text(ssgd)}"})
      continue
    diff = paired_difference(a, ssgd) if set(a["by_seed"]) & set(ssgd["by_seed"]) else None
    result = verdict(diff, points) if diff else "undecided"
    if diff:
      row.update(delta=diff["mean"], **{k: diff[k] for k in ("sd", "half", "lo", "hi", "pairs")})
    if row["failed"]:
      worse = any(s in ssgd["by_seed"] for s in failed_seeds(a))
      result = "worse" if worse else "undecided" if result == "within" else result
    elif result == "undecided" and diff and diff["pairs"] > 1:
      row["seeds_needed"] = seeds_for_power(diff["mean"] - points, diff["sd"])
    if ssgd["outcomes"]:
      notes.append(f"SSGD {outcomes_text(ssgd)}")
    if result != "within" and diff and not row["failed"]:   # why the trained seeds fall short
      if diff["pairs"] == 1:
        notes.append("one seed: no interval (use --seeds 0 1 2)")
      if diff["mean"] > 0 and a["loss"][0] > 1.1 * ssgd["loss"][0]:
        notes.append(f"under-trained: train loss {a['loss'][0]:.4f} vs SSGD {ssgd['loss'][0]:.4f} "
                     f"(steps α0/σ with ⟨σ⟩ = {a['staleness']:.2f})")
      elif diff["mean"] > 0:
        notes.append(f"train loss on par ({a['loss'][0]:.4f} vs {ssgd['loss'][0]:.4f}): a generalisation gap")
    if diff is None and not notes:
      notes.append("no seed trained in both this cell and SSGD")
    out.append({**row, "verdict": result, "why": "; ".join(notes)})
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
  """A cell's test error in % over its trained seeds: '3.12 ± 0.40' (mean ± 95 % half-width), '3.12' for one
  seed, '3.12 ± 0.40 (4 of 5 seeds; 1 collapsed)' when some seeds did not train, '– (collapsed in 2 of 3 seeds,
  diverged in 1 of 3 seeds)' when none did; '5.83 (0 to 12.93: the interval cut at 0)' when mean − half-width < 0
  (an error rate is not negative: the t interval of a few spread-out seeds can reach below 0)."""
  if a["error"] is None:
    return f"– ({outcomes_text(a)})"
  mean, half = a["error"][0], a["half"]
  text = f"{mean:.2f}" + ("" if half is None else f" ± {half:.2f}" if mean - half >= 0 else
                          f" (0 to {mean + half:.2f}: the interval cut at 0)")
  if not a["outcomes"]:
    return text
  return text + f" ({len(a['by_seed'])} of {a['seeds']} seeds; " + ", ".join(
      f"{k} {word}" for word, k in a["outcomes"].items()) + ")"


def outcomes_text(a: dict, keep: Callable[[str], bool] = lambda word: True) -> str:
  """'collapsed in 1 of 3 seeds, diverged in 2 of 3 seeds' ('diverged' for a cell of one seed): the outcomes of
  the summary ``a`` but trained, those that ``keep`` keeps."""
  outcomes = {word: k for word, k in a["outcomes"].items() if keep(word)}
  if a["seeds"] == 1:
    return ", ".join(outcomes)
  return ", ".join(f"{word} in {k} of {a['seeds']} seeds" for word, k in outcomes.items())


def run_error_text(final: dict, classes: int = CLASSES) -> str:
  """One run's test error for the tables of every run: '3.12', '90.00 (collapsed)', 'diverged'."""
  outcome = outcome_of(final, classes)
  if final.get("test_error") is None or outcome not in (TRAINED, "collapsed"):
    return outcome
  return f"{100 * final['test_error']:.2f}" + ("" if outcome == TRAINED else f" ({outcome})")


def outcome_rule(classes: int = CLASSES) -> str:
  """The sentence that says which seeds count as collapsed or diverged."""
  return (f"A seed *collapsed* when its final train loss is within {LOSS_TOLERANCE:g} of ln {classes} = "
          f"{math.log(classes):.4f} (a constant output) or its test error is at chance, at or above "
          f"{100 * chance_floor(classes):g} % (1 − 1/{classes} less half a class's share: a constant prediction "
          f"scores 1 − its class's share, and class shares and the test set's sampling noise move that by a few "
          "points); it *diverged* when it stopped on non-finite gradients or ended non-finite. Either is an "
          "outcome of its own, counted, never averaged: every mean and interval is over the *trained* seeds.")


def _diff(v: dict) -> str:
  if v["delta"] is None:
    return "–"
  return f"{v['delta']:+.2f}" + (f" ± {v['half']:.2f}" if v["half"] is not None else "")


def _verdict_text(v: dict) -> str:
  if v["verdict"] != "undecided" or v["pairs"] < 2 or v["failed"]:
    return v["verdict"]
  if v["seeds_needed"]:
    return f"undecided ({100 * POWER:.0f} % power at {v['seeds_needed']} seeds)"
  return f"undecided ({100 * POWER:.0f} % power needs > {MAX_SEEDS} seeds)"


DESCRIPTIONS = {"mnist5k": "mnist5k (4,000 train / 1,000 test digits)",
                "fashion_mnist": "Fashion-MNIST (60,000 train / 10,000 test images, IDX files)"}


def render_markdown(agg: dict, verdicts: list[dict], *, command: str, epochs: float, seeds: Sequence[int],
                    wall_s: float | None, runs: Sequence[tuple[str, dict]], estimate: str,
                    figures: Sequence[tuple[str, str]], dataset: str = "mnist5k", train_examples: int = 0,
                    extra: Sequence[str] = (), momentum: float | None = None, note: str = "",
                    missing: int = 0, classes: int = CLASSES) -> str:
  """The report: a hand-written ``note`` (kept between its markers when the report is rewritten), command,
  table (rows n, λ, μ; columns inverse, constant, SSGD, the paired difference and the P4 verdict), P4, timing,
  figures."""
  base = base_config(dataset)
  ci = (" (mean ± half-width of the 95 % Student-t interval over the trained seeds)" if len(seeds) > 1 else
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
      "(same λ and seed, both trained) with its interval. " + outcome_rule(classes), "",
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
              "interval). A cell with a collapsed or diverged seed is never *within*: it is *worse* when SSGD's run "
              "of that seed trained, else undecided. For an undecided cell, the power statement is a planning "
              f"estimate: the seeds k at which the paired t test of the mean difference against +{P4_POINTS} "
              f"(two-sided, α = 0.05: the test the 95 % interval makes) has {100 * POWER:.0f} % power if the true "
              "difference d̄ and sd s were the observed ones; power(k) = P(|T| > t₀.₉₇₅,ₖ₋₁) for T noncentral t "
              f"with k − 1 degrees of freedom and noncentrality √k · |d̄ − {P4_POINTS}| / s.", ""]
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
  lines += [f"| `{name}` | {run_error_text(f, classes)} | "
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
