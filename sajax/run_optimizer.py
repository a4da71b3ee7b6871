"""The optimizer a run's config asks for: the learning-rate schedule α(t) over parameter-server updates and the
staleness-aware transform around SGD with momentum (Zhang et al. 2016: α0 with step decays; the momentum rules of
:mod:`sajax.momentum`; the outer optimizers of asynchronous local-SGD, :mod:`sajax.local_steps`)."""

from __future__ import annotations

from typing import Any, Optional

import jax.numpy as jnp
import ml_collections
import optax

from sajax import config as config_lib, local_steps
from sajax.momentum import DEFAULT_STALENESS_DECAY, momentum_rule
from sajax.optim import staleness_aware
from sajax.steps import one_per_process


def make_schedule(config: ml_collections.ConfigDict, per_epoch: float) -> optax.Schedule:
  """α as a function of the PS update count t: α0, times lr_decay at each boundary (given in epochs), and with
  ``lr_warmup_epochs`` = w > 0 times min(1, (t + 1)/W) over the first W = w epochs' updates (the linear warm-up
  of Goyal et al. 2017, which also tames the first λ asynchronous pushes, all computed on θ_0). The start is the
  outer optimizer's rate (:func:`sajax.local_steps.outer_learning_rate`): α0 unless ``outer_optimizer`` or
  ``outer_learning_rate`` says otherwise."""
  boundaries = tuple(sorted(config_lib.schedule_boundaries(config, per_epoch).items()))
  warmup = config_lib.epoch_to_update(config.get("lr_warmup_epochs", 0.0), per_epoch)
  return _schedule(float(local_steps.outer_learning_rate(config)), boundaries, warmup)


@one_per_process
def _schedule(start: float, boundaries: tuple[tuple[int, float], ...], warmup: int) -> optax.Schedule:
  """One schedule object per (α0, boundaries, warm-up) in a process: runs that share them share its programs."""
  steps = optax.piecewise_constant_schedule(start, dict(boundaries))
  if not warmup:
    return steps
  return lambda t: steps(t) * jnp.minimum(1.0, (t + 1) / warmup)


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule, policy: Optional[Any] = None
                   ) -> optax.GradientTransformationExtraArgs:
  """The paper's optimizer: SGD(α0 with step decays at epoch boundaries, momentum β) under
  ``config.momentum_rule`` (``plain``, the default, is ``optax.sgd(α, momentum=β)``; the others are in
  :mod:`sajax.momentum`), wrapped staleness-aware with ``config.policy`` built from ``config.policy_args``
  (:func:`sajax.config.policy_of`).

  ``config.outer_optimizer`` (the optimizer of the parameter server, whatever learners push: gradients, or the
  pseudo-gradients Δ of ``local_steps`` > 1, :mod:`sajax.local_steps`) picks the base: ``sgd`` is the above;
  ``nesterov`` is ``optax.sgd(α, β, nesterov=True)`` (DiLoCo's outer step); ``delayed_nesterov`` is the momentum
  rule of that name. α follows ``schedule``; β is :func:`sajax.local_steps.outer_momentum` (``config.momentum``
  for ``sgd``, 0.9 for the other two, unless ``outer_momentum`` is set)."""
  outer = config.get("outer_optimizer", "sgd")
  rule = "delayed_nesterov" if outer == "delayed_nesterov" else config.get("momentum_rule", "plain")
  return _optimizer(outer, rule, schedule, local_steps.outer_momentum(config), config.learners,
                    config.get("momentum_rule_period", 0),
                    config.get("momentum_rule_staleness_decay", DEFAULT_STALENESS_DECAY),
                    config.get("weight_decay", 0.0), policy or config_lib.policy_of(config))


@one_per_process
def _optimizer(outer: str, rule: str, schedule: optax.Schedule, beta: float, learners: int, period: int,
               staleness_decay: float, weight_decay: float, policy: Any) -> optax.GradientTransformationExtraArgs:
  """One optimizer object per distinct setting in a process (a seed sweep, a notebook's reruns): its update,
  init and the parameter server's programs built on it are then traced and compiled once."""
  if outer == "nesterov":
    base = optax.sgd(schedule, momentum=beta, nesterov=True)
  else:
    base = momentum_rule(rule, schedule, beta, learners=learners, period=period, staleness_decay=staleness_decay)
  if weight_decay:
    base = optax.chain(optax.add_decayed_weights(weight_decay), base)
  return staleness_aware(base, policy=policy)
