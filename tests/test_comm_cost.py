"""Communication in the simulated clock (sim_bandwidth, sim_latency): each pull and each push of the d parameters
costs sim_latency + 4·d / sim_bandwidth seconds of the learner's own link and moves 4·d bytes."""

import functools

import jax
import numpy as np
import pytest

import sajax
from sajax import config as config_lib
from sajax import metrics as metrics_lib
from sajax.executors.comm import CommModel
from sajax.server import ParameterServer
from tests.helpers import reproducible, smoke_config


def _config(protocol="async", learners=2, **overrides):
  return smoke_config("simulated", protocol, learners=learners, batch_per_learner=16, train_examples=128,
                      **overrides)


@functools.lru_cache(maxsize=None)
def _parameters():
  """d, the parameters of the smoke runs' model (configs/smoke.py's, on its dataset), counted from its shapes."""
  from sajax import data, models
  config = _config()
  dataset = data.load_dataset(config.dataset)
  model = models.create_model(config.model, dataset.num_classes)
  shapes = jax.eval_shape(lambda key: models.init_params(model, key, dataset.input_shape), jax.random.PRNGKey(0))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def _timeline(config):
  """(result, [(simulated time, learner, σ, bytes moved) at each push]) of an async run (c = 1: one update per
  push, so the callback sees each)."""
  pushes, seen = [], [[(0, 0)] * config.learners]

  def callback(run):
    per = run.executor.ps.stats.per_learner
    now = [(per[k].count, per[k].total) if k in per else (0, 0) for k in range(config.learners)]
    k = next(k for k in range(config.learners) if now[k] != seen[-1][k])
    seen.append(now)
    pushes.append((run.executor.sim_time, k, now[k][1] - seen[-2][k][1], run.executor.telemetry()["bytes_moved"]))

  return sajax.train(config, callbacks=[callback]), pushes


@pytest.mark.parametrize("latency, transfer", [(0.0, 0.25), (0.125, 0.125)])
def test_each_pull_and_push_costs_latency_plus_4d_over_bandwidth_on_the_clock(tmp_path, latency, transfer):
  """λ = 2 async learners, 1 s and 3 s of compute, no jitter; a message takes τ = L + 4d/B = 0.25 s, so a cycle
  (pull, compute, push) lasts 1.5 s and 3.5 s. Learner 0 pushes at 1.5, 3, 4.5, 6, 7.5, …, learner 1 at 3.5, 7,
  10.5, …; with free communication they would push at 1, 2, 3, … and 3, 6, …. Every push moves 4d bytes, every
  pull 4d: after u pushes both learners have pulled once more, so 4d·(2u + 2) bytes have moved."""
  d = _parameters()
  config = _config(sim_speeds=(1.0, 3.0), sim_latency=latency, sim_bandwidth=4 * d / transfer,
                   workdir=str(tmp_path))
  result, pushes = _timeline(config)
  expected = sorted([(1.5 * i, 0) for i in range(1, 40)] + [(3.5 * i, 1) for i in range(1, 20)])[:16]
  assert result.metrics["updates"] == 16
  assert [(t, k) for t, k, _, _ in pushes] == expected
  # each learner pulled at its previous push (version = the pushes so far), so σ = the others' pushes since
  last = {0: 0, 1: 0}
  for u, (t, k, sigma, moved) in enumerate(pushes, start=1):
    assert sigma == u - 1 - last[k], (t, k)
    last[k] = u
    assert moved == 4 * d * (2 * u + 2)
  assert result.metrics["sim_time"] == expected[-1][0] == 17.5   # learner 1's 5th push, learner 0's 11th before it


def test_bytes_are_4d_per_pull_and_per_push_counted_at_the_parameter_server(tmp_path, monkeypatch):
  """Counted against every ParameterServer.pull and .push of a softsync run with a learner that dies instead of
  pushing and one whose gradients are NaN (dropped, but sent): bytes_pulled = 4d·pulls, bytes_pushed = 4d·pushes
  at every evaluation, and the final summary says how many."""
  calls = {"pull": 0, "push": 0}
  for name in calls:
    original = getattr(ParameterServer, name)

    def spy(self, *args, _original=original, _name=name, **kwargs):
      calls[_name] += 1
      return _original(self, *args, **kwargs)

    monkeypatch.setattr(ParameterServer, name, spy)
  seen = []
  config = _config("softsync", learners=4, n=2, sim_jitter=0.3, sim_bandwidth=1e6, fault_learner=3,
                   fault_at_step=2, nan_learners=(1,), nan_at_step=1, nan_steps=2, workdir=str(tmp_path))
  result = sajax.train(config, callbacks=[lambda run: seen.append((dict(calls), run.executor.telemetry()))])
  d = _parameters()
  assert result.metrics["learners_alive"] == 3 and result.metrics["gradients_dropped"] == 2
  for counted, telemetry in seen:
    assert telemetry["bytes_pulled"] == 4 * d * counted["pull"]
    assert telemetry["bytes_pushed"] == 4 * d * counted["push"]
    assert telemetry["bytes_moved"] == 4 * d * (counted["pull"] + counted["push"])
  assert calls["pull"] > calls["push"] > result.metrics["updates"]
  final = result.metrics
  assert final["bytes_moved"] == 4 * d * (calls["pull"] + calls["push"])
  text = metrics_lib.summary(config.to_dict(), final, result.workdir)
  assert f" simulated       time {final['sim_time']:g} s   moved " in text


def test_free_communication_is_todays_clock_bit_for_bit(tmp_path):
  """sim_bandwidth = 0 and sim_latency = 0 give the metrics of a config without the keys, bit for bit."""
  config = _config("softsync", learners=4, n=2, sim_jitter=0.5, sim_stragglers=0.25)
  without = config.copy_and_resolve_references()
  del without["sim_bandwidth"], without["sim_latency"]
  config.sim_bandwidth, config.sim_latency = 0.0, 0.0
  a = sajax.train(config, workdir=str(tmp_path / "a"))
  b = sajax.train(without, workdir=str(tmp_path / "b"))
  assert reproducible(metrics_lib.read_metrics(a.workdir)) == reproducible(metrics_lib.read_metrics(b.workdir))
  assert a.metrics["bytes_moved"] > 0      # bytes are counted even when they cost no time


def test_paid_communication_slows_the_clock_and_moves_the_same_bytes(tmp_path):
  """λ = 2 equally fast learners: with τ = 0.5 s per message each cycle takes 2 s instead of 1 s, so the same
  run of the same pushes ends at twice the simulated time, having moved the same bytes."""
  d = _parameters()
  free = sajax.train(_config(), workdir=str(tmp_path / "free"))
  paid = sajax.train(_config(sim_bandwidth=8.0 * d), workdir=str(tmp_path / "paid"))
  assert paid.metrics["updates"] == free.metrics["updates"] == 16
  assert paid.metrics["sim_time"] == 2 * free.metrics["sim_time"] == 16.0
  assert paid.metrics["bytes_moved"] == free.metrics["bytes_moved"] == 4 * d * (16 + 18)
  assert paid.metrics["staleness_histogram"] == free.metrics["staleness_histogram"]


def test_the_model_charges_latency_plus_size_over_bandwidth():
  comm = CommModel(message_bytes=4_000, bandwidth=1_000.0, latency=0.5)
  assert (comm.message_time, comm.cycle_time) == (4.5, 9.0)
  assert CommModel(message_bytes=4_000).cycle_time == 0.0
  assert CommModel(message_bytes=4_000, latency=0.25).cycle_time == 0.5     # bandwidth 0: only the latency


@pytest.mark.parametrize("key, value, allowed", [
    ("sim_bandwidth", -1.0, "bytes per simulated second, a finite number >= 0 (0: free communication)"),
    ("sim_bandwidth", float("nan"), "bytes per simulated second"),
    ("sim_bandwidth", float("inf"), "bytes per simulated second"),
    ("sim_latency", -0.5, "seconds per message, a finite number >= 0"),
])
def test_bad_communication_values_are_one_line_naming_value_and_allowed(key, value, allowed):
  from configs import default
  config = default.get_config()
  config[key] = value
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(config)
  message = str(info.value)
  assert message.startswith(f"config.{key}={value!r} is invalid; allowed: ") and allowed in message
  assert "\n" not in message
