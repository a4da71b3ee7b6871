"""Learner speeds for the simulated clock: how many seconds of simulated time each gradient takes.

A learner's time per gradient is its compute time × its fixed factor, plus a fixed time per push, all times
(optionally) a random factor per gradient. The compute time is ``base_time``, or, when ``example_time`` is set,
``example_time`` × μ (a gradient of μ examples costs time proportional to μ, so the model can compare λ
learners of μ = ⌈128/λ⌉ fairly); ``push_time`` is the fixed cost of one push (communication, the PS update),
the same for every learner. The fixed factors come from a named *profile*, so simulated results can be compared
with the literature:

- ``""`` (custom): the ``sim_*`` keys as they are: ``speeds`` (one factor per learner) or a fraction
  ``stragglers`` of the learners (the lowest ids) ``slowdown``× slower; ``jitter`` multiplies each time by
  a lognormal factor of median 1 (e^N(0, jitter²); mean e^(jitter²/2)), as sajax always did.
- ``one_slow``: learner 0 is ``slowdown`` (k)× slower than the other λ − 1, the single-straggler set-up.
- ``heterogeneous``: fixed per-learner factors cycled over the λ learners, by default
  :data:`HETEROGENEOUS_FACTORS` (0.58, 0.75, 1.51, 3.33 s per step, the four workers of the asynchronous
  local-SGD paper, Liu et al. 2024); ``speeds`` gives another pattern.
- ``lognormal``: every learner alike, each gradient's time multiplied by a lognormal factor of mean 1,
  e^N(−s²/2, s²) with s = ``jitter`` (its standard deviation is √(e^(s²) − 1)).

In the named profiles the jitter has mean 1, so each learner's mean time is ``base_time`` × its factor;
``poisson`` (exponential times with the same mean) applies to every profile.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

PROFILES: tuple[str, ...] = ("", "one_slow", "heterogeneous", "lognormal")

HETEROGENEOUS_FACTORS: tuple[float, ...] = (0.58, 0.75, 1.51, 3.33)
"""Seconds per step of the four heterogeneous workers in asynchronous local-SGD (Liu et al., 2024)."""


def heterogeneous_factors(learners: int, pattern: tuple[float, ...] = HETEROGENEOUS_FACTORS) -> tuple[float, ...]:
  """Learner k's factor is ``pattern[k mod len(pattern)]``, for k < ``learners``."""
  return tuple(float(pattern[k % len(pattern)]) for k in range(learners))


def one_slow_factors(learners: int, slowdown: float) -> tuple[float, ...]:
  """Learner 0 takes ``slowdown``× as long as each of the other λ − 1 learners."""
  return (float(slowdown),) + (1.0,) * (learners - 1)


@dataclasses.dataclass(frozen=True)
class SpeedModel:
  """Seconds of simulated time a learner takes per gradient."""

  base_time: float = 1.0
  jitter: float = 0.0          # σ of a lognormal factor (0: none); mean 1 in a named profile, median 1 in ""
  stragglers: float = 0.0      # fraction of the λ learners (the lowest ids) that are slow
  slowdown: float = 4.0        # how much slower a straggler is
  poisson: bool = False        # exponential times (Poisson arrivals) with the same mean
  speeds: tuple = ()           # optional per-learner time factors, overriding stragglers
  profile: str = ""            # "" | one_slow | heterogeneous | lognormal (see the module docstring)
  push_time: float = 0.0       # fixed seconds per push, whatever the learner's factor
  example_time: float = 0.0    # seconds per example: the compute time is example_time × μ (0: base_time)
  batch: int = 1               # μ, the examples per gradient

  @classmethod
  def from_config(cls, config: Any) -> "SpeedModel":
    """The model of a config's ``sim_*`` keys; a named ``sim_profile`` is resolved to λ per-learner factors."""
    return cls.from_profile(config.get("sim_profile", ""), config.learners,
                            base_time=config.get("sim_base_time", 1.0), jitter=config.get("sim_jitter", 0.0),
                            stragglers=config.get("sim_stragglers", 0.0), slowdown=config.get("sim_slowdown", 4.0),
                            poisson=config.get("sim_poisson", False), speeds=tuple(config.get("sim_speeds", ())),
                            push_time=config.get("sim_push_time", 0.0),
                            example_time=config.get("sim_example_time", 0.0), batch=config.batch_per_learner)

  @classmethod
  def from_profile(cls, profile: str, learners: int, **keys: Any) -> "SpeedModel":
    """A model for ``learners`` learners under ``profile``; ``keys`` are the other fields.

    Raises ValueError (one line) for an unknown profile.
    """
    if profile not in PROFILES:
      raise ValueError(f"unknown sim_profile {profile!r}; allowed: {', '.join(repr(p) for p in PROFILES)}")
    speeds = tuple(keys.pop("speeds", ()))
    if profile == "one_slow":
      speeds = one_slow_factors(learners, keys.get("slowdown", cls.slowdown))
    elif profile == "heterogeneous":
      speeds = heterogeneous_factors(learners, speeds or HETEROGENEOUS_FACTORS)
    return cls(profile=profile, speeds=speeds, **keys)

  def factor(self, learner: int, learners: int) -> float:
    """Learner k's fixed time factor (1 for a normal learner)."""
    if self.speeds:
      return float(self.speeds[learner % len(self.speeds)])   # a learner beyond λ (a join) cycles the factors
    return self.slowdown if learner < round(self.stragglers * learners) else 1.0

  @property
  def compute_time(self) -> float:
    """A normal learner's compute time per gradient: ``example_time`` × μ, or ``base_time``."""
    return self.example_time * self.batch if self.example_time else self.base_time

  def step_times(self, learners: int) -> tuple[float, ...]:
    """Each of the λ learners' mean seconds per gradient, without the push: compute time × its factor (a named
    profile's jitter has mean 1; in the custom profile ``""`` it has median 1, and the times are medians)."""
    return tuple(self.compute_time * self.factor(k, learners) for k in range(learners))

  def duration(self, rng: np.random.Generator, learner: int, learners: int, steps: int = 1) -> float:
    """Seconds until learner k's push: ``steps`` gradients computed in a row (H inner steps of local SGD), then
    one push."""
    t = self.push_time + self.compute_time * self.factor(learner, learners) * steps
    if self.poisson:
      t *= rng.exponential(1.0)
    if self.jitter:
      t *= rng.lognormal(-self.jitter ** 2 / 2 if self.profile else 0.0, self.jitter)
    return float(t)
