"""launch/local_sgd.py: the declared grid and its configs, the communication model's constants, the report of
fabricated runs (a collapsed seed, a censored target, the interval arithmetic by hand), bad input, and one tiny
end-to-end run of the command."""

import json
import math
import os
import statistics

import pytest

from launch import local_sgd as ls
from launch import local_sgd_report as report
from launch.local_sgd import LocalCell
from sajax import config as config_lib
from tests.helpers import every_model_is_the_mlp


def test_the_grid_is_66_runs_seed_major_each_row_its_declared_config():
  cells = ls.cells(ls.SEEDS)
  assert len(cells) == 66 == 11 * 2 * 3 and len({c.name(12.0) for c in cells}) == 66
  assert [c.seed for c in cells] == [s for s in range(3) for _ in range(22)]               # seed-major
  assert [c.row for c in cells[:11]] == [
      "ssgd", "async", "diloco-h8", "diloco-h32", "local-h8-constant", "local-h8-polynomial", "local-h8-inverse",
      "local-h32-constant", "local-h32-polynomial", "local-h32-inverse", "dylu-h32"]
  for cell in cells[:22]:
    config = ls.cell_config(cell, 12.0)
    config_lib.validate(config)
    row = ls.ROW_OF[cell.row]
    assert (config.dataset, config.executor, config.sim_profile) == ("fashion_mnist", "simulated", "heterogeneous")
    assert (config.sim_bandwidth, config.sim_latency) == (2.2e6, 0.01)
    assert (config.batch_per_learner, config.train_examples) == ({4: 32, 16: 8}[cell.learners], 20000)
    assert (config.momentum, config.learning_rate, tuple(config.lr_boundaries_epochs)) == (0.9, 0.05, (8, 10.5))
    assert math.isclose(config.eval_every_epochs, 12 / 40)
    assert (config.local_steps, config.outer_optimizer, config.dynamic_local_steps) == (
        row.steps, row.outer, row.dynamic)
    assert (config.inner_optimizer, config.inner_momentum, config.inner_learning_rate) == ("sgd", 0.0, None)
    c = config_lib.protocol_of(config).gradients_per_update
    assert c == (cell.learners if row.protocol == "hardsync" else 1)
    assert config.policy == row.policy
    assert json.loads(config.policy_args) == ({"a": 0.5} if row.policy == "polynomial" else {})
  assert {ls.ROW_OF[c.row].outer for c in cells if c.row.startswith("diloco")} == {"nesterov"}
  assert {ls.ROW_OF[c.row].outer for c in cells if c.row.startswith(("local", "dylu"))} == {"delayed_nesterov"}
  assert ls.ROW_OF["dylu-h32"].policy == "async_local_sgd"


def test_the_communication_model_a_pull_and_a_push_cost_about_one_mean_step():
  import jax
  from sajax import models
  from sajax.executors import speed
  from sajax.executors.comm import CommModel, tree_bytes
  model = models.create_model("small_cnn", 10)      # shapes only: the bytes without initialising
  params = jax.eval_shape(lambda key: models.init_params(model, key, (28, 28, 1)), jax.random.PRNGKey(0))
  assert tree_bytes(params) == ls.MESSAGE_BYTES
  comm = CommModel.from_config(ls.cell_config(LocalCell("ssgd", 4, 0), 12.0), params)
  assert comm.cycle_time == pytest.approx(2 * (0.01 + ls.MESSAGE_BYTES / 2.2e6))
  assert comm.cycle_time == pytest.approx(statistics.fmean(speed.HETEROGENEOUS_FACTORS), rel=0.02)


def _history(errors, step_s=100.0, step_bytes=1e9):
  return [{"epoch": 4.0 * (i + 1), "test_error": e, "train_loss": 0.3, "sim_time": step_s * (i + 1),
           "bytes_moved": step_bytes * (i + 1)} for i, e in enumerate(errors)]


def _final(error, loss=0.3):
  return {"test_error": error, "train_loss": loss, "staleness_mean": 3.0, "sim_time": 300.0, "bytes_moved": 3e9,
          "wall_s": 400.0}


# λ = 4, seeds 0-2, final errors in %. SSGD 10.0, 10.2, 10.4: target 10.7. Every run's history: 20 %, 10 %, final
# (it reaches 10.7 at t = 100 + 100 · (20 − 10.7)/(20 − 10) = 193 s and 1.93 GB), except where noted.
ERRORS = {"ssgd": (10.0, 10.2, 10.4), "async": (10.3, 90.0, 10.5), "diloco-h8": (10.5, 10.9, 11.3),
          "diloco-h32": (10.4, 10.6, 10.8), "local-h8-constant": (11.0, 11.1, 11.2),
          "local-h8-polynomial": (10.5, 10.6, 10.7), "local-h8-inverse": (10.8, 10.95, 11.1),
          "local-h32-constant": (10.6, 10.9, 10.7), "local-h32-polynomial": (10.7, 10.6, 10.8),
          "local-h32-inverse": (12.0, 12.5, 90.0), "dylu-h32": (10.5, 10.5, 10.5)}


def _runs():
  runs = []
  for cell in ls.cells([0, 1, 2], [4, 16]):
    if cell.learners == 16:
      runs.append((cell, None, []))
      continue
    e = ERRORS[cell.row][cell.seed]
    final = _final(e / 100, 2.3026 if e == 90.0 else 0.3)
    if cell.row == "local-h32-inverse":        # censored: never at the target (two at 12 %, one collapsed)
      history = _history([0.2, 0.15, e / 100])
    elif cell.row == "local-h32-polynomial":   # 2.5× sooner, 5× fewer bytes
      history = _history([0.2, 0.10, e / 100], step_s=40.0, step_bytes=2e8)
    else:
      history = _history([0.2, 0.10, e / 100])
    runs.append((cell, final, history))
  return runs


def _render(runs):
  return report.render(runs, learners=[4, 16], seeds=[0, 1, 2], epochs=12.0, train_examples=20000,
                       command="python launch/local_sgd.py", note="", classes=10, trained=0, wall_s=0.0,
                       figure="local_sgd/test_error.png")


def _line(text, label):
  section = text.split("## λ = 4 (μ = 32)")[1].split("## λ = 16")[0]
  return next(line for line in section.splitlines() if line.startswith(f"| {label} "))


def test_the_report_of_fabricated_runs_intervals_by_hand_a_collapsed_seed_a_censored_target(tmp_path):
  text = _render(_runs())
  assert "## Declared before any run" in text and "= 66 runs" in text and "2τ = 1.55 s" in text
  assert "**33 of 66 runs done**" in text and "SSGD's target: 10.70 %" in text
  # DiLoCo H = 8: errors 10.5, 10.9, 11.3 (sd 0.4); paired differences 0.5, 0.7, 0.9 (sd 0.2); t_0.975,2 = 4.3027
  t = 4.302653
  assert f"{t * 0.4 / math.sqrt(3):.2f}" == "0.99" and f"{t * 0.2 / math.sqrt(3):.2f}" == "0.50"
  diloco = _line(text, "DiLoCo (hardsync, H = 8)")
  assert "| 3 of 3 | 10.90 ± 0.99 | – | +0.70 ± 0.50 [+0.20, +1.20] | undecided" in diloco
  assert "| 193 (3 of 3 reached) | 1.00× | 1.93 GB (3 of 3 reached) | 1.00× |" in diloco
  collapsed = _line(text, "async SGD (H = 1, inverse)")
  assert "10.40 ± 1.27 | collapsed in 1 of 3 seeds |" in collapsed and "| worse; Holm: worse (no test" in collapsed
  censored = _line(text, "async local-SGD (H = 32, inverse)")
  assert "not reached (0 of 3 reached)" in censored
  fast = _line(text, "async local-SGD (H = 32, polynomial (1 + σ)^−0.5)")
  assert "| 77 (3 of 3 reached) | 2.50× | 386 MB (3 of 3 reached) | 5.00× |" in fast   # 40 · 1.93, 2e8 · 1.93
  assert "| 0 of 3 | waiting |" in text.split("## λ = 16 (μ = 8)")[1].split("Columns:")[0]
  answers = text.split("## What the grid answers")[1]
  assert "λ = 4, time to the target: least for **async local-SGD (H = 32, polynomial (1 + σ)^−0.5)**, " \
         "median 77 s, SSGD's ÷ 2.50" in answers
  assert "λ = 4, bytes to the target: least for **async local-SGD (H = 32, polynomial" in answers
  # H = 8: polynomial lowest; constant − polynomial 0.5 in every seed, inverse − polynomial 0.30..0.40: separated
  assert "λ = 4, H = 8, weighting: **polynomial** is right by the rule" in answers
  assert "constant 11.10 %, +0.50 [+0.50, +0.50]" in answers
  # H = 32: polynomial and constant overlap; inverse has a collapsed seed (last)
  assert "λ = 4, H = 32, weighting: no weighting is separated" in answers
  assert "inverse 12.25 % (1 seed(s) collapsed or diverged)" in answers
  assert "λ = 16: no trained SSGD run yet, so no target." in answers and "this may change" in answers
  png = report.plot_curves(_runs(), str(tmp_path / "c.png"))
  assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  nothing = _render([(c, None, []) for c, _, _ in _runs()])
  assert "**0 of 66 runs done**" in nothing and "| (no run done yet) |" in nothing


def test_the_cost_estimate_is_the_measured_run_times_per_gradient(monkeypatch):
  monkeypatch.setattr(report, "MEASURED_RUN_S", {4: 400.0, 16: 800.0})
  assert report.estimate_s(ls.cells([0, 1, 2]), 12.0) == pytest.approx(3 * 11 * (400 + 800))
  assert report.estimate_s(ls.cells([0], [4]), 6.0) == pytest.approx(11 * 200)        # half the epochs
  assert report.estimate_s(ls.cells([0], [8]), 12.0) == pytest.approx(11 * 400 * 2)   # λ = 4's per gradient
  monkeypatch.setattr(report, "MEASURED_RUN_S", {})
  assert report.estimate_s(ls.cells([0]), 12.0) is None


def test_bad_input_is_one_line_exit_2_writing_nothing(tmp_path, capsys):
  from tests.test_momentum_staleness import _fashion_idx
  root, out = str(tmp_path / "r"), str(tmp_path / "d" / "l.md")
  os.makedirs(tmp_path / "d")
  data = ["--data-dir", _fashion_idx(tmp_path / "fashion")]
  for argv, message in [(["--learners", "1"], "--learners 1 is invalid; allowed: integers 2..128"),
                        (["--seeds", "-1"], "--seeds -1 is invalid"),
                        (["--epochs", "0"], "--epochs 0 is invalid"),
                        (["--train-examples", "5"], "--train-examples 5 is invalid"),
                        (["--cell-timeout-s", "-3"], "--cell-timeout-s -3 is invalid"),
                        (["--out", str(tmp_path / "l.txt")], "is invalid; allowed: a path ending in .md"),
                        (["--bogus"], "unrecognized arguments: --bogus")]:
    assert ls.main(["l", "--root", root, "--out", out, *data, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
  (tmp_path / "d" / "l.md").write_text("<!-- note -->\nIt saved 3 GB.\n<!-- /note -->\n")
  assert ls.main(["l", "--root", root, "--out", out, "--report-only", *data]) == 2
  assert "hand-written note" in capsys.readouterr().err
  assert not os.path.exists(root) and os.listdir(tmp_path / "d") == ["l.md"]


def test_command_text_drops_report_only():
  assert ls.command_text(["--seeds", "0", "1", "--report-only"]) == "python launch/local_sgd.py --seeds 0 1"


@pytest.mark.slow
def test_end_to_end_two_cells_on_small_idx_files_then_a_rerun_trains_nothing(tmp_path, capsys, monkeypatch):
  """SSGD and asynchronous local-SGD (H = 8, polynomial, delayed Nesterov) at λ = 4, each in a child process as
  the command runs them, on 512 training images for one epoch; then a rerun trains nothing."""
  from tests.test_momentum_staleness import _fashion_idx
  every_model_is_the_mlp(monkeypatch)
  every = ls.cells
  monkeypatch.setattr(ls, "cells", lambda seeds, learners, train: [
      c for c in every(seeds, learners, train) if c.row in ("ssgd", "local-h8-polynomial")])
  root, out = str(tmp_path / "runs"), str(tmp_path / "docs" / "l.md")
  os.makedirs(tmp_path / "docs")
  argv = ["local_sgd.py", "--learners", "4", "--epochs", "1", "--train-examples", "512", "--seeds", "0",
          "--data-dir", _fashion_idx(tmp_path / "fashion", n_train=512), "--root", root, "--out", out]
  assert ls.main(argv) == 0
  cells = ls.cells([0], [4], 512)
  finals = [json.load(open(ls.final_path(c, 1.0, root))) for c in cells]
  assert [f["cell"]["row"] for f in finals] == ["ssgd", "local-h8-polynomial"]
  assert all(f["bytes_moved"] > 0 and f["sim_time"] > 0 for f in finals)
  config = json.load(open(os.path.join(root, cells[1].name(1.0), "config.json")))
  assert (config["local_steps"], config["outer_optimizer"], config["policy"]) == (8, "delayed_nesterov", "polynomial")
  assert (config["sim_bandwidth"], config["sim_profile"]) == (2.2e6, "heterogeneous")
  text = open(out).read()
  assert "**2 of 2 runs done**" in text and "SSGD's target: " in text and "## λ = 4 (μ = 32)" in text
  assert "| async local-SGD (H = 8, polynomial (1 + σ)^−0.5) | 1 of 1 |" in text
  assert open(tmp_path / "docs" / "l" / "test_error.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  stamps = [os.path.getmtime(ls.final_path(c, 1.0, root)) for c in cells]
  capsys.readouterr()
  assert ls.main(argv) == 0
  assert stamps == [os.path.getmtime(ls.final_path(c, 1.0, root)) for c in cells]
  assert "0 trained" in capsys.readouterr().out.splitlines()[-1]


def test_the_time_left_is_the_median_run_times_the_runs_to_go():
  """A run paused for half an hour (1,764 s beside ~170 s) moves the estimate little: the median, not the mean."""
  from launch.row_summary import time_to_go
  said = time_to_go([154.0, 169.0, 184.0, 199.0, 1764.0], 74)
  assert "a median of 184 s each (154–1764 s)" in said and "the 74 to go take ≈ 3.8 h" in said
  assert time_to_go([], 3) == "" and time_to_go([100.0], 0) == ""
