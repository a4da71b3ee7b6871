"""launch/compare_policies.py: the rows and cells, time to target, ranking with Holm-adjusted paired verdicts,
collapsed and diverged seeds counted apart, the report."""

import dataclasses
import json
import os
import re

import pytest

from launch import compare_policies as cp
from launch import policies_report as pr
from launch import reproduce
from sajax import config as config_lib, optim

POLICIES = optim.available_policies()
# the rules that leave the step at α0 (issue #20 item 4): each also runs at α0/λ, and no other rule does
STEP_AT_ALPHA0 = ("constant", "delay_adaptive", "drop", "dc_asgd", "dc_asgd_adaptive", "ssp")
SCALED = [f"{r}-lr_over_lambda" for r in STEP_AT_ALPHA0]
RUNS_FASHION = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "policies",
                            "runs_fashion")


def test_rows_are_ssgd_then_every_policy_on_async_then_ssp():
  rows = cp.variants([*POLICIES, cp.SSP])
  assert [v.name for v in rows] == [cp.SSGD, *POLICIES, cp.SSP, *SCALED]
  assert [v.name for v in cp.variants([*POLICIES, cp.SSP], lr_over_lambda=False)] == [cp.SSGD, *POLICIES, cp.SSP]
  rows = rows[:-len(SCALED)]
  assert rows[0] == cp.Variant("ssgd", "hardsync", "constant")
  assert {v.protocol for v in rows[1:-1]} == {"async"}
  assert json.loads(next(v for v in rows if v.name == "drop").policy_args) == {"bound": 60}   # R = 2λ
  assert all(json.loads(v.policy_args) == {} for v in rows if v.name != "drop")
  assert rows[-1] == cp.Variant("ssp", "ssp", "constant", spread=2)
  assert [v.name for v in cp.variants(["inverse"], learners=8)] == ["ssgd", "inverse"]   # no ssp unless named


def test_grid_runs_a_whole_seed_first_and_leaves_out_ssp_when_it_cannot_run():
  rows = cp.variants([*POLICIES, cp.SSP])
  cells = cp.grid(rows, cp.PROFILES, [0, 1, 2], "mnist5k", runnable=False)
  assert len(cells) == len(set(cells)) == 3 * 2 * (len(POLICIES) + 1 + len(SCALED) - 1)
  assert [c.seed for c in cells] == sorted(c.seed for c in cells)
  assert {c.variant.protocol for c in cells} == {"hardsync", "async"}        # neither SSP row
  assert len(cp.grid(rows, cp.PROFILES, [0, 1, 2], "mnist5k", runnable=True)) == 3 * 2 * (
      len(POLICIES) + 2 + len(SCALED))
  cell = cells[1]
  assert (cell.learners, cell.batch) == (30, 5)
  assert cell.name(1.0) == "mnist5k-one_slow-inverse-lambda30-mu5-e1-seed0"
  assert cp.cell_from_json(json.dumps(__import__("dataclasses").asdict(cell))) == cell


def test_cell_config_is_async_with_the_profile_and_ssgd_is_hardsync():
  rows = {v.name: v for v in cp.variants(POLICIES)}
  drop = cp.cell_config(cp.PolicyCell(rows["drop"], "heterogeneous", 2), epochs=1.0)
  config_lib.validate(drop)
  assert (drop.executor, drop.protocol, drop.policy, drop.sim_profile, drop.seed) == (
      "simulated", "async", "drop", "heterogeneous", 2)
  assert config_lib.protocol_of(drop).gradients_per_update == 1
  assert drop.eval_every_epochs == pytest.approx(1.0 / reproduce.EVALS) and reproduce.EVALS >= 40
  ssgd = cp.cell_config(cp.PolicyCell(rows["ssgd"], "one_slow", 0), epochs=1.0)
  config_lib.validate(ssgd)
  assert (ssgd.protocol, config_lib.protocol_of(ssgd).gradients_per_update, ssgd.sim_profile) == (
      "hardsync", 30, "one_slow")
  assert ssgd.learning_rate == drop.learning_rate                              # SSGD's α0 everywhere


def test_constants_are_the_built_policys_with_lambda_and_alpha0_filled_in():
  rows = {v.name: v for v in cp.variants([*POLICIES, cp.SSP])}

  def text(name):
    return cp.constants_text(rows[name], cp.cell_config(cp.PolicyCell(rows[name], "one_slow", 0), epochs=1.0))
  assert text("drop") == "bound = 60"
  assert text("delay_adaptive") == "learners = 30"
  assert text("gap_aware").startswith("learning_rate = 0.05, decay = 0.999")
  assert text("hinge") == "a = 10, b = 4"
  assert text("inverse") == "none"
  assert text("ssgd") == "c = λ = 30, σ = 0" and text("ssp") == "spread s = 2, c = 1"


def test_the_alpha_over_lambda_rows_are_their_alpha0_rows_at_alpha0_over_lambda():
  rows = {v.name: v for v in cp.variants([*POLICIES, cp.SSP])}
  assert sorted(n for n, v in rows.items() if v.alpha_over_lambda) == sorted(SCALED)
  for rule in STEP_AT_ALPHA0:
    at_alpha0, scaled = rows[rule], rows[f"{rule}-lr_over_lambda"]
    assert dataclasses.replace(scaled, name=rule, alpha_over_lambda=False) == at_alpha0
    cell = cp.PolicyCell(scaled, "heterogeneous", 1, "fashion_mnist", momentum=0.5)
    a = cp.cell_config(dataclasses.replace(cell, variant=at_alpha0), epochs=12.0, train_examples=20000)
    b = cp.cell_config(cell, epochs=12.0, train_examples=20000)
    config_lib.validate(b)
    assert a.learning_rate == reproduce.base_config("fashion_mnist").learning_rate == 0.05
    assert b.learning_rate == pytest.approx(0.05 / 30)                        # α0·μ/(λμ) = α0/λ
    assert {**b.to_dict(), "learning_rate": None} == {**a.to_dict(), "learning_rate": None}   # all else equal
    assert cp.constants_text(scaled, b) == cp.constants_text(at_alpha0, a)
    assert (cp.alpha_text(at_alpha0, a), cp.alpha_text(scaled, b)) == ("α0 = 0.05", "α0/λ = 0.05/30 = 0.00167")
    assert cp.cell_from_json(json.dumps(dataclasses.asdict(cell))) == cell
    assert cell.name(12, 20000) == (f"fashion_mnist-heterogeneous-{rule}-lr_over_lambda-lambda30-mu5-e12-t20000-"
                                    "m0.5-seed1")
  assert pr.row_label("constant-lr_over_lambda") == "constant (α0/λ)" and pr.row_label("constant") == "constant"


def test_the_committed_runs_keep_their_folders_and_the_new_rows_get_their_own():
  """Every run of docs/policies/runs_fashion/ is still a cell of its command, so a rerun skips all of them."""
  rows = cp.variants([*POLICIES, cp.SSP])
  names = [c.name(12.0, 20000) for c in cp.grid(rows, cp.PROFILES, [0, 1, 2], "fashion_mnist", momentum=0.5)]
  assert "fashion_mnist-heterogeneous-constant-lambda30-mu5-e12-t20000-m0.5-seed0" in names
  committed = {n for n in os.listdir(RUNS_FASHION) if n.startswith("fashion_mnist-")}
  at_alpha0 = {n for n in committed if "-lr_over_lambda-" not in n}      # the α0/λ runs may be committed later
  assert len(at_alpha0) == 72 and committed <= set(names)
  scaled = {n for n in names if "-lr_over_lambda-" in n}
  assert len(scaled) == 2 * 3 * len(STEP_AT_ALPHA0) and set(names) == at_alpha0 | scaled


def _curve(points):
  return [{"sim_time": t, "test_error": e / 100} for t, e in points]


def test_mean_curve_and_error_at_equal_simulated_time():
  runs = [_curve([(10, 60.0), (20, 30.0), (30, 20.0)]), _curve([(12, 50.0), (22, 40.0)]), []]
  curve = pr.mean_curve(runs)                      # the empty run is left out; the shortest run sets the length
  assert curve == [(pytest.approx(11.0), pytest.approx(55.0)), (pytest.approx(21.0), pytest.approx(35.0))]
  assert pr.error_at(curve, 16.0) == pytest.approx(45.0)
  assert pr.error_at(curve, 11.0) == pytest.approx(55.0) and pr.error_at(curve, 21.0) == pytest.approx(35.0)
  assert pr.error_at(curve, 5.0) is None and pr.error_at(curve, 30.0) is None
  assert pr.mean_curve([[], []]) == []


def test_dropped_fraction_counts_both_kinds_over_all_pushed():
  finals = [{"gradients_dropped": 1, "gradients_stale_dropped": 9, "staleness_histogram": {"1": 60, "30": 30}},
            {"gradients_dropped": 0, "gradients_stale_dropped": 0, "staleness_histogram": {"2": 100}}]
  assert pr.dropped_fraction(finals) == pytest.approx(10 / 200)
  assert pr.dropped_fraction([{"gradients_dropped": 0, "staleness_histogram": {"3": 5}}]) == 0.0


def _runs(errors_by_row, profile="one_slow", times=None):
  """Fabricated runs: per row, one final error (%) per seed (None: diverged); the curve falls linearly from 90 %
  to the final error over 10 evaluations at simulated times 1..10 (SSGD: 4..40)."""
  rows = {v.name: v for v in cp.variants(POLICIES)}
  out = []
  for name, errors in errors_by_row.items():
    scale = 4.0 if name == "ssgd" else 1.0
    for seed, error in enumerate(errors):
      end = 90.0 if error is None else error
      history = [{"sim_time": scale * k, "test_error": (90.0 + (end - 90.0) * k / 10) / 100} for k in range(1, 11)]
      final = {"test_error": None if error is None else error / 100, "staleness_mean": 0.0 if name == "ssgd" else 29.0,
               "staleness_max": 0 if name == "ssgd" else 120 + seed, "gradients_dropped": 0,
               "gradients_stale_dropped": 10 if name == "drop" else 0, "staleness_histogram": {"29": 90},
               **({"diverged": "diverged: 100 consecutive non-finite gradients"} if error is None else {})}
      out.append((cp.PolicyCell(rows[name], profile, seed), final, history))
  return out


RUNS = {"ssgd": [10.0, 11.0, 12.0], "inverse": [10.1, 11.0, 11.7], "constant": [14.0, 15.2, 16.1],
        "drop": [9.0, 12.0, 10.0], "polynomial": [9.5, 90.0, 10.5], "hinge": [10.0, 11.0, None],
        "dc_asgd": [None, None, None]}      # polynomial's seed 1 collapsed (at chance), hinge's seed 2 diverged


def _crossing(error, scale=1.0, target=11.5):
  """Where a fabricated curve (90 % → ``error`` over 10 evaluations) reaches ``target``, by hand: between its
  9th and 10th evaluations, t = 9 + (e₉ − target)/(e₉ − e₁₀), times ``scale``."""
  e9 = 90.0 + (error - 90.0) * 9 / 10
  return scale * (9 + (e9 - target) / (e9 - error))


def test_summary_target_and_time_to_target():
  summary = pr.summarize(_runs(RUNS))
  assert summary[("one_slow", None)] == pytest.approx(11.5)                 # SSGD's mean + 0.5
  inverse = summary[("one_slow", "inverse")]
  assert inverse["error"][0] == pytest.approx(32.8 / 3) and inverse["half"] is not None
  assert (inverse["sigma_mean"], inverse["sigma_max"], inverse["seeds"]) == (29.0, 122, 3)
  # seed errors 10.1, 11.0, 11.7 reach 11.5 between the 9th and 10th evaluations, then never: the median of
  # the three with the censored one last is the larger of the two that reached it
  assert inverse["times"] == [pytest.approx(_crossing(10.1)), pytest.approx(_crossing(11.0)), None]
  assert _crossing(10.1) == pytest.approx(9 + 6.59 / 7.99)              # e₉ = 18.09, e₁₀ = 10.1
  assert (inverse["time"], inverse["reached"]) == (pytest.approx(_crossing(11.0)), 2)
  ssgd = summary[("one_slow", "ssgd")]
  assert (ssgd["time"], ssgd["reached"]) == (pytest.approx(_crossing(11.0, 4.0)), 2)   # 12 never reaches 11.5
  assert summary[("one_slow", "drop")]["dropped"] == pytest.approx(10 / 100)
  assert summary[("one_slow", "dc_asgd")]["sigma_mean"] == 29.0             # diverged after evaluating
  hinge = summary[("one_slow", "hinge")]
  assert (hinge["outcomes"], hinge["by_seed"]) == ({"diverged": 1}, {0: 10.0, 1: 11.0})
  # the collapsed seed is counted apart, never averaged: the mean is over the two that trained
  poly = summary[("one_slow", "polynomial")]
  assert poly["outcomes"] == {"collapsed": 1} and poly["by_seed"] == {0: 9.5, 2: 10.5}
  assert poly["error"][0] == pytest.approx(10.0) and poly["outcome_by_seed"][1] == "collapsed"
  assert len(poly["trained_histories"]) == 2 and len(poly["histories"]) == 3


def test_rank_sorts_by_error_and_decides_only_where_holm_does():
  summary = pr.summarize(_runs(RUNS))
  family = pr.comparisons(summary)
  # the family: every pair of the four rows without a collapsed or diverged seed (polynomial, hinge, dc_asgd are
  # not compared), 6 paired t tests over 3 seeds each
  assert sorted(family) == [("one_slow", a, b) for a, b in (("constant", "drop"), ("constant", "inverse"),
                                                             ("constant", "ssgd"), ("drop", "inverse"),
                                                             ("drop", "ssgd"), ("inverse", "ssgd"))]
  # constant − drop = 5.0, 3.2, 6.1: t = 4.767 / (1.464/√3) = 5.64 on 2 df, p = 0.030 on its own (decided at
  # 5 %), but the third smallest of 6: Holm multiplies it by 4, 0.120 (undecided)
  cd = family[("one_slow", "constant", "drop")]
  assert cd["p"] == pytest.approx(0.0300, abs=2e-4) and cd["p_holm"] == pytest.approx(4 * cd["p"])
  assert family[("one_slow", "constant", "ssgd")]["p_holm"] == pytest.approx(6 * family[("one_slow", "constant",
                                                                                          "ssgd")]["p"])
  rows = pr.rank(summary, "one_slow", family)
  assert [r["variant"].name for r in rows] == ["drop", "inverse", "ssgd", "constant", "polynomial", "hinge",
                                               "dc_asgd"]
  # a row with a collapsed or diverged seed is last and compared with none, even on its trained seeds
  assert (rows[-1]["better_than"], rows[-1]["vs_ssgd"], rows[-1]["time"]) == ([], None, None)
  assert all(n not in r["better_than"] for r in rows for n in ("polynomial", "hinge", "dc_asgd"))
  by = {r["variant"].name: r for r in rows}
  assert by["polynomial"]["vs_ssgd"]["decided"] is None and by["polynomial"]["better_than"] == []
  assert by["constant"]["vs_ssgd"]["decided"] == "worse"
  assert by["inverse"]["vs_ssgd"]["decided"] == "undecided"
  assert by["ssgd"]["better_than"] == ["constant"] and by["inverse"]["better_than"] == ["constant"]
  assert by["drop"]["better_than"] == []                 # its p = 0.03 against constant does not survive Holm
  assert by["ssgd"]["vs_ssgd"] is None


def test_runs_that_diverged_before_evaluating_have_no_staleness():
  rows = {v.name: v for v in cp.variants(POLICIES)}
  final = {"test_error": None, "diverged": "diverged: 100 consecutive non-finite gradients", "gradients_dropped": 100}
  summary = pr.summarize(_runs({"ssgd": [10.0]}) + [(cp.PolicyCell(rows["dc_asgd"], "one_slow", 0), final, [])])
  dc = summary[("one_slow", "dc_asgd")]
  assert (dc["sigma_mean"], dc["sigma_max"], dc["dropped"], dc["time"]) == (None, None, 1.0, None)
  table = pr.table_lines(pr.rank(summary, "one_slow"), {}, summary[("one_slow", "ssgd")])
  assert table[-1].endswith("| not reached (0 of 1 reached) | – | – | – | 100.0 % |")
  assert pr.dropped_fraction([{"test_error": None}]) is None                  # nothing recorded: no fraction


def test_the_report_shows_a_rule_at_alpha0_and_at_alpha0_over_lambda_with_the_same_statistics():
  runs = _runs({**RUNS, "constant-lr_over_lambda": [10.2, 11.1, 12.3], "drop-lr_over_lambda": [9.9, None, 10.0]})
  summary = pr.summarize(runs)
  family = pr.comparisons(summary)
  # the family grows: constant at α0/λ trained in every seed and is compared with the four others (6 + 4 pairs);
  # drop at α0/λ has a diverged seed and is compared with none
  assert len(family) == 10 and ("one_slow", "constant-lr_over_lambda", "ssgd") in family
  assert not any("drop-lr_over_lambda" in key for key in family)
  alphas = {"constant": "α0 = 0.05", "constant-lr_over_lambda": "α0/λ = 0.05/30 = 0.00167"}
  text = pr.render_markdown(summary, profiles=["one_slow"], constants={"constant": "none",
                            "constant-lr_over_lambda": "none"}, alphas=alphas, command="c", note="", setting="",
                            seeds=[0, 1, 2], wall_s=0.0, figure="x.png", runs=[(c.name(1.0), f) for c, f, _ in runs])
  table = {line.split("|")[2].strip(): line for line in text.splitlines() if line.startswith("| ") and "**" in line}
  assert table["**constant**"].startswith("| 5 | **constant** | none | 15.10 ± ")
  assert "| **constant (α0/λ)** | none | 11.20 ± " in table["**constant (α0/λ)**"]
  assert "| 9.95 ± 0.64 (2 of 3 seeds; 1 diverged) | -1.05" in table["**drop (α0/λ)**"]
  # constant − constant at α0/λ = 3.8, 4.1, 3.8: decided after Holm over the 10, and named by its label
  assert table["**constant (α0/λ)**"].split("|")[6].strip() == "constant"
  assert pr.better(family, "one_slow", "constant-lr_over_lambda", "constant")
  assert "| constant (α0/λ) | α0/λ = 0.05/30 = 0.00167 | none | plain ASGD (staleness ignored); at α0/λ" in text
  assert "| constant | α0 = 0.05 | none | plain ASGD (staleness ignored) |" in text
  assert "The page makes 10 paired comparisons" in text and "The family grows with the rows" in text
  assert "`mnist5k-one_slow-drop-lr_over_lambda-lambda30-mu5-e1-seed1` | diverged |" in text


def test_a_partial_grid_shows_its_waiting_rows_and_compares_only_the_complete_ones():
  rows = {v.name: v for v in cp.variants([*POLICIES, cp.SSP])}
  runs = _runs({"ssgd": [10.0, 11.0, 12.0], "inverse": [10.1, 11.0, 11.7], "constant-lr_over_lambda": [10.4]})
  waiting = [cp.PolicyCell(rows[n], "one_slow", seed) for n, seeds in (("constant-lr_over_lambda", (1, 2)),
                                                                       ("ssp-lr_over_lambda", (0, 1, 2)))
             for seed in seeds]
  summary = pr.summarize(runs, waiting=waiting)
  assert summary[("one_slow", "ssp-lr_over_lambda")]["waiting"] == 3
  assert summary[("one_slow", "ssp-lr_over_lambda")]["seeds"] == 0
  assert summary[("one_slow", "constant-lr_over_lambda")]["waiting"] == 2
  assert sorted(pr.comparisons(summary)) == [("one_slow", "inverse", "ssgd")]   # only the complete rows
  ranked = pr.rank(summary, "one_slow")
  assert [r["variant"].name for r in ranked] == ["inverse", "ssgd", "constant-lr_over_lambda", "ssp-lr_over_lambda"]
  assert ranked[2]["vs_ssgd"]["decided"] is None                              # waiting: compared with none
  text = pr.render_markdown(summary, profiles=["one_slow"], constants={}, command="c", note="", setting="",
                            seeds=[0, 1, 2], wall_s=0.0, figure="x.png",
                            runs=[(c.name(1.0), f) for c, f, _ in runs], waiting=len(waiting))
  table = [line for line in text.splitlines() if line.startswith("| ") and "**" in line]
  assert table[2].startswith("| 3 | **constant (α0/λ)** |  | 10.40; 2 of 3 seeds waiting | +0.40 (not compared) |")
  assert table[3] == "| – | **ssp (α0/λ)** |  | waiting (0 of 3 seeds) | – | – | – | – | – | – | – |"
  assert "The page makes 1 paired comparisons" in text and "**Partial grid.** 5 of the command's 12 runs" in text
  assert "7 runs trained for" in text and "5 more wait for their runs" in text and "(`--report-only`)" in text


def test_report_only_trains_nothing_and_shows_every_row_waiting(tmp_path, capsys):
  out, root = tmp_path / "p.md", tmp_path / "r"
  argv = ["compare_policies.py", "--dataset", "mnist5k", "--epochs", "1", "--root", str(root), "--out", str(out),
          "--seeds", "0", "--profiles", "one_slow", "--policies", "inverse", "drop", "--report-only"]
  assert cp.main(argv) == 0
  assert not root.exists() or not [p for p in root.iterdir() if p.name != ".jax_cache"]
  text = out.read_text()
  command = text.split("```bash\n")[1].split("\n")[0]                          # the grid's, not this invocation's
  assert command.startswith("python launch/compare_policies.py --dataset mnist5k --epochs 1 --root ")
  assert command.endswith("--policies inverse drop")
  assert "| – | **drop (α0/λ)** | bound = 60 | waiting (0 of 1 seeds) |" in text
  assert "α0 = 0.05 (α0/λ = 0.00167 in the rows marked α0/λ)" in text
  assert "4 waiting" in capsys.readouterr().out


def test_one_seed_decides_nothing():
  rows = pr.rank(pr.summarize(_runs({"ssgd": [10.0], "constant": [30.0]})), "one_slow")
  assert [r["better_than"] for r in rows] == [[], []]
  assert rows[1]["vs_ssgd"]["decided"] == "undecided"


def test_report_has_a_row_per_policy_the_missing_ssp_the_note_and_the_figure(tmp_path):
  summary = pr.summarize(_runs(RUNS))
  runs = [(c.name(1.0), f) for c, f, _ in _runs(RUNS)]
  text = pr.render_markdown(summary, profiles=["one_slow", "heterogeneous"], constants={"drop": "bound = 60"},
                            command="python launch/compare_policies.py --epochs 1", note="Why: the machine.",
                            setting="Setting: x.", seeds=[0, 1, 2], wall_s=12.0, figure="policies/x.png",
                            runs=runs, missing=["ssp"])
  assert "<!-- note -->\nWhy: the machine.\n<!-- /note -->" in text
  (tmp_path / "p.md").write_text(text)
  assert cp.kept_note(str(tmp_path / "p.md")) == "Why: the machine."
  assert "python launch/compare_policies.py --epochs 1" in text and "![test error against simulated time]" in text
  assert "SSGD target: 11.50 %" in text and "No run of this profile." in text
  table = [line for line in text.splitlines() if line.startswith("| ") and "**" in line]
  assert [line.split("|")[2].strip() for line in table] == ["**drop**", "**inverse**", "**ssgd**", "**constant**",
                                                          "**polynomial**", "**hinge**", "**dc_asgd**", "**ssp**"]
  assert "| 1 | **drop** | bound = 60 | 10.33 ± " in table[0]
  assert f"| +4.10 ± 0.25 (worse, Holm p = {6 * 0.000198:.2g}) |" in table[3] and pr.NOT_RUN in table[7]
  assert "(Holm p = 1) | – |" in table[0]                                # drop decides nothing after Holm
  # the collapsed seed and the diverged one are counted apart, the means over the two seeds that trained
  assert "| 10.00 ± 6.35 (2 of 3 seeds; 1 collapsed) | -1.00 ± 6.35 (not compared) | – |" in table[4]
  assert "| 10.50 ± 6.35 (2 of 3 seeds; 1 diverged) |" in table[5] and "diverged in" not in table[5]
  assert "| – (diverged in 3 of 3 seeds) | – | – | not reached (0 of 3 reached) |" in table[6]
  # censored median: inverse reached the target in 2 of 3 seeds; SSGD's median over inverse's
  assert f"| {_crossing(11.0):.1f} (2 of 3 reached) | 4.00× |" in table[1]
  assert "| `mnist5k-one_slow-polynomial-lambda30-mu5-e1-seed1` | 90.00 (collapsed) |" in text
  assert ("The page makes 6 paired comparisons: every pair of rows of a profile (both profiles together) neither "
          "of which has a collapsed or diverged seed") in text
  assert "Holm–Bonferroni adjusted p-value over all 6 is at most 0.05" in text and "2 of the 6 are" in text
  assert "A seed *collapsed* when its final train loss is within 0.01 of ln 10 = 2.3026" in text
  assert "at or above 85 %" in text and "(the runs here evaluated 10 times)" in text
  for mean, half in re.findall(r"\| (\d+\.\d+) ± (\d+\.\d+)", text):     # no error cell's interval goes below 0
    assert float(mean) - float(half) >= 0
  assert "| `mnist5k-one_slow-hinge-lambda30-mu5-e1-seed2` | diverged |" in text
  # the async runs end at 10 s, when SSGD's curve (4 s per evaluation, 90 % → 11 %) is at 90 − 79·2.5/10 %
  assert ("Equal simulated time: the async runs end at ≈ 10 s; SSGD's mean test error then is 70.2 % (the best "
          "async row, drop, ends at 10.33 %); SSGD ends at 40 s with 11.00 %.") in text
  assert "trained none of them (all were done) and only wrote the report" in text
  (tmp_path / "p.md").write_text("no markers")
  assert cp.kept_note(str(tmp_path / "p.md")) == "" and cp.kept_note(str(tmp_path / "none.md")) == ""


@pytest.mark.parametrize("argv, message", [
    (["--profiles", "fast"], "--profiles 'fast' is invalid"),
    (["--policies", "sqrt"], "--policies 'sqrt' is invalid"),
    (["--dataset", "cifar10"], "--dataset 'cifar10' is invalid"),
    (["--epochs", "0"], "--epochs 0 is invalid"),
    (["--seeds", "-1"], "--seeds -1 is invalid"),
    (["--train-examples", "5"], "--train-examples 5 is invalid"),
    (["--out", "x.txt"], "--out 'x.txt' is invalid"),
    (["--cell-timeout-s", "0"], r"--cell-timeout-s 0 is invalid; allowed: seconds > 0"),
    (["--cell-timeout-s", "soon"], "argument --cell-timeout-s: invalid float value: 'soon'"),
])
def test_bad_flags_are_one_line_errors(argv, message, tmp_path):
  with pytest.raises(ValueError, match=message):
    cp.parse_args(["--root", str(tmp_path / "r"), "--dataset", "mnist5k", *argv])


def test_defaults_are_the_issues_full_setting(tmp_path):
  args = cp.parse_args(["--root", str(tmp_path / "r"), "--out", str(tmp_path / "p.md")])
  assert args.dataset == cp.default_dataset()
  assert args.epochs == {"fashion_mnist": 12.0, "mnist5k": 20.0}[args.dataset]   # the base configs' epochs
  # every policy registered when the script runs (other tests may have registered their own by now)
  policies = list(optim.available_policies())
  assert (args.seeds, args.profiles, args.policies) == ([0, 1, 2], list(cp.PROFILES), [*policies, cp.SSP])


def test_a_declared_momentum_goes_into_every_row_its_name_and_the_setting(tmp_path):
  rows = cp.variants(["inverse"], learners=30)
  cells = cp.grid(rows, ["one_slow"], [0], "fashion_mnist", momentum=0.5)
  assert {c.momentum for c in cells} == {0.5}
  assert {cp.cell_config(c, epochs=1.0).momentum for c in cells} == {0.5}
  assert cells[0].name(12, 20000) == "fashion_mnist-one_slow-ssgd-lambda30-mu5-e12-t20000-m0.5-seed0"
  assert cp.cell_from_json(json.dumps(dataclasses.asdict(cells[1]))) == cells[1]
  args = cp.parse_args(["--dataset", "fashion_mnist", "--momentum", "0.5", "--root", str(tmp_path),
                        "--out", str(tmp_path / "p.md")])
  assert "momentum 0.5 (the base config has 0.9)" in cp.setting_text(args)
  with pytest.raises(ValueError, match=r"--momentum -0.1 is invalid; allowed: 0 <= momentum < 1"):
    cp.parse_args(["--momentum", "-0.1", "--root", str(tmp_path), "--out", str(tmp_path / "p.md")])


def test_a_row_whose_runs_timed_out_or_whose_learners_failed_says_so_and_averages_only_the_finished():
  rows = {v.name: v for v in cp.variants(POLICIES)}
  timed_out = {"test_error": None, "timed_out": "ran past --cell-timeout-s 60 s; ...", "wall_s": 60.0}
  failed = {"test_error": None, "learners_failed": "every learner died; the last: learner 3: OSError: x"}
  runs = _runs({"ssgd": [10.0, 12.0], "constant": [20.0]})
  runs += [(cp.PolicyCell(rows["constant"], "one_slow", 1), timed_out, []),
           (cp.PolicyCell(rows["dc_asgd"], "one_slow", 0), failed, []),
           (cp.PolicyCell(rows["dc_asgd"], "one_slow", 1), timed_out, [])]
  summary = pr.summarize(runs)
  constant, dc = summary[("one_slow", "constant")], summary[("one_slow", "dc_asgd")]
  assert constant["by_seed"] == {0: 20.0} and constant["outcomes"] == {"timed out": 1} and not pr.failed(constant)
  assert dc["outcomes"] == {"learners failed": 1, "timed out": 1} and not dc["by_seed"]
  table = "\n".join(pr.table_lines(pr.rank(summary, "one_slow"), {}, summary[("one_slow", "ssgd")]))
  assert "| 20.00 (1 of 2 seeds; 1 timed out) |" in table
  assert "| – (learners failed in 1 of 2 seeds, timed out in 1 of 2 seeds) |" in table


def test_a_kept_note_with_a_number_stops_the_comparison_in_one_line_before_any_run(tmp_path, capsys):
  out, root = tmp_path / "p.md", tmp_path / "r"
  out.write_text("# p\n\n<!-- note -->\nhinge trains 8× slower than inverse.\n<!-- /note -->\n")
  argv = ["compare_policies.py", "--dataset", "mnist5k", "--epochs", "1", "--root", str(root), "--out", str(out)]
  assert cp.main(argv) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "has 1 number(s) the command does not recompute (first: '8')" in err
  assert not root.exists() or not list(root.iterdir())
