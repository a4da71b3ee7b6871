"""The built-in staleness policies, registered on import (``import sajax`` imports this module).

Each function below builds a :class:`~sajax.optim.StalenessPolicy` from the policy's arguments and is
registered under its own name, so ``staleness_aware(tx, policy="hinge", policy_args={"b": 8})``,
``get_policy("hinge", b=8)`` and ``policies.hinge(b=8)`` are the same policy. A default is the constant the
policy's paper recommends (each docstring says which); an argument without one is either the run's own (λ,
α0: :func:`sajax.config.policy_of` passes them; ``drop``'s R defaults to 2λ, our choice). σ is the
staleness i − j of a gradient computed on θ_j and applied to θ_i; a negative σ counts as 0.

Scale policies multiply gradient l by s(σ_l). Policies that read θ_j (``needs_stale_params``) adjust each
gradient element-wise; the two with state keep an EMA of squared gradients in the transform's state
(:class:`SquareAverageState`, checkpointed with it) and advance it once per transform update, from the mean
of the c gradients' squares: ν ← β·ν + (1 − β)·(1/c) Σ_l g_l², before the gradients are adjusted.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sajax.optim import StalenessPolicy, _weighted_mean, register_policy, register_preset

Array = jax.Array
PyTree = Any


def _sigma(staleness: Array) -> Array:
  return jnp.maximum(jnp.asarray(staleness, jnp.float32), 0.0)


def _real(policy: str, name: str, value: Any, *, minimum: float = 0.0, strict: bool = False,
          below: float | None = None) -> float:
  """``value`` as a float, or a one-line ValueError naming it and the allowed range."""
  ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and (
      value > minimum if strict else value >= minimum) and (below is None or value < below)
  if not ok:
    allowed = f"a number {'>' if strict else '>='} {minimum:g}" + (f" and < {below:g}" if below is not None else "")
    raise ValueError(f"policy {policy!r}: {name}={value!r} is invalid; allowed: {allowed}")
  return float(value)


def _count(policy: str, name: str, value: Any) -> int:
  if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
    raise ValueError(f"policy {policy!r}: {name}={value!r} is invalid; allowed: an integer >= 1")
  return int(value)


# ---- scale policies: s(σ) ------------------------------------------------------------------------------------
def inverse() -> StalenessPolicy:
  """s(σ) = 1/σ for σ ≥ 1 and s(0) = 1, i.e. the learning rate α0/σ (α0 at σ = 0).

  Zhang, Gupta, Lian & Liu, "Staleness-Aware Async-SGD for Distributed Deep Learning", IJCAI 2016.
  """
  return StalenessPolicy("inverse", scale=lambda s: 1.0 / jnp.maximum(_sigma(s), 1.0))


def constant() -> StalenessPolicy:
  """s(σ) ≡ 1: plain asynchronous SGD, staleness ignored (the comparison in Zhang et al., IJCAI 2016)."""
  return StalenessPolicy("constant", scale=lambda s: jnp.ones(jnp.shape(s), jnp.float32))


def polynomial(a: float = 0.5) -> StalenessPolicy:
  """s(σ) = (1 + σ)^(−a).

  Xie, Koyejo & Gupta, "Asynchronous Federated Optimization" (FedAsync), 2019, its polynomial staleness
  function; the default a = 0.5 is the choice of asynchronous local-SGD (Liu et al., "Asynchronous Local-SGD
  Training for Language Modeling", 2024), whose pseudo-gradients (``local_steps`` > 1) it weights: the preset
  ``async_local_sgd`` names it.
  """
  a = _real("polynomial", "a", a)
  return StalenessPolicy("polynomial", scale=lambda s: (1.0 + _sigma(s)) ** -a, args=(("a", a),))


def exponential(beta: float = 0.1) -> StalenessPolicy:
  """s(σ) = exp(−β·σ).

  The exponential staleness discount of the asynchronous federated-learning literature; no paper fixes β, so
  the default 0.1 is ours (s(10) ≈ 0.37, half-weight at σ ≈ 7).
  """
  beta = _real("exponential", "beta", beta)
  return StalenessPolicy("exponential", scale=lambda s: jnp.exp(-beta * _sigma(s)), args=(("beta", beta),))


def hinge(a: float = 10.0, b: float = 4.0) -> StalenessPolicy:
  """s(σ) = 1 if σ ≤ b, else 1 / (a·(σ − b) + 1).

  Xie, Koyejo & Gupta, "Asynchronous Federated Optimization" (FedAsync), 2019, its hinge staleness function;
  a = 10, b = 4 as in FedAsync's experiments.
  """
  a, b = _real("hinge", "a", a), _real("hinge", "b", b)

  def scale(staleness: Array) -> Array:
    sigma = _sigma(staleness)
    return jnp.where(sigma <= b, 1.0, 1.0 / (a * jnp.maximum(sigma - b, 0.0) + 1.0))

  return StalenessPolicy("hinge", scale=scale, args=(("a", a), ("b", b)))


def delay_adaptive(learners: int) -> StalenessPolicy:
  """s(σ) = min(1, λ/σ) = λ / max(λ, σ): the step η·λ/max(λ, σ), full up to σ = λ, then shrinking as 1/σ.

  Mishchenko, Bach, Even & Woodworth, "Asynchronous SGD Beats Minibatch SGD Under Arbitrary Delays",
  NeurIPS 2022 (the delay-adaptive step size, with the number of workers λ as the threshold). ``learners`` is
  λ; the trainer passes ``config.learners``.
  """
  lam = float(_count("delay_adaptive", "learners", learners))
  return StalenessPolicy("delay_adaptive", scale=lambda s: lam / jnp.maximum(lam, _sigma(s)),
                         args=(("learners", int(lam)),))


def drop(bound: int | None = None, learners: int | None = None) -> StalenessPolicy:
  """Discard a gradient with σ ≥ R (``bound``); apply the others as plain ASGD, s(σ) = 1 for σ < R.

  Maranjyan, Tyurin & Richtárik, "Ringmaster ASGD: The First Asynchronous SGD with Optimal Time Complexity",
  2025 (ignore gradients with delay ≥ R, constant step otherwise); the public Rudra code's spread bound is the
  same idea. The parameter server calls ``accepts(σ)`` (σ < R) before counting a gradient: a rejected one is
  counted as stale-dropped (apart from non-finite drops) and does not count toward c. Inside the transform
  s(σ) = 1 if σ < R else 0, so a too-stale gradient that reaches it anyway adds nothing.

  Ringmaster's R depends on the gradient noise and the target accuracy, which a run does not know; the default
  here is ours: R = 2λ (``learners``, which the trainer passes). Under async with λ learners at one pace every
  gradient has σ ≈ λ − 1, so 2λ drops only the gradients of a learner running at less than about half the common
  pace (it is also the R of docs/policies.md's comparison). ``bound`` overrides it.
  """
  if bound is None:
    if learners is None:
      raise ValueError("policy 'drop' needs bound= (R) or learners= (λ, for the default R = 2λ); allowed: an "
                       "integer >= 1 for either")
    bound = 2 * _count("drop", "learners", learners)
  bound = _count("drop", "bound", bound)
  return StalenessPolicy("drop", scale=lambda s: jnp.where(_sigma(s) < bound, 1.0, 0.0),
                         accepts=lambda staleness: staleness < bound, args=(("bound", bound),))


# ---- policies that read θ_j -------------------------------------------------------------------------------
class SquareAverageState(NamedTuple):
  """A policy's EMA ν of squared gradients (element-wise, shaped like θ) and the number of updates it has seen."""

  count: Array
  nu: PyTree


def _init_square_average(params: PyTree) -> SquareAverageState:
  return SquareAverageState(count=jnp.zeros([], jnp.int32), nu=jax.tree.map(jnp.zeros_like, params))


def _advance(state: SquareAverageState, grads: PyTree, decay: float) -> SquareAverageState:
  """ν ← β·ν + (1 − β)·(1/c) Σ_l g_l² for the c gradients stacked on the leading axis of ``grads``."""
  # _weighted_mean, not jnp.mean(..., axis=0): XLA CPU reduces a leading axis ~85× slower (36 vs 0.43 ms on a
  # (4, 3136, 128) leaf), see sajax.optim.
  nu = jax.tree.map(lambda v, g: decay * v + (1.0 - decay) * _weighted_mean(jnp.square(g), None).astype(v.dtype),
                    state.nu, grads)
  return SquareAverageState(count=state.count + 1, nu=nu)


def dc_asgd(lam: float = 0.04) -> StalenessPolicy:
  """g ← g + λ_dc · g ⊙ g ⊙ (θ_i − θ_j), element-wise (a diagonal Hessian approximation of the delay).

  Zheng, Meng, Wang, Chen, Yu, Ma & Liu, "Asynchronous Stochastic Gradient Descent with Delay Compensation"
  (DC-ASGD), ICML 2017; λ_dc = ``lam`` = 0.04 is MXNet's ``DCASGD`` default.
  """
  lam = _real("dc_asgd", "lam", lam)

  def adjust(grads, staleness, *, params, stale_params):
    return jax.tree.map(lambda g, p, q: g + lam * g * g * (p - q), grads, params, stale_params)

  return StalenessPolicy("dc_asgd", adjust=adjust, needs_stale_params=True, args=(("lam", lam),))


def dc_asgd_adaptive(lam0: float = 2.0, decay: float = 0.95, eps: float = 1e-7) -> StalenessPolicy:
  """DC-ASGD with an adaptive λ: g ← g + λ_t ⊙ g ⊙ g ⊙ (θ_i − θ_j), λ_t = λ0 / √(MeanSquare_t + ε).

  MeanSquare_t = m·MeanSquare_{t−1} + (1 − m)·(1/c) Σ_l g_l² (m = ``decay``), advanced once per update before
  λ_t is taken, starting from 0. Zheng et al., ICML 2017 (DC-ASGD-a); λ0 = 2, m = 0.95, ε = 1e-7 as in the
  paper's DC-ASGD-a setting.
  """
  lam0, eps = _real("dc_asgd_adaptive", "lam0", lam0), _real("dc_asgd_adaptive", "eps", eps, strict=True)
  decay = _real("dc_asgd_adaptive", "decay", decay, below=1.0)

  def adjust(grads, staleness, *, params, stale_params, state):
    state = _advance(state, grads, decay)
    out = jax.tree.map(lambda g, v, p, q: g + lam0 / jnp.sqrt(v + eps) * g * g * (p - q),
                       grads, state.nu, params, stale_params)
    return out, state

  return StalenessPolicy("dc_asgd_adaptive", adjust=adjust, needs_stale_params=True, init=_init_square_average,
                         args=(("lam0", lam0), ("decay", decay), ("eps", eps)))


def gap_aware(learning_rate: float, decay: float = 0.999, eps: float = 1e-8) -> StalenessPolicy:
  """g ← g / max(1, |θ_i − θ_j| / C), element-wise, with C = η · (√(ν_t / (1 − β^t)) + ε).

  The gap |θ_i − θ_j| is measured in units of C, the typical distance one step moves a parameter: η =
  ``learning_rate`` (the trainer passes α0) times the bias-corrected EMA ν of the gradients' squares (β =
  ``decay``, t updates, ν advanced once per update from the mean of the c gradients' squares, then used).
  Barkai, Hakimi & Schuster, "Gap-Aware Mitigation of Gradient Staleness", ICLR 2020; β = 0.999 and ε = 1e-8
  as in a public PyTorch implementation from the authors' group (which divides by 1 + |θ_i − θ_j|/C instead).
  """
  learning_rate = _real("gap_aware", "learning_rate", learning_rate, strict=True)
  decay = _real("gap_aware", "decay", decay, below=1.0)
  eps = _real("gap_aware", "eps", eps, strict=True)

  def adjust(grads, staleness, *, params, stale_params, state):
    state = _advance(state, grads, decay)
    correction = 1.0 - jnp.float32(decay) ** state.count.astype(jnp.float32)

    def one(g, v, p, q):
      unit = learning_rate * (jnp.sqrt(v / correction) + eps)
      return g / jnp.maximum(1.0, jnp.abs(p - q) / unit)

    return jax.tree.map(one, grads, state.nu, params, stale_params), state

  return StalenessPolicy("gap_aware", adjust=adjust, needs_stale_params=True, init=_init_square_average,
                         args=(("learning_rate", learning_rate), ("decay", decay), ("eps", eps)))


for _factory in (inverse, constant, polynomial, exponential, hinge, delay_adaptive, drop, dc_asgd,
                 dc_asgd_adaptive, gap_aware):
  register_policy(_factory.__name__, factory=_factory, overwrite=True)

# Asynchronous local-SGD's weighting of a pseudo-gradient of staleness σ, s(σ) = (1 + σ)^−0.5 (Liu et al.,
# "Asynchronous Local-SGD Training for Language Modeling", 2024): ``polynomial`` with a = 0.5, by that name.
register_preset("async_local_sgd", "polynomial", a=0.5)
