"""End-to-end runs of the pmap SSGD trainer on the smoke config: outputs, resumption, corrupt checkpoints."""

import json
import logging
import os
import shutil

import pytest

import sajax
from configs import smoke
from sajax import config as config_lib
from sajax import metrics as metrics_lib
from tests import helpers
from tests.helpers import reproducible as _reproducible

REQUIRED = {"epoch", "updates", "samples", "wall_s", "train_loss", "test_error", "staleness_mean",
            "staleness_max", "samples_per_s"}


# The tests sharing the reference run go to one pytest-xdist worker, which makes it once (session scope: a
# module-scoped fixture is made again whenever the worker ran another module's test in between).
pytestmark = pytest.mark.xdist_group("train-reference")


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
  """One uninterrupted smoke run, shared by the tests that compare against it."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  config = smoke.get_config()
  config.plots = True
  return sajax.train(config, workdir=workdir)


def test_smoke_run_writes_every_output(reference_run):
  workdir = reference_run.workdir
  for name in ("config.json", "metrics.jsonl", "curves.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tensorboard")))
  records = metrics_lib.read_metrics(workdir)
  assert len(records) == 2 and [r["epoch"] for r in records] == [1.0, 2.0]
  for r in records:
    assert REQUIRED <= set(r)
    assert r["staleness_mean"] == 0 and r["staleness_max"] == 0  # SSGD: σ ≡ 0
  config = smoke.get_config()
  # 1,024 examples / (λμ = 64) = 16 updates per epoch
  assert [r["updates"] for r in records] == [16, 32]
  assert records[-1]["samples"] == 32 * config.learners * config.batch_per_learner
  # it learns: 10 classes start at 90 % error
  assert records[-1]["test_error"] < 0.5
  assert records[-1]["train_loss"] < records[0]["train_loss"] + 0.5
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  assert saved["learners"] == config.learners and saved["dataset"] == "mnist5k"
  assert reference_run.metrics["test_error"] == records[-1]["test_error"]
  assert reference_run.metrics["protocol"] == "hardsync"
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["16", "32"]


def test_interrupted_run_resumes_to_the_same_metrics(reference_run, tmp_path):
  """Stop mid-epoch (as Ctrl-C does), rerun in the same workdir: identical metrics to the uninterrupted run."""
  workdir = str(tmp_path / "run")

  def stop_at_update_21(run):
    if run.updates == 21:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    sajax.train(smoke.get_config(), workdir=workdir, callbacks=[stop_at_update_21])
  assert "21" in os.listdir(os.path.join(workdir, "checkpoints"))
  assert len(metrics_lib.read_metrics(workdir)) == 1
  resumed = sajax.train(smoke.get_config(), workdir=workdir)
  assert _reproducible(metrics_lib.read_metrics(workdir)) == _reproducible(reference_run.history)
  assert resumed.metrics["test_error"] == reference_run.metrics["test_error"]
  assert resumed.metrics["train_loss"] == reference_run.metrics["train_loss"]


def test_rerunning_a_finished_run_changes_nothing(reference_run, tmp_path):
  workdir = str(tmp_path / "copy")
  shutil.copytree(reference_run.workdir, workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  saved["workdir"] = os.path.abspath(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(saved, f)
  before = metrics_lib.read_metrics(workdir)
  again = sajax.train(smoke.get_config(), workdir=workdir)
  assert metrics_lib.read_metrics(workdir) == before
  assert again.metrics["test_error"] == reference_run.metrics["test_error"]


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(reference_run, tmp_path, caplog):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference_run.workdir, workdir)
  latest = os.path.join(workdir, "checkpoints", "32")
  # Corrupt every file of the latest checkpoint's state (truncate it to garbage).
  for root, _, files in os.walk(os.path.join(latest, "state")):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\x00garbage")
  with caplog.at_level(logging.WARNING, logger="sajax"):
    result = sajax.train(smoke.get_config(), workdir=workdir)
  assert any("unreadable" in r.getMessage() and "step 32" in r.getMessage() for r in caplog.records)
  assert os.path.isdir(os.path.join(workdir, "corrupt-32"))  # kept aside, never deleted
  # It fell back to update 16 and recomputed epoch 2 to the same result.
  assert _reproducible(metrics_lib.read_metrics(workdir)) == _reproducible(reference_run.history)
  assert result.metrics["test_error"] == reference_run.metrics["test_error"]


def test_workdir_with_another_config_is_refused_and_untouched(reference_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference_run.workdir, workdir)
  before = sorted(os.listdir(workdir))
  config = smoke.get_config()
  config.learning_rate = 0.123
  with pytest.raises(config_lib.ConfigError, match="learning_rate"):
    sajax.train(config, workdir=workdir)
  assert sorted(os.listdir(workdir)) == before


def test_tfds_dataset_trains_through_the_same_path(tmp_path):
  """The paper's CIFAR10 config on TFDS mock data (cifar10_full, crop+flip), a handful of updates."""
  from configs import cifar10
  from tests.tfds_mock import mock_tfds

  config = cifar10.get_config()
  config.learners, config.batch_per_learner = 2, 8
  config.train_examples = 64
  config.epochs, config.eval_every_epochs, config.checkpoint_every_epochs = 2, 1, 1
  config.lr_boundaries_epochs = (1,)
  config.eval_batch_size = 32
  config.progress = False
  with mock_tfds(64):
    result = sajax.train(config, workdir=str(tmp_path / "cifar"))
  assert [r["updates"] for r in result.history] == [4, 8]
  assert 0.0 <= result.metrics["test_error"] <= 1.0
  assert result.metrics["samples"] == 8 * 16


def test_the_schedule_steps_at_epoch_boundaries_and_warms_up_linearly():
  """α0 = 0.1 with 10 updates per epoch, ÷10 at epoch 2; a 0.5-epoch warm-up is W = 5 updates: α_t = α0 (t+1)/5."""
  from sajax import run_optimizer
  config = helpers.smoke_config("simulated", "async", learners=2, batch_per_learner=8, learning_rate=0.1,
                               lr_boundaries_epochs=(2,), lr_decay=0.1)
  plain = run_optimizer.make_schedule(config, per_epoch=10)
  assert [float(plain(t)) for t in (0, 19, 20)] == pytest.approx([0.1, 0.1, 0.01])
  config.lr_warmup_epochs = 0.5
  warm = run_optimizer.make_schedule(config, per_epoch=10)
  assert [float(warm(t)) for t in (0, 1, 4, 5, 19, 20)] == pytest.approx([0.02, 0.04, 0.1, 0.1, 0.1, 0.01])
  config.lr_warmup_epochs = -1
  with pytest.raises(config_lib.ConfigError, match=r"^config.lr_warmup_epochs=-1.0 is invalid; allowed: a number >= 0"):
    config_lib.validate(config)


def test_newest_params_reads_the_last_checkpoint_and_changes_nothing(reference_run, tmp_path):
  """θ of the final checkpoint gives the final record's test error; no file of the run changes (resuming would
  cut metrics back and open writers)."""
  from sajax import data, models, saved_state, steps
  workdir, config = reference_run.workdir, smoke.get_config()
  before = {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(workdir) for f in fs}
  dataset = data.load_dataset(config.dataset)
  update, params = saved_state.newest_params(config, workdir, dataset)
  after = {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(workdir) for f in fs}
  assert after == before
  final = metrics_lib.read_metrics(workdir)[-1]
  assert update == final["updates"]
  model = models.create_model(config.model, dataset.num_classes)
  evaluate = steps.Evaluator(model, data.make_preprocess(dataset), dataset.test, batch_size=config.eval_batch_size)
  assert evaluate(params)["test_error"] == pytest.approx(final["test_error"], abs=1e-6)
  assert saved_state.newest_params(config, str(tmp_path), dataset) is None
