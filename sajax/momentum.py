"""Momentum that knows about staleness: the base optimizers a parameter server (PS) can put under
:func:`~sajax.optim.staleness_aware`.

In the paper's system (Zhang, Gupta, Lian & Liu, IJCAI 2016) λ learners push gradients of μ examples, the PS
combines c of them per update, ḡ = (1/c) Σ_l s(σ_l)·g_l, and hands ḡ to a base optimizer: SGD with momentum β
at the rate α(t) (α0 and its step schedule, t = PS updates). Momentum and asynchrony interact: a gradient of
staleness σ = i − j was computed on weights σ updates old, and momentum keeps moving the weights in between.
Each rule below is an optax transform (``init``/``update``, a ``NamedTuple`` state, ``jax.tree.map``) that takes
α(t) and β and reads σ: :func:`~sajax.optim.staleness_aware` hands the base the σ of the gradients it combined
as ``staleness=`` (a scalar for one gradient, an int vector of length c for an update of c), so the rules live
in the PS core and every executor (threads, simulated, MPI) has them with no executor code. Their state is in
the optimizer state, so it is checkpointed and resumed with it. One config key picks one
(:func:`momentum_rule`, ``config.momentum_rule``):

- ``plain``: today's ``optax.sgd(α, momentum=β)``: m ← β·m + ḡ, θ ← θ − α·m.
- ``delayed_nesterov``: :func:`delayed_nesterov` (Liu et al. 2024): the momentum advances once per N gradients.
- ``compensation``: :func:`compensated_momentum` (Mitliagkas et al. 2016): β lowered by the momentum that
  asynchrony adds, 1 − 1/(1 + ⟨σ⟩).
- ``lookahead``: :func:`lookahead_momentum` (after DANA, Hakimi et al. 2019): the PS publishes the estimated
  position of the weights when the gradient being computed will be applied, so learners compute there.

The two rules that read ⟨σ⟩ smooth it with :func:`update_staleness_mean` (an exponentially weighted mean).
Weight warm-up (``lr_warmup_epochs``) is a schedule, not a rule: it combines with any of them.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

Array = jax.Array
PyTree = Any

MOMENTUM_RULES: tuple[str, ...] = ("plain", "delayed_nesterov", "compensation", "lookahead")
"""The values of ``config.momentum_rule`` (``plain``, today's momentum, is the default)."""

DEFAULT_STALENESS_DECAY = 0.99
"""ρ of the smoothed ⟨σ⟩, per gradient: a horizon of about 1/(1 − ρ) = 100 gradients."""


# ---- small pieces shared by the rules ------------------------------------------------------------------------
def gradients_in(staleness: Any) -> int:
  """c, the number of gradients an update combined: the length of its σ vector (1 for a scalar or None).
  Static under jit (a shape)."""
  return 1 if staleness is None else max(1, int(jnp.size(staleness)))


def _step_size(learning_rate: optax.ScalarOrSchedule, count: Array) -> Array:
  """−α(t), as optax's ``scale_by_learning_rate`` computes it (so ``plain``-equivalent cases agree bit for bit)."""
  return -learning_rate(count) if callable(learning_rate) else -learning_rate


def _scaled(step: Any, tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: jnp.array(step, dtype=x.dtype) * x, tree)


def _check(rule: str, name: str, value: Any, ok: bool, allowed: str) -> None:
  if not ok:
    raise ValueError(f"momentum rule {rule!r}: {name}={value!r} is invalid; allowed: {allowed}")


def _require_staleness(rule: str, staleness: Any) -> None:
  if staleness is None:
    raise ValueError(f"momentum rule {rule!r} needs staleness= (σ of the update's gradients); wrap it in "
                     "sajax.staleness_aware, which hands it over")


def _real(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_momentum(rule: str, momentum: Any) -> float:
  _check(rule, "momentum", momentum, _real(momentum) and 0 <= momentum < 1, "0 <= β < 1")
  return float(momentum)


def _check_decay(rule: str, decay: Any) -> float:
  _check(rule, "staleness_decay", decay, _real(decay) and 0 <= decay <= 1, "0 <= ρ <= 1 (1: the running mean)")
  return float(decay)


def _split(tree_of_tuples: PyTree, like: PyTree, n: int) -> tuple:
  """A tree of n-tuples (shaped like ``like`` above the tuples) as n trees."""
  return jax.tree.transpose(jax.tree.structure(like), jax.tree.structure((0,) * n), tree_of_tuples)


# ---- the smoothed mean staleness ⟨σ⟩ ----------------------------------------------------------------------------
class StalenessMean(NamedTuple):
  """⟨σ⟩ = ``total / weight``: Σ_k ρ^(a_k)·σ_k over the gradients applied so far, over Σ_k ρ^(a_k)."""

  total: Array    # float32 scalar
  weight: Array   # float32 scalar (0 before the first update)


def init_staleness_mean() -> StalenessMean:
  return StalenessMean(total=jnp.zeros([], jnp.float32), weight=jnp.zeros([], jnp.float32))


def update_staleness_mean(state: StalenessMean, staleness: Any, decay: float) -> StalenessMean:
  """Adds the σ of one update's c gradients: total ← ρ^c·total + Σ_l σ_l, weight ← ρ^c·weight + c.

  So ⟨σ⟩ = Σ_k ρ^(a_k)·σ_k / Σ_k ρ^(a_k), where a_k counts the gradients applied after gradient k's update (the
  c gradients of one update share their age; a negative σ counts as 0, as in the policies). An exponentially
  weighted mean rather than the running mean, because ⟨σ⟩ moves during a run: the first λ pushes, all computed on
  θ_0, have σ = 0, 1, …, λ − 1 before the steady state, a learner that dies lowers it, a straggler raises it; a
  running mean never forgets. Dividing by the weight is the bias correction: the first estimate is the first
  update's mean σ, not a value pulled toward 0. ρ = 1 gives the running mean of every σ.
  """
  sigma = jnp.maximum(jnp.asarray(0 if staleness is None else staleness, jnp.float32), 0.0)
  keep = jnp.float32(decay ** gradients_in(staleness))
  return StalenessMean(total=keep * state.total + jnp.sum(sigma), weight=keep * state.weight + sigma.size)


def staleness_mean(state: StalenessMean) -> Array:
  """⟨σ⟩ (0 before any update)."""
  return jnp.where(state.weight > 0, state.total / jnp.maximum(state.weight, 1e-30), 0.0)


# ---- delayed Nesterov ---------------------------------------------------------------------------------------
class DelayedNesterovState(NamedTuple):
  """PS updates t (for α(t)), gradients buffered since the last momentum step (0 ≤ arrivals < N), their sum Δ,
  and the momentum m."""

  count: Array
  arrivals: Array
  buffer: PyTree
  momentum: PyTree


def delayed_nesterov(learning_rate: optax.ScalarOrSchedule, momentum: float, period: int
                     ) -> optax.GradientTransformationExtraArgs:
  """Delayed Nesterov: every gradient moves θ at once, the momentum advances once per N gradients.

  Liu, Chhaparia, Douillard, Kale, Rusu, Shen, Szlam & Ranzato, "Asynchronous Local-SGD Training for Language
  Modeling", 2024, Algorithm 3 (Delayed Nesterov): for each arriving gradient g,

      Δ ← Δ + g;  θ ← θ − α·g/N;  and every N-th arrival:  m ← β·m + Δ/N,  θ ← θ − α·β·m,  Δ ← 0.

  Over N arrivals this is one Nesterov step on their mean ḡ = Δ/N, θ ← θ − α·(ḡ + β·m) with m already advanced,
  but θ moves with each gradient instead of waiting for all N. ``period`` is N; the trainer's default is λ, so the momentum advances
  once per λ gradients, the cadence of SSGD's momentum.

  Gradients are counted, not PS updates: an update that combined c gradients (n-softsync: c = ⌊λ/n⌋, the length
  of its σ vector) counts as c arrivals of its combination ḡ = (1/c) Σ_l s(σ_l)·g_l, so θ moves by −α·c·ḡ/N and
  the momentum steps wherever the count crosses a multiple of N, with Δ split there: the part of the update that
  completes the N, then the rest starts the next Δ (an update of c > N gradients steps it more than once). With
  c = N (hardsync, N = λ) every update is exactly Nesterov momentum, ``optax.sgd(α, β, nesterov=True)``; with c
  dividing N (N = λ, n dividing λ) the momentum steps every N/c updates. The c gradients of an update are
  already one combination when the rule sees them, so counting them as c equal arrivals is the only split it
  can make, and it keeps the rate per gradient α/N whatever the protocol. α is α(t) at the update's PS count
  t. Combine it with any staleness policy (Liu et al. use no staleness scale; a policy adjusts each gradient
  before the combination ḡ reaches the rule).

  Args:
    learning_rate: α, a float or a schedule of the PS update count.
    momentum: β, 0 ≤ β < 1.
    period: N ≥ 1, gradients per momentum step.

  Returns:
    A transform whose ``update(updates, state, params=None, *, staleness=None)`` reads c from ``staleness``.
  """
  beta = _check_momentum("delayed_nesterov", momentum)
  _check("delayed_nesterov", "period", period, isinstance(period, numbers.Integral) and not isinstance(period, bool)
         and period >= 1, "an integer N >= 1 (gradients per momentum step)")
  n = int(period)

  def init_fn(params: PyTree) -> DelayedNesterovState:
    zeros = jax.tree.map(jnp.zeros_like, params)
    return DelayedNesterovState(count=jnp.zeros([], jnp.int32), arrivals=jnp.zeros([], jnp.int32),
                                buffer=zeros, momentum=zeros)

  def update_fn(updates: PyTree, state: DelayedNesterovState, params: PyTree = None, *, staleness: Any = None,
                **extra_args: Any) -> tuple[PyTree, DelayedNesterovState]:
    del params, extra_args
    c = gradients_in(staleness)
    total = state.arrivals + c
    crossings = total // n                     # momentum steps in this update (at most ⌊(N − 1 + c)/N⌋)
    leftover = total - crossings * n           # gradients that start the next Δ
    step = _step_size(learning_rate, state.count)

    def one(g, buffer, m):
      moved = jnp.zeros_like(m)                # Σ of the momenta this update steps to
      for k in range((n - 1 + c) // n):        # static bound; step k happens when k < crossings
        fresh = (buffer + (n - state.arrivals).astype(g.dtype) * g) / n if k == 0 else g
        stepped = k < crossings
        m = jnp.where(stepped, beta * m + fresh, m)
        moved = moved + jnp.where(stepped, m, jnp.zeros_like(m))
      buffer = jnp.where(crossings > 0, leftover.astype(g.dtype) * g, buffer + c * g)
      return jnp.array(step, dtype=g.dtype) * (c / n * g + beta * moved), buffer, m

    out, buffer, m = _split(jax.tree.map(one, updates, state.buffer, state.momentum), updates, 3)
    return out, DelayedNesterovState(count=optax.safe_increment(state.count), arrivals=leftover.astype(jnp.int32),
                                     buffer=buffer, momentum=m)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---- momentum compensation ----------------------------------------------------------------------------------
class CompensationState(NamedTuple):
  """PS updates t (for α(t)), the smoothed ⟨σ⟩, and the momentum trace m."""

  count: Array
  staleness: StalenessMean
  trace: PyTree


def implicit_momentum(mean_staleness: Array) -> Array:
  """The momentum asynchrony adds, 1 − 1/(1 + ⟨σ⟩) (Mitliagkas et al. 2016: 1 − 1/M for M asynchronous
  workers, whose staleness has mean M − 1)."""
  return 1.0 - 1.0 / (1.0 + mean_staleness)


def compensated_momentum(learning_rate: optax.ScalarOrSchedule, momentum: float,
                         staleness_decay: float = DEFAULT_STALENESS_DECAY) -> optax.GradientTransformationExtraArgs:
  """Momentum compensation: explicit momentum lowered by the implicit momentum of asynchrony.

  Mitliagkas, Zhang, Hadjis & Ré, "Asynchrony begets momentum, with an application to deep learning",
  Allerton 2016: asynchronous SGD behaves like synchronous SGD with an extra momentum 1 − 1/(1 + ⟨σ⟩), so the
  explicit momentum that gives a target total β is

      β_eff = max(0, β − (1 − 1/(1 + ⟨σ⟩))),   m ← β_eff·m + ḡ,   θ ← θ − α(t)·m,

  with ⟨σ⟩ the PS's smoothed mean staleness, updated with the update's σ before β_eff is taken
  (:func:`update_staleness_mean`, decay ρ = ``staleness_decay`` per gradient). The paper also reports that the
  best explicit value can be negative at high asynchrony; this rule stops at 0. With σ ≡ 0 (hardsync) β_eff = β
  and the rule is ``optax.sgd(α, momentum=β)`` bit for bit.

  Args:
    learning_rate: α, a float or a schedule of the PS update count.
    momentum: β, the target total momentum, 0 ≤ β < 1.
    staleness_decay: ρ, 0 ≤ ρ ≤ 1 (1: the running mean of every σ).

  Returns:
    A transform whose ``update(updates, state, params=None, *, staleness)`` needs σ.
  """
  beta = _check_momentum("compensation", momentum)
  decay = _check_decay("compensation", staleness_decay)

  def init_fn(params: PyTree) -> CompensationState:
    return CompensationState(count=jnp.zeros([], jnp.int32), staleness=init_staleness_mean(),
                             trace=jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates: PyTree, state: CompensationState, params: PyTree = None, *, staleness: Any = None,
                **extra_args: Any) -> tuple[PyTree, CompensationState]:
    del params, extra_args
    _require_staleness("compensation", staleness)
    sigma = update_staleness_mean(state.staleness, staleness, decay)
    effective = jnp.maximum(0.0, jnp.float32(beta) - implicit_momentum(staleness_mean(sigma)))
    trace = jax.tree.map(lambda g, t: g + effective.astype(t.dtype) * t, updates, state.trace)
    out = _scaled(_step_size(learning_rate, state.count), trace)
    return out, CompensationState(count=optax.safe_increment(state.count), staleness=sigma, trace=trace)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---- look-ahead -----------------------------------------------------------------------------------------------
class LookaheadState(NamedTuple):
  """PS updates t, the smoothed ⟨σ⟩, the momentum trace m of the underlying weights θ, and ``offset`` = α·D of
  the published point Θ = θ − α·D·m (so θ = Θ + offset·m)."""

  count: Array
  staleness: StalenessMean
  trace: PyTree
  offset: Array


def lookahead_distance(momentum: float, mean_staleness: Array) -> Array:
  """D = Σ_{k=1..h} β^k = β·(1 − β^h)/(1 − β) with h = ⟨σ⟩ + 1: how many steps of the current momentum θ still
  moves in the h updates until a gradient pulled now is applied (if no new gradient came). h = 1 (σ = 0) gives
  D = β, Nesterov's look-ahead."""
  if momentum == 0:
    return jnp.zeros([], jnp.float32)
  beta = jnp.float32(momentum)
  return beta * (1.0 - beta ** (mean_staleness + 1.0)) / (1.0 - beta)


def lookahead_momentum(learning_rate: optax.ScalarOrSchedule, momentum: float,
                       staleness_decay: float = DEFAULT_STALENESS_DECAY) -> optax.GradientTransformationExtraArgs:
  """Look-ahead momentum: the PS publishes the estimated future position of the weights, so each gradient is
  computed where the weights will be when it is applied.

  After DANA (Hakimi, Barkai, Gabel & Schuster, "Taming Momentum in a Distributed Asynchronous Environment",
  2019): with momentum, the weights keep moving during the σ updates a gradient is late, so DANA computes it
  on an estimate of the weights at its arrival, θ̂ = θ − α·β·Σ_i v^i (one momentum v^i per worker). DANA-Slim
  writes this in the Bengio–Nesterov form (Bengio, Boulanger-Lewandowski & Pascanu 2013), where the stored
  weights *are* the look-ahead point, so workers pull it with no extra traffic. Here the PS keeps one momentum
  m, and publishes Θ instead of the momentum iterate θ:

      m ← β·m + ḡ,   θ ← θ − α(t)·m,   Θ = θ − α(t)·D·m,   D = Σ_{k=1..⟨σ⟩+1} β^k = β(1 − β^(⟨σ⟩+1))/(1 − β)

  Θ is where θ will be after ⟨σ⟩ + 1 more updates if no new gradient came (the k-th moves it by α·β^k·m): a
  gradient pulled now enters the update σ + 1 updates later, so ḡ, computed on Θ, is evaluated where momentum
  will have carried the weights by then, as Nesterov's gradient is one update ahead (σ = 0, D = β). The
  estimate leaves out the gradients still to come, which are unknown. ⟨σ⟩ is the PS's smoothed mean staleness
  (:func:`update_staleness_mean`), since the σ of a gradient being computed is not known yet. The transform moves
  the parameters it is given, Θ, by Θ' − Θ = −α·m' − α·D'·m' + offset·m (``offset`` = α·D of the previous Θ), so
  θ itself is never stored: the published weights are Θ, and learners, policies and evaluations all read Θ.
  With σ ≡ 0, D = β and this is Bengio–Nesterov momentum, i.e. ``optax.sgd(α, β, nesterov=True)``.

  DANA itself keeps one momentum per worker, updated only by that worker's gradients (λ momenta, λ·d memory,
  and updates that depend on which learner pushed); this rule keeps the PS's one momentum, whose future effect
  it extrapolates over the measured ⟨σ⟩ instead.

  Args:
    learning_rate: α, a float or a schedule of the PS update count.
    momentum: β, 0 ≤ β < 1.
    staleness_decay: ρ of ⟨σ⟩, 0 ≤ ρ ≤ 1 (1: the running mean of every σ).

  Returns:
    A transform whose ``update(updates, state, params=None, *, staleness)`` needs σ.
  """
  beta = _check_momentum("lookahead", momentum)
  decay = _check_decay("lookahead", staleness_decay)

  def init_fn(params: PyTree) -> LookaheadState:
    return LookaheadState(count=jnp.zeros([], jnp.int32), staleness=init_staleness_mean(),
                          trace=jax.tree.map(jnp.zeros_like, params), offset=jnp.zeros([], jnp.float32))

  def update_fn(updates: PyTree, state: LookaheadState, params: PyTree = None, *, staleness: Any = None,
                **extra_args: Any) -> tuple[PyTree, LookaheadState]:
    del params, extra_args
    _require_staleness("lookahead", staleness)
    sigma = update_staleness_mean(state.staleness, staleness, decay)
    step = _step_size(learning_rate, state.count)                       # −α(t)
    offset = -jnp.asarray(step, jnp.float32) * lookahead_distance(beta, staleness_mean(sigma))   # α·D

    def one(g, m):
      new = g + beta * m
      move = jnp.array(step, g.dtype) * new - offset.astype(g.dtype) * new + state.offset.astype(g.dtype) * m
      return move, new

    out, trace = _split(jax.tree.map(one, updates, state.trace), updates, 2)
    return out, LookaheadState(count=optax.safe_increment(state.count), staleness=sigma, trace=trace, offset=offset)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---- the one flag ---------------------------------------------------------------------------------------------
def momentum_rule(name: str, learning_rate: optax.ScalarOrSchedule, momentum: float, *,
                  learners: Optional[int] = None, period: int = 0,
                  staleness_decay: float = DEFAULT_STALENESS_DECAY) -> optax.GradientTransformation:
  """The base optimizer of rule ``name`` (one of :data:`MOMENTUM_RULES`) at rate α and momentum β.

  ``plain`` is ``optax.sgd(α, momentum=β or None)``, today's optimizer. ``period`` is delayed Nesterov's N; 0
  means λ (``learners``). ``staleness_decay`` is ρ of ⟨σ⟩ for ``compensation`` and ``lookahead``.

  Raises:
    ValueError: (one line) an unknown name, or a bad argument.
  """
  if name == "plain":
    return optax.sgd(learning_rate, momentum=momentum or None)
  if name == "delayed_nesterov":
    if not period and not learners:
      raise ValueError("momentum rule 'delayed_nesterov' needs period= (N) or learners= (λ, for N = λ); "
                       "allowed: an integer >= 1 for either")
    return delayed_nesterov(learning_rate, momentum, period or learners)
  if name == "compensation":
    return compensated_momentum(learning_rate, momentum, staleness_decay)
  if name == "lookahead":
    return lookahead_momentum(learning_rate, momentum, staleness_decay)
  raise ValueError(f"unknown momentum_rule {name!r}; allowed: {', '.join(MOMENTUM_RULES)}")
