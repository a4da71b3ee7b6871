"""Statistics over seeds for the grid reports (launch/reproduce_report.py, launch/policies_report.py,
launch/speedup_report.py). Pure: no I/O, no jax, no import from launch/ (scipy for the t distributions).

Not ``launch/statistics.py``: ``python launch/reproduce.py`` puts launch/ first on sys.path, and that name would
hide the standard library's ``statistics`` from every module of the process.

- What a seed's run became (:func:`seed_outcome`): *trained*, *collapsed* (train loss within
  :data:`LOSS_TOLERANCE` of ln(classes), or test error at chance, see :func:`chance_floor`), or the reason it
  stopped (*diverged*, ...). Only trained seeds enter a mean; the others are counted ("collapsed in 1 of 3").
- Means over seeds: :func:`mean_sd`, the 95 % Student-t half-width (:func:`half_width`), the paired
  difference of two cells over the seeds both trained (:func:`paired_difference`) and its verdict against a
  bound (:func:`verdict`).
- Tests and their power: the two-sided paired t test's p-value (:func:`t_test_p`), Holm's step-down adjustment
  of a family of them (:func:`holm`), the seeds a paired t test needs for 80 % power (:func:`seeds_for_power`,
  the noncentral t).
- Time to a target error: interpolated between evaluations (:func:`time_to_target`), with censored seeds
  (never reached it) kept in the median (:func:`censored_median`).
"""

from __future__ import annotations

import math
import statistics
from typing import Iterable, Optional, Sequence

CONFIDENCE = 0.95            # of every interval; ALPHA = 1 − CONFIDENCE for the tests
ALPHA = 1 - CONFIDENCE
POWER = 0.80                 # the power :func:`seeds_for_power` asks for
MAX_SEEDS = 1000             # seeds_for_power gives up beyond this
LOSS_TOLERANCE = 0.01        # a train loss within this of ln(classes) is a constant output: collapsed
TRAINED, COLLAPSED, DIVERGED = "trained", "collapsed", "diverged"
FAILED = (COLLAPSED, DIVERGED)   # outcomes that are results of their own: never averaged, never *within*


# ---- what a seed's run became ---------------------------------------------------------------------------
def chance_floor(classes: int) -> float:
  """The test error (a fraction) at or above which a run is at chance: 1 − 1/classes less half a class's share,
  1 − 1.5/classes (0.85 for 10 classes).

  A network stuck on one output scores 1 − (that class's share of the test set): exactly 0.9 on Fashion-MNIST's
  balanced test set, 0.8865 to 0.9108 on MNIST's (class shares 8.92 to 11.35 %). Half a share of slack covers
  that imbalance and the sampling noise of a near-chance run on 1,000 test images (sd √(0.9·0.1/1000) ≈ 0.0095,
  so 3 sd ≈ 0.03), while a run that learned anything on these sets ends far below (SSGD: 3 to 12 %)."""
  if classes < 2:
    raise ValueError(f"classes={classes!r} is invalid; allowed: an integer >= 2")
  return 1 - 1.5 / classes


def seed_outcome(test_error: Optional[float], train_loss: Optional[float], classes: int, stopped: str = "") -> str:
  """What one seed's run became: ``stopped`` when it did not train to its end (the caller's word: 'diverged',
  'timed out', ...), 'diverged' when its final test error or train loss is missing or not finite, 'collapsed'
  when its train loss is within :data:`LOSS_TOLERANCE` of ln(classes) or its test error (a fraction) is at or
  above :func:`chance_floor`, else 'trained'."""
  if stopped:
    return stopped
  if test_error is None or not math.isfinite(test_error) or (train_loss is not None and not math.isfinite(train_loss)):
    return DIVERGED
  if test_error >= chance_floor(classes) - 1e-12 or (
      train_loss is not None and abs(train_loss - math.log(classes)) <= LOSS_TOLERANCE):
    return COLLAPSED
  return TRAINED


def count_outcomes(outcomes: Iterable[str]) -> dict[str, int]:
  """{'collapsed': 1, 'diverged': 2}: how many seeds ended each way but trained (the
  outcomes of :func:`seed_outcome`), collapsed and diverged first, then the others alphabetically."""
  words = [o for o in outcomes if o != TRAINED]
  order = [*FAILED, *sorted(set(words) - set(FAILED))]
  return {w: words.count(w) for w in order if w in words}


# ---- means and intervals over seeds ---------------------------------------------------------------------
def mean_sd(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for one value)."""
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
  """Student t's two-sided quantile t_{(1+confidence)/2, df} (12.71 for df = 1, 2.78 for df = 4 at 95 %)."""
  if df < 1:
    raise ValueError(f"df={df!r} is invalid; allowed: an integer >= 1")
  from scipy import stats
  return float(stats.t.ppf((1 + confidence) / 2, df))


def half_width(sd: float, k: int) -> Optional[float]:
  """The 95 % interval's half-width t_{0.975, k−1} · sd/√k of a mean over k seeds; None for one seed."""
  return t_quantile(k - 1) * sd / math.sqrt(k) if k > 1 else None


def paired_difference(a: dict, b: dict) -> dict:
  """a − b over the seeds both have in ``by_seed`` ({seed: value}): mean, sd, half-width (None for one pair),
  pairs, lo, hi (None without an interval), and the two-sided p-value of the paired t test against 0."""
  diffs = [a["by_seed"][s] - b["by_seed"][s] for s in sorted(set(a["by_seed"]) & set(b["by_seed"]))]
  mean, sd = mean_sd(diffs)
  half = half_width(sd, len(diffs))
  lo, hi = (mean - half, mean + half) if half is not None else (None, None)
  return {"mean": mean, "sd": sd, "half": half, "pairs": len(diffs), "lo": lo, "hi": hi,
          "p": t_test_p(mean, sd, len(diffs))}


def verdict(diff: dict, points: float) -> str:
  """within (interval at or below +points), worse (wholly above), undecided (straddles it, or one pair)."""
  if diff["half"] is None:
    return "undecided"
  if round(diff["hi"], 6) <= points:     # no float noise at the edge
    return "within"
  return "worse" if round(diff["lo"], 6) > points else "undecided"


# ---- tests, families of tests, power ---------------------------------------------------------------------
def t_test_p(mean: float, sd: float, k: int, null: float = 0.0) -> Optional[float]:
  """Two-sided p-value of the one-sample (paired) t test of a mean over k values against ``null``:
  2 · P(T_{k−1} > |mean − null| / (sd/√k)); None for one value; 0 (1) when sd = 0 and the mean is off (on) it."""
  if k < 2:
    return None
  gap = abs(mean - null)
  if sd == 0:
    return 0.0 if gap > 1e-12 else 1.0
  from scipy import stats
  return float(2 * stats.t.sf(gap / (sd / math.sqrt(k)), k - 1))


def holm(p_values: Sequence[float]) -> list[float]:
  """Holm's step-down adjusted p-values of a family of m tests, in the given order (Holm 1979): with the
  p-values sorted p_(1) ≤ … ≤ p_(m), p̃_(i) = max_{j ≤ i} min(1, (m − j + 1) · p_(j)). Rejecting where p̃ ≤ α
  keeps the chance of any false rejection in the family at most α, whatever the dependence between tests."""
  order = sorted(range(len(p_values)), key=lambda i: p_values[i])
  adjusted, running = [0.0] * len(p_values), 0.0
  for rank, i in enumerate(order):
    running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
    adjusted[i] = running
  return adjusted


def power(effect: float, sd: float, k: int, alpha: float = ALPHA) -> float:
  """Power of the two-sided one-sample (paired) t test at level ``alpha`` on k values whose true mean is
  ``effect`` away from the null, with standard deviation ``sd``: P(|T| > t_{1−α/2, k−1}) for T noncentral t with
  k − 1 degrees of freedom and noncentrality √k · |effect| / sd."""
  if k < 2:
    raise ValueError(f"k={k!r} is invalid; allowed: an integer >= 2")
  if sd == 0:
    return 1.0 if effect else alpha
  from scipy import stats
  df, crit, nc = k - 1, t_quantile(k - 1, 1 - alpha), math.sqrt(k) * abs(effect) / sd
  return float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))


def seeds_for_power(effect: float, sd: float, target: float = POWER, alpha: float = ALPHA) -> Optional[int]:
  """The fewest values k ≥ 2 for which :func:`power` (two-sided, level ``alpha``) reaches ``target`` if the true
  effect and sd are ``effect`` and ``sd``; None when no k ≤ :data:`MAX_SEEDS` does (effect 0). d = 1 at 80 %,
  α = 0.05 needs 10 (the textbook value). Plugging in an observed effect makes this a planning estimate."""
  if not effect or power(effect, sd, MAX_SEEDS, alpha) < target:
    return None
  lo, hi = 1, 2                         # power(lo) < target <= power(hi); power grows with k
  while power(effect, sd, hi, alpha) < target:
    lo, hi = hi, min(2 * hi, MAX_SEEDS)
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (lo, mid) if power(effect, sd, mid, alpha) >= target else (mid, hi)
  return hi


# ---- time to a target error -------------------------------------------------------------------------------
def time_to_target(history: Sequence[dict], target: float, time_key: str = "sim_time") -> Optional[float]:
  """When a run's test error (in %) first reaches ``target``: linear in time between the last evaluation above
  the target and the first at or below it; the first evaluation's time when that one already is; None when no
  evaluation is (censored: the run never reached it). Evaluations without a test error are skipped."""
  points = [(float(r[time_key]), 100 * r["test_error"]) for r in history if r.get("test_error") is not None]
  for i, (t1, e1) in enumerate(points):
    if e1 <= target + 1e-9:
      if i == 0:
        return t1
      t0, e0 = points[i - 1]
      return t0 + (t1 - t0) * (e0 - target) / (e0 - e1)
  return None


def censored_median(times: Sequence[Optional[float]]) -> Optional[float]:
  """The median of ``times`` where None is a censored value (the run never reached the target: later than any
  time that was reached); None when the median falls on a censored one (half or more never reached it)."""
  ordered = sorted(times, key=lambda t: math.inf if t is None else t)
  n = len(ordered)
  middle = ordered[(n - 1) // 2: n // 2 + 1]
  return None if not middle or any(t is None for t in middle) else statistics.fmean(middle)
