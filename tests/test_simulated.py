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
  with pytest.raises(config_lib.ConfigError, match="sim_ring=-1"):
    sajax.train(_config("async", sim_ring=-1), workdir=str(tmp_path / "z"))
  with pytest.raises(config_lib.ConfigError, match="sim_batching 'grouped'; allowed: auto, unrolled, vmap"):
    sajax.train(_config("async", sim_batching="grouped"), workdir=str(tmp_path / "w"))
  assert not any((tmp_path / d).exists() for d in "xyzw")


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
    sajax.train(config, workdir=str(tmp_path / "stopped"), callbacks=[_stop_at(37)])
  assert len(metrics_lib.read_metrics(str(tmp_path / "stopped"))) == 1   # stopped after the epoch-1 evaluation
  resumed = sajax.train(config, workdir=str(tmp_path / "stopped"))
  assert _reproducible(resumed.history) == _reproducible(whole.history)
  assert _reproducible(metrics_lib.read_metrics(resumed.workdir)) == _reproducible(metrics_lib.read_metrics(whole.workdir))
  assert resumed.metrics["sim_gradient_calls"] == whole.metrics["sim_gradient_calls"]


def test_a_one_entry_ring_forces_flushes_and_changes_no_gradient(tmp_path):
  """A ring of one version per device cannot hold the snapshots of learners still computing: every such pull
  forces a batched call first (counted), so the calls group learners differently, yet no number changes.
  λ = 16 learners on the 8 test devices: two share each device's ring."""
  config = _config("async", learners=16, sim_jitter=0.3)
  auto = sajax.train(config, workdir=str(tmp_path / "auto"))
  config.sim_ring = 1
  tiny = sajax.train(config, workdir=str(tmp_path / "tiny"))
  assert auto.metrics["sim_ring_flushes"] == 0 and tiny.metrics["sim_ring_flushes"] > 0
  assert tiny.metrics["sim_gradient_calls"] > auto.metrics["sim_gradient_calls"]
  drop = {"sim_gradient_calls", "sim_ring_flushes"}
  assert ([{k: v for k, v in r.items() if k not in drop} for r in _reproducible(tiny.history)] ==
          [{k: v for k, v in r.items() if k not in drop} for r in _reproducible(auto.history)])


@pytest.mark.parametrize("how", ["unrolled", "vmap"])
def test_batched_gradients_equal_one_at_a_time_gradients(how):
  """The batched call (several learners, versions and batches per device) gives each learner the gradient a
  plain jitted value_and_grad gives on its own snapshot and batch, with either slot batching."""
  import jax
  import numpy as np
  from jax.flatten_util import ravel_pytree
  from sajax import data, models, steps
  from sajax.executors import batched

  ds = data.load_dataset("mnist5k")
  model = models.create_model("small_cnn", 10)
  p0 = models.init_params(model, jax.random.PRNGKey(0), ds.input_shape)
  flat0, unravel = ravel_pytree(p0)
  versions = [flat0, flat0 * 0.9, flat0 + 0.01]
  loss_fn = steps.make_loss_fn(model, data.make_preprocess(ds))
  devices = jax.local_devices()[:2]
  rings = [batched.VersionRing(d, 2, flat0.size, flat0.dtype) for d in devices]
  entries = [[rings[0].slot_for(0, versions[0], set()), rings[0].slot_for(1, versions[1], {0})],
             [rings[1].slot_for(2, versions[2], set()), rings[1].slot_for(2, versions[2], {2})]]
  assert rings[0].slot_for(2, versions[2], {0, 1}) is None      # full of needed versions: the caller must flush
  which = [[0, 1], [2, 2]]
  mu, key = 8, jax.random.PRNGKey(3)
  images = np.asarray(ds.train.images[:4 * mu]).reshape(2, 2, mu, *ds.input_shape)
  labels = np.asarray(ds.train.labels[:4 * mu]).reshape(2, 2, mu).astype(np.int32)
  learner = np.array([[0, 2], [1, 3]], np.int32)
  step = np.array([[5, 0], [1, 7]], np.int32)
  ring = jax.make_array_from_single_device_arrays(
      (2, 2, flat0.size), jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), ("d",)),
                                                     jax.sharding.PartitionSpec("d")), [r.array for r in rings])
  grads = batched.make_batched_gradients(loss_fn, unravel, devices, how=how)
  loss, flat, finite = grads(ring, np.array(entries, np.int32), images, labels, learner, step, key)
  assert np.asarray(finite).all()
  single = jax.jit(jax.value_and_grad(loss_fn))
  for d in range(2):
    for s in range(2):
      rng = jax.random.fold_in(jax.random.fold_in(key, learner[d, s]), step[d, s])
      ref_loss, ref = single(unravel(versions[which[d][s]]), images[d, s], labels[d, s], rng)
      np.testing.assert_allclose(np.asarray(loss)[d, s], ref_loss, rtol=1e-5)
      np.testing.assert_allclose(np.asarray(flat)[d, s], ravel_pytree(ref)[0], rtol=1e-4, atol=1e-6)


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
