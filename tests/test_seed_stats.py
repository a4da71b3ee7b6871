"""launch/seed_stats.py: the pure statistics of the grid reports, each against a hand-worked or textbook value."""

import math

import pytest
from scipy import stats

from launch import seed_stats as ss


def test_a_seed_is_trained_collapsed_or_what_stopped_it():
  assert ss.chance_floor(10) == pytest.approx(0.85) and ss.chance_floor(2) == pytest.approx(0.25)
  assert ss.seed_outcome(0.031, 0.08, 10) == "trained"
  assert ss.seed_outcome(0.90, 2.3027, 10) == "collapsed"               # at chance, loss ln 10
  assert ss.seed_outcome(0.86, 1.9, 10) == "collapsed"                  # at or above 1 − 1.5/10
  assert ss.seed_outcome(0.84, 1.9, 10) == "trained"                    # below it: it learned something
  assert ss.seed_outcome(0.50, math.log(10) - 0.009, 10) == "collapsed"   # loss within 0.01 of ln 10
  assert ss.seed_outcome(0.50, math.log(10) - 0.011, 10) == "trained"
  assert ss.seed_outcome(0.20, None, 10) == "trained"                   # no loss recorded: the error decides
  assert ss.seed_outcome(None, None, 10) == "diverged"
  assert ss.seed_outcome(0.1, float("nan"), 10) == "diverged" and ss.seed_outcome(float("inf"), 1.0, 10) == "diverged"
  assert ss.seed_outcome(None, None, 10, stopped="timed out") == "timed out"
  assert ss.count_outcomes(["trained", "timed out", "diverged", "collapsed", "diverged"]) == {
      "collapsed": 1, "diverged": 2, "timed out": 1}
  assert list(ss.count_outcomes(["timed out", "learners failed", "diverged"])) == [
      "diverged", "learners failed", "timed out"]
  with pytest.raises(ValueError, match=r"classes=1 is invalid; allowed: an integer >= 2"):
    ss.chance_floor(1)


def test_student_t_intervals():
  assert ss.t_quantile(1) == pytest.approx(12.706, abs=1e-3)       # the t-table at 95 %
  assert ss.t_quantile(4) == pytest.approx(2.776, abs=1e-3)
  assert ss.t_quantile(29) == pytest.approx(2.045, abs=1e-3)
  assert ss.half_width(0.2, 3) == pytest.approx(4.303 * 0.2 / 3 ** 0.5, abs=1e-3)
  assert ss.half_width(0.2, 1) is None
  assert ss.mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0) and ss.mean_sd([4.0]) == (4.0, 0.0)
  with pytest.raises(ValueError, match=r"df=0 is invalid; allowed: an integer >= 1"):
    ss.t_quantile(0)


def test_paired_t_test_p_value():
  # differences 1, 2, 3: mean 2, sd 1, t = 2/(1/√3) = 3.464 on 2 df: two-sided p = 0.0742 (t-table)
  assert ss.t_test_p(2.0, 1.0, 3) == pytest.approx(0.0742, abs=1e-4)
  assert ss.t_test_p(2.0, 1.0, 3, null=2.0) == pytest.approx(1.0)
  assert ss.t_test_p(0.5, 0.0, 3) == 0.0 and ss.t_test_p(0.0, 0.0, 3) == 1.0 and ss.t_test_p(1.0, 1.0, 1) is None
  diff = ss.paired_difference({"by_seed": {0: 4.0, 1: 5.0, 2: 6.0, 9: 1.0}}, {"by_seed": {0: 3.0, 1: 3.0, 2: 3.0}})
  assert (diff["pairs"], diff["mean"], diff["p"]) == (3, 2.0, pytest.approx(0.0742, abs=1e-4))
  # the 95 % interval excludes 0 exactly when p < 0.05
  assert (diff["lo"] > 0) == (diff["p"] < 0.05)


def test_holm_against_a_hand_worked_family():
  # p = 0.012, 0.02, 0.001, 0.30 (m = 4). Sorted: 0.001·4 = 0.004; 0.012·3 = 0.036; 0.02·2 = 0.04; 0.30·1 = 0.30.
  # At α = 0.05 Holm rejects the first three; Bonferroni (×4) would keep 0.02 (0.08).
  assert ss.holm([0.012, 0.02, 0.001, 0.30]) == pytest.approx([0.036, 0.04, 0.004, 0.30])
  # step-down is monotone: 0.01·3 = 0.03, then 0.011·2 = 0.022 is raised to 0.03; and capped at 1
  assert ss.holm([0.01, 0.011, 0.6]) == pytest.approx([0.03, 0.03, 0.6])
  assert ss.holm([0.4, 0.5]) == pytest.approx([0.8, 0.8]) and ss.holm([0.7, 0.9]) == [1.0, 1.0]
  assert ss.holm([0.03]) == [0.03] and ss.holm([]) == []


def test_seeds_for_80_percent_power_by_the_noncentral_t():
  # the textbook case: one-sample t test, two-sided α = 0.05, effect size d = 1: 80 % power needs n = 10
  assert ss.seeds_for_power(1.0, 1.0) == 10
  assert ss.power(1.0, 1.0, 10) == pytest.approx(0.803, abs=1e-3) and ss.power(1.0, 1.0, 9) < 0.8
  # an independent computation of one case, the formula written out: effect 0.3, sd 0.4 (d = 0.75);
  # power(n) = P(T > t_{0.975, n−1}) + P(T < −t_{0.975, n−1}), T ~ noncentral t(n − 1, √n · d)
  def by_hand(n, d=0.75):
    crit = stats.t.ppf(0.975, n - 1)
    return stats.nct.sf(crit, n - 1, math.sqrt(n) * d) + stats.nct.cdf(-crit, n - 1, math.sqrt(n) * d)
  n = next(n for n in range(2, 100) if by_hand(n) >= 0.8)
  assert n == 16 and ss.seeds_for_power(0.3, 0.4) == n
  assert ss.seeds_for_power(-0.3, 0.4) == n                   # the side of the bound does not matter
  assert ss.seeds_for_power(0.0, 0.4) is None                 # on the bound: no number of seeds decides it
  assert ss.seeds_for_power(1e-4, 1.0) is None                # beyond MAX_SEEDS
  assert ss.seeds_for_power(0.3, 0.0) == 2                    # no spread: two seeds decide


def test_time_to_target_is_interpolated_between_the_evaluations_around_the_first_crossing():
  curve = [{"sim_time": t, "test_error": e / 100} for t, e in ((10, 60.0), (20, 30.0), (30, 12.0), (40, 14.0),
                                                               (50, 9.0))]
  assert ss.time_to_target(curve, 12.0) == pytest.approx(30)           # at the target counts
  assert ss.time_to_target(curve, 13.0) == pytest.approx(20 + 10 * 17 / 18)   # 30 % → 12 %: 17 of 18 points
  assert ss.time_to_target(curve, 45.0) == pytest.approx(15)           # halfway from 60 % to 30 %
  assert ss.time_to_target(curve, 9.5) == pytest.approx(49)            # the first crossing of 9.5 is 14 % → 9 %
  assert ss.time_to_target(curve, 5.0) is None                         # never reached: censored
  assert ss.time_to_target(curve[:1], 70.0) == 10                      # the first evaluation already is
  assert ss.time_to_target([{"sim_time": 5, "test_error": None}, *curve], 45.0) == pytest.approx(15)
  assert ss.time_to_target([{"epoch": 1.0, "test_error": 0.5}, {"epoch": 2.0, "test_error": 0.3}], 40.0,
                           time_key="epoch") == pytest.approx(1.5)


def test_censored_median_counts_the_seeds_that_never_reached_the_target_as_slowest():
  assert ss.censored_median([30.0, None, 10.0]) == 30.0                # 2 of 3 reached: the larger of them
  assert ss.censored_median([30.0, 10.0, 20.0]) == 20.0
  assert ss.censored_median([10.0, None, None]) is None                # half or more never reached it
  assert ss.censored_median([10.0, None]) is None and ss.censored_median([10.0, 20.0]) == 15.0
  assert ss.censored_median([10.0, 20.0, 30.0, None]) == 25.0 and ss.censored_median([]) is None
