"""The staleness-aware transform against hand-computed references of the paper's rule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sajax
from sajax import optim


def _params():
  return {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array(0.25)}


def _grad(k):
  """A deterministic gradient number k (different for every k)."""
  return {"w": jnp.array([0.1 * k + 0.3, -0.2 * k, 1.0 / (k + 1)]), "b": jnp.array(0.05 * k - 0.1)}


def test_staleness_scale_inverse_and_constant():
  sigma = jnp.array([0, 1, 2, 4, 10])
  np.testing.assert_allclose(sajax.staleness_scale(sigma), [1.0, 1.0, 0.5, 0.25, 0.1])
  np.testing.assert_allclose(sajax.staleness_scale(sigma, "constant"), np.ones(5))
  assert sajax.staleness_scale(3).dtype == jnp.float32
  np.testing.assert_allclose(jax.jit(sajax.staleness_scale)(jnp.array(5)), 0.2)
  np.testing.assert_allclose(jax.vmap(sajax.staleness_scale)(sigma), [1.0, 1.0, 0.5, 0.25, 0.1])


def test_unknown_policy_names_the_value_and_allowed():
  with pytest.raises(ValueError, match=r"'nope'.*inverse.*constant"):
    sajax.staleness_aware(optax.sgd(0.1), policy="nope")


def test_sgd_momentum_trajectory_under_varying_staleness():
  """One gradient per update (async): θ ← θ − α0·m, m ← 0.9·m + s(σ)·g, with s(σ) = 1/σ, s(0) = 1."""
  lr, beta = 0.1, 0.9
  tx = sajax.staleness_aware(optax.sgd(lr, momentum=beta), policy="inverse")
  params = _params()
  state = tx.init(params)
  sigmas = [0, 3, 1, 5, 2, 0, 7]
  ref_params = jax.tree.map(np.asarray, params)
  ref_m = jax.tree.map(np.zeros_like, ref_params)
  for k, sigma in enumerate(sigmas):
    g = _grad(k)
    updates, state = tx.update(g, state, params, staleness=sigma)
    params = optax.apply_updates(params, updates)
    s = 1.0 if sigma == 0 else 1.0 / sigma
    ref_m = jax.tree.map(lambda m, gg: beta * m + s * np.asarray(gg), ref_m, g)
    ref_params = jax.tree.map(lambda p, m: p - lr * m, ref_params, ref_m)
    for key in ref_params:
      np.testing.assert_allclose(params[key], ref_params[key], rtol=1e-6, atol=1e-7)


def test_stacked_gradients_combine_before_one_momentum_step():
  """n-softsync: c stacked gradients → (1/c) Σ s(σ_l) g_l, then exactly one momentum step per update."""
  lr, beta, c = 0.05, 0.9, 4
  tx = sajax.staleness_aware(optax.sgd(lr, momentum=beta), policy="inverse")
  params = _params()
  state = tx.init(params)
  ref_params = jax.tree.map(np.asarray, params)
  ref_m = jax.tree.map(np.zeros_like, ref_params)
  rng = np.random.default_rng(0)
  for update in range(5):
    sigmas = rng.integers(0, 9, size=c)
    gs = [_grad(update * c + l) for l in range(c)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *gs)
    updates, state = tx.update(stacked, state, params, staleness=jnp.asarray(sigmas))
    params = optax.apply_updates(params, updates)
    scales = [1.0 if s == 0 else 1.0 / s for s in sigmas]
    combined = jax.tree.map(lambda *xs: sum(sc * np.asarray(x) for sc, x in zip(scales, xs)) / c, *gs)
    ref_m = jax.tree.map(lambda m, g: beta * m + g, ref_m, combined)
    ref_params = jax.tree.map(lambda p, m: p - lr * m, ref_params, ref_m)
    for key in ref_params:
      np.testing.assert_allclose(params[key], ref_params[key], rtol=1e-5, atol=1e-7)
  # The momentum trace advanced once per PS update, not once per gradient.
  trace = state.inner_state[0].trace
  np.testing.assert_allclose(trace["w"], ref_m["w"], rtol=1e-5)


def test_constant_policy_is_the_base_optimizer():
  adam = optax.adam(1e-2)
  tx = sajax.staleness_aware(optax.adam(1e-2), policy="constant")
  p1 = p2 = _params()
  s1, s2 = tx.init(p1), adam.init(p2)
  for k in range(6):
    u1, s1 = tx.update(_grad(k), s1, p1, staleness=k * 3 + 1)
    u2, s2 = adam.update(_grad(k), s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  for key in p1:
    np.testing.assert_allclose(p1[key], p2[key], rtol=1e-6)
  # and with stacked gradients, constant is the plain mean through Adam
  st1, st2 = tx.init(p1), adam.init(p1)
  gs = [_grad(k) for k in range(3)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *gs)
  u1, _ = tx.update(stacked, st1, p1, staleness=jnp.array([5, 0, 2]))
  u2, _ = adam.update(jax.tree.map(lambda x: x.mean(0), stacked), st2, p1)
  np.testing.assert_allclose(u1["w"], u2["w"], rtol=1e-6)


def test_jit_and_vmap():
  tx = sajax.staleness_aware(optax.sgd(0.1, momentum=0.9))
  params = _params()
  state = tx.init(params)
  eager, _ = tx.update(_grad(1), state, params, staleness=4)
  jitted, _ = jax.jit(lambda g, s, p, sig: tx.update(g, s, p, staleness=sig))(_grad(1), state, params, 4)
  np.testing.assert_allclose(jitted["w"], eager["w"], rtol=1e-6)
  np.testing.assert_allclose(eager["w"], -0.1 * 0.25 * np.asarray(_grad(1)["w"]), rtol=1e-6)
  # vmap over independent replicas, each with its own σ
  sigmas = jnp.array([0, 1, 2, 4])
  grads = jax.tree.map(lambda x: jnp.stack([x] * 4), _grad(2))
  states = jax.tree.map(lambda x: jnp.stack([x] * 4), state)
  updates, _ = jax.vmap(lambda g, s, sig: tx.update(g, s, params, staleness=sig))(grads, states, sigmas)
  expected = -0.1 * np.array([1.0, 1.0, 0.5, 0.25])[:, None] * np.asarray(_grad(2)["w"])[None]
  np.testing.assert_allclose(updates["w"], expected, rtol=1e-6)


def test_composes_with_chain_schedule_and_inject_hyperparams():
  schedule = optax.piecewise_constant_schedule(0.1, {2: 0.1})
  tx = optax.chain(sajax.staleness_aware(optax.sgd(schedule)), optax.clip_by_global_norm(1e9))
  params = _params()
  state = tx.init(params)
  seen = []
  for k in range(4):
    u, state = tx.update(_grad(0), state, params, staleness=2)
    seen.append(float(u["b"]))
  g = float(_grad(0)["b"])
  np.testing.assert_allclose(seen, [-0.1 * 0.5 * g] * 2 + [-0.01 * 0.5 * g] * 2, rtol=1e-5)

  tx = sajax.staleness_aware(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1))
  state = tx.init(params)
  state.inner_state.hyperparams["learning_rate"] = jnp.asarray(0.3)
  u, state = tx.update(_grad(0), state, params, staleness=3)
  np.testing.assert_allclose(u["b"], -0.3 / 3 * g, rtol=1e-5)
  assert optax.tree_utils.tree_get(state, "learning_rate") == pytest.approx(0.3)


def test_registry_extends_without_editing_sajax_and_policies_can_read_stale_params():
  name = "test_sqrt_inverse"
  optim.register_policy(name, scale=lambda s: 1.0 / jnp.sqrt(jnp.maximum(jnp.asarray(s, jnp.float32), 1.0)),
                        overwrite=True)
  np.testing.assert_allclose(sajax.staleness_scale(jnp.array([0, 4]), name), [1.0, 0.5])
  with pytest.raises(ValueError, match="already registered"):
    optim.register_policy(name, scale=lambda s: s)

  # A delay-compensated policy (DC-ASGD style): g + 0.5·g⊙g⊙(θ_i − θ_j), reading θ_j.
  def dc(grads, staleness, *, params, stale_params):
    return jax.tree.map(lambda g, p, q: g + 0.5 * g * g * (p - q), grads, params, stale_params)

  dc_name = "test_delay_compensated"
  optim.register_policy(dc_name, adjust=dc, needs_stale_params=True, overwrite=True)
  tx = sajax.staleness_aware(optax.sgd(1.0), policy=dc_name)
  params = {"w": jnp.array([1.0, 2.0])}
  stale = {"w": jnp.array([0.0, 2.0])}
  g = {"w": jnp.array([2.0, 3.0])}
  u, _ = tx.update(g, tx.init(params), params, staleness=1, stale_params=stale)
  np.testing.assert_allclose(u["w"], [-(2.0 + 0.5 * 4.0 * 1.0), -3.0])
  # stacked with a stacked θ_j
  stacked_g = {"w": jnp.stack([g["w"], g["w"]])}
  stacked_stale = {"w": jnp.stack([stale["w"], params["w"]])}
  u, _ = tx.update(stacked_g, tx.init(params), params, staleness=jnp.array([1, 0]), stale_params=stacked_stale)
  np.testing.assert_allclose(u["w"], [-(4.0 + 2.0) / 2, -3.0])
  with pytest.raises(ValueError, match="stale_params"):
    tx.update(g, tx.init(params), params, staleness=1)


def test_stacked_shape_mismatch_is_a_clear_error():
  tx = sajax.staleness_aware(optax.sgd(0.1))
  params = _params()
  with pytest.raises(ValueError, match="leading axis of 3"):
    tx.update(_grad(0), tx.init(params), params, staleness=jnp.array([1, 2, 3]))
