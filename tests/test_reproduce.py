"""launch/reproduce.py: the paper's grid (λ, μ = ⌈128/λ⌉, n, policies, SSGD), report, resumability, bad flags."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import sajax
from launch import grid_runner, reproduce, reproduce_figures, reproduce_report, seed_stats, speedup_report
from launch.reproduce import Cell
from sajax import config as config_lib, metrics as metrics_lib
from tests.helpers import every_model_is_the_mlp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_grid_is_the_papers_with_n_equal_lambda_deduplicated():
  cells = reproduce.grid(reproduce.LEARNERS, reproduce.NS, seeds=[0])
  assert len(cells) == len(set(cells)) == 34          # λ=4: n ∈ {1,2,4}; 8, 16, 30: four n; ×2 policies; +4 SSGD
  ns = {lam: sorted({c.n for c in cells if c.learners == lam and c.policy != "ssgd"}) for lam in reproduce.LEARNERS}
  assert ns == {4: [1, 2, 4], 8: [1, 2, 4, 8], 16: [1, 2, 4, 16], 30: [1, 2, 4, 30]}
  assert {lam: Cell(lam, 1, "inverse", 0).batch for lam in reproduce.LEARNERS} == {4: 32, 8: 16, 16: 8, 30: 5}
  assert [c for c in cells if c.policy == "ssgd"] == [Cell(lam, 0, "ssgd", 0) for lam in reproduce.LEARNERS]
  assert {c.policy for c in cells} == {"ssgd", "inverse", "constant"}
  assert Cell(30, 4, "inverse", 0).c == 7 and Cell(30, 30, "constant", 0).c == 1 and Cell(8, 0, "ssgd", 0).c == 8
  assert len(reproduce.grid([4, 8], ["1", "lambda"], seeds=[0, 1, 2])) == 3 * (5 + 5)
  assert reproduce.grid([2], ["4"], seeds=[0]) == [Cell(2, 0, "ssgd", 0)]   # n > λ is not a cell


def test_constant_policy_only_at_the_chosen_n():
  cells = reproduce.grid([8, 30], reproduce.NS, seeds=[0], constant_ns=["4", "lambda"])
  constant = sorted((c.learners, c.n) for c in cells if c.policy == "constant")
  assert constant == [(8, 4), (8, 8), (30, 4), (30, 30)]
  assert len(cells) == 2 * (1 + 4 + 2)                 # per λ: SSGD, inverse at 4 n, constant at 2


def test_speedup_cells_and_their_speed_model():
  cells = reproduce.speedup_cells([1, 2, 8], seeds=[0], dataset="mnist5k")
  assert [(c.learners, c.n, c.policy) for c in cells] == [
      (1, 0, "ssgd"), (2, 0, "ssgd"), (2, 1, "inverse"), (2, 2, "inverse"), (8, 0, "ssgd"), (8, 1, "inverse"),
      (8, 8, "inverse")]
  assert all(c.speed == "cost" for c in cells) and cells[0].name(12) != Cell(1, 0, "ssgd", 0).name(12)
  config = reproduce.cell_config(cells[-1], 12)
  assert (config.sim_profile, config.sim_slowdown, config.sim_push_time) == ("one_slow", 4.0, 0.1)
  assert config.sim_example_time == 1 / 128 and config.sim_jitter == 0.2
  assert config.eval_every_epochs == pytest.approx(12 / reproduce.EVALS) and reproduce.EVALS >= 40
  assert reproduce.cell_config(cells[0], 12).sim_profile == "lognormal"      # λ = 1: no straggler
  assert reproduce.cell_config(Cell(8, 8, "inverse", 0), 12).sim_example_time == 0.0   # the grid's: equal speeds


def test_speedup_rows_time_to_target_and_figure(tmp_path):
  def history(errors, dt):
    return [{"test_error": e / 100, "sim_time": dt * (i + 1)} for i, e in enumerate(errors)]
  runs = [({"learners": 1, "n": 0, "policy": "ssgd"}, history([20, 12, 10], 100.0)),
          ({"learners": 4, "n": 0, "policy": "ssgd"}, history([20, 12, 10.4], 40.0)),
          ({"learners": 4, "n": 1, "policy": "inverse"}, history([15, 10.2, 10.1], 30.0)),
          ({"learners": 4, "n": 4, "policy": "inverse"}, history([30, 20, 11], 20.0))]
  target, rows = speedup_report.speedup_rows(runs)
  assert target == 10.5
  by = {(r["protocol"], r["learners"]): r for r in rows}
  # times interpolated between the evaluations around the crossing: λ = 1 goes 12 → 10 % from 200 to 300 s, so
  # 10.5 % at 200 + 100 · 1.5/2 = 275 s; SSGD λ = 4 12 → 10.4 % over 80..120 s: 80 + 40 · 1.5/1.6 = 117.5 s;
  # 1-softsync 15 → 10.2 % over 30..60 s: 30 + 30 · 4.5/4.8 = 58.125 s
  assert by[("hardsync (SSGD)", 1)]["mean"] == 275.0 and by[("async, inverse", 1)]["mean"] == 275.0
  assert by[("hardsync (SSGD)", 4)]["mean"] == 117.5 and by[("hardsync (SSGD)", 4)]["speedup"] == 275 / 117.5
  assert by[("1-softsync, inverse", 4)]["mean"] == 58.125
  assert by[("1-softsync, inverse", 4)]["speedup"] == pytest.approx(275 / 58.125)
  assert by[("async, inverse", 4)]["mean"] is None and by[("async, inverse", 4)]["times"] == [None]
  ladder = speedup_report.speedup_ladder(runs, (0.5, 2.0, 10.0))
  assert [(p, t) for p, t, _ in ladder] == [(0.5, 10.5), (2.0, 12.0), (10.0, 20.0)] and ladder[0] == (0.5, target, rows)
  lines = speedup_report.speedup_markdown(ladder, "x/speedup.png")
  assert "| async, inverse | 4 | 32 | – | – | – |" in lines and "| 1-softsync, inverse | 4 | 32 | 58 | 58 | 4.73× |" in lines
  # looser targets: async λ = 4 reaches 12 % between 40 s (20 %) and 60 s (11 %): 40 + 20 · 8/9 = 57.8 s (λ = 1:
  # 200 s, at its 2nd evaluation); 20 % at its 2nd evaluation, 40 s (λ = 1: 100 s, at its first)
  assert any("the λ = 1 run's final error +2 and +10 points: 12.00 %, 20.00 %" in line for line in lines)
  assert "| async, inverse | 4 | 32 | 58 (3.46×) | 40 (2.50×) |" in lines
  assert _is_png(speedup_report.plot_speedup(ladder, str(tmp_path / "s.png")))
  assert speedup_report.speedup_ladder([(runs[0][0], [])] + runs[1:]) == []            # λ = 1 diverged
  assert speedup_report.speedup_ladder(runs, ()) == []
  assert speedup_report.speedup_rows([(runs[0][0], [])] + runs[1:]) == (None, [])   # λ = 1 diverged: no target
  _, rows = speedup_report.speedup_rows(runs[:3] + [(runs[3][0], [])])                # a diverged run: no time
  assert [r["times"] for r in rows if r["learners"] == 4 and r["protocol"] == "async, inverse"] == [[None]]


def test_error_vs_n_figure(tmp_path):
  finals = [{"cell": {"learners": lam, "n": n, "policy": p, "seed": s}, "test_error": e, "train_loss": 0.1,
             "staleness_mean": float(n)} for lam in (8, 30) for s, e in ((0, 0.1), (1, 0.12))
            for n, p in ((0, "ssgd"), (1, "inverse"), (lam, "inverse"), (lam, "constant"))]
  assert _is_png(reproduce_figures.plot_error_vs_n(reproduce_report.aggregate(finals), str(tmp_path / "e.png")))


def test_cell_config_is_the_default_config_in_simulated_mode():
  config = reproduce.cell_config(Cell(30, 4, "constant", 2), epochs=12)
  config_lib.validate(config)
  assert (config.executor, config.protocol, config.n, config.policy) == ("simulated", "softsync", 4, "constant")
  assert (config.learners, config.batch_per_learner, config.seed) == (30, 5, 2)
  assert config_lib.protocol_of(config).gradients_per_update == 7
  assert tuple(config.lr_boundaries_epochs) == (8, 10.5) and config.epochs == 12
  assert (config.learning_rate, config.momentum, config.dataset) == (0.05, 0.5, "mnist5k")
  ssgd = reproduce.cell_config(Cell(8, 0, "ssgd", 0), epochs=6)
  assert (ssgd.protocol, config_lib.protocol_of(ssgd).gradients_per_update) == ("hardsync", 8)


def _final(lam, n, policy, seed, error, loss=0.05, sigma=1.0):
  return {"cell": {"learners": lam, "n": n, "policy": policy, "seed": seed}, "test_error": error,
          "train_loss": loss, "staleness_mean": sigma}


@pytest.mark.parametrize("diffs, expected", [
    ([0.1, 0.3, 0.2], "within"),            # [−0.05, +0.45]
    ([-2.0, -1.6, -1.8], "within"),         # better than SSGD: never a failure
    ([1.2, 1.2, 1.1], "worse"),             # [+1.02, +1.31]
    ([0.0, 0.8, 0.4], "undecided"),         # [−0.59, +1.39]
    ([0.4], "undecided"),                   # one seed: no interval
    ([0.5, 0.5], "within"),                 # exactly +0.5 with no spread is within
])
def test_p4_verdict_is_three_valued_on_the_paired_interval(diffs, expected):
  ssgd = {"by_seed": {s: 3.0 for s in range(len(diffs))}}
  inverse = {"by_seed": {s: 3.0 + d for s, d in enumerate(diffs)}}
  assert seed_stats.verdict(seed_stats.paired_difference(inverse, ssgd), reproduce.P4_POINTS) == expected


def test_paired_difference_uses_only_seeds_both_cells_ran():
  inverse = {"by_seed": {0: 3.5, 1: 3.9, 2: 9.0}}     # seed 2 has no SSGD run: left out
  ssgd = {"by_seed": {0: 3.0, 1: 3.2, 5: 1.0}}
  diff = seed_stats.paired_difference(inverse, ssgd)
  assert diff["pairs"] == 2 and diff["mean"] == pytest.approx(0.6) and diff["sd"] == pytest.approx(0.1414, abs=1e-4)
  assert diff["half"] == pytest.approx(12.706 * 0.1, abs=1e-3)
  assert (diff["lo"], diff["hi"]) == pytest.approx((0.6 - diff["half"], 0.6 + diff["half"]))


def test_aggregate_p4_and_table_from_hand_made_results():
  """λ = 8 over 3 seeds: SSGD 3.0/3.4/3.2 %; n = 2 within, n = 8 worse (under-trained), n = 4 undecided."""
  finals = [_final(8, 0, "ssgd", s, e) for s, e in enumerate((0.030, 0.034, 0.032))]
  finals += [_final(8, 2, "inverse", s, e, sigma=g) for s, e, g in zip(range(3), (0.031, 0.037, 0.034), (2.0, 2.2, 2.1))]
  finals += [_final(8, 8, "inverse", s, e, loss=0.2, sigma=7.0) for s, e in enumerate((0.042, 0.046, 0.043))]
  finals += [_final(8, 4, "inverse", s, e, sigma=4.0) for s, e in enumerate((0.030, 0.042, 0.036))]
  finals += [_final(8, 8, "constant", s, 0.9, loss=2.3, sigma=7.0) for s in range(3)]   # at chance: collapsed
  agg = reproduce_report.aggregate(finals)
  assert agg[(8, 0, "ssgd")]["error"] == pytest.approx((3.2, 0.2))
  assert agg[(8, 0, "ssgd")]["half"] == pytest.approx(0.4968, abs=1e-4)
  assert agg[(8, 2, "inverse")]["staleness"] == pytest.approx(2.1) and agg[(8, 2, "inverse")]["seeds"] == 3
  verdicts = {v["n"]: v for v in reproduce_report.p4_verdicts(agg)}
  assert set(verdicts) == {2, 4, 8}
  assert verdicts[2]["verdict"] == "within" and verdicts[2]["delta"] == pytest.approx(0.2)
  assert verdicts[8]["verdict"] == "worse" and verdicts[8]["delta"] == pytest.approx(3.5 / 3)
  assert "under-trained" in verdicts[8]["why"] and verdicts[8]["seeds_needed"] is None
  assert verdicts[4]["verdict"] == "undecided" and verdicts[4]["pairs"] == 3
  # differences 0, +0.8, +0.4: mean 0.4, sd 0.4, 0.1 below the bound (d = 0.25): 80 % power at 128 seeds
  assert verdicts[4]["seeds_needed"] == seed_stats.seeds_for_power(0.1, 0.4) == 128
  assert reproduce_report.verdict_counts(list(verdicts.values())) == "1 within, 1 worse, 1 undecided"
  runs = [("lambda8-x", {**finals[0], "updates": 7, "wall_s": 5.0})]
  text = reproduce_report.render_markdown(agg, list(verdicts.values()), command="python launch/reproduce.py --seeds 0 1 2",
                                          epochs=6, seeds=[0, 1, 2], wall_s=10, runs=runs, estimate="E",
                                          figures=[("curves", "reproduction/test_error.png")])
  assert "| 2 | 8 | 16 | 4 | 2.10 | 3.40 ± 0.75 | – | 3.20 ± 0.50 | +0.20 ± 0.25 | within |" in text
  assert ("| 8 | 8 | 16 | 1 | 7.00 | 4.37 ± 0.52 | – (collapsed in 3 of 3 seeds) | 3.20 ± 0.50 | +1.17 ± 0.14 | "
          "worse |") in text
  assert "| 4 | 8 | 16 | 2 | 4.00 | 3.60 ± 1.49 | – | 3.20 ± 0.50 | +0.40 ± 0.99 | undecided (80 % power at 128 seeds) |" in text
  assert ("the seeds k at which the paired t test of the mean difference against +0.5 (two-sided, α = 0.05: the "
          "test the 95 % interval makes) has 80 % power") in text and "noncentrality √k · |d̄ − 0.5| / s" in text
  assert "**1 within, 1 worse, 1 undecided**" in text
  assert "- n = 8, λ = 8: +1.17 points, 95 % interval [+1.02, +1.31] over 3 seeds (sd 0.06) — **worse**; under-trained" in text
  assert "- n = 4, λ = 8: +0.40 points, 95 % interval [-0.59, +1.39] over 3 seeds" in text
  assert "- n = 2" not in text                                             # within: no line of its own
  assert "| `lambda8-x` | 3.00 | 0.0500 | 1.00 | 7 | 5 s |" in text
  assert "configs/default.py unchanged: α0 = 0.05 for a λμ ≈ 128 mini-batch, momentum 0.5, 6 epochs, α ÷10 at epochs 4, 5.25" in text
  assert "python launch/reproduce.py --seeds 0 1 2" in text and "![curves](reproduction/test_error.png)" in text
  one = reproduce_report.aggregate([finals[0], finals[3]])                   # one seed: undecided, no interval
  [v] = reproduce_report.p4_verdicts(one)
  assert (v["verdict"], v["half"], v["seeds_needed"]) == ("undecided", None, None) and "one seed" in v["why"]
  text = reproduce_report.render_markdown(one, [v], command="c", epochs=6, seeds=[0], wall_s=1, runs=runs,
                                          estimate="E", figures=[])
  assert "| 2 | 8 | 16 | 4 | 2.00 | 3.10 | – | 3.00 | +0.10 | undecided |" in text and "one seed: no interval" in text


def test_time_fit_recovers_a_linear_cost_model():
  """1 ms per example, 5 ms per gradient, 2 ms per update, over cells of different μ and c."""
  sizes = [(24000, 750, 750), (24000, 1500, 188), (24000, 1500, 1500), (12000, 375, 94), (48000, 9600, 9600)]
  points = [(s, g, u, 0.001 * s + 0.005 * g + 0.002 * u) for s, g, u in sizes]
  assert reproduce_report.fit_seconds(points) == pytest.approx((0.001, 0.005, 0.002))
  assert reproduce_report.fit_seconds([(100, 10, 5, 1.0)]) == pytest.approx((0.01, 0.0, 0.0))   # never negative
  epochs = reproduce.base_config("mnist5k").epochs
  text = reproduce_report.estimate_text(points, epochs=epochs)
  seconds = sum(0.001 * epochs * 4000 + 0.005 * reproduce.gradients_of(c, epochs)
                + 0.002 * reproduce.updates_of(c, epochs) for c in reproduce.grid(reproduce.LEARNERS, reproduce.NS, [0]))
  assert f"**{seconds / 3600:.1f} h per seed**" in text and f"`python launch/reproduce.py`: {epochs:g} epochs" in text


def _is_png(path):
  with open(path, "rb") as f:
    return f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_tiny_grid_end_to_end_resumes_a_half_done_cell_and_skips_done_ones(tmp_path, capsys, monkeypatch):
  """λ = 2, μ = 64 on 256 digits, 2 epochs: SSGD and 2-softsync (async) under both policies; the inverse cell
  is interrupted first, so the grid is half done when the script starts."""
  every_model_is_the_mlp(monkeypatch)
  root, out = str(tmp_path / "runs"), str(tmp_path / "docs" / "reproduction.md")
  half = Cell(2, 2, "inverse", 0)
  workdir = os.path.join(root, half.name(2, 256))

  def stop(run):
    if run.updates == 5:
      raise KeyboardInterrupt
  with pytest.raises(KeyboardInterrupt):
    sajax.train(reproduce.cell_config(half, 2, 256), workdir=workdir, callbacks=[stop])
  first = metrics_lib.read_metrics(workdir)
  assert [r["updates"] for r in first][:4] == [1, 2, 3, 4]     # EVALS = 40 per run: here one per update

  argv = ["reproduce.py", "--root", root, "--out", out, "--learners", "2", "--n", "lambda", "--epochs", "2",
          "--train-examples", "256"]
  assert reproduce.main(argv) == 0
  assert "3 cells (3 trained, 0 already done)" in capsys.readouterr().out
  records = metrics_lib.read_metrics(workdir)
  assert records[:4] == first[:4]                 # resumed from its checkpoint: the first records are kept as is
  assert [r["updates"] for r in records] == [1, 2, 3, 4, 5, 6, 7, 8]

  finals = {}
  # A cache named in JAX_COMPILATION_CACHE_DIR (the test session's, tests/conftest.py) is used, none made under
  # --root (that the grid makes <root>/.jax_cache otherwise: test_cell_environment_asks_for_...).
  assert not os.path.exists(os.path.join(root, grid_runner.CACHE_DIR))
  for name in sorted(set(os.listdir(root)) - {grid_runner.CACHE_DIR}):
    with open(os.path.join(root, name, "final.json")) as f:
      finals[name] = json.load(f)
  assert len(finals) == 3
  ssgd = finals[Cell(2, 0, "ssgd", 0).name(2, 256)]
  inv, const = finals[half.name(2, 256)], finals[Cell(2, 2, "constant", 0).name(2, 256)]
  assert ssgd["staleness_max"] == 0 and ssgd["updates"] == 4 and inv["updates"] == 8
  assert sum(const["staleness_histogram"].values()) == 8 and const["staleness_max"] >= 1
  text = open(out).read()
  def error(f):     # 256 digits for 2 epochs: a run may end at chance, a collapsed seed (counted, not averaged)
    trained = seed_stats.seed_outcome(f["test_error"], f["train_loss"], 10) == "trained"
    return f"{100 * f['test_error']:.2f}" if trained else "– (collapsed)"
  row = f"| 2 | 2 | 64 | 1 | {inv['staleness_mean']:.2f} | {error(inv)} | {error(const)} | {error(ssgd)} |"
  assert row in text and " ".join(argv[1:]) in text and "h per seed" in text
  assert f"trained for {sum(f['wall_s'] for f in finals.values()):.0f} s in all" in text
  for png in ("test_error.png", "staleness_n2.png"):
    path = tmp_path / "docs" / "reproduction" / png
    assert _is_png(path) and f"reproduction/{png}" in text

  stamps = {n: os.path.getmtime(os.path.join(root, n, "metrics.jsonl")) for n in finals}
  assert reproduce.main(argv) == 0
  assert "3 cells (0 trained, 3 already done)" in capsys.readouterr().out
  assert stamps == {n: os.path.getmtime(os.path.join(root, n, "metrics.jsonl")) for n in finals}
  assert row in open(out).read()


@pytest.mark.parametrize("flags, named", [
    (["--learners", "0"], "--learners 0"), (["--learners", "x"], "invalid int value: 'x'"),
    (["--n", "two"], "--n 'two'"), (["--epochs", "0"], "--epochs 0"), (["--seeds", "-1"], "--seeds -1"),
    (["--out", "report.txt"], "'report.txt'"), (["--bogus"], "unrecognized arguments: --bogus"),
    (["--learners", "4", "--n", "8"], "no cell"), (["--train-examples", "100"], "--train-examples 100"),
    (["--dataset", "cifar10"], "--dataset 'cifar10'"), (["--constant-n", "3"], "--constant-n '3'"),
    (["--speedup", "2", "4"], "--speedup 2 4"), (["--speedup", "0"], "--speedup 0"),
    (["--cell-timeout-s", "-1"], "--cell-timeout-s -1"), (["--cell-timeout-s", "inf"], "--cell-timeout-s inf")])
def test_bad_flags_give_one_line_and_exit_2_writing_nothing(flags, named, tmp_path, capsys):
  root = tmp_path / "runs"
  assert reproduce.main(["reproduce.py", "--root", str(root), "--out", str(tmp_path / "r.md"), *flags]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "\n" not in err and named in err and "allowed" in err
  assert not root.exists() and not (tmp_path / "r.md").exists()


def test_command_line_bad_value_exit_code(tmp_path):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "reproduce.py"), "--root",
                         str(tmp_path / "runs"), "--learners", "200"], capture_output=True, text=True)
  assert proc.returncode == 2 and proc.stdout == ""
  assert proc.stderr.strip() == "error: --learners 200 is invalid; allowed: integers 1..128 (μ = ⌈128/λ⌉)"
  assert not (tmp_path / "runs").exists()


def test_flags_defaults_and_repeats(tmp_path):
  quick = reproduce.parse_args(["--quick", "--root", str(tmp_path / "r")])
  assert (quick.learners, quick.epochs, quick.seeds, quick.n) == ([4, 8], 4.0, [0], ["1", "2", "4", "lambda"])
  full = reproduce.parse_args(["--seeds", "1", "0", "1", "--learners", "8", "8", "--n", "2", "2"])
  assert (full.learners, full.epochs, full.seeds, full.n, full.out) == ([8], 20.0, [1, 0], ["2"], "docs/reproduction.md")
  assert full.epochs == reproduce.base_config("mnist5k").epochs == reproduce.EPOCHS
  assert not (tmp_path / "r").exists()


def test_fashion_mnist_cells_use_its_tuned_config_unchanged_but_for_the_grids_keys(tmp_path):
  from configs import fashion_mnist
  tuned = fashion_mnist.get_config()
  args = reproduce.parse_args(["--dataset", "fashion_mnist", "--root", str(tmp_path / "r")])
  assert (args.dataset, args.epochs, args.full_epochs) == ("fashion_mnist", tuned.epochs, tuned.epochs)
  assert reproduce.parse_args(["--dataset", "fashion_mnist", "--quick"]).epochs == reproduce.QUICK_EPOCHS
  cell = Cell(8, 2, "inverse", 1, "fashion_mnist")
  config = reproduce.cell_config(cell, epochs=tuned.epochs / 2)
  config_lib.validate(config)
  assert (config.dataset, config.executor, config.protocol, config.n, config.policy) == (
      "fashion_mnist", "simulated", "softsync", 2, "inverse")
  for key in ("learning_rate", "momentum", "weight_decay", "lr_decay", "model"):
    assert config[key] == tuned[key], key
  assert tuple(config.lr_boundaries_epochs) == tuple(round(b / 2, 2) for b in tuned.lr_boundaries_epochs)
  assert cell.name(3, 0) == "fashion_mnist-lambda8-mu16-n2-inverse-e3-seed1"
  assert reproduce.grid([4], ["1"], [0], "fashion_mnist")[0] == Cell(4, 0, "ssgd", 0, "fashion_mnist")
  assert reproduce.gradients_of(cell, 2) == 2 * 60000 / 16 and reproduce.gradients_of(cell, 2, 1600) == 200
  text = reproduce_report.estimate_text([(1000, 10, 5, 1.0)], tuned.epochs, dataset="fashion_mnist")
  assert "`python launch/reproduce.py --dataset fashion_mnist`" in text and "epochs · 60,000 examples" in text
  own = [Cell(8, 0, "ssgd", 0, "fashion_mnist"), Cell(8, 8, "inverse", 0, "fashion_mnist")]   # 1 ms per example
  text = reproduce_report.estimate_text([(1000, 0, 0, 1.0)], 12, "fashion_mnist", command_cells=own,
                                        train_examples=20000)
  assert text.endswith(f" This command's 2 runs: **{2 * 12 * 20000 * 1e-3 / 3600:.2f} h** by the same fit.")


def test_a_missing_dataset_gives_one_line_and_exit_2_before_any_cell(tmp_path, capsys, monkeypatch):
  from sajax import data, idx
  monkeypatch.setitem(idx.SYSTEM_FOLDERS, "fashion_mnist", str(tmp_path / "none"))
  def unprepared(name, *args):
    raise data.DatasetError(f"dataset {name!r} is not prepared")
  monkeypatch.setattr(data, "_tfds_sources", unprepared)
  root = tmp_path / "runs"
  argv = ["reproduce.py", "--dataset", "fashion_mnist", "--root", str(root), "--out", str(tmp_path / "r.md")]
  assert reproduce.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: dataset 'fashion_mnist' not found") and "\n" not in err
  assert "apt-get install -y dataset-fashion-mnist" in err and "tfds build fashion_mnist" in err
  assert not root.exists() and not (tmp_path / "r.md").exists()


@pytest.mark.slow
def test_a_cell_refused_in_its_child_process_gives_one_line_and_exit_2(tmp_path, capsys):
  """Each cell trains in a child process; the child's one-line error (here: the cell's folder holds another
  run) comes back as the grid's, with exit code 2, and the other run's files are left untouched."""
  root = tmp_path / "runs"
  ssgd = Cell(2, 0, "ssgd", 0)
  workdir = root / ssgd.name(2, 256)
  workdir.mkdir(parents=True)
  other = json.dumps({"learners": 7, "seed": 0})
  (workdir / "config.json").write_text(other)
  argv = ["reproduce.py", "--root", str(root), "--out", str(tmp_path / "r.md"), "--learners", "2", "--n", "lambda",
          "--epochs", "2", "--train-examples", "256"]
  assert reproduce.main(argv) == 2
  errors = [line for line in re.split(r"[\r\n]", capsys.readouterr().err) if "error:" in line]   # beside the bar
  assert len(errors) == 1 and errors[0].startswith("error: workdir ") and "another config" in errors[0]
  assert "allowed" in errors[0]
  assert os.listdir(workdir) == ["config.json"] and (workdir / "config.json").read_text() == other
  assert not (tmp_path / "r.md").exists()


def test_cell_environment_asks_for_min_lambda_cores_8_devices_and_a_shared_compilation_cache(tmp_path, monkeypatch):
  flag = "--xla_force_host_platform_device_count"
  monkeypatch.setattr(os, "cpu_count", lambda: 2)
  assert f"{flag}=2" in grid_runner.cell_environment(Cell(30, 2, "inverse", 0), "r", environ={})["XLA_FLAGS"]
  monkeypatch.setattr(os, "cpu_count", lambda: 16)
  env = grid_runner.cell_environment(Cell(30, 2, "inverse", 0), str(tmp_path), environ={"PATH": "/bin"})
  assert f"{flag}=8" in env["XLA_FLAGS"].split() and env["PATH"] == "/bin"
  assert env["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / grid_runner.CACHE_DIR)
  assert f"{flag}=4" in grid_runner.cell_environment(Cell(4, 1, "inverse", 0), "r", environ={})["XLA_FLAGS"]
  chosen = {"XLA_FLAGS": f"{flag}=2", "JAX_COMPILATION_CACHE_DIR": "/elsewhere"}   # the user's choices win
  env = grid_runner.cell_environment(Cell(30, 2, "inverse", 0), "r", environ=chosen)
  assert f"{flag}=2" in env["XLA_FLAGS"] and f"{flag}=8" not in env["XLA_FLAGS"]
  assert env["JAX_COMPILATION_CACHE_DIR"] == "/elsewhere"


@pytest.mark.slow
def test_a_diverged_cell_is_a_result_the_grid_reports_not_a_failure(tmp_path):
  """α0 = 1e9 (the issue's diverging run) in a real cell: train_and_record writes its final.json with the reason
  and no test error; the table shows it as diverged and its P4 verdict is worse."""
  cell = Cell(2, 2, "inverse", 0)
  config = reproduce.cell_config(cell, 1, 256)
  config.learning_rate, config.divergence_after, config.eval_every_epochs = 1e9, 4, 0.25
  config.batch_per_learner = 8                     # 32 gradients in the epoch: room to diverge
  path = reproduce.final_path(cell, 1, str(tmp_path), 256)
  final = grid_runner.train_and_record(config, path, {"cell": {**cell.__dict__}, "epochs": 1})
  with open(path) as f:
    assert json.load(f) == final
  assert final["test_error"] is None and final["wall_s"] > 0
  assert re.fullmatch(r"diverged: 4 consecutive non-finite gradients at update \d+; .*", final["diverged"])
  ssgd = [_final(2, 0, "ssgd", s, 0.10) for s in (0, 1)]
  agg = reproduce_report.aggregate(ssgd + [final, {**final, "cell": {**final["cell"], "seed": 1}}])
  assert agg[(2, 2, "inverse")]["error"] is None and agg[(2, 2, "inverse")]["outcomes"] == {"diverged": 2}
  [v] = reproduce_report.p4_verdicts(agg)
  assert (v["verdict"], v["delta"], v["why"]) == ("worse", None, "diverged in 2 of 2 seeds")
  text = reproduce_report.render_markdown(agg, [v], command="c", epochs=1, seeds=[0, 1], wall_s=1,
                                          runs=[("inv", final)], estimate="E", figures=[])
  assert "| – (diverged in 2 of 2 seeds) | – | 10.00 ± 0.00 | – | worse |" in text
  assert "- n = 2, λ = 2: no paired difference — **worse**; diverged in 2 of 2 seeds" in text
  assert re.search(r"\| `inv` \| diverged \| .* s \|", text)
  if final.get("staleness_histogram"):          # it evaluated before diverging: its σ are drawn
    assert [n for n, _ in reproduce_figures.plot_staleness_by_n([final], str(tmp_path))] == [2]
  assert reproduce_figures.plot_staleness_by_n([{**final, "staleness_histogram": {}}], str(tmp_path)) == []


def test_some_seeds_diverged_the_others_keep_their_mean_and_the_cell_is_worse():
  finals = [_final(8, 0, "ssgd", s, 0.10) for s in range(3)]
  finals += [_final(8, 4, "inverse", 0, 0.11), _final(8, 4, "inverse", 1, 0.12),
             {"cell": {"learners": 8, "n": 4, "policy": "inverse", "seed": 2}, "test_error": None, "diverged": "d"}]
  agg = reproduce_report.aggregate(finals)
  a = agg[(8, 4, "inverse")]
  assert a["error"] == pytest.approx((11.5, 0.7071), abs=1e-4) and (a["seeds"], a["outcomes"]) == (3, {"diverged": 1})
  assert reproduce_report.error_text(a) == f"11.50 ± {a['half']:.2f} (2 of 3 seeds; 1 diverged)"
  [v] = reproduce_report.p4_verdicts(agg)
  assert v["verdict"] == "worse" and v["delta"] == pytest.approx(1.5) and v["pairs"] == 2
  assert reproduce_report.estimate_text([], 20).startswith("No run finished")
  gone = {"test_error": None, "diverged": "d"}
  mixed = [{**_final(8, 0, "ssgd", 0, 0.1), **gone}, _final(8, 0, "ssgd", 1, 0.1),   # no seed finished in both
           _final(8, 4, "inverse", 0, 0.11), {**_final(8, 4, "inverse", 1, 0.1), **gone}]
  [v] = reproduce_report.p4_verdicts(reproduce_report.aggregate(mixed))
  assert (v["verdict"], v["delta"], v["pairs"]) == ("worse", None, 0)
  no_ssgd = [{**_final(8, 0, "ssgd", s, 0.1), **gone} for s in (0, 1)] + [_final(8, 4, "inverse", 0, 0.11)]
  [v] = reproduce_report.p4_verdicts(reproduce_report.aggregate(no_ssgd))
  assert (v["verdict"], v["why"]) == ("undecided", "no SSGD reference: SSGD diverged in 2 of 2 seeds")


def test_a_collapsed_or_diverged_seed_is_an_outcome_of_its_own_never_averaged_and_never_within():
  """λ = 8, 3 seeds, SSGD 10.0/10.2/10.4 %. n = 8: seeds 0, 1 a hair above SSGD, seed 2 at chance (train loss
  ln 10): before, its mean was (10.1 + 10.3 + 90)/3 = 36.8 ± 114.6, an interval reaching −78 %. n = 2: the same
  two seeds and a third that diverged. n = 4: SSGD's seed 2 collapsed too, so its seeds 0 and 1 alone say within."""
  finals = [_final(8, 0, "ssgd", s, e) for s, e in enumerate((0.100, 0.102, 0.104))]
  finals += [_final(8, 8, "inverse", 0, 0.101), _final(8, 8, "inverse", 1, 0.103),
             _final(8, 8, "inverse", 2, 0.90, loss=2.3026)]
  finals += [_final(8, 2, "inverse", 0, 0.101), _final(8, 2, "inverse", 1, 0.103),
             {**_final(8, 2, "inverse", 2, None), "diverged": "diverged: 100 consecutive non-finite gradients"}]
  finals += [_final(8, 4, "inverse", 0, 0.101), _final(8, 4, "inverse", 1, 0.103), _final(8, 4, "inverse", 2, 0.89)]
  ssgd_collapsed = [{**f, "test_error": 0.9, "train_loss": 2.3026} if f["cell"]["seed"] == 2 else f for f in finals[:3]]
  agg = reproduce_report.aggregate(finals)
  a = agg[(8, 8, "inverse")]
  assert a["by_seed"] == pytest.approx({0: 10.1, 1: 10.3}) and a["outcomes"] == {"collapsed": 1}
  assert a["error"][0] == pytest.approx(10.2) and a["half"] == pytest.approx(12.706 * 0.1414 / 2 ** 0.5, abs=1e-3)
  assert reproduce_report.error_text(a) == "10.20 ± 1.27 (2 of 3 seeds; 1 collapsed)"
  assert reproduce_report.error_text(agg[(8, 2, "inverse")]) == "10.20 ± 1.27 (2 of 3 seeds; 1 diverged)"
  verdicts = {v["n"]: v for v in reproduce_report.p4_verdicts(agg)}
  # +0.1 point in both trained seeds would be within; the collapsed seed, where SSGD trained, makes it worse
  assert (verdicts[8]["verdict"], verdicts[8]["delta"], verdicts[8]["pairs"]) == ("worse", pytest.approx(0.1), 2)
  assert verdicts[8]["why"] == "collapsed in 1 of 3 seeds" and verdicts[8]["seeds_needed"] is None
  assert (verdicts[2]["verdict"], verdicts[2]["why"]) == ("worse", "diverged in 1 of 3 seeds")
  # SSGD collapsed in the same seed: nothing to pair it with, but still never within
  [v4] = [v for v in reproduce_report.p4_verdicts(reproduce_report.aggregate(ssgd_collapsed + finals[9:]))]
  assert v4["verdict"] == "undecided" and v4["why"] == "collapsed in 1 of 3 seeds; SSGD collapsed in 1 of 3 seeds"
  text = reproduce_report.render_markdown(agg, list(verdicts.values()), command="c", epochs=20, seeds=[0, 1, 2],
                                          wall_s=1, runs=[("inv", {**finals[5], "wall_s": 9.0})], estimate="E", figures=[])
  assert "| 8 | 8 | 16 | 1 | 1.00 | 10.20 ± 1.27 (2 of 3 seeds; 1 collapsed) | – | 10.20 ± 0.50 | +0.10 ± 0.00 | worse |" in text
  assert "- n = 8, λ = 8: +0.10 points, 95 % interval [+0.10, +0.10] over 2 seeds (sd 0.00) — **worse**; collapsed in 1 of 3 seeds" in text
  assert "; diverged in 1 of 3 seeds" in text and "| `inv` | 90.00 (collapsed) |" in text
  assert "within 0.01 of ln 10 = 2.3026 (a constant output) or its test error is at chance, at or above 85 %" in text
  assert "A cell with a collapsed or diverged seed is never *within*" in text
  for mean, half in re.findall(r"\| (\d+\.\d+) ± (\d+\.\d+)", text):     # no error interval below 0
    assert float(mean) - float(half) >= 0
  # three trained seeds far apart (8.8, 5.6, 3.1 %: docs/reproduction.md's constant at n = 4, λ = 8): the t
  # interval 5.83 ± 7.10 would reach −1.27 %; an error rate is not negative, so it is cut at 0
  spread = reproduce_report.aggregate([_final(8, 4, "constant", s, e) for s, e in enumerate((0.088, 0.056, 0.031))])
  assert reproduce_report.error_text(spread[(8, 4, "constant")]) == "5.83 (0 to 12.93: the interval cut at 0)"


def test_a_kept_note_with_a_number_is_refused_in_one_line_before_any_training(tmp_path, capsys):
  assert reproduce_report.note_numbers("At λ = 30 the gap is 0.5 point (2026-11-29).") == ["30", "0.5", "2026", "11",
                                                                                            "29"]
  # names are not numbers: α0, conv2, fc1, a file m05; nor is a link target
  assert reproduce_report.note_numbers("α0 kills conv2 and fc1; see [the m05 grid](docs/reproduction_m05.md) and "
                                       "docs/reproduction_fashion_m05.md.") == []
  assert reproduce_report.note_numbers("1,000 digits, 3.5e3, n-1") == ["1,000", "3.5e3", "1"]
  out = tmp_path / "r.md"
  out.write_text("# x\n\n<!-- note -->\nInverse trains in every seed at n = λ.\n<!-- /note -->\n")
  assert reproduce_report.kept_note(str(out)) == "Inverse trains in every seed at n = λ."
  out.write_text("# x\n\n<!-- note -->\nInverse is 0.5 point worse.\n<!-- /note -->\n")
  with pytest.raises(ValueError, match=r"has 1 number\(s\) the command does not recompute \(first: '0.5'\)"):
    reproduce_report.kept_note(str(out))
  root = tmp_path / "runs"
  argv = ["reproduce.py", "--root", str(root), "--out", str(out), "--learners", "2", "--n", "lambda", "--epochs", "1",
          "--train-examples", "256"]
  assert reproduce.main(argv) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith(f"error: the hand-written note of {out} has 1 number(s)")
  assert not root.exists() or not list(root.iterdir())                      # nothing trained
  assert out.read_text().endswith("Inverse is 0.5 point worse.\n<!-- /note -->\n")   # the report is untouched


def test_a_declared_momentum_goes_into_every_cell_its_name_and_the_report(tmp_path):
  cells = reproduce.grid([8], ["1", "lambda"], [0], "fashion_mnist", ["lambda"], momentum=0.5)
  assert {c.momentum for c in cells} == {0.5} and len(cells) == 4
  assert cells[0].name(12, 20000) == "fashion_mnist-lambda8-mu16-ssgd-e12-t20000-m0.5-seed0"
  assert Cell(8, 0, "ssgd", 0, "fashion_mnist").name(12, 20000) == "fashion_mnist-lambda8-mu16-ssgd-e12-t20000-seed0"
  assert {reproduce.cell_config(c, 12, 20000).momentum for c in cells} == {0.5}
  assert reproduce.cell_config(Cell(8, 0, "ssgd", 0, "fashion_mnist"), 12).momentum == 0.9
  assert {c.momentum for c in reproduce.speedup_cells([1, 2], [0], "fashion_mnist", 0.5)} == {0.5}
  args = reproduce.parse_args(["--dataset", "fashion_mnist", "--momentum", "0.5", "--root", str(tmp_path),
                               "--out", str(tmp_path / "r.md")])
  assert args.momentum == 0.5
  with pytest.raises(ValueError, match=r"--momentum 1 is invalid; allowed: 0 <= momentum < 1"):
    reproduce.parse_args(["--momentum", "1", "--root", str(tmp_path), "--out", str(tmp_path / "r.md")])
  agg = reproduce_report.aggregate([_final(8, 0, "ssgd", 0, 0.1), _final(8, 1, "inverse", 0, 0.11)])
  text = reproduce_report.render_markdown(agg, reproduce_report.p4_verdicts(agg), command="c", epochs=12, seeds=[0],
                                          wall_s=1, runs=[], estimate="E", figures=[], dataset="fashion_mnist",
                                          momentum=0.5)
  assert "but for the momentum, 0.5 in every cell, SSGD included (a declared second setting" in text
  assert "momentum 0.5, 12 epochs" in text


def test_report_only_writes_the_cells_done_so_far_and_trains_nothing(tmp_path, capsys):
  """Two of the grid's three cells have a final.json (made here, no training): the report has them, says one
  run is missing, and shows the grid's command; with none done it is one line and exit 2."""
  root, out = tmp_path / "runs", tmp_path / "docs" / "r.md"
  argv = ["reproduce.py", "--root", str(root), "--out", str(out), "--learners", "2", "--n", "lambda",
          "--constant-n", "lambda", "--epochs", "2", "--seeds", "0", "--train-examples", "256", "--report-only"]
  assert reproduce.main(argv) == 2
  assert "none of the grid's cells is done" in capsys.readouterr().err
  for cell, error in ((Cell(2, 0, "ssgd", 0), 0.20), (Cell(2, 2, "inverse", 0), 0.25)):
    folder = root / cell.name(2, 256)
    folder.mkdir(parents=True)
    record = {"epoch": 2.0, "updates": 8, "samples": 512, "gradients": 8, "test_error": error, "train_loss": 1.0,
              "staleness_mean": 0.0 if cell.policy == "ssgd" else 1.0, "staleness_histogram": {"1": 8},
              "sim_time": 8.0, "wall_s": 3.0}
    (folder / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    (folder / "final.json").write_text(json.dumps({"cell": cell.__dict__, "epochs": 2.0, "cpu_count": 2,
                                                   "load_avg_1min": 1.0, **record}))
  assert reproduce.main(argv) == 0
  text = out.read_text()
  assert "**Partial report** (`--report-only`, the grid still running): 1 of the command's 3 runs" in text
  assert "| 2 | 2 | 64 | 1 | 1.00 | 25.00 | – | 20.00 | +5.00 | undecided |" in text
  assert "written by `--report-only` from the finished runs" in text and "last invocation" not in text
  assert "```bash\npython launch/reproduce.py " + " ".join(argv[1:-1]) + "\n```" in text   # the grid's command
  assert not (root / Cell(2, 2, "constant", 0).name(2, 256)).exists()          # nothing trained


@pytest.mark.slow
def test_a_cell_whose_learners_failed_is_a_result_recorded_in_one_line_and_the_grid_goes_on(tmp_path, capsys):
  """A real cell whose learner raises under fail_fast (the run stops with LearnersFailed, as when every learner
  died): its final.json records the one-line reason and no test error; the grid says so in one line and goes on
  to the next cell; the reports show it as such, never in a mean."""
  cell = Cell(2, 2, "inverse", 0)
  config = reproduce.cell_config(cell, 1, 256)
  config.fault_learner, config.fault_at_step, config.fail_fast = 0, 0, True
  path = reproduce.final_path(cell, 1, str(tmp_path), 256)
  final = grid_runner.train_and_record(config, path, reproduce.cell_head(cell, 1, 256))
  with open(path) as f:
    assert json.load(f) == final
  assert final["test_error"] is None and grid_runner.unfinished(final) == "learners failed"
  assert final["learners_failed"] == ("learner 0 failed (RuntimeError: injected fault: learner 0 raised at its step "
                                      "0 (config.fault_learner)) and fail_fast is set")
  ssgd = _final(2, 0, "ssgd", 0, 0.10)
  finals, trained = grid_runner.run_cells(["failed", "ssgd"], lambda c: ({"failed": final, "ssgd": ssgd}[c], True),
                                          name=lambda c: c)
  assert finals == [final, ssgd] and trained == 2
  said = [line for line in re.split(r"[\r\n]", capsys.readouterr().err) if "failed:" in line]
  assert said == [f"failed: learners failed: {final['learners_failed']}"]
  agg = reproduce_report.aggregate([final, {**final, "cell": {**final["cell"], "seed": 1}}, ssgd])
  a = agg[(2, 2, "inverse")]
  assert a["error"] is None and a["outcomes"] == {"learners failed": 2}
  assert reproduce_report.error_text(a) == "– (learners failed in 2 of 2 seeds)"
  text = reproduce_report.render_markdown(agg, reproduce_report.p4_verdicts(agg), command="c", epochs=1, seeds=[0, 1],
                                          wall_s=1, runs=[("inv", final)], estimate="E", figures=[])
  assert re.search(r"\| `inv` \| learners failed \| .* s \|", text)



GRANDCHILD = """
import subprocess, sys, time
sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
open(sys.argv[1], "w").write(str(sleeper.pid))
time.sleep(120)
"""


def _alive(pid):
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"      # a zombie has ended
  except OSError:
    return False


def test_a_cell_past_its_time_limit_is_killed_with_its_process_group_and_recorded_as_timed_out(tmp_path):
  """The child (and a process it started) is killed once past the limit; the record is the cell's head, timed
  out, no test error, and is written nowhere, so a rerun resumes the cell."""
  pid_file, path = tmp_path / "grandchild.pid", tmp_path / "cell" / "final.json"
  start = time.monotonic()
  record, ran = grid_runner.run_in_child(str(path), [sys.executable, "-c", GRANDCHILD, str(pid_file)], dict(os.environ),
                                         "slow-cell", head={"cell": {"seed": 3}}, timeout_s=2)
  assert time.monotonic() - start < 60 and ran
  assert record["timed_out"].startswith("ran past --cell-timeout-s 2 s; its process group was killed")
  assert record["cell"] == {"seed": 3} and record["test_error"] is None and record["wall_s"] >= 2
  assert grid_runner.unfinished(record) == "timed out" and not path.exists()
  deadline = time.monotonic() + 10
  while _alive(int(pid_file.read_text())) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not _alive(int(pid_file.read_text())), "the cell's own child outlived it"


TRAPS_CTRL_C = """
import signal, sys, time
def saved(signum, frame):
  open(sys.argv[1], "w").write("checkpoint saved")
  sys.exit(130)
signal.signal(signal.SIGINT, saved)
open(sys.argv[1] + ".ready", "w").close()
time.sleep(120)
"""


# A grid process (run apart from pytest, whose xdist workers handle signals their own way): its main thread waits
# on the cell in run_in_child while another thread presses Ctrl-C once the cell is ready, either at the process
# (the terminal's way) or at that thread itself (what the kernel may do in a process with JAX's threads).
GRID_PRESSING_CTRL_C = """
import os, signal, sys, threading, time
sys.path.insert(0, sys.argv[1])
from launch import grid_runner
marker, receiver, cell = sys.argv[2], sys.argv[3], sys.argv[4]
# Python's own Ctrl-C handler, as under a terminal: a pytest started in the background (`cmd &`, nohup) hands its
# children SIGINT ignored, and Python then installs none
signal.signal(signal.SIGINT, signal.default_int_handler)
def press():
  while not os.path.exists(marker + ".ready"):
    time.sleep(0.05)
  if receiver == "process":
    os.kill(os.getpid(), signal.SIGINT)
  else:
    signal.pthread_kill(threading.get_ident(), signal.SIGINT)    # Python's handler trips here, not in main
threading.Thread(target=press, daemon=True).start()
start = time.monotonic()
try:
  grid_runner.run_in_child(marker + ".json", [sys.executable, "-c", cell, marker], dict(os.environ), "cell",
                           timeout_s=60)
except KeyboardInterrupt:
  print(f"interrupted after {time.monotonic() - start:.1f} s")
"""


@pytest.mark.parametrize("receiver", ["process", "another thread"])
def test_a_ctrl_c_reaches_the_cell_in_its_own_process_group_which_saves_before_the_grid_stops(tmp_path, receiver):
  """The cell runs in a process group of its own (so a time limit can kill all of it), out of the terminal's
  reach: the grid passes a Ctrl-C on and waits for the cell to save its checkpoint. Also when the kernel hands
  the signal to a thread other than the waiting one: the grid sees it within a slice of its wait, not when the
  cell's time limit (60 s here) ends the wait, as one long wait did."""
  marker = tmp_path / "marker"
  grid = subprocess.run([sys.executable, "-c", GRID_PRESSING_CTRL_C, ROOT, str(marker), receiver, TRAPS_CTRL_C],
                        capture_output=True, text=True, timeout=120)
  assert grid.returncode == 0 and grid.stdout.startswith("interrupted after "), grid.stderr[-2000:]
  assert float(grid.stdout.split()[2]) < 30, f"the Ctrl-C waited for the cell's time limit: {grid.stdout}"
  assert marker.read_text() == "checkpoint saved"


@pytest.mark.slow
def test_a_grid_whose_cells_time_out_reports_them_as_timed_out_and_trains_on(tmp_path, capsys):
  """--cell-timeout-s 0.5: every cell is killed while it starts; each gets one line, the grid goes on to the
  next, and the report lists each run as timed out (no mean, no final.json: a rerun resumes them)."""
  root, out = tmp_path / "runs", tmp_path / "r.md"
  argv = ["reproduce.py", "--root", str(root), "--out", str(out), "--learners", "2", "--n", "lambda", "--epochs", "1",
          "--train-examples", "256", "--cell-timeout-s", "0.5"]
  assert reproduce.main(argv) == 0
  captured = capsys.readouterr()
  assert "3 cells (3 trained, 0 already done, 3 timed out)" in captured.out
  said = [line for line in re.split(r"[\r\n]", captured.err) if ": timed out: " in line]
  assert len(said) == 3 and all("ran past --cell-timeout-s 0.5 s" in line for line in said)
  text = out.read_text()
  assert len(re.findall(r"\| `lambda2-[^`]*` \| timed out \|", text)) == 3
  assert "| 2 | 2 | 64 | 1 | – | – (timed out) | – (timed out) | – (timed out) |" in text
  assert not list(root.glob("*/final.json"))
