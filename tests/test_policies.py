"""The built-in staleness policies against numbers worked out by hand from each policy's formula."""

import json

import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sajax
from configs import default
from sajax import config as config_lib
from sajax import optim

SIGMAS = [0, 1, 2, 3, 5, 10]

# s(σ) at σ = 0, 1, 2, 3, 5, 10, written from each formula.
SCALES = [
    ("inverse", {}, [1, 1, 1 / 2, 1 / 3, 1 / 5, 1 / 10]),                          # 1/σ, 1 at σ = 0
    ("constant", {}, [1, 1, 1, 1, 1, 1]),
    ("polynomial", {}, [1, 0.70710678, 0.57735027, 0.5, 0.40824829, 0.30151134]),   # (1+σ)^-0.5
    ("polynomial", {"a": 1}, [1, 1 / 2, 1 / 3, 1 / 4, 1 / 6, 1 / 11]),             # 1/(1+σ)
    ("exponential", {}, [1, 0.90483742, 0.81873075, 0.74081822, 0.60653066, 0.36787944]),  # e^(-σ/10)
    ("exponential", {"beta": 0.5}, [1, 0.60653066, 0.36787944, 0.22313016, 0.08208500, 0.00673795]),
    ("hinge", {}, [1, 1, 1, 1, 1 / 11, 1 / 61]),                  # a=10, b=4: 1/(10·(σ−4)+1) past σ = 4
    ("hinge", {"a": 1, "b": 2}, [1, 1, 1, 1 / 2, 1 / 4, 1 / 9]),  # 1/((σ−2)+1) past σ = 2
    ("delay_adaptive", {"learners": 4}, [1, 1, 1, 1, 4 / 5, 4 / 10]),   # min(1, λ/σ)
    ("drop", {"bound": 3}, [1, 1, 1, 0, 0, 0]),                   # applied (as plain ASGD) only below R = 3
]


@pytest.mark.parametrize("name, args, expected", SCALES, ids=[f"{n}{a or ''}" for n, a, _ in SCALES])
def test_scale_policies_against_their_formulas(name, args, expected):
  scale = sajax.staleness_scale(jnp.array(SIGMAS), name, policy_args=args)
  assert scale.dtype == jnp.float32
  np.testing.assert_allclose(scale, expected, rtol=1e-6)
  np.testing.assert_allclose(jax.jit(sajax.get_policy(name, **args).scale)(jnp.array(SIGMAS)), expected, rtol=1e-6)


@pytest.mark.parametrize("name, args, expected", SCALES[2::2], ids=[n for n, _, _ in SCALES[2::2]])
def test_a_scale_policy_through_the_transform(name, args, expected):
  """c = 3 stacked gradients, SGD(0.1): the update is −0.1 · (1/3) Σ_l s(σ_l) g_l."""
  tx = sajax.staleness_aware(optax.sgd(0.1), policy=name, policy_args=args)
  params = {"w": jnp.zeros(2)}
  grads = {"w": jnp.array([[1.0, 2.0], [3.0, -1.0], [-2.0, 4.0]])}
  s = dict(zip(SIGMAS, expected))
  u, _ = tx.update(grads, tx.init(params), params, staleness=jnp.array([1, 3, 10]))
  want = -0.1 * (s[1] * np.array([1.0, 2.0]) + s[3] * np.array([3.0, -1.0]) + s[10] * np.array([-2.0, 4.0])) / 3
  np.testing.assert_allclose(u["w"], want, rtol=1e-6)


def test_drop_accepts_below_the_bound_and_the_others_accept_everything():
  drop = sajax.get_policy("drop", bound=3)
  assert [drop.accepts(s) for s in SIGMAS] == [True, True, True, False, False, False]
  for name in ("inverse", "polynomial", "hinge", "dc_asgd"):
    assert all(sajax.get_policy(name).accepts(s) for s in (0, 7, 10**6))


# ---- policies that read θ_j --------------------------------------------------------------------------------
THETA_I = {"w": jnp.array([1.0, 2.0])}
THETA_J = {"w": jnp.array([0.0, 2.0])}       # θ_i − θ_j = [1, 0]
THETA_J2 = {"w": jnp.array([0.5, 1.0])}      # θ_i − θ_j2 = [0.5, 1]
G = {"w": jnp.array([2.0, 3.0])}
G2 = {"w": jnp.array([1.0, -2.0])}


def _stack(*trees):
  return jax.tree.map(lambda *x: jnp.stack(x), *trees)


def test_dc_asgd_against_hand_numbers():
  """g + 0.04·g⊙g⊙(θ_i − θ_j): [2 + 0.04·4·1, 3 + 0] = [2.16, 3] and [1 + 0.04·1·0.5, −2 + 0.04·4·1] =
  [1.02, −1.84]."""
  tx = sajax.staleness_aware(optax.sgd(1.0), policy="dc_asgd")
  u, _ = tx.update(G, tx.init(THETA_I), THETA_I, staleness=2, stale_params=THETA_J)
  np.testing.assert_allclose(u["w"], [-2.16, -3.0], rtol=1e-6)
  u, _ = tx.update(_stack(G, G2), tx.init(THETA_I), THETA_I, staleness=jnp.array([2, 1]),
                   stale_params=_stack(THETA_J, THETA_J2))
  np.testing.assert_allclose(u["w"], [-(2.16 + 1.02) / 2, -(3.0 - 1.84) / 2], rtol=1e-6)
  tx = sajax.staleness_aware(optax.sgd(1.0), policy="dc_asgd", policy_args={"lam": 0.5})
  u, _ = tx.update(G, tx.init(THETA_I), THETA_I, staleness=2, stale_params=THETA_J)
  np.testing.assert_allclose(u["w"], [-(2.0 + 0.5 * 4.0), -3.0], rtol=1e-6)
  with pytest.raises(ValueError, match="stale_params"):
    tx.update(G, tx.init(THETA_I), THETA_I, staleness=1)


def test_dc_asgd_adaptive_keeps_its_mean_square_in_the_state():
  """MeanSquare ← 0.95·MS + 0.05·mean_l g_l², then g + 2/√(MS + 1e-7) ⊙ g⊙g⊙(θ_i − θ_j)."""
  tx = sajax.staleness_aware(optax.sgd(1.0), policy="dc_asgd_adaptive")
  state = tx.init(THETA_I)
  np.testing.assert_allclose(state.policy_state.nu["w"], [0.0, 0.0])
  u, state = tx.update(G, state, THETA_I, staleness=1, stale_params=THETA_J)
  # MS1 = 0.05·[4, 9] = [0.2, 0.45]; λ1 = 2/√0.2 = 4.472136 on the first coordinate (Δθ = 0 on the second)
  np.testing.assert_allclose(state.policy_state.nu["w"], [0.2, 0.45], rtol=1e-6)
  np.testing.assert_allclose(u["w"], [-(2.0 + 4.472136 * 4.0 * 1.0), -3.0], rtol=1e-5)
  # second update, c = 2: mean g² = [(4 + 1)/2, (9 + 4)/2] = [2.5, 6.5]; MS2 = 0.95·MS1 + 0.05·[2.5, 6.5]
  u, state = tx.update(_stack(G, G2), state, THETA_I, staleness=jnp.array([1, 2]),
                       stale_params=_stack(THETA_J, THETA_J2))
  ms2 = np.array([0.19 + 0.125, 0.4275 + 0.325])
  np.testing.assert_allclose(state.policy_state.nu["w"], ms2, rtol=1e-6)
  assert int(state.policy_state.count) == 2
  lam = 2.0 / np.sqrt(ms2 + 1e-7)
  g1 = np.array([2.0, 3.0]) + lam * np.array([4.0, 9.0]) * np.array([1.0, 0.0])
  g2 = np.array([1.0, -2.0]) + lam * np.array([1.0, 4.0]) * np.array([0.5, 1.0])
  np.testing.assert_allclose(u["w"], -(g1 + g2) / 2, rtol=1e-5)


def test_gap_aware_divides_by_the_gap_in_units_of_the_step():
  """ν ← 0.9·ν + 0.1·mean_l g_l², C = η·(√(ν/(1 − 0.9^t)) + ε), g / max(1, |θ_i − θ_j| / C)."""
  tx = sajax.staleness_aware(optax.sgd(1.0), policy="gap_aware", policy_args={"learning_rate": 0.1, "decay": 0.9})
  params = {"w": jnp.array([1.0, 1.0])}
  stale = {"w": jnp.array([0.0, 0.99])}        # gaps [1, 0.01]
  state = tx.init(params)
  u, state = tx.update({"w": jnp.array([2.0, 0.5])}, state, params, staleness=3, stale_params=stale)
  # ν1 = 0.1·[4, 0.25]; bias-corrected [4, 0.25]; C = 0.1·[2, 0.5] = [0.2, 0.05]; gap/C = [5, 0.2] → G = [5, 1]
  np.testing.assert_allclose(state.policy_state.nu["w"], [0.4, 0.025], rtol=1e-6)
  np.testing.assert_allclose(u["w"], [-2.0 / 5, -0.5], rtol=1e-5)
  # second update, c = 2, g = [1, 1] and [3, 1]: mean g² = [5, 1]; ν2 = 0.9·[0.4, 0.025] + 0.1·[5, 1]
  u, state = tx.update({"w": jnp.array([[1.0, 1.0], [3.0, 1.0]])}, state, params, staleness=jnp.array([1, 4]),
                       stale_params={"w": jnp.array([[1.0, 0.7], [0.5, 1.0]])})   # gaps [0, 0.3], [0.5, 0]
  nu2 = np.array([0.36 + 0.5, 0.0225 + 0.1])
  np.testing.assert_allclose(state.policy_state.nu["w"], nu2, rtol=1e-6)
  unit = 0.1 * (np.sqrt(nu2 / (1 - 0.9 ** 2)) + 1e-8)
  g1 = np.array([1.0, 1.0]) / np.maximum(1.0, np.array([0.0, 0.3]) / unit)
  g2 = np.array([3.0, 1.0]) / np.maximum(1.0, np.array([0.5, 0.0]) / unit)
  np.testing.assert_allclose(u["w"], -(g1 + g2) / 2, rtol=1e-5)
  assert np.all(np.array([0.3, 0.5]) / unit > 1)     # both gaps were penalised, the test can fail


def test_a_stateful_policy_resumes_from_its_saved_state():
  """Saving the transform's state as host arrays and restoring it continues the EMA exactly."""
  tx = sajax.staleness_aware(optax.sgd(0.1, momentum=0.9), policy="gap_aware", policy_args={"learning_rate": 0.1})
  params, state = THETA_I, tx.init(THETA_I)
  grads = [G, G2, {"w": jnp.array([0.5, 0.5])}, G]
  for g in grads[:2]:
    _, state = tx.update(g, state, params, staleness=1, stale_params=THETA_J2)
  saved = jax.tree.map(np.asarray, state)
  restored = jax.tree.unflatten(jax.tree.structure(tx.init(params)), jax.tree.leaves(saved))
  for g in grads[2:]:
    u_a, state = tx.update(g, state, params, staleness=1, stale_params=THETA_J2)
    u_b, restored = tx.update(g, restored, params, staleness=1, stale_params=THETA_J2)
    np.testing.assert_array_equal(u_a["w"], u_b["w"])
  assert int(restored.policy_state.count) == 4


def test_stateless_policies_have_an_empty_policy_state():
  tx = sajax.staleness_aware(optax.sgd(0.1), policy="hinge")
  assert tx.init(THETA_I).policy_state == optax.EmptyState()
  assert not sajax.get_policy("dc_asgd").stateful and sajax.get_policy("gap_aware", learning_rate=0.1).stateful


BUILT = [("inverse", {}), ("constant", {}), ("polynomial", {}), ("exponential", {}), ("hinge", {"a": 1, "b": 1}),
         ("delay_adaptive", {"learners": 2}), ("drop", {"bound": 4}), ("dc_asgd", {}), ("dc_asgd_adaptive", {}),
         ("gap_aware", {"learning_rate": 0.1})]


def test_every_built_in_policy_is_tested_here():
  assert {n for n, _ in BUILT} == set(sajax.available_policies()) - {n for n in sajax.available_policies()
                                                                     if n.startswith("test_")}


@pytest.mark.parametrize("name, args", BUILT, ids=[n for n, _ in BUILT])
def test_jit_matches_eager_for_one_and_for_stacked_gradients(name, args):
  tx = sajax.staleness_aware(optax.sgd(0.1, momentum=0.9), policy=name, policy_args=args)
  needs = sajax.get_policy(name, **args).needs_stale_params
  params = THETA_I
  update = lambda g, s, sig, sp: tx.update(g, s, params, staleness=sig, stale_params=sp)  # noqa: E731
  cases = [(G, jnp.array(3), THETA_J), (_stack(G, G2, G), jnp.array([0, 3, 5]), _stack(THETA_J, THETA_J2, THETA_I))]
  state = tx.init(params)
  for grads, sigma, stale in cases:
    stale = stale if needs else None
    eager, eager_state = update(grads, state, sigma, stale)
    jitted, jit_state = jax.jit(update)(grads, state, sigma, stale)
    np.testing.assert_allclose(jitted["w"], eager["w"], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), jit_state, eager_state)
    state = eager_state


# ---- arguments and errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("call, message", [
    (lambda: sajax.get_policy("hinge", c=1), r"unknown argument 'c' for policy 'hinge'; allowed: a, b$"),
    (lambda: sajax.get_policy("inverse", a=1), r"unknown argument 'a' for policy 'inverse'; allowed: none$"),
    (lambda: sajax.get_policy("drop"), r"policy 'drop' needs bound= \(R\) or learners= \(λ, for the default R = 2λ\)"),
    (lambda: sajax.get_policy("drop", learners=0), r"learners=0 is invalid; allowed: an integer >= 1$"),
    (lambda: sajax.get_policy("polynomial", a=-1), r"a=-1 is invalid; allowed: a number >= 0$"),
    (lambda: sajax.get_policy("drop", bound=2.5), r"bound=2.5 is invalid; allowed: an integer >= 1$"),
    (lambda: sajax.get_policy("gap_aware", learning_rate=0.1, decay=1.0),
     r"decay=1.0 .*allowed: a number >= 0 and < 1"),
    (lambda: sajax.get_policy("nope"), r"unknown staleness policy 'nope'; allowed: inverse, constant, polynomial"),
    (lambda: sajax.staleness_aware(optax.sgd(0.1), "polynomial", {"alpha": 1}), r"'alpha'.*allowed: a$"),
    (lambda: sajax.get_policy(sajax.get_policy("inverse"), a=1), r"already built"),
])
def test_bad_policy_arguments_are_one_line_naming_what_is_allowed(call, message):
  with pytest.raises(ValueError, match=message) as info:
    call()
  assert "\n" not in str(info.value)


def test_a_registered_stateful_policy_advances_its_state_once_per_update():
  def adjust(grads, staleness, *, params, stale_params, state):
    return jax.tree.map(lambda g: g * state[None], grads), state + 1.0    # scales by the number of earlier updates

  optim.register_policy("test_counting", adjust=adjust, init=lambda params: jnp.ones([]), overwrite=True)
  tx = sajax.staleness_aware(optax.sgd(1.0), policy="test_counting")
  state = tx.init(THETA_I)
  _, state = tx.update(_stack(G, G2, G), state, THETA_I, staleness=jnp.array([0, 1, 2]))
  u, state = tx.update(G, state, THETA_I, staleness=4)
  assert float(state.policy_state) == 3.0
  np.testing.assert_allclose(u["w"], -2.0 * np.array([2.0, 3.0]))
  with pytest.raises(ValueError, match="init= .*needs adjust="):
    optim.register_policy("test_bad", scale=lambda s: s, init=lambda p: ())


def test_external_factories_register_with_their_arguments():
  def sqrt_inverse(floor: float = 1.0):
    return optim.StalenessPolicy("test_sqrt_floor", scale=lambda s: 1 / jnp.sqrt(jnp.maximum(s, floor)))

  optim.register_policy("test_sqrt_floor", factory=sqrt_inverse, overwrite=True)
  assert optim.policy_arg_names("test_sqrt_floor") == ("floor",)
  np.testing.assert_allclose(sajax.staleness_scale(jnp.array([1.0, 16.0]), "test_sqrt_floor", {"floor": 4.0}),
                             [0.5, 0.25])
  with pytest.raises(ValueError, match="factory= alone"):
    optim.register_policy("test_bad", factory=sqrt_inverse, scale=lambda s: s)


# ---- config ---------------------------------------------------------------------------------------------------
def _config(**overrides):
  config = default.get_config()
  for key, value in overrides.items():
    config[key] = value
  return config


def test_config_policy_args_build_the_policy_and_fill_learners_and_learning_rate():
  config = _config(policy="polynomial", policy_args='{"a": 0.25}')
  config_lib.validate(config)
  assert dict(config_lib.policy_of(config).args) == {"a": 0.25}
  config = _config(policy="delay_adaptive", learners=6)
  config_lib.validate(config)
  assert dict(config_lib.policy_of(config).args) == {"learners": 6}
  config = _config(policy="gap_aware", learning_rate=0.2, policy_args=json.dumps({"decay": 0.99}))
  assert dict(config_lib.policy_of(config).args) == {"learning_rate": 0.2, "decay": 0.99, "eps": 1e-8}
  as_dict = ml_collections.ConfigDict(dict(_config(policy="drop").to_dict(), policy_args={"bound": 5}))
  config_lib.validate(as_dict)        # a config file may give policy_args as a dict
  assert dict(config_lib.policy_of(as_dict).args) == {"bound": 5}
  bare = _config(policy="drop", learners=6)   # --config.policy=drop alone: the documented default R = 2λ
  config_lib.validate(bare)
  assert dict(config_lib.policy_of(bare).args) == {"bound": 12}
  assert sajax.get_policy("drop", learners=6).accepts(11) and not sajax.get_policy("drop", learners=6).accepts(12)


@pytest.mark.parametrize("overrides, message", [
    ({"policy": "hinge", "policy_args": '{"c": 1}'}, r"'c' for policy 'hinge'; allowed: a, b"),
    ({"policy": "drop", "policy_args": '{"bound": 0}'}, r"bound=0 is invalid; allowed: an integer >= 1"),
    ({"policy": "polynomial", "policy_args": "a=0.5"}, r"not a JSON object; allowed"),
    ({"policy": "dc_asgd", "executor": "pmap"}, r"needs θ_j .*allowed executors: threads, simulated, mpi, ray$"),
    ({"policy": "gap_aware", "executor": "pmap"}, r"allowed executors: threads, simulated, mpi, ray$"),
])
def test_config_rejects_bad_policy_args_in_one_line(overrides, message):
  with pytest.raises(config_lib.ConfigError, match=message) as info:
    config_lib.validate(_config(**overrides))
  assert "\n" not in str(info.value)


def test_config_differences_ignore_how_policy_args_are_spelled_and_their_absence():
  new = _config(policy_args='{"a":0.5}').to_dict()
  old = dict(new, policy_args='{"a": 0.5}')
  assert config_lib.config_differences(old, new) == []
  old = {k: v for k, v in _config().to_dict().items() if k not in ("policy_args", "sim_profile")}
  assert config_lib.config_differences(old, _config().to_dict()) == []
  assert config_lib.config_differences(dict(old, policy_args='{"a": 1}'), _config().to_dict()) != []
