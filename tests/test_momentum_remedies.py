"""launch/momentum_remedies.py: the declared grid, the phase-2 rule, the report of a partial grid, the flags, and
one tiny end-to-end run of the command."""

import json
import math
import os

import pytest

from launch import momentum_remedies as mr
from launch import momentum_remedies_report as report
from launch.momentum_remedies import RemedyCell
from sajax import config as config_lib
from sajax import momentum
from tests.helpers import every_model_is_the_mlp


def test_phase1_is_80_runs_seed_major_each_the_declared_config():
  cells = mr.phase1_cells(mr.SEEDS)
  assert len(cells) == 80 == (1 + 3 * 5) * 5
  assert len({c.name(12.0) for c in cells}) == 80
  assert [c.seed for c in cells] == [s for s in range(5) for _ in range(16)]          # seed-major
  assert [(c.row, c.n) for c in cells[:16]] == [("ssgd", 0)] + [(row, n) for n in (1, 4, 30) for row in mr.ROWS]
  assert set(mr.REMEDIES) - {"warmup"} <= set(momentum.MOMENTUM_RULES)
  for cell in cells[:16]:
    config = mr.cell_config(cell, 12.0)
    config_lib.validate(config)
    assert (config.dataset, config.executor, config.sim_profile) == ("fashion_mnist", "simulated", "heterogeneous")
    assert (config.learners, config.batch_per_learner, config.train_examples) == (30, 5, 20000)
    assert (config.momentum, config.learning_rate, tuple(config.lr_boundaries_epochs)) == (0.9, 0.05, (8, 10.5))
    assert config.epochs * 1 == 12 and math.isclose(config.eval_every_epochs, 12 / 40)
    assert config.lr_warmup_epochs == (1.0 if cell.row == "warmup" else 0.0)
    assert config.momentum_rule == (cell.row if cell.row in ("delayed_nesterov", "compensation", "lookahead")
                                    else "plain")
    assert (config.momentum_rule_period, config.momentum_rule_staleness_decay) == (0, 0.99)   # the defaults
    c = config_lib.protocol_of(config).gradients_per_update
    if cell.row == "ssgd":
      assert config.protocol == "hardsync" and c == 30 == cell.c
    else:
      assert (config.protocol, config.n, config.policy) == ("softsync", cell.n, "inverse")
      assert c == cell.c == {1: 30, 4: 7, 30: 1}[cell.n]


def test_phase2_is_the_remedy_and_ssgd_at_n_lambda_on_all_images_first_three_seeds():
  cells = mr.phase2_cells("compensation", mr.SEEDS)
  assert [(c.row, c.n, c.seed, c.train_examples) for c in cells] == [
      (row, n, s, 0) for s in (0, 1, 2) for row, n in (("ssgd", 0), ("compensation", 30))]
  assert not {c.name(12.0) for c in cells} & {c.name(12.0) for c in mr.phase1_cells(mr.SEEDS)}
  assert mr.cell_config(cells[1], 12.0).train_examples == 0 and mr.cell_config(cells[1], 12.0).sim_profile == \
      "heterogeneous"


def _final(error, loss=0.3, **extra):
  return {"test_error": error, "train_loss": loss, "staleness_mean": 29.0, "sim_time": 1500.0, "wall_s": 170.0,
          **extra}


def test_the_phase2_rule_lowest_mean_error_a_collapsed_seed_last_ties_to_the_first():
  errors = {"delayed_nesterov": [0.12, 0.12], "compensation": [0.11, 0.11], "lookahead": [0.10, 0.90],
            "warmup": [0.11, 0.11]}
  runs = [(RemedyCell(row, 30, s), _final(e, 2.3026 if e == 0.9 else 0.3)) for row, es in errors.items()
          for s, e in enumerate(es)]
  runs += [(RemedyCell("plain", 30, 0), _final(0.05)), (RemedyCell("delayed_nesterov", 4, 0), _final(0.01))]
  ranking = mr.select_remedy(runs, 10)
  # lookahead's trained seed is the best, but its other seed collapsed: last. compensation ties warmup: first.
  assert [r["row"] for r in ranking] == ["compensation", "warmup", "delayed_nesterov", "lookahead"]
  assert ranking[0]["mean"] == pytest.approx(11.0) and ranking[-1]["failed"] == 1 and ranking[-1]["trained"] == 1
  diverged = [(c, {**f, "test_error": None, "diverged": "non-finite"} if c.row == "compensation" else f)
              for c, f in runs]
  assert [r["row"] for r in mr.select_remedy(diverged, 10)][:2] == ["warmup", "delayed_nesterov"]


def _history(final_error, reach=True):
  errors = [0.5, 0.2, final_error] if reach else [0.5, 0.4, final_error]
  return [{"epoch": e, "test_error": x, "sim_time": 100.0 * (i + 1), "train_loss": 0.3}
          for i, (e, x) in enumerate(zip((4.0, 8.0, 12.0), errors))]


def _partial_grid():
  """Seeds 0-2 of phase 1: SSGD at 10 %; n = 1 and 4 at +0.1, n = 30 at +0.2 points (+0.05 per seed: within);
  at n = 30 plain collapsed in seed 1, look-ahead at 14 % never reaching the target, warm-up at +0.5 (undecided
  over its two seeds); seed 2 of every n = 4 cell and of the n = 30 warm-up not run."""
  runs = []
  for cell in mr.phase1_cells([0, 1, 2]):
    error = 0.1 + {0: 0, 1: 0.001, 4: 0.001, 30: 0.002}[cell.n] + 0.001 * cell.seed + 0.0005 * cell.seed * (
        cell.row != "ssgd") + 0.003 * (cell.row == "warmup" and cell.n == 30)
    final, history = _final(error), _history(error)
    if cell.n == 30 and cell.row == "plain" and cell.seed == 1:
      final, history = _final(0.9, 2.3026), _history(0.9, reach=False)
    if cell.n == 30 and cell.row == "lookahead":
      final, history = _final(0.14), _history(0.14, reach=False)
    if cell.seed == 2 and (cell.n == 4 or (cell.n == 30 and cell.row == "warmup")):
      final, history = None, []
    runs.append((cell, final, history))
  return runs


def _render(phase1, phase2=(), ranking=None):
  return report.render(phase1, list(phase2), ranking, learners=30, seeds=[0, 1, 2], epochs=12.0,
                       train_examples=20000, command="python launch/momentum_remedies.py", note="", classes=10,
                       trained=0, wall_s=0.0, figure="m/test_error.png")


def _line(text, section, label):
  return next(line for line in text.split(section)[1].splitlines() if line.startswith(f"| {label}"))


def test_the_report_of_a_partial_grid_shows_what_it_has_and_the_goal(tmp_path):
  phase1 = _partial_grid()
  text = _render(phase1)
  assert "## Declared before any run" in text and "= 48 runs" in text and "seeds 0, 1, 2 (6 runs)" in text
  assert "Phase 1: **42 of 48 runs done** (seeds complete: 0, 1)" in text
  assert "Phase 2: waits for phase 1 (6 runs to go)" in text and "python launch/momentum_remedies.py --phase 1" in text
  plain = _line(text, "### n = 30", "plain momentum")
  assert "| 3 of 3 |" in plain and "collapsed in 1 of 3 seeds" in plain and "| worse | worse (no test" in plain
  look = _line(text, "### n = 30", "look-ahead")
  assert "not reached (0 of 3 reached)" in look and "| worse | worse (p = " in look
  warm = _line(text, "### n = 30", "warm-up")
  assert "| 2 of 3 |" in warm and "| undecided (80 % power at 18 seeds) |" in warm   # what it has; the power
  assert "| – (1 of 2 reached) |" in warm                                 # censored: no median of 2, 1 reached
  n1 = text.split("### n = 1 ")[1].split("### n = 4")[0]
  assert n1.count("| within | undecided (p = ") == 5 and n1.count("(3 of 3 reached)") == 5   # Holm over 14
  goal = text.split("## Where the goal was reached")[1]
  assert "**12 of 15 cells within 0.5 point of SSGD** by the paired 95 % interval (0 after Holm" in goal
  assert "Not within: n = 30 plain (worse), n = 30 lookahead (worse), n = 30 warmup (undecided)." in goal
  assert "Rows within at every n: delayed_nesterov, compensation." in goal and "Phase 1 is not complete" in goal
  from launch.reproduce_report import kept_note
  (tmp_path / "m.md").write_text(text.replace("<!-- note -->\n", "<!-- note -->\nIt waits.\n"))
  assert kept_note(str(tmp_path / "m.md")) == "It waits."
  png = report.plot_curves(phase1, [], str(tmp_path / "c.png"))
  assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_cells_with_no_run_wait_and_so_does_the_goal():
  phase1 = [(c, f if i < 6 else None, h if i < 6 else []) for i, (c, f, h) in enumerate(_partial_grid())]
  phase1[5] = (phase1[5][0], {"test_error": None, "timed_out": "ran past --cell-timeout-s 9 s"}, [])
  text = _render(phase1)
  assert "Phase 1: **5 of 48 runs done**;" in text                       # a timed-out run is to be resumed
  assert "| 0 of 3 | – | timed out |" in _line(text, "### n = 1 ", "warm-up")
  assert "| 0 of 3 | waiting |" in _line(text, "### n = 4", "plain momentum")
  assert "| 1 of 3 |" in _line(text, "### n = 1 ", "plain momentum")
  goal = text.split("## Where the goal was reached")[1]
  assert "Waiting (no run, or no SSGD run, done yet): n = 4 plain, " in goal and "n = 30 warmup." in goal
  nothing = _render([(c, None, []) for c, _, _ in phase1])
  assert "The goal is decided in no cell yet: all 15 cells wait" in nothing and "| (no run done yet) |" in nothing


def test_a_complete_phase1_selects_the_remedy_and_phase2_is_reported():
  phase1 = [(c, f or _final(0.2), h or _history(0.2)) for c, f, h in _partial_grid()]
  ranking = mr.select_remedy([(c, f) for c, f, _ in phase1], 10)
  assert [r["row"] for r in ranking] == ["delayed_nesterov", "compensation", "warmup", "lookahead"]   # a tie: first
  phase2 = [(c, _final(0.09 + 0.01 * (c.row != "ssgd")), _history(0.09)) for c in
            mr.phase2_cells(ranking[0]["row"], [0, 1, 2])]
  text = _render(phase1, phase2, ranking)
  assert "Phase 2 runs **delayed_nesterov**" in text and "**6 of 6 runs done**" in text
  assert "Phase 2 (delayed_nesterov at all the images): **worse**" in text   # +1 point in every seed


def test_bad_flags_a_note_with_numbers_and_phase2_before_phase1_are_one_line_exit_2_writing_nothing(tmp_path, capsys):
  from tests.test_momentum_staleness import _fashion_idx
  root, out = str(tmp_path / "r"), str(tmp_path / "d" / "m.md")
  os.makedirs(tmp_path / "d")
  data = ["--data-dir", _fashion_idx(tmp_path / "fashion")]     # whether or not this machine has the dataset
  for argv, message in [(["--phase", "3"], "--phase '3' is invalid; allowed: 1, 2, all"),
                        (["--learners", "1"], "--learners 1 is invalid; allowed: integers 2..128"),
                        (["--seeds", "-1"], "--seeds -1 is invalid"),
                        (["--out", str(tmp_path / "m.txt")], "is invalid; allowed: a path ending in .md"),
                        (["--bogus"], "unrecognized arguments: --bogus"),
                        (["--phase", "2"], "--phase 2: 80 of the 80 phase-1 runs")]:
    assert mr.main(["m", "--root", root, "--out", out, *data, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
  (tmp_path / "d" / "m.md").write_text("<!-- note -->\nIt took 3 seeds.\n<!-- /note -->\n")
  assert mr.main(["m", "--root", root, "--out", out, "--report-only", *data]) == 2
  assert "hand-written note" in capsys.readouterr().err
  assert not os.path.exists(root) and os.listdir(tmp_path / "d") == ["m.md"]


def test_command_text_drops_what_one_invocation_chooses():
  assert mr.command_text(["--phase", "1", "--seeds", "0", "1", "--report-only", "--phase=2"]) == \
      "python launch/momentum_remedies.py --seeds 0 1"


@pytest.mark.slow
def test_end_to_end_phase1_then_phase2_on_small_idx_files(tmp_path, capsys, monkeypatch):
  """Two phase-1 cells (SSGD and look-ahead at n = λ) and phase 2's remedy, each in a child process as the command
  runs them, on 256 training images at λ = 2; then a rerun trains nothing."""
  from tests.test_momentum_staleness import _fashion_idx
  every_model_is_the_mlp(monkeypatch)
  every1, every2 = mr.phase1_cells, mr.phase2_cells
  monkeypatch.setattr(mr, "phase1_cells", lambda seeds, learners, train: [
      c for c in every1(seeds, learners, train) if c.row == "ssgd" or (c.row, c.n) == ("lookahead", learners)])
  monkeypatch.setattr(mr, "phase2_cells", lambda remedy, seeds, learners: every2(remedy, seeds, learners)[1:2])
  root, out = str(tmp_path / "runs"), str(tmp_path / "docs" / "m.md")
  os.makedirs(tmp_path / "docs")
  argv = ["momentum_remedies.py", "--learners", "2", "--epochs", "0.5", "--train-examples", "256", "--seeds", "0",
          "--data-dir", _fashion_idx(tmp_path / "fashion"), "--root", root, "--out", out]
  assert mr.main(argv + ["--phase", "1"]) == 0
  first = mr.phase1_cells([0], 2, 256)
  assert len(first) == 2 and all(os.path.exists(mr.final_path(c, 0.5, root)) for c in first)
  config = json.load(open(os.path.join(root, first[1].name(0.5), "config.json")))
  assert (config["momentum_rule"], config["sim_profile"], config["momentum"]) == ("lookahead", "heterogeneous", 0.9)
  text = open(out).read()
  assert "Phase 1: **2 of 2 runs done**" in text and "0 of 1 runs done" in text
  capsys.readouterr()
  assert mr.main(argv) == 0                               # phase 2: the remedy the rule picks, on all the images
  ranking = mr.select_remedy([(c, mr.read_final(c, 0.5, root)) for c in first], 10)
  second = mr.phase2_cells(ranking[0]["row"], [0], 2)
  assert os.path.exists(mr.final_path(second[0], 0.5, root)) and second[0].train_examples == 0
  text = open(out).read()
  assert "**1 of 1 runs done**" in text and f"Phase 2 runs **{ranking[0]['row']}**" in text
  assert open(tmp_path / "docs" / "m" / "test_error.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  stamps = [os.path.getmtime(mr.final_path(c, 0.5, root)) for c in first + second]
  assert mr.main(argv) == 0
  assert stamps == [os.path.getmtime(mr.final_path(c, 0.5, root)) for c in first + second]
  assert "0 trained" in capsys.readouterr().out.splitlines()[-1]
