"""The parameter-server core driven from outside, without threads: exact staleness bookkeeping and updates."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sajax
from sajax import optim
from sajax.server import ParameterServer, PushResult


def _params():
  return {"w": jnp.array([1.0, -1.0, 0.5]), "b": jnp.array(0.0)}


def _grad(k):
  return {"w": jnp.array([0.1 * k + 0.2, -0.05 * k, 0.3]), "b": jnp.array(0.01 * k)}


def _ps(protocol, policy="inverse", lr=0.1, momentum=0.9):
  tx = sajax.staleness_aware(optax.sgd(lr, momentum=momentum), policy=policy)
  return ParameterServer(_params(), tx, protocol=protocol, policy=policy)


def test_protocols():
  assert sajax.Protocol.hardsync(8).gradients_per_update == 8 and sajax.Protocol.hardsync(8).learners_wait
  assert sajax.Protocol.softsync(8, 2).gradients_per_update == 4
  assert sajax.Protocol.softsync(8, 3).gradients_per_update == 2  # ⌊8/3⌋
  assert not sajax.Protocol.softsync(8, 2).learners_wait
  assert sajax.Protocol.asynchronous(8).gradients_per_update == 1
  for bad in (lambda: sajax.Protocol.softsync(8, 0), lambda: sajax.Protocol.softsync(8, 9)):
    with pytest.raises(ValueError, match=r"n=\d+ .*1 <= n <= 8"):
      bad()
  with pytest.raises(ValueError, match="learners=0"):
    sajax.Protocol.hardsync(0)


def test_hardsync_every_gradient_has_zero_staleness_and_c_equals_lambda():
  ps = _ps(sajax.Protocol.hardsync(4))
  for round_ in range(3):
    pulled = [ps.pull() for _ in range(4)]
    results = [ps.push(k, v, _grad(k)) for k, (v, _) in enumerate(pulled)]
    assert [r.staleness for r in results] == [0, 0, 0, 0]
    assert [r.applied_update for r in results] == [False, False, False, True]
    assert ps.version == round_ + 1
  assert ps.stats.histogram == {0: 12} and ps.stats.mean == 0 and ps.stats.max == 0


def test_async_and_softsync_staleness_is_i_minus_j_exactly():
  ps = _ps(sajax.Protocol.softsync(4, 2))  # c = 2
  v0, _ = ps.pull()                         # learners 0..3 all pull version 0
  r = [ps.push(k, v0, _grad(k)) for k in range(4)]
  assert [x.staleness for x in r] == [0, 0, 1, 1] and [x.applied_update for x in r] == [False, True, False, True]
  assert ps.version == 2
  r = ps.push(0, 1, _grad(9))               # a gradient computed on version 1, arriving at version 2
  assert r == PushResult(applied_update=False, staleness=1, dropped=False)
  r = ps.push(1, 0, _grad(9))
  assert r.staleness == 2 and r.applied_update and ps.version == 3
  assert ps.stats.histogram == {0: 2, 1: 3, 2: 1}
  assert ps.stats.per_learner[1].max == 2 and ps.stats.per_learner[1].min == 0
  with pytest.raises(ValueError, match="version=7"):
    ps.push(0, 7, _grad(0))


def test_updates_match_the_hand_computed_rule_through_momentum():
  """Async PS with momentum and the inverse policy: θ ← θ − α·m, m ← β·m + s(σ)·g, one step per push."""
  ps = _ps(sajax.Protocol.asynchronous(3), lr=0.1, momentum=0.9)
  ref_w, m = np.asarray(_params()["w"]), np.zeros(3)
  versions = {k: ps.pull()[0] for k in range(3)}
  order = [0, 1, 2, 2, 0, 1, 1, 0]
  for step, k in enumerate(order):
    sigma = ps.version - versions[k]
    res = ps.push(k, versions[k], _grad(step))
    assert res.staleness == sigma and res.applied_update
    s = 1.0 if sigma == 0 else 1.0 / sigma
    m = 0.9 * m + s * np.asarray(_grad(step)["w"])
    ref_w = ref_w - 0.1 * m
    versions[k] = ps.pull()[0]
  np.testing.assert_allclose(ps.pull()[1]["w"], ref_w, rtol=1e-5)
  assert ps.version == len(order)


def test_softsync_combines_c_gradients_in_one_base_step():
  ps = _ps(sajax.Protocol.softsync(4, 2), lr=0.5, momentum=0.0)
  v, p0 = ps.pull()
  ps.push(0, v, _grad(1))
  ps.push(1, v, _grad(2))                   # update 1: σ = (0, 0)
  ps.push(2, v, _grad(3))
  ps.push(3, v, _grad(4))                   # update 2: σ = (1, 1)
  expected = (np.asarray(p0["w"]) - 0.5 * (np.asarray(_grad(1)["w"]) + np.asarray(_grad(2)["w"])) / 2
              - 0.5 * (np.asarray(_grad(3)["w"]) + np.asarray(_grad(4)["w"])) / 2)
  np.testing.assert_allclose(ps.pull()[1]["w"], expected, rtol=1e-5)


def test_non_finite_gradients_are_dropped_counted_and_not_counted_toward_c():
  ps = _ps(sajax.Protocol.softsync(4, 2))   # c = 2
  v, before = ps.pull()
  bad = {"w": jnp.array([jnp.nan, 0.0, 0.0]), "b": jnp.array(0.0)}
  inf = {"w": jnp.array([0.0, 0.0, 0.0]), "b": jnp.array(jnp.inf)}
  assert ps.push(0, v, _grad(0)) == PushResult(False, 0, False)
  assert ps.push(1, v, bad) == PushResult(False, 0, True)
  assert ps.push(2, v, inf).dropped
  assert ps.version == 0 and ps.buffered == 1  # the NaN/Inf ones did not complete the update
  assert ps.push(3, v, _grad(1)).applied_update
  assert bool(jnp.all(jnp.isfinite(ps.pull()[1]["w"])))
  assert ps.stats.dropped == 2 and ps.stats.count == 2
  assert ps.stats.per_learner[1].dropped == 1 and ps.stats.per_learner[1].count == 0
  # a caller that already checked finiteness on the learner's device can say so
  assert ps.push(0, 1, _grad(0), finite=False).dropped


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_random_arrival_order_gives_mean_staleness_n_times_lambda_minus_1_over_lambda(n):
  """λ = 8 learners each push once per round in a random order and pull right after: ⟨σ⟩ = (λ−1)/c."""
  learners = 8
  ps = _ps(sajax.Protocol.softsync(learners, n), lr=1e-3, momentum=0.0)
  rng = np.random.default_rng(n)
  versions = {k: ps.pull()[0] for k in range(learners)}
  for _ in range(300):
    for k in rng.permutation(learners):
      ps.push(int(k), versions[k], _grad(int(k)))
      versions[k] = ps.pull()[0]
  expected = n * (learners - 1) / learners
  # 2,400 pushes: the sample mean's standard error is below 0.05 here; 0.15 is three of them with margin.
  assert abs(ps.stats.mean - expected) < 0.15, (ps.stats.mean, expected)


def test_changing_c_applies_a_full_buffer_at_once():
  ps = _ps(sajax.Protocol.hardsync(4))
  v, _ = ps.pull()
  for k in range(3):
    ps.push(k, v, _grad(k))
  assert ps.version == 0
  assert ps.set_gradients_per_update(3)       # learner 3 died: c re-derived from the 3 alive
  assert ps.version == 1 and ps.buffered == 0


def test_state_round_trips_and_continues_identically():
  a = _ps(sajax.Protocol.softsync(4, 2))
  v, _ = a.pull()
  for k in range(4):
    a.push(k, v, _grad(k))
  meta = json.loads(json.dumps(a.state_meta()))
  b = _ps(sajax.Protocol.softsync(4, 2))
  b.restore(a.state_arrays(), meta)
  assert b.version == a.version == 2 and b.stats.histogram == a.stats.histogram
  for ps in (a, b):
    ps.push(0, 1, _grad(5))
    ps.push(1, 2, _grad(6))
  np.testing.assert_allclose(a.pull()[1]["w"], b.pull()[1]["w"])
  assert a.stats.to_json() == b.stats.to_json()


@pytest.mark.parametrize("policy", ["inverse", "test_server_reads_theta_j"])
def test_gradients_buffered_toward_an_update_are_saved_and_applied_after_restore(policy):
  """Saved between two updates (c = 3, one gradient buffered, already counted in the statistics): the restored PS
  applies it in the next update exactly as the PS that was never saved (running sum and θ_j-reading paths)."""
  optim.register_policy("test_server_reads_theta_j", overwrite=True, needs_stale_params=True,
                        adjust=lambda g, s, *, params, stale_params: jax.tree.map(
                            lambda x, p, q: x + 0.5 * (p - q), g, params, stale_params))
  a = _ps(sajax.Protocol.softsync(3, 1), policy=policy)
  v0 = a.pull(learner=0)[0]
  for k in (0, 1, 2):
    a.pull(learner=k)
  for k in (0, 1, 2):
    a.push(k, v0, _grad(k))
  a.pull(learner=0)
  a.push(0, 1, _grad(3))                            # buffered: 1 of c = 3
  assert a.buffered == 1 and a.stats.count == 4
  arrays = jax.tree.map(np.asarray, a.state_arrays())
  assert set(arrays) - {"params", "opt_state"} == (
      {"pending_total"} if policy == "inverse" else {"pending_grads", "pending_stale_params"})
  b = _ps(sajax.Protocol.softsync(3, 1), policy=policy)
  b.restore(arrays, json.loads(json.dumps(a.state_meta())))
  assert b.buffered == 1 and b.stats.to_json() == a.stats.to_json()
  for ps in (a, b):
    for k in (1, 2):
      ps.pull(learner=k)
      ps.push(k, 1, _grad(4 + k))
  assert a.version == b.version == 2
  np.testing.assert_array_equal(a.pull()[1]["w"], b.pull()[1]["w"])


def test_policy_reading_stale_params_gets_theta_j():
  seen = []

  def record(grads, staleness, *, params, stale_params):
    seen.append(stale_params)
    return jax.tree.map(lambda g, p, q: g + (p - q), grads, params, stale_params)

  optim.register_policy("test_ps_records_stale", adjust=record, needs_stale_params=True, overwrite=True)
  ps = _ps(sajax.Protocol.asynchronous(2), policy="test_ps_records_stale", lr=1.0, momentum=0.0)
  v0, theta0 = ps.pull(learner=0)
  ps.push(1, *ps.pull(learner=1)[:1], _grad(1))      # version 1 now
  _, theta1 = ps.pull()
  res = ps.push(0, v0, _grad(2))                    # computed on θ_0, applied at θ_1
  assert res.staleness == 1
  # update = g + (θ_1 − θ_0), so θ_2 = θ_1 − g − (θ_1 − θ_0) = θ_0 − g
  np.testing.assert_allclose(ps.pull()[1]["w"], np.asarray(theta0["w"]) - np.asarray(_grad(2)["w"]), rtol=1e-5)
  assert not ps._snapshots                          # θ_j released once its gradient was applied


def test_stale_params_given_with_the_push_need_no_registration():
  """Executors whose learners hold θ_j themselves (threads, MPI) hand it over with the push."""
  optim.register_policy("test_ps_stale_given", adjust=lambda g, s, *, params, stale_params: jax.tree.map(
      lambda x, p, q: x + (p - q), g, params, stale_params), needs_stale_params=True, overwrite=True)
  ps = _ps(sajax.Protocol.asynchronous(2), policy="test_ps_stale_given", lr=1.0, momentum=0.0)
  v0, theta0 = ps.pull()
  ps.push(1, v0, _grad(1), stale_params=theta0)
  res = ps.push(0, v0, _grad(2), stale_params=theta0)   # σ = 1, no pull(learner=) ever happened
  assert res.staleness == 1
  np.testing.assert_allclose(ps.pull()[1]["w"], np.asarray(theta0["w"]) - np.asarray(_grad(2)["w"]), rtol=1e-5)
  with pytest.raises(ValueError, match="no snapshot of version 0"):
    ps.push(0, 0, _grad(3))                             # σ = 2, θ_0 neither held nor given


def test_hardsync_round_completes_when_a_dropped_learner_pushes_again():
  """A NaN gradient is not counted toward c: its learner's recomputed gradient completes the round, σ = 0."""
  ps = _ps(sajax.Protocol.hardsync(3))
  v, _ = ps.pull()
  bad = jax.tree.map(lambda x: x * jnp.nan, _grad(0))
  assert ps.push(0, v, _grad(0)) == PushResult(False, 0, False)
  assert ps.push(1, v, bad) == PushResult(False, 0, True)
  assert ps.push(2, v, _grad(2)) == PushResult(False, 0, False)
  assert ps.push(1, v, _grad(1)) == PushResult(True, 0, False)      # learner 1 again, on its next batch
  assert ps.stats.dropped == 1 and ps.stats.histogram == {0: 3} and ps.version == 1


def test_consecutive_non_finite_pushes_are_divergence_and_a_finite_one_resets_the_count():
  ps = sajax.ParameterServer(_params(), sajax.staleness_aware(optax.sgd(0.1)), sajax.Protocol.asynchronous(2),
                             policy="inverse", divergence_after=3)
  bad = jax.tree.map(lambda x: x * jnp.nan, _grad(0))
  ps.push(0, 0, bad)
  ps.push(1, 0, bad)
  ps.push(0, 0, _grad(0))             # finite: the count starts again
  ps.push(0, 1, bad)
  ps.push(1, 1, bad)
  assert ps.nonfinite_streak == 2 and ps.version == 1
  with pytest.raises(sajax.server.DivergenceError, match="diverged: 3 consecutive non-finite gradients at update 1"):
    ps.push(0, 1, bad)
  with pytest.raises(ValueError, match="divergence_after=0"):
    sajax.ParameterServer(_params(), sajax.staleness_aware(optax.sgd(0.1)), sajax.Protocol.asynchronous(2),
                          divergence_after=0)


def _live_bytes():
  return sum(x.nbytes for x in jax.live_arrays())


@pytest.mark.parametrize("hidden, held_vectors", [(False, 1), (True, 7)])
def test_a_scale_policy_holds_one_running_sum_not_c_gradients(hidden, held_vectors):
  """Hardsync with c = 8: after 7 pushes a scale policy holds O(d) (one running sum), the generic path (a policy
  hidden inside an optax.chain, no policy=) 7·d."""
  d = 50_000
  tx = sajax.staleness_aware(optax.sgd(0.1, momentum=0.9), policy="inverse")
  ps = sajax.ParameterServer(jnp.zeros((d,)), optax.chain(tx) if hidden else tx, sajax.Protocol.hardsync(8))
  for round_ in range(2):
    version = ps.pull()[0]
    if round_ == 1:
      jax.block_until_ready(ps.params)
      base = _live_bytes()
    for k in range(7):
      ps.push(k, version, jnp.full((d,), 0.01 * (k + 1)), finite=True)
    if round_ == 1:
      held = _live_bytes() - base
    ps.push(7, version, jnp.full((d,), 0.08), finite=True)
  assert held == held_vectors * d * 4, held
  # and the update is the same: θ = −α·(1/c)Σ g over two rounds of momentum 0.9 (every σ = 0)
  mean = 0.01 * np.arange(1, 9).mean()
  np.testing.assert_allclose(np.asarray(ps.params), -0.1 * mean * (1 + 1.9), rtol=1e-5)


def test_a_ps_built_without_policy_takes_the_transforms_and_drops_what_it_drops():
  """PS(params, staleness_aware(.., "drop", R = 2)) without policy=: a gradient with σ ≥ R is dropped as stale and
  does not count toward c (it used to be applied with s(σ) = 0 and count as an update)."""
  tx = sajax.staleness_aware(optax.sgd(0.1), policy="drop", policy_args={"bound": 2})
  ps = ParameterServer(_params(), tx, protocol=sajax.Protocol.asynchronous(4))
  assert ps.policy.name == "drop"
  version, _ = ps.pull()
  assert [ps.push(k, version, _grad(k)).applied_update for k in (0, 1)] == [True, True]   # σ = 0, 1
  assert ps.push(2, version, _grad(2)) == PushResult(applied_update=False, staleness=2, dropped=True, stale=True)
  assert ps.version == 2 and ps.stats.stale_dropped == 1 and ps.stats.count == 2
  flat = ParameterServer(jnp.zeros(4), sajax.server.flat_transform(tx, lambda v: {"w": v}), sajax.Protocol.asynchronous(4))
  assert flat.policy.name == "drop"                                         # through the executors' flat wrapper


def test_a_policy_that_differs_from_the_transforms_is_refused_in_one_line():
  tx = sajax.staleness_aware(optax.sgd(0.1), policy="drop", policy_args={"bound": 2})
  with pytest.raises(ValueError, match=r"^policy='drop' \{'bound': 3\} differs from the policy tx was built with "
                                       r"\('drop' \{'bound': 2\}\); allowed: the same policy, or no policy="):
    ParameterServer(_params(), tx, protocol=sajax.Protocol.asynchronous(4), policy=sajax.get_policy("drop", bound=3))
  ps = ParameterServer(_params(), tx, protocol=sajax.Protocol.asynchronous(4), policy=sajax.get_policy("drop", bound=2))
  assert ps.policy.name == "drop"


def test_an_optimizer_state_that_holds_the_params_is_not_donated_away_from_the_caller():
  """The PS donates its optimizer state to each update. A state that holds θ itself (as lookahead's slow weights
  do) must not be the caller's arrays, or the first update deletes the caller's θ."""
  def init(params):
    return {"anchor": params}

  def update(updates, state, params=None):
    return updates, state

  tx = sajax.staleness_aware(optax.chain(optax.GradientTransformation(init, update), optax.sgd(0.1)))
  params = _params()
  ps = ParameterServer(params, tx, protocol=sajax.Protocol.asynchronous(1))
  assert ps.push(0, 0, _grad(1)).applied_update
  np.testing.assert_array_equal(np.asarray(params["w"]), [1.0, -1.0, 0.5])
  np.testing.assert_allclose(np.asarray(ps.params["w"]), [0.97, -0.995, 0.47], rtol=1e-6)


def test_unravel_of_inverts_flatten_and_compiles_nothing():
  """The executors' flat vectors: :func:`flatten` (one compiled program) and ``unravel_of`` (ravel_pytree's
  inverse, found without running ravel_pytree's per-leaf concatenation)."""
  import jax.monitoring
  from jax.flatten_util import ravel_pytree
  from sajax.executors.learners import flatten, unravel_of
  tree = {"conv": jnp.arange(24.0).reshape(2, 3, 4), "bias": jnp.array([7.0, 8.0]), "scale": jnp.array(3.0)}
  other = {"other": jnp.zeros((5, 7)), "shapes": jnp.zeros(13)}
  lowered = []

  def count(name, secs, **kwargs):
    if name.endswith("jaxpr_to_mlir_module_duration"):
      lowered.append(name)
  jax.monitoring.register_event_duration_secs_listener(count)
  try:
    unravel = unravel_of(tree)
    assert lowered == []
    ravel_pytree(other)              # what it replaces: a reshape per leaf shape and a concatenation
    assert lowered
  finally:
    jax.monitoring.unregister_event_duration_listener(count)
  flat, reference = ravel_pytree(tree)
  np.testing.assert_array_equal(np.asarray(flatten(tree)), np.asarray(flat))
  back = unravel(flatten(tree))
  assert jax.tree.structure(back) == jax.tree.structure(tree)
  for a, b, c in zip(jax.tree.leaves(back), jax.tree.leaves(reference(flat)), jax.tree.leaves(tree)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


@pytest.mark.parametrize("policy", ["inverse", "dc_asgd"])   # a running sum of s(σ)·g; the buffered gradients
def test_the_updates_of_a_run_are_one_compiled_program(policy):
  """θ and the optimizer state the PS starts from are committed to its device, as its updates' outputs are, so
  the first update is not a program of its own (it was: momentum's trace, which jit leaves uncommitted, made the
  PS compile its update twice in every run)."""
  params = {"w": jnp.ones(3), "b": jnp.zeros(2)}
  tx = sajax.staleness_aware(optax.sgd(0.1, momentum=0.9), policy=policy)
  ps = ParameterServer(params, tx, protocol=sajax.Protocol.asynchronous(2))
  assert all(x.committed for x in jax.tree.leaves((ps.params, ps.opt_state)))
  for _ in range(4):
    version, theta = ps.pull(learner=0)
    ps.push(learner=0, version=version, grads=jax.tree.map(jnp.ones_like, theta))
  apply = ps._apply_combined if policy == "inverse" else ps._apply
  assert ps.version == 4 and apply._cache_size() == 1
