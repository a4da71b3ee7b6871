"""The simulated executor: discrete-event asynchrony on the same PS core, reproducible bit for bit."""

import pytest

import sajax
from tests.helpers import reproducible as _reproducible, smoke_config
from sajax import config as config_lib
from sajax import metrics as metrics_lib


def _config(protocol, n=1, learners=4, **overrides):
  return smoke_config("simulated", protocol, n=n, learners=learners, batch_per_learner=16, **overrides)


def test_same_config_and_seed_give_identical_metrics_on_one_device_or_two(tmp_path, monkeypatch):
  """On CPU the learners spread over at most one device per core (os.cpu_count()): run a on 1 device, run b on
  2 (learners 0, 2 and 1, 3 share one); where the gradients are computed changes no number."""
  import os
  from sajax.executors import common
  spread, original = [], common.compute_devices
  monkeypatch.setattr(common, "compute_devices", lambda *a, **k: spread.append(original(*a, **k)) or spread[-1])
  config = _config("softsync", n=2, sim_jitter=0.5, sim_stragglers=0.25)
  monkeypatch.setattr(os, "cpu_count", lambda: 1)
  a = sajax.train(config, workdir=str(tmp_path / "a"))
  monkeypatch.setattr(os, "cpu_count", lambda: 2)
  b = sajax.train(config, workdir=str(tmp_path / "b"))
  assert [len(d) for d in spread] == [1, 2]
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
  with pytest.raises(config_lib.ConfigError, match="unknown config key 'sim_ring'"):   # retired with the ring
    sajax.train(_config("async", sim_ring=1), workdir=str(tmp_path / "z"))
  assert not any((tmp_path / d).exists() for d in "xyz")


def test_a_run_saved_with_retired_keys_still_resumes():
  saved = {"sim_ring": 0, "sim_batching": "auto", "n": 2}
  assert config_lib.config_differences(saved, {"n": 2}) == []
  assert config_lib.config_differences(saved, {"n": 4}) == ["n: 2 -> 4"]
  assert config_lib.config_differences({"learners": 4}, {"learners": 8}) == []   # λ may change (elastic resume)


def _stop_at(update):
  def callback(run):
    if run.updates == update:
      raise KeyboardInterrupt
  return callback


def test_a_stopped_and_resumed_run_ends_bit_identical(tmp_path):
  """Stopped between checkpoints (pending gradients, a half-drawn event queue, jittered times, a straggler),
  then resumed by rerunning: every metrics record equals the uninterrupted run's, to the last bit."""
  config = _config("softsync", n=2, sim_jitter=0.5, sim_speeds=(3.0, 1.0, 1.0, 1.0), checkpoint_every_epochs=2)
  whole = sajax.train(config, workdir=str(tmp_path / "whole"))
  with pytest.raises(KeyboardInterrupt):
    sajax.train(config, workdir=str(tmp_path / "stopped"), callbacks=[_stop_at(21)])   # mid-epoch 2
  assert len(metrics_lib.read_metrics(str(tmp_path / "stopped"))) == 1   # stopped after the epoch-1 evaluation
  resumed = sajax.train(config, workdir=str(tmp_path / "stopped"))
  assert _reproducible(resumed.history) == _reproducible(whole.history)
  assert _reproducible(metrics_lib.read_metrics(resumed.workdir)) == _reproducible(metrics_lib.read_metrics(whole.workdir))


def test_the_simulation_equals_a_plain_event_loop(tmp_path):
  """The reference is the loop public simulators run, written here from the protocol: λ = 4 equally fast
  async learners finish in (time, id) order; per event, learner k's gradient on its own snapshot θ_j and its
  next mini-batch, one update with σ = i − j (inverse rule, SGD with momentum), and k pulls θ_i. The executor
  dispatches each gradient at the pull and applies it at the push: the final weights must agree."""
  import heapq

  import jax
  import numpy as np
  import optax
  from sajax import data, models, steps, trainer
  from sajax.executors import simulated

  config = _config("async", train_examples=256, lr_boundaries_epochs=(), epochs=1.0, learning_rate=0.05)
  dataset = data.load_dataset("mnist5k")
  trainer.prepare_workdir(config, str(tmp_path))
  run = trainer.Run(config, str(tmp_path), dataset)
  try:
    params, _ = simulated.SimulatedEngine(run).run_loop()
  finally:
    run.close()
  updates = run.updates
  assert updates == 256 // 16

  λ, μ = config.learners, config.batch_per_learner
  model = models.create_model(config.model, dataset.num_classes)
  loss_fn = steps.make_loss_fn(model, data.make_preprocess(dataset))
  key = jax.random.PRNGKey(config.seed)
  theta = models.init_params(model, jax.random.fold_in(key, 0), dataset.input_shape)
  key = jax.random.fold_in(key, 1)
  tx = sajax.staleness_aware(optax.sgd(0.05, momentum=0.5), "inverse")
  state = tx.init(theta)
  samplers = data.learner_samplers(256, μ, λ, config.seed)
  held, steps_of, version = [(0, theta)] * λ, [0] * λ, 0
  events = [(1.0, k) for k in range(λ)]
  grad = jax.jit(jax.value_and_grad(loss_fn))
  for _ in range(updates):
    now, k = heapq.heappop(events)
    j, theta_j = held[k]
    images, labels = dataset.train.gather(next(samplers[k]))
    _, g = grad(theta_j, images, labels, jax.random.fold_in(jax.random.fold_in(key, k), steps_of[k]))
    step_updates, state = tx.update(g, state, theta, staleness=version - j)
    theta, version = optax.apply_updates(theta, step_updates), version + 1
    steps_of[k] += 1
    held[k] = (version, theta)
    heapq.heappush(events, (now + 1.0, k))
  assert run.executor.ps.stats.to_json()["histogram"] == {"0": 1, "1": 1, "2": 1, "3": updates - 3}
  for ours, ref in zip(jax.tree.leaves(params), jax.tree.leaves(theta)):
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-6)


def test_a_policy_reading_stale_weights_resumes_bit_identical(tmp_path):
  """A delay-compensated policy reads θ_j: the checkpoint carries each in-flight learner's θ_j, so a stopped
  run resumes (and pushes those gradients against the right θ_j) exactly like an uninterrupted one."""
  import jax
  from sajax import optim

  def dc(grads, staleness, *, params, stale_params):
    return jax.tree.map(lambda g, p, q: g + 0.5 * g * g * (p - q), grads, params, stale_params)

  optim.register_policy("test_sim_delay_compensated", adjust=dc, needs_stale_params=True, overwrite=True)
  config = _config("async", train_examples=512, sim_jitter=0.5, policy="test_sim_delay_compensated")
  whole = sajax.train(config, workdir=str(tmp_path / "whole"))
  with pytest.raises(KeyboardInterrupt):
    sajax.train(config, workdir=str(tmp_path / "stopped"), callbacks=[_stop_at(45)])
  resumed = sajax.train(config, workdir=str(tmp_path / "stopped"))
  assert whole.metrics["staleness_max"] >= 3
  assert _reproducible(resumed.history) == _reproducible(whole.history)
