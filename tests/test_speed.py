"""Learner-speed profiles of the simulated clock: the per-learner factors and the jitter's distribution."""

import numpy as np
import pytest

from configs import default
from sajax import config as config_lib
from sajax.executors.speed import HETEROGENEOUS_FACTORS, SpeedModel


def _config(**overrides):
  config = default.get_config()
  config.executor = "simulated"
  for key, value in overrides.items():
    config[key] = value
  return config


def _factors(model, learners):
  return [model.factor(k, learners) for k in range(learners)]


def test_heterogeneous_cycles_the_async_local_sgd_workers_over_the_learners():
  assert HETEROGENEOUS_FACTORS == (0.58, 0.75, 1.51, 3.33)
  model = SpeedModel.from_config(_config(sim_profile="heterogeneous", learners=6, sim_base_time=2.0))
  assert _factors(model, 6) == [0.58, 0.75, 1.51, 3.33, 0.58, 0.75]
  rng = np.random.default_rng(0)
  assert [model.duration(rng, k, 6) for k in range(6)] == pytest.approx([1.16, 1.5, 3.02, 6.66, 1.16, 1.5])
  model = SpeedModel.from_config(_config(sim_profile="heterogeneous", learners=5, sim_speeds=(1.0, 3.0)))
  assert _factors(model, 5) == [1.0, 3.0, 1.0, 3.0, 1.0]


def test_one_slow_slows_learner_zero_only():
  model = SpeedModel.from_config(_config(sim_profile="one_slow", learners=4, sim_slowdown=5.0))
  assert _factors(model, 4) == [5.0, 1.0, 1.0, 1.0]
  assert _factors(SpeedModel.from_config(_config(sim_profile="one_slow", learners=1)), 1) == [4.0]


def test_lognormal_jitter_has_mean_one_and_the_given_spread():
  """Times base·e^N(−s²/2, s²): mean base, standard deviation base·√(e^(s²) − 1), log-σ s."""
  s, base = 0.5, 2.0
  model = SpeedModel.from_config(_config(sim_profile="lognormal", sim_jitter=s, sim_base_time=base, learners=3))
  assert _factors(model, 3) == [1.0, 1.0, 1.0]
  rng = np.random.default_rng(1)
  times = np.array([model.duration(rng, k % 3, 3) for k in range(60_000)])
  assert times.mean() == pytest.approx(base, rel=0.01)
  assert times.std() == pytest.approx(base * np.sqrt(np.exp(s ** 2) - 1), rel=0.03)    # 1.0652 here
  assert np.log(times).std() == pytest.approx(s, rel=0.02)


def test_the_custom_profile_keeps_its_median_one_jitter():
  """sim_profile "" is what sajax always did: jitter e^N(0, s²), so earlier simulated runs replay exactly."""
  model = SpeedModel.from_config(_config(sim_jitter=0.5, learners=2))
  a, b = np.random.default_rng(3), np.random.default_rng(3)
  assert model.duration(a, 0, 2) == b.lognormal(0.0, 0.5)
  model = SpeedModel.from_config(_config(sim_stragglers=0.25, learners=8, sim_slowdown=3.0))
  assert _factors(model, 8) == [3.0, 3.0] + [1.0] * 6


@pytest.mark.parametrize("overrides, message", [
    ({"sim_profile": "bursty"},
     r"unknown sim_profile 'bursty'; allowed: '', 'one_slow', 'heterogeneous', 'lognormal'$"),
    ({"sim_profile": "lognormal"}, r"sim_jitter=0.0 is invalid with sim_profile='lognormal'; allowed: a number > 0"),
    ({"sim_profile": "one_slow", "sim_speeds": (1.0, 2.0)}, r"sim_speeds=\(1.0, 2.0\) is invalid with sim_profile"),
    ({"sim_profile": "one_slow", "sim_stragglers": 0.5}, r"sim_stragglers=0.5 is invalid with sim_profile"),
    ({"sim_profile": "heterogeneous", "sim_speeds": (1.0, -2.0)}, r"sim_speeds=\(1.0, -2.0\) is invalid"),
    ({"sim_speeds": (1.0, 2.0)}, r"allowed: \(\) or 8 positive time factors, one per learner"),
])
def test_bad_speed_profiles_are_one_line_naming_what_is_allowed(overrides, message):
  with pytest.raises(config_lib.ConfigError, match=message) as info:
    config_lib.validate(_config(**overrides))
  assert "\n" not in str(info.value)


def test_valid_profiles_pass_validation():
  config_lib.validate(_config(sim_profile="heterogeneous", sim_speeds=(1.0, 2.0, 3.0)))
  config_lib.validate(_config(sim_profile="lognormal", sim_jitter=0.3))
  config_lib.validate(_config(sim_profile="one_slow", sim_slowdown=10.0))


def test_a_gradient_costs_a_fixed_push_time_plus_a_time_per_example():
  """t = push_time + example_time · μ · factor (issue #13's speed model): μ = 16 at 0.01 s per example and a
  0.05 s push is 0.21 s for a normal learner, 0.05 + 4 × 0.16 = 0.69 s for a 4× straggler."""
  from sajax.executors.speed import SpeedModel
  model = SpeedModel(push_time=0.05, example_time=0.01, batch=16, stragglers=0.25, slowdown=4.0)
  rng = np.random.default_rng(0)
  assert model.duration(rng, 1, 4) == pytest.approx(0.21)
  assert model.duration(rng, 0, 4) == pytest.approx(0.69)
  assert SpeedModel(base_time=2.0, push_time=0.5).duration(rng, 0, 1) == pytest.approx(2.5)   # no example_time


def test_negative_push_or_example_time_is_refused_naming_it():
  config = default.get_config()
  config.sim_example_time = -0.01
  with pytest.raises(config_lib.ConfigError, match=r"config.sim_example_time=-0.01 is invalid; allowed: seconds >= 0"):
    config_lib.validate(config)
