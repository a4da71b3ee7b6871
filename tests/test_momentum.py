"""The staleness-aware momentum rules (sajax/momentum.py) against numpy written from each paper's formula, the
one config flag that picks them, their state through a checkpoint, and a short run of each in two executors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sajax
from sajax import config as config_lib, momentum, optim
from sajax.checkpoint import Checkpointer
from sajax.protocol import Protocol
from sajax.server import ParameterServer
from tests.helpers import smoke_config


def _params():
  return {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array(0.25)}


def _grad(k):
  """A deterministic gradient number k (different for every k)."""
  return {"w": jnp.array([0.1 * k + 0.3, -0.2 * k, 1.0 / (k + 1)]), "b": jnp.array(0.05 * k - 0.1)}


def _stack(grads):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *grads)


def _np(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _close(tree, ref, rtol=1e-5):
  for key in ref:
    np.testing.assert_allclose(np.asarray(tree[key]), ref[key], rtol=rtol, atol=1e-6, err_msg=key)


def _inverse(sigma):
  return 1.0 if sigma == 0 else 1.0 / sigma


def _combined(ks, sigmas):
  """ḡ = (1/c) Σ_l s(σ_l)·g_l for the inverse policy, in numpy."""
  return {key: sum(_inverse(s) * np.asarray(_grad(k)[key], np.float64) for k, s in zip(ks, sigmas)) / len(ks)
          for key in _params()}


def _run(tx, updates, params=None):
  """Applies ``tx`` to each (gradient numbers, σ's) in ``updates`` (stacked when more than one); yields θ."""
  params = params or _params()
  state = tx.init(params)
  step = jax.jit(lambda g, s, p, sigma: tx.update(g, s, p, staleness=sigma))
  for ks, sigmas in updates:
    grads = _grad(ks[0]) if len(ks) == 1 else _stack([_grad(k) for k in ks])
    sigma = np.int32(sigmas[0]) if len(ks) == 1 else np.asarray(sigmas, np.int32)
    u, state = step(grads, state, params, sigma)
    params = optax.apply_updates(params, u)
    yield params, state


# ---- plain ----------------------------------------------------------------------------------------------------
def test_plain_rule_is_todays_sgd_momentum_bit_for_bit():
  """make_optimizer's default: the combination (1/c) Σ s(σ_l) g_l through optax.sgd(α(t), β), exactly as before the
  rules existed (σ now also reaches the base, which ignores it)."""
  from configs import smoke
  from sajax.run_optimizer import make_optimizer, make_schedule
  config = smoke.get_config()
  assert config.get("momentum_rule", "plain") == "plain"
  schedule = make_schedule(config, per_epoch=2.0)          # α0 = 0.03, ÷10 after update 3
  tx = make_optimizer(config, schedule)
  sgd, policy = optax.sgd(schedule, momentum=config.momentum), optim.get_policy(config.policy)
  params = ref = _params()
  state, ref_state = tx.init(params), sgd.init(ref)
  for t, sigmas in enumerate([[0, 2, 1, 3], [4, 0, 0, 1], [2], [7, 1, 1, 0], [3]]):
    ks = [10 * t + l for l in range(len(sigmas))]
    grads = _grad(ks[0]) if len(ks) == 1 else _stack([_grad(k) for k in ks])
    sigma = jnp.asarray(sigmas[0] if len(ks) == 1 else sigmas, jnp.int32)
    u, state = tx.update(grads, state, params, staleness=sigma)
    mean, _ = optim.combine_gradients(grads, sigma, policy)
    ref_u, ref_state = sgd.update(mean, ref_state, ref)
    params, ref = optax.apply_updates(params, u), optax.apply_updates(ref, ref_u)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
      np.testing.assert_array_equal(a, b)


# ---- delayed Nesterov -----------------------------------------------------------------------------------------
def _delayed_nesterov_reference(updates, rates, beta, n):
  """Liu et al. 2024, Alg. 3, gradient by gradient: Δ += g; θ −= α·g/N; every N-th: m = βm + Δ/N, θ −= α·β·m, Δ = 0.
  An update of c gradients is c arrivals of its combination ḡ at that update's α."""
  theta, m, buffer, count, out = _np(_params()), None, None, 0, []
  m = {k: np.zeros_like(v) for k, v in theta.items()}
  buffer = {k: np.zeros_like(v) for k, v in theta.items()}
  for (ks, sigmas), alpha in zip(updates, rates):
    g = _combined(ks, sigmas)
    for _ in ks:
      count += 1
      for key in theta:
        buffer[key] = buffer[key] + g[key]
        theta[key] = theta[key] - alpha * g[key] / n
        if count % n == 0:
          m[key] = beta * m[key] + buffer[key] / n
          theta[key] = theta[key] - alpha * beta * m[key]
          buffer[key] = np.zeros_like(buffer[key])
    out.append({key: v.copy() for key, v in theta.items()})
  return out


@pytest.mark.parametrize("c, n", [(1, 3), (2, 3), (4, 3), (3, 6)])
def test_delayed_nesterov_matches_liu_et_al_counting_gradients(c, n):
  """Async (c = 1) and n-softsync updates of c gradients, N not a multiple of c (the momentum steps inside an
  update, Δ split there) and c > N (two momentum steps in one update), with a step schedule."""
  schedule = optax.piecewise_constant_schedule(0.1, {4: 0.5})
  rng = np.random.default_rng(c * 10 + n)
  updates = [([c * t + l for l in range(c)], list(rng.integers(0, 6, size=c))) for t in range(8)]
  tx = sajax.staleness_aware(sajax.delayed_nesterov(schedule, 0.9, period=n), policy="inverse")
  reference = _delayed_nesterov_reference(updates, [float(schedule(t)) for t in range(8)], 0.9, n)
  for (params, state), ref in zip(_run(tx, updates), reference):
    _close(params, ref)
  assert int(state.inner_state.arrivals) == (8 * c) % n


def test_delayed_nesterov_with_period_c_is_nesterov_momentum():
  """Hardsync with N = λ = c: every update is one Nesterov step, optax.sgd(α, β, nesterov=True)."""
  updates = [([4 * t + l for l in range(4)], [0, 0, 0, 0]) for t in range(6)]
  ours = _run(sajax.staleness_aware(sajax.delayed_nesterov(0.1, 0.9, period=4)), updates)
  nesterov = _run(sajax.staleness_aware(optax.sgd(0.1, momentum=0.9, nesterov=True)), updates)
  for (a, _), (b, _) in zip(ours, nesterov):
    _close(a, jax.tree.map(np.asarray, b))


def test_the_parameter_server_hands_each_updates_staleness_to_the_rule():
  """Through the PS core (2-softsync, λ = 4, c = 2, the inverse policy's running-sum path): the rule counts the c
  gradients of each update, as the reference does."""
  n, protocol = 3, Protocol.softsync(learners=4, n=2)
  ps = ParameterServer(_params(), sajax.staleness_aware(sajax.delayed_nesterov(0.05, 0.8, period=n)), protocol)
  updates = []
  for t in range(5):
    ks = [2 * t, 2 * t + 1]
    pushed = [ps.push(learner=k % 4, version=max(0, ps.version - k % 3), grads=_grad(k)) for k in ks]
    assert [p.applied_update for p in pushed] == [False, True]
    updates.append((ks, [p.staleness for p in pushed]))
  assert ps.version == 5 and max(max(s) for _, s in updates) == 2
  _close(ps.params, _delayed_nesterov_reference(updates, [0.05] * 5, 0.8, n)[-1])


# ---- compensation ---------------------------------------------------------------------------------------------
def test_compensation_lowers_beta_by_the_implicit_momentum_of_the_smoothed_staleness():
  """β_eff = max(0, β − (1 − 1/(1 + ⟨σ⟩))), ⟨σ⟩ = Σ ρ^age σ / Σ ρ^age (age: gradients applied since), then heavy
  ball. σ grows from 0 (β_eff = β) through a partial compensation until β_eff is clamped at 0."""
  beta, alpha, rho = 0.6, 0.05, 0.5
  updates = [([2 * t, 2 * t + 1], [t, 2 * t]) for t in range(7)]
  tx = sajax.staleness_aware(sajax.compensated_momentum(alpha, beta, staleness_decay=rho), policy="inverse")
  theta, m, seen = _np(_params()), {k: 0.0 for k in _params()}, []
  seen_effective = set()
  for (params, state), (ks, sigmas) in zip(_run(tx, updates), updates):
    seen.append(sigmas)
    ages = [2 * (len(seen) - 1 - u) for u in range(len(seen))]        # c = 2 gradients per later update
    mean = sum(rho ** a * sum(s) for a, s in zip(ages, seen)) / sum(rho ** a * len(s) for a, s in zip(ages, seen))
    effective = max(0.0, beta - (1.0 - 1.0 / (1.0 + mean)))
    seen_effective.add("β" if effective == beta else "0" if effective == 0 else "between")
    g = _combined(ks, sigmas)
    m = {k: effective * m[k] + g[k] for k in theta}
    theta = {k: theta[k] - alpha * m[k] for k in theta}
    _close(params, theta)
    np.testing.assert_allclose(momentum.staleness_mean(state.inner_state.staleness), mean, rtol=1e-6)
  assert seen_effective == {"β", "between", "0"}


def test_compensation_smooths_staleness_as_a_running_mean_at_decay_one_and_is_plain_momentum_without_staleness():
  updates = [([t], [s]) for t, s in enumerate([3, 0, 5, 1, 1, 8])]
  *_, (_, state) = _run(sajax.staleness_aware(sajax.compensated_momentum(0.1, 0.9, staleness_decay=1.0)), updates)
  np.testing.assert_allclose(momentum.staleness_mean(state.inner_state.staleness), np.mean([3, 0, 5, 1, 1, 8]))
  synchronous = [([t], [0]) for t in range(6)]
  ours = sajax.staleness_aware(sajax.compensated_momentum(0.1, 0.9), policy="constant")
  plain = sajax.staleness_aware(optax.sgd(0.1, momentum=0.9), policy="constant")
  for (a, _), (b, _) in zip(_run(ours, synchronous), _run(plain, synchronous)):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(x, y)


# ---- look-ahead -----------------------------------------------------------------------------------------------
def _distance(beta, mean):
  """D = Σ_{k=1..h} β^k with h = ⟨σ⟩ + 1, summed as the geometric series it is (h need not be an integer)."""
  return beta * (1 - beta ** (mean + 1)) / (1 - beta)


def test_lookahead_publishes_the_momentum_iterate_moved_ahead_by_the_smoothed_staleness():
  """θ follows heavy ball on gradients computed at the published Θ = θ − α(t)·D·m, D = Σ_{k=1..⟨σ⟩+1} β^k."""
  beta, rho = 0.8, 0.9
  schedule = optax.piecewise_constant_schedule(0.1, {3: 0.5})
  updates = [([t], [s]) for t, s in enumerate([0, 2, 3, 1, 4, 2, 2])]
  tx = sajax.staleness_aware(sajax.lookahead_momentum(schedule, beta, staleness_decay=rho), policy="inverse")
  theta, m, total, weight = _np(_params()), {k: 0.0 for k in _params()}, 0.0, 0.0
  for t, ((params, state), (ks, sigmas)) in enumerate(zip(_run(tx, updates), updates)):
    alpha = float(schedule(t))
    total, weight = rho * total + sigmas[0], rho * weight + 1
    g = _combined(ks, sigmas)
    m = {k: beta * m[k] + g[k] for k in theta}
    theta = {k: theta[k] - alpha * m[k] for k in theta}
    published = {k: theta[k] - alpha * _distance(beta, total / weight) * m[k] for k in theta}
    _close(params, published)


def test_lookahead_is_where_the_weights_will_be_when_the_gradient_arrives():
  """With ⟨σ⟩ = 2 and no new gradient after the published Θ, θ reaches Θ exactly σ + 1 = 3 updates later."""
  tx = sajax.staleness_aware(sajax.lookahead_momentum(0.1, 0.9), policy="constant")
  zero = {"w": jnp.zeros(3), "b": jnp.zeros(())}
  params = _params()
  state = tx.init(params)
  history = []
  for t in range(8):
    u, state = tx.update(_grad(t) if t < 4 else zero, state, params, staleness=2)
    params = optax.apply_updates(params, u)
    inner = state.inner_state
    theta = jax.tree.map(lambda p, m: p + inner.offset * m, params, inner.trace)    # θ = Θ + α·D·m
    history.append((params, theta))
  published_after_4th = history[3][0]
  _close(history[6][1], jax.tree.map(np.asarray, published_after_4th))


def test_lookahead_without_staleness_is_nesterov_momentum():
  updates = [([t], [0]) for t in range(6)]
  ours = _run(sajax.staleness_aware(sajax.lookahead_momentum(0.1, 0.9)), updates)
  nesterov = _run(sajax.staleness_aware(optax.sgd(0.1, momentum=0.9, nesterov=True)), updates)
  for (a, _), (b, _) in zip(ours, nesterov):
    _close(a, jax.tree.map(np.asarray, b))


# ---- the flag ------------------------------------------------------------------------------------------------
def test_a_bad_momentum_rule_is_one_line_naming_it_and_the_allowed_ones():
  from configs import smoke
  config = smoke.get_config()
  config.momentum_rule = "heavy_ball"
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(config)
  assert str(error.value) == ("unknown momentum_rule 'heavy_ball'; allowed: plain, delayed_nesterov, compensation, "
                              "lookahead")
  for key, value, match in [("momentum_rule_period", -1, r"momentum_rule_period=-1 .*>= 0"),
                            ("momentum_rule_staleness_decay", 1.5, r"staleness_decay=1.5 .*0 <= ρ <= 1")]:
    bad = smoke.get_config()
    bad.momentum_rule, bad[key] = "delayed_nesterov", value
    bad.executor = "simulated"
    with pytest.raises(config_lib.ConfigError, match=match) as error:
      config_lib.validate(bad)
    assert "\n" not in str(error.value)
  ssgd = smoke.get_config()
  ssgd.momentum_rule = "delayed_nesterov"
  with pytest.raises(config_lib.ConfigError, match=r"'delayed_nesterov'.*'pmap'.*allowed executors: threads"):
    config_lib.validate(ssgd)
  with pytest.raises(ValueError, match=r"period=0 is invalid; allowed: an integer N >= 1"):
    sajax.delayed_nesterov(0.1, 0.9, period=0)


def test_make_optimizer_puts_the_rule_under_weight_decay_and_the_policy_and_it_still_reads_staleness():
  from sajax.run_optimizer import make_optimizer
  config = smoke_config("simulated", "async", learners=4, batch_per_learner=8, momentum_rule="compensation",
                        momentum_rule_staleness_decay=1.0, weight_decay=1e-4)
  config_lib.validate(config)
  tx = make_optimizer(config, optax.constant_schedule(0.1))
  state = tx.init(_params())
  _, state = tx.update(_stack([_grad(0), _grad(1)]), state, _params(), staleness=jnp.array([3, 5]))
  decay_state, rule_state = state.inner_state
  assert isinstance(rule_state, momentum.CompensationState)
  np.testing.assert_allclose(momentum.staleness_mean(rule_state.staleness), 4.0)


# ---- state through a checkpoint ------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["delayed_nesterov", "compensation", "lookahead"])
def test_a_rules_state_survives_the_checkpoint_round_trip(rule, tmp_path):
  """The Δ buffer and arrival count, the smoothed ⟨σ⟩, the look-ahead offset: saved with the optimizer state
  by sajax's Checkpointer, restored into a fresh init, and the run goes on as if never stopped."""
  tx = sajax.staleness_aware(momentum.momentum_rule(rule, 0.1, 0.9, period=3, staleness_decay=0.7))
  step = jax.jit(lambda g, s, p, sigma: tx.update(g, s, p, staleness=sigma))
  params, state = _params(), tx.init(_params())
  for k, sigma in enumerate([2, 0, 5, 1]):
    u, state = step(_grad(k), state, params, np.int32(sigma))
    params = optax.apply_updates(params, u)
  ckpt = Checkpointer(str(tmp_path / "checkpoints"))
  ckpt.save(4, {"params": params, "opt_state": state}, {"updates": 4})
  _, restored, _ = ckpt.restore_latest({"params": _params(), "opt_state": tx.init(_params())})
  ckpt.close()
  assert jax.tree.structure(restored["opt_state"]) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves({"params": params, "opt_state": state})):
    np.testing.assert_array_equal(a, b)
  again = restored["params"], restored["opt_state"]
  for k, sigma in [(4, 3), (5, 0)]:
    u, state = step(_grad(k), state, params, np.int32(sigma))
    params = optax.apply_updates(params, u)
    u, s2 = step(_grad(k), again[1], again[0], np.int32(sigma))
    again = optax.apply_updates(again[0], u), s2
  for a, b in zip(jax.tree.leaves(again[0]), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


# ---- end to end ----------------------------------------------------------------------------------------------
STATES = {"delayed_nesterov": momentum.DelayedNesterovState, "compensation": momentum.CompensationState,
          "lookahead": momentum.LookaheadState}


@pytest.mark.parametrize("rule, executor", [("delayed_nesterov", "threads"), ("compensation", "simulated"),
                                            ("lookahead", "simulated")])
def test_each_rule_trains_through_sajax_train(rule, executor, tmp_path):
  """The cheapest run (λ = 2, 8 gradients of μ = 8): the rule is the PS's optimizer and its state advanced. One
  executor per rule: the rules live in the transform the PS core applies, which every executor shares (the MPI
  job of tests/mpi_policies.py runs all three too)."""
  seen = []
  config = smoke_config(executor, "async", learners=2, batch_per_learner=8, momentum_rule=rule, epochs=1.0,
                        train_examples=64)
  final = sajax.train(config, workdir=str(tmp_path), callbacks=[lambda run: seen.append(run.executor.ps.opt_state)]
                      ).metrics
  assert np.isfinite(final["train_loss"]) and final["updates"] == 8 and final["gradients_dropped"] == 0
  rule_state = seen[-1].inner_state
  assert isinstance(rule_state, STATES[rule]) and int(rule_state.count) == 8
