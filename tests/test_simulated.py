"""The simulated executor: discrete-event asynchrony on the same PS core, reproducible bit for bit."""

import pytest

import sajax
from tests.helpers import reproducible as _reproducible, smoke_config
from sajax import config as config_lib
from sajax import metrics as metrics_lib


def _config(protocol, n=1, learners=4, **overrides):
  return smoke_config("simulated", protocol, n=n, learners=learners, batch_per_learner=16, **overrides)


def test_same_config_and_seed_give_identical_metrics(tmp_path):
  config = _config("softsync", n=2, sim_jitter=0.5, sim_stragglers=0.25)
  a = sajax.train(config, workdir=str(tmp_path / "a"))
  b = sajax.train(config, workdir=str(tmp_path / "b"))
  assert _reproducible(metrics_lib.read_metrics(a.workdir)) == _reproducible(metrics_lib.read_metrics(b.workdir))
  assert a.metrics["sim_time"] > 0 and len(a.history) == 2
  other = _config("softsync", n=2, sim_jitter=0.5, sim_stragglers=0.25, seed=1)
  c = sajax.train(other, workdir=str(tmp_path / "c"))
  assert c.metrics["staleness_histogram"] != a.metrics["staleness_histogram"] or c.metrics["sim_time"] != a.metrics["sim_time"]


def test_async_event_order_gives_the_exact_staleness_pattern(tmp_path):
  """Equal speeds, no jitter: 4 learners finish together and ties go by learner id, so the first round pushes
  σ = 0, 1, 2, 3 and every later gradient has σ = λ − 1 = 3."""
  result = sajax.train(_config("async", train_examples=512), workdir=str(tmp_path))
  hist = result.metrics["staleness_histogram"]
  assert hist["0"] == hist["1"] == hist["2"] == 1 and set(hist) == {"0", "1", "2", "3"}
  assert hist["3"] == result.metrics["updates"] - 3
  assert result.metrics["sim_time"] == pytest.approx(result.metrics["updates"] / 4)  # 4 gradients per second


def test_hardsync_rounds_last_as_long_as_the_slowest_learner(tmp_path):
  result = sajax.train(_config("hardsync", train_examples=512, sim_stragglers=0.25, sim_slowdown=4.0),
                       workdir=str(tmp_path))
  assert result.metrics["staleness_max"] == 0
  assert result.metrics["sim_time"] == pytest.approx(4.0 * result.metrics["updates"])


def test_a_straggler_pushes_rarely_and_stale(tmp_path):
  result = sajax.train(_config("async", train_examples=512, sim_speeds=(4.0, 1.0, 1.0, 1.0)),
                       workdir=str(tmp_path))
  per = result.metrics["staleness_per_learner"]
  assert per["0"]["count"] < per["1"]["count"] / 3
  assert per["0"]["mean"] > 2 * per["1"]["mean"]


def test_poisson_arrivals_are_seeded(tmp_path):
  config = _config("async", train_examples=512, sim_poisson=True)
  a = sajax.train(config, workdir=str(tmp_path / "a"))
  b = sajax.train(config, workdir=str(tmp_path / "b"))
  assert a.metrics["staleness_histogram"] == b.metrics["staleness_histogram"]
  assert len(a.metrics["staleness_histogram"]) > 4   # random arrival order spreads σ beyond 0..3


def test_bad_speed_model_is_refused(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="sim_speeds"):
    sajax.train(_config("async", sim_speeds=(1.0, 2.0)), workdir=str(tmp_path / "x"))
  with pytest.raises(config_lib.ConfigError, match="sim_stragglers=1.5"):
    sajax.train(_config("async", sim_stragglers=1.5), workdir=str(tmp_path / "y"))
  assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
