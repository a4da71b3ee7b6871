"""launch/momentum_staleness.py: the probes of why momentum 0.9 fails async learners, dead units, the report."""

import json
import math
import os

import jax
import numpy as np
import pytest

from launch import momentum_staleness as ms
from launch.momentum_staleness import Probe
from sajax import idx, models


def test_probes_are_the_references_then_inverse_at_each_momentum_and_warmed_up():
  labels = [p.label for p in ms.probes(30, [0])]
  assert labels == ["SSGD, m = 0.9", "async constant, m = 0.9", "async inverse, m = 0.9",
                    "async inverse, m = 0.9, warm-up 1 epoch", "async inverse, m = 0.7", "async inverse, m = 0.5",
                    "async inverse, m = 0"]
  assert len(ms.probes(30, [0, 1])) == 14


def test_a_probe_is_the_grids_cell_with_its_momentum_warmup_and_the_full_runs_schedule():
  warm = ms.probe_config(Probe(30, 30, "inverse", 0.9, 1.0, 2), epochs=2, train_examples=20000, data_dir="/d")
  assert (warm.executor, warm.protocol, warm.n, warm.policy) == ("simulated", "softsync", 30, "inverse")
  assert (warm.learners, warm.batch_per_learner, warm.seed, warm.train_examples) == (30, 5, 2, 20000)
  assert (warm.momentum, warm.lr_warmup_epochs, warm.learning_rate) == (0.9, 1.0, 0.05)
  assert tuple(warm.lr_boundaries_epochs) == (8, 10.5)         # configs/fashion_mnist.py's, not scaled to 2 epochs
  assert (warm.eval_every_epochs, warm.epochs, warm.data_dir) == (0.1, 2.0, "/d")
  ssgd = ms.probe_config(Probe(30, 0, "ssgd", 0.9, 0.0, 0), epochs=2, train_examples=20000)
  assert (ssgd.protocol, ssgd.momentum, ssgd.lr_warmup_epochs) == ("hardsync", 0.9, 0.0) and not ssgd.get("data_dir")


def test_dead_fractions_count_units_with_no_positive_pre_activation():
  model = models.create_model("small_cnn", 10)
  params = models.init_params(model, jax.random.PRNGKey(0), (28, 28, 1))
  images = jax.random.uniform(jax.random.PRNGKey(1), (16, 28, 28, 1))
  half = jax.tree.map(lambda x: x, params)
  half["conv1"]["kernel"] = np.zeros_like(params["conv1"]["kernel"])
  half["conv1"]["bias"] = np.where(np.arange(32) % 2 == 0, 1.0, -1.0).astype(np.float32)   # even channels live
  assert ms.dead_fractions(model, half, images)["conv1"] == 0.5
  dead = jax.tree.map(lambda x: x, params)
  dead["conv1"]["bias"] = np.full(32, -1e3, np.float32)         # every conv1 unit off: nothing reaches conv2
  got = ms.dead_fractions(model, dead, images)
  assert got["conv1"] == 1.0 and got["conv2"] == 1.0           # conv2 sees zeros: pre-activation = bias = 0
  assert ms.dead_fractions(model, params, images)["conv1"] < 0.5


def test_start_weight_and_peak_loss():
  assert ms.start_weight(30, "inverse") == pytest.approx(1 + sum(1 / s for s in range(1, 30)))
  assert ms.start_weight(4, "inverse") == pytest.approx(1 + 1 + 1 / 2 + 1 / 3)
  assert ms.start_weight(30, "constant") == 30
  history = [{"epoch": 0.1, "train_loss": 2.2}, {"epoch": 0.2, "train_loss": 9.0}, {"epoch": 0.3, "train_loss": 2.3}]
  assert ms.peak_loss(history) == (0.2, 9.0)
  assert math.isnan(ms.peak_loss(history + [{"epoch": 0.4, "train_loss": float("nan")}])[1])
  assert ms.peak_loss([]) is None


def _fashion_idx(folder, n_train=256, n_test=64):
  rng = np.random.default_rng(0)
  os.makedirs(folder, exist_ok=True)
  for role, n in (("train", n_train), ("test", n_test)):
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = (rng.integers(0, 60, (n, 28, 28)) + 19 * labels[:, None, None]).astype(np.uint8)   # learnable
    idx.write(os.path.join(folder, idx.FILES[f"{role}_images"]), images)
    idx.write(os.path.join(folder, idx.FILES[f"{role}_labels"]), labels)
  return str(folder)


@pytest.mark.slow
def test_end_to_end_on_small_idx_files_then_a_rerun_trains_nothing(tmp_path, capsys, monkeypatch):
  """Three of the seven probes (SSGD, inverse at m = 0.9, and the same warmed up: every kind of row), each in a
  child process as the command runs them; the probes' processes load compiled code from the test session's cache
  (tests/conftest.py), which the other tests' runs of the same model have filled."""
  every = ms.probes
  monkeypatch.setattr(ms, "probes", lambda learners, seeds: [every(learners, seeds)[i] for i in (0, 2, 3)])
  data_dir = _fashion_idx(tmp_path / "fashion")
  root, out = str(tmp_path / "runs"), str(tmp_path / "docs" / "m.md")
  argv = ["momentum_staleness.py", "--learners", "2", "--epochs", "0.5", "--train-examples", "256",
          "--data-dir", data_dir, "--root", root, "--out", out]
  assert ms.main(argv) == 0
  names = [p.name(0.5, 256) for p in ms.probes(2, [0])]
  assert len(names) == 3
  finals = [json.load(open(os.path.join(root, n, "final.json"))) for n in names]
  for f in finals:
    assert set(f["dead"]) == {*ms.LAYERS, "update"} and all(0 <= f["dead"][k] <= 1 for k in ms.LAYERS)
    assert f["dead"]["update"] == f["updates"]                    # the final checkpoint's
  text = open(out).read()
  assert text.count("| 0 | ") == 3 and "| async inverse, m = 0.9, warm-up 1 epoch | 0 |" in text
  assert "momentum_staleness.py --learners 2 --epochs 0.5" in text and "(m/train_loss.png)" in text
  with open(tmp_path / "docs" / "m" / "train_loss.png", "rb") as png:
    assert png.read(8) == b"\x89PNG\r\n\x1a\n"
  warm = json.load(open(os.path.join(root, names[2], "config.json")))
  assert warm["lr_warmup_epochs"] == 1.0 and warm["momentum"] == 0.9
  stamps = [os.path.getmtime(os.path.join(root, n, "final.json")) for n in names]
  capsys.readouterr()
  assert ms.main(argv) == 0
  assert stamps == [os.path.getmtime(os.path.join(root, n, "final.json")) for n in names]


def test_bad_flags_and_a_missing_dataset_are_one_line_and_exit_2_writing_nothing(tmp_path, capsys, monkeypatch):
  from sajax import data
  assert ms.main(["m", "--learners", "1", "--root", str(tmp_path / "r")]) == 2
  assert capsys.readouterr().err.strip() == "error: --learners 1 is invalid; allowed: integers 2..128"
  monkeypatch.setitem(idx.SYSTEM_FOLDERS, "fashion_mnist", str(tmp_path / "none"))   # this machine may have Debian's

  def unprepared(name, *args):
    raise data.DatasetError(f"dataset {name!r} is not prepared")
  monkeypatch.setattr(data, "_tfds_sources", unprepared)
  assert ms.main(["m", "--data-dir", str(tmp_path / "empty"), "--root", str(tmp_path / "r"),
                  "--out", str(tmp_path / "m.md")]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: dataset 'fashion_mnist' not found") and "\n" not in err
  assert not os.path.exists(tmp_path / "r") and not os.path.exists(tmp_path / "m.md")


def test_the_report_keeps_its_hand_written_note_when_rewritten(tmp_path):
  from launch import reproduce_report
  rows = [(Probe(30, 30, "inverse", 0.9, 0.0, 0), {"test_error": 0.9, "train_loss": 2.3,
                                                    "dead": {"conv1": 0.0, "conv2": 1.0, "fc1": 1.0, "update": 8}},
           [{"epoch": 0.1, "train_loss": 93.5, "test_error": 0.9}])]
  text = ms.render(rows, command="c", epochs=2, train_examples=20000, wall_s=1, figure="f.png", note="It dies.")
  assert "| async inverse, m = 0.9 | 0 | 90.00 | 2.3000 | 93.5 (0.1) | 0 % / 100 % / 100 % |" in text
  assert "4.96 gradients under the inverse rule" in text      # 1 + H_29
  (tmp_path / "m.md").write_text(text)
  assert reproduce_report.kept_note(str(tmp_path / "m.md")) == "It dies."
