"""Asynchronous local-SGD (``local_steps`` = H > 1, sajax/local_steps.py): learners push Δ = θ_j − θ_local after H
inner steps, the parameter server steps its outer optimizer on it.

Most runs swap the CNN for tests/test_delayed_reference.py's TinyNet (compiles in milliseconds): what is checked
is the executors' and the PS's arithmetic, not a model.
"""

import functools
import logging

import jax
import jax.flatten_util
import numpy as np
import optax
import pytest

import sajax
from sajax import config as config_lib, data, local_steps, metrics as metrics_lib, models, run_optimizer, steps
from tests.helpers import reproducible, smoke_config
from tests.test_delayed_reference import TinyNet, max_gap, train_recording

NEW_KEYS = ("local_steps", "inner_optimizer", "inner_learning_rate", "inner_momentum", "inner_weight_decay",
            "inner_schedule", "outer_optimizer", "outer_learning_rate", "outer_momentum")


@pytest.fixture
def tiny(monkeypatch):
  monkeypatch.setattr(models, "create_model", lambda name, num_classes: TinyNet(num_classes))


def _config(executor="simulated", protocol="async", *, learners=2, batch=8, **overrides):
  overrides.setdefault("train_examples", 128)
  overrides.setdefault("epochs", 1.0)
  overrides.setdefault("lr_boundaries_epochs", ())
  return smoke_config(executor, protocol, learners=learners, batch_per_learner=batch, **overrides)


# ---- (1) the DiLoCo update, by hand ---------------------------------------------------------------------------
LEARNERS, BATCH, H, ROUNDS, INNER_LR = 2, 4, 3, 4, 0.01
ATOL = 1e-5   # on θ after each update: float32 rounding of the same arithmetic (observed ≤ 2e-7)


def diloco(grad, theta0, batch, *, keep_inner_state=True, steps=H):
  """DiLoCo (Douillard et al. 2023) in plain JAX/optax: each round, each of λ learners runs ``steps`` AdamW steps
  from θ on its own batches (its AdamW state kept from its previous round, or fresh), Δ_k = θ − θ_k, and the
  outer Nesterov step (lr 0.7, momentum 0.9) on the mean Δ. Returns [(θ_1, [Δ_k of round 0]), ...]."""
  inner = optax.adamw(INNER_LR, weight_decay=0.0)
  outer = optax.sgd(0.7, momentum=0.9, nesterov=True)
  inner_update, outer_update = jax.jit(inner.update), jax.jit(outer.update)
  theta, outer_state = theta0, outer.init(theta0)
  states = [inner.init(theta0) for _ in range(LEARNERS)]
  out = []
  for i in range(ROUNDS):
    deltas = []
    for k in range(LEARNERS):
      local, state = theta, states[k] if keep_inner_state else inner.init(theta)
      for h in range(steps):
        g = grad(local, *batch(k, i * H + h))
        update, state = inner_update(g, state, local)
        local = optax.apply_updates(local, update)
      states[k] = state
      deltas.append(jax.tree.map(lambda a, b: a - b, theta, local))
    mean = jax.tree.map(lambda a, b: (a + b) / 2, *deltas)
    update, outer_state = outer_update(mean, outer_state, theta)
    theta = optax.apply_updates(theta, update)
    out.append((theta, deltas))
  return out


def test_hardsync_local_sgd_is_diloco_in_the_executor_and_the_parameter_server(tmp_path, monkeypatch, tiny):
  """λ = 2 learners, hardsync (c = λ), H = 3 AdamW steps, outer Nesterov: the simulated executor's θ after each of 4
  updates equals a hand-written DiLoCo loop fed the very mini-batches the executor drew; so does a bare
  ParameterServer fed the loop's Δs. The same loop with the inner state reset at each pull, or one inner step
  fewer, lands far away (the test can fail; and the executor keeps the inner state, as documented)."""
  config = _config("simulated", "hardsync", learners=LEARNERS, batch=BATCH, train_examples=LEARNERS * H * BATCH * ROUNDS,
                   local_steps=H, inner_optimizer="adamw", inner_learning_rate=INNER_LR, outer_optimizer="nesterov",
                   policy="constant")
  run, trajectory, drawn, result = train_recording(config, str(tmp_path), monkeypatch)
  assert result.metrics["updates"] == len(trajectory) == ROUNDS and result.metrics["staleness_max"] == 0
  assert sorted(drawn) == [(k, s) for k in range(LEARNERS) for s in range((ROUNDS + 1) * H)]   # + the round in flight

  dataset = data.load_dataset("mnist5k")
  grad = jax.jit(jax.grad(steps.make_loss_fn(TinyNet(dataset.num_classes), data.make_preprocess(dataset))))
  batch = lambda k, s: (*drawn[k, s], jax.random.fold_in(jax.random.fold_in(run.key, k), s))  # noqa: E731
  theta0 = jax.tree.map(np.array, run.params)
  reference = diloco(grad, theta0, batch)
  gaps = [max_gap(ours, theirs) for ours, (theirs, _) in zip(trajectory, reference)]
  assert max(gaps) < ATOL, f"executor vs DiLoCo by hand, max |Δθ| after each update: {gaps}"

  ps = sajax.ParameterServer(theta0, sajax.staleness_aware(optax.sgd(0.7, momentum=0.9, nesterov=True), "constant"),
                             sajax.Protocol.hardsync(LEARNERS))
  for theta, deltas in reference:
    version, _ = ps.pull()
    assert [ps.push(k, version, delta).applied_update for k, delta in enumerate(deltas)] == [False, True]
    assert max_gap(ps.params, theta) < ATOL

  for name, other in (("inner state reset at each pull", diloco(grad, theta0, batch, keep_inner_state=False)),
                      ("one inner step fewer", diloco(grad, theta0, batch, steps=H - 1))):
    gap = max_gap(trajectory[-1], other[-1][0])
    assert gap > 100 * ATOL, f"{name}: final θ only {gap} from the executor's; the test cannot tell them apart"


# ---- (2) H = 1 is today's run, bit for bit ----------------------------------------------------------------------
def test_one_local_step_is_todays_run_bit_for_bit(tmp_path, tiny):
  """local_steps = 1 (with the inner optimizer's keys set to anything: unused) gives the very metrics and θ of a
  config without any of the new keys, as a run saved before they existed has."""
  finals = {}

  def keep_final(name):
    return lambda run: finals.__setitem__(name, jax.tree.map(np.array, run.executor.ps.params))

  without = _config(sim_jitter=0.5, epochs=2.0, checkpoint_every_epochs=1.0)
  for key in NEW_KEYS:
    del without[key]
  with_keys = _config(sim_jitter=0.5, epochs=2.0, checkpoint_every_epochs=1.0, local_steps=1, inner_optimizer="adamw",
                      inner_learning_rate=0.5, inner_schedule="cosine", outer_optimizer="sgd")
  a = sajax.train(without, workdir=str(tmp_path / "without"), callbacks=[keep_final("without")])
  b = sajax.train(with_keys, workdir=str(tmp_path / "with"), callbacks=[keep_final("with")])
  assert reproducible(metrics_lib.read_metrics(a.workdir)) == reproducible(metrics_lib.read_metrics(b.workdir))
  assert a.metrics["updates"] == 32 and a.metrics["staleness_max"] >= 1
  for x, y in zip(jax.tree.leaves(finals["without"]), jax.tree.leaves(finals["with"])):
    assert np.array_equal(x, y)


# ---- (3) each inner and each outer optimizer, end to end ---------------------------------------------------------
ENDS = [("simulated", {"inner_optimizer": "sgd", "outer_optimizer": "sgd", "learning_rate": 1.0, "momentum": 0.0}),
        ("simulated", {"inner_optimizer": "adamw", "outer_optimizer": "nesterov", "policy": "async_local_sgd",
                       "inner_schedule": "cosine"}),
        ("simulated", {"inner_optimizer": "sgd", "inner_momentum": 0.9, "outer_optimizer": "delayed_nesterov"}),
        ("threads", {"inner_optimizer": "sgd", "inner_momentum": 0.5, "outer_optimizer": "sgd"}),
        ("threads", {"inner_optimizer": "adamw", "outer_optimizer": "delayed_nesterov", "policy": "async_local_sgd"}),
        ("threads", {"inner_optimizer": "sgd", "outer_optimizer": "nesterov", "inner_weight_decay": 1e-4})]


@pytest.mark.parametrize("executor, settings", ENDS, ids=[f"{e}-{s['inner_optimizer']}-{s['outer_optimizer']}"
                                                         for e, s in ENDS])
def test_each_inner_and_outer_optimizer_trains_end_to_end(executor, settings, tmp_path, tiny):
  """One short async run each (λ = 2, H = 2, μ = 8, 128 examples: 8 pushes of 16): it ends with finite loss,
  every example counted once, and θ moved by the outer optimizer."""
  config = _config(executor, local_steps=2, **settings)
  moved = []
  result = sajax.train(config, workdir=str(tmp_path), callbacks=[
      lambda run: moved.append(max_gap(run.params, run.executor.ps.params if executor == "simulated"
                                       else run.executor.unravel(run.executor.ps.params)))])
  final = result.metrics
  assert np.isfinite(final["train_loss"]) and final["gradients_dropped"] == 0
  assert final["updates"] == 8 and final["samples"] == 128 and final["epoch"] == 1.0
  assert moved[-1] > 0



def _compiled(caplog):
  """The names of the jitted functions compiled since ``caplog`` started (JAX logs each under jax_log_compiles)."""
  return [r.getMessage()[len("Compiling jit("):].split(")")[0] for r in caplog.records
          if r.getMessage().startswith("Compiling jit(")]


@pytest.fixture
def log_compiles(caplog):
  """jax_log_compiles for every thread (the context manager's setting is the calling thread's only)."""
  jax.config.update("jax_log_compiles", True)
  try:
    with caplog.at_level(logging.WARNING, logger="jax"):
      yield caplog
  finally:
    jax.config.update("jax_log_compiles", False)


def test_a_learners_first_inner_state_is_one_program_on_its_device(log_compiles):
  """Inner momentum's state does not read θ's values: built op by op it was one program per leaf shape, and
  compiled whole without θ as an input it was uncommitted, unlike the rounds' states."""
  inner = local_steps.from_config(_config(local_steps=2, inner_momentum=0.9), 8).inner
  device = jax.devices()[1]
  params = jax.device_put({"w": np.ones((3, 2), np.float32), "b": np.zeros(2, np.float32)}, device)
  state = inner.init(params)
  assert _compiled(log_compiles) == ["init_fn"]
  assert all(x.committed and x.devices() == {device} for x in jax.tree.leaves(state))


@pytest.mark.parametrize("executor", ["simulated", "threads"])
def test_a_learners_rounds_are_one_compiled_program_from_the_first(executor, tmp_path, tiny, log_compiles):
  """A learner's H inner steps and its Δ compile once in a run, not again at its second round (built anew here:
  a run before this one in the process may have built the same and left nothing to compile)."""
  local_steps.make_local_update.cache_clear()
  sajax.train(_config(executor, local_steps=2, inner_momentum=0.9, learners=1), workdir=str(tmp_path))
  compiled = _compiled(log_compiles)
  assert compiled.count("inner_step") == 1 and compiled.count("finish") == 1, compiled

def test_the_outer_optimizers_are_the_documented_ones():
  """make_optimizer: sgd is today's optax.sgd(α0, β); nesterov and delayed_nesterov take DiLoCo's 0.7 and 0.9 unless
  outer_learning_rate / outer_momentum say otherwise."""
  from sajax import momentum
  params = {"w": np.ones(3, np.float32)}
  grads = [{"w": np.array([1.0, -2.0, 0.5], np.float32)}, {"w": np.array([0.3, 0.1, -1.0], np.float32)}]

  def trajectory(tx):
    state, out, p = tx.init(params), [], params
    for g in grads:
      update, state = tx.update(g, state, p, staleness=np.zeros((), np.int32))
      p = optax.apply_updates(p, update)
      out.append(p)
    return out

  def ours(**keys):
    config = _config(**keys)
    return trajectory(run_optimizer.make_optimizer(config, run_optimizer.make_schedule(config, per_epoch=10.0)))

  def same(a, b):
    return all(max_gap(x, y) < 1e-7 for x, y in zip(a, b))

  plain = lambda tx: trajectory(sajax.staleness_aware(tx, "inverse"))  # noqa: E731 - the config's policy
  assert same(ours(learning_rate=0.03, momentum=0.5), plain(optax.sgd(0.03, momentum=0.5)))
  assert same(ours(outer_optimizer="nesterov"), plain(optax.sgd(0.7, momentum=0.9, nesterov=True)))
  assert same(ours(outer_optimizer="nesterov", outer_learning_rate=0.2, outer_momentum=0.5),
              plain(optax.sgd(0.2, momentum=0.5, nesterov=True)))
  assert same(ours(outer_optimizer="delayed_nesterov"), plain(momentum.delayed_nesterov(0.7, 0.9, period=2)))
  assert not same(ours(outer_optimizer="nesterov"), plain(optax.sgd(0.7, momentum=0.9)))


def test_the_inner_optimizers_are_optax_sgd_and_adamw():
  """The inner direction u with θ ← θ − α_inner·u is optax.sgd (momentum, weight decay) and optax.adamw."""
  params = {"w": np.linspace(-1, 1, 5, dtype=np.float32)}
  grads = [{"w": np.linspace(0.5, -0.2, 5, dtype=np.float32) * (i + 1)} for i in range(3)]
  cases = [("sgd", dict(momentum=0.9, weight_decay=0.01),
            optax.chain(optax.add_decayed_weights(0.01), optax.sgd(0.1, momentum=0.9))),
           ("adamw", dict(weight_decay=0.01), optax.adamw(0.1, weight_decay=0.01))]
  for name, keys, reference in cases:
    inner = local_steps.inner_direction(name, **keys)
    p, q, s, r = params, params, inner.init(params), reference.init(params)
    for g in grads:
      u, s = inner.update(g, s, p)
      p = jax.tree.map(lambda x, d: x - 0.1 * d, p, u)
      v, r = reference.update(g, r, q)
      q = optax.apply_updates(q, v)
    assert max_gap(p, q) < 1e-6, name


def test_the_async_local_sgd_preset_is_polynomial_one_half():
  policy = sajax.get_policy("async_local_sgd")
  assert (policy.name, dict(policy.args)) == ("polynomial", {"a": 0.5})
  np.testing.assert_allclose(np.asarray(policy.scale(np.arange(4))), (1 + np.arange(4)) ** -0.5, rtol=1e-6)
  assert "async_local_sgd" not in sajax.available_policies()   # a name for a setting, not a policy of its own
  assert sajax.optim.same_policy(config_lib.policy_of(_config(policy="async_local_sgd")),
                                 sajax.get_policy("polynomial", a=0.5))


# ---- (4) bad values ----------------------------------------------------------------------------------------------
BAD = [({"local_steps": 0}, "local_steps=0"),
       ({"inner_optimizer": "lion"}, "lion"), ({"outer_optimizer": "adam"}, "adam"),
       ({"inner_schedule": "linear"}, "linear"), ({"inner_learning_rate": 0.0}, "inner_learning_rate=0.0"),
       ({"outer_learning_rate": -1.0}, "outer_learning_rate=-1.0"), ({"inner_momentum": 1.0}, "inner_momentum=1.0"),
       ({"outer_momentum": 1.5}, "outer_momentum=1.5"), ({"inner_weight_decay": -0.1}, "inner_weight_decay=-0.1"),
       ({"inner_optimizer": "adamw", "inner_momentum": 0.9}, "inner_momentum=0.9"),
       ({"outer_optimizer": "nesterov", "momentum_rule": "compensation"}, "compensation"),
       ({"executor": "pmap", "local_steps": 2}, "pmap"),
       ({"executor": "pmap", "outer_optimizer": "delayed_nesterov"}, "pmap")]


@pytest.mark.parametrize("keys, named", BAD, ids=[n for _, n in BAD])
def test_bad_values_are_refused_in_one_line(keys, named, tmp_path):
  with pytest.raises(config_lib.ConfigError, match=named) as error:
    sajax.train(_config(**keys), workdir=str(tmp_path / "run"))
  assert "\n" not in str(error.value) and "allowed" in str(error.value)
  assert not (tmp_path / "run").exists()


def test_bad_values_exit_2_from_the_command_line_and_good_ones_parse(tmp_path, monkeypatch, capsys):
  from launch import train as launcher
  monkeypatch.chdir(tmp_path)
  for flag, named in (("--config.local_steps=0", "local_steps=0"), ("--config.outer_optimizer=adam", "adam")):
    assert launcher.main(["train.py", flag, "--workdir", str(tmp_path / "run")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and named in lines[0] and "allowed" in lines[0]
  config = launcher.parse_config(["train.py", "--config.local_steps=4", "--config.outer_optimizer=nesterov",
                                  "--config.outer_learning_rate=0.5", "--config.inner_learning_rate=0.001"])
  assert (config.local_steps, config.outer_learning_rate, config.inner_learning_rate) == (4, 0.5, 0.001)
  assert local_steps.outer_momentum(config) == 0.9 and config.outer_momentum is None
  config_lib.validate(config)


# ---- (5) samples, epochs, evaluations and checkpoints count H·μ examples per push -------------------------------
def test_a_push_of_h_steps_counts_h_mini_batches(tmp_path, tiny):
  """λ = 2 async (c = 1), H = 4, μ = 8, N = 128: an update is one push of 32 examples, so an epoch is 4 updates;
  evaluations and checkpoints fall at whole epochs, the step schedule's boundary (in epochs) at its update, and
  each learner's stream has drawn 4 mini-batches per push (plus the round each holds in flight)."""
  config = _config(local_steps=4, epochs=2.0, eval_every_epochs=1.0, checkpoint_every_epochs=1.0,
                   lr_boundaries_epochs=(1.5,), lr_decay=0.1, learning_rate=0.5)
  runs = []
  result = sajax.train(config, workdir=str(tmp_path), callbacks=[lambda run: runs.__setitem__(slice(None), [run])])
  run = runs[0]
  assert run.per_epoch == 4.0 and run.samples_per_update == 32
  assert [(r["updates"], r["samples"], r["epoch"]) for r in result.history] == [(4, 128, 1.0), (8, 256, 2.0)]
  assert [r["learning_rate"] for r in result.history] == pytest.approx([0.5, 0.05])   # ÷10 at update 6 (epoch 1.5)
  assert sorted(run.executor.ps.stats.per_learner) == [0, 1]
  assert sum(run.executor.ps.stats.per_learner[k].count for k in (0, 1)) == 8
  assert sum(s.step for s in run.streams) == 256 // 8 + 2 * 4
  from sajax import checkpoint
  saved = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
  try:
    assert saved.steps() == [4, 8]
  finally:
    saved.close()


# ---- (6) resume -------------------------------------------------------------------------------------------------
def _stop_at(update):
  def callback(run):
    if run.updates == update:
      raise KeyboardInterrupt
  return callback


def test_a_stopped_and_resumed_local_sgd_run_ends_bit_identical(tmp_path, monkeypatch, tiny):
  """The simulated executor checkpoints each learner's inner (AdamW) state beside its Δ in flight: stopped mid-epoch
  and resumed, every metrics record equals the uninterrupted run's to the last bit. Resumed with the inner states
  dropped instead (fresh AdamW moments), the records differ: the test sees the state."""
  config = _config(local_steps=3, inner_optimizer="adamw", outer_optimizer="nesterov", policy="async_local_sgd",
                   sim_jitter=0.5, train_examples=192, epochs=2.0, checkpoint_every_epochs=2.0)
  whole = sajax.train(config, workdir=str(tmp_path / "whole"))
  assert whole.metrics["updates"] == 16
  for name in ("stopped", "dropped"):
    with pytest.raises(KeyboardInterrupt):
      sajax.train(config, workdir=str(tmp_path / name), callbacks=[_stop_at(11)])   # mid-epoch 2
  resumed = sajax.train(config, workdir=str(tmp_path / "stopped"))
  assert reproducible(resumed.history) == reproducible(whole.history)
  monkeypatch.setattr(local_steps, "restore_states", lambda arrays, like: {})
  dropped = sajax.train(config, workdir=str(tmp_path / "dropped"))
  assert reproducible(dropped.history)[-1] != reproducible(whole.history)[-1]


def test_threads_checkpoint_each_learners_inner_state_and_resume_from_it(tmp_path, monkeypatch, tiny):
  """Threads are not bit-reproducible, so the guarantee is what is saved and restored: the checkpoint of a stopped
  run holds every learner's inner state (after its last push), the resumed learners start from exactly those, and
  the run ends with every example counted once. Hardsync (c = λ), so that both learners have pushed by the stop."""
  config = _config("threads", "hardsync", local_steps=2, inner_optimizer="adamw", outer_optimizer="nesterov",
                   epochs=2.0, checkpoint_every_epochs=2.0)
  with pytest.raises(KeyboardInterrupt):
    sajax.train(config, workdir=str(tmp_path), callbacks=[_stop_at(3)])
  restored = []
  original = local_steps.restore_states
  monkeypatch.setattr(local_steps, "restore_states",
                      lambda arrays, like: restored.append((dict(arrays), original(arrays, like))) or restored[-1][1])
  resumed = sajax.train(config, workdir=str(tmp_path))
  arrays, states = restored[0]
  assert list(arrays["inner_state_saved"]) == [True, True] and sorted(states) == [0, 1]
  for k in (0, 1):
    assert np.array_equal(np.asarray(jax.flatten_util.ravel_pytree(states[k])[0]), arrays["inner_state"][k])
    assert int(states[k][0].count) >= 6   # AdamW's count: 3 rounds of H = 2 steps (or the 4th) before the stop
  assert resumed.metrics["samples"] == 256 and resumed.metrics["updates"] == 8
  assert [r["updates"] for r in metrics_lib.read_metrics(resumed.workdir)] == [4, 8]


def test_inner_states_round_trip_through_checkpoint_arrays():
  """state_arrays / restore_states: AdamW's count (int32) and moments come back exactly; learners without a state
  are marked; an inner optimizer without arrays saves nothing."""
  params = {"a": np.arange(3, dtype=np.float32), "b": np.ones((2, 2), np.float32)}
  inner = local_steps.inner_direction("adamw")
  state = inner.init(params)
  state = inner.update({"a": np.ones(3, np.float32) * 0.5, "b": np.full((2, 2), -2.0, np.float32)}, state, params)[1]
  arrays = local_steps.state_arrays({1: state}, learners=3)
  assert arrays["inner_state"].shape == (3, 1 + 2 * 7) and list(arrays["inner_state_saved"]) == [False, True, False]
  back = local_steps.restore_states(arrays, inner.init(params))
  assert list(back) == [1]
  for x, y in zip(jax.tree.leaves(back[1]), jax.tree.leaves(state)):
    assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
  assert local_steps.state_arrays({0: local_steps.inner_direction("sgd").init(params)}, learners=2) == {}


def test_the_cosine_inner_schedule_follows_the_pulled_version():
  lr = local_steps.inner_schedule("cosine", 0.1, last_update=10)
  assert lr(0) == pytest.approx(0.1) and lr(5) == pytest.approx(0.05) and lr(10) == lr(12) == pytest.approx(0.0)
  assert local_steps.inner_schedule("constant", 0.1, 10)(7) == 0.1
  assert functools.reduce(lambda a, b: a and b, [lr(j) >= lr(j + 1) for j in range(12)])
