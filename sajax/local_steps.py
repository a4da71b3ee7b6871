"""Asynchronous local-SGD: a learner's H inner steps and the pseudo-gradient Δ it pushes.

With ``local_steps`` = H > 1 a learner that pulled (j, θ_j) runs H steps of its own *inner* optimizer on H
consecutive mini-batches of μ from its own stream, θ_local ← θ_local − α_inner·u_h (u_h the inner optimizer's
direction on the h-th batch, starting from θ_local = θ_j), and pushes

    Δ = θ_j − θ_local

in place of a gradient. The parameter server treats Δ exactly as a gradient of staleness σ = i − j: every
staleness policy s(σ) scales it, the c pushes of an update are combined, (1/c) Σ_l s(σ_l)·Δ_l, and the *outer*
optimizer (``outer_optimizer``: sgd, nesterov or delayed_nesterov; :func:`sajax.run_optimizer.make_optimizer`) steps
on the combination. With hardsync (c = λ), outer Nesterov (lr 0.7, momentum 0.9) and inner AdamW this is DiLoCo
(Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language Models", 2023); with async,
the (1 + σ)^−0.5 weighting (``policy="async_local_sgd"``) and delayed Nesterov it is asynchronous local-SGD (Liu
et al., "Asynchronous Local-SGD Training for Language Modeling", 2024). Outer SGD at rate 1 without momentum
averages the learners' local models (local SGD / FedAvg).

The inner state stays on the learner and is *kept across rounds*: after a push the learner pulls the newest
θ and goes on with the inner optimizer's moments (and, for AdamW, its bias-correction count) from the previous
round, as DiLoCo and Liu et al. do: AdamW's second-moment estimate needs many steps to settle, and resetting it
every H steps would make every round start with the bias-corrected first steps of a fresh Adam (steps of about
α_inner per coordinate, whatever the gradient's scale). A round whose Δ is non-finite keeps the state it
started from (the PS drops that Δ; the learner's next round starts as if it had not run).

The inner learning rate α_inner(j) depends on the version j the learner pulled, i.e. on the run's progress,
not on the learner's own step count, so fast and slow learners (heterogeneous speeds) follow the same curve:
``constant`` (α_inner) or ``cosine``, α_inner·½(1 + cos(π·min(1, j/T))) with T the run's last PS update. It is
constant within a round.

With ``dynamic_local_steps`` (DyLU, "dynamic local updates", Liu et al. 2024) learner k runs

    H_k = max(1, ⌊H · v_k / v_fastest⌋)

inner steps per round instead of H, v_k its speed (steps per second): a slow learner's round takes about as long
as the fastest learner's H steps, so every learner pushes about as often and a slow learner's Δ is no staler than
a fast one's. :class:`RoundLengths` holds the rule for a run: under the simulated executor v_k comes from the speed
model (fixed for the run, so a resumed run is bit-identical); under threads it is measured, each learner's
seconds per inner step averaged over its rounds (an exponential moving average, :data:`MEASURED_WEIGHT` on the
newest round; a learner's first round of each length compiles, and is not counted), and a learner runs H until
it has been measured. The parameter server needs nothing new: a short
round's Δ is a pseudo-gradient like any other, and the sample clock counts the H_k·μ examples each push carries.

One round lives in one place, :func:`make_local_update`, which every executor calls: H calls of one compiled
inner step, then one compiled Δ. Not a ``lax.scan`` over the H stacked batches: measured on XLA CPU for the
small CNN (μ = 16, H = 4, inner SGD; launch/bench_local_steps.py, two sessions), a round took 44–51 ms as H
jitted calls, 7.8–7.9× that as a scan and 1.5–1.6× as a fully unrolled scan (one program, the steps fused into
each other), the same Δ to float32 rounding.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from sajax.steps import jit_once, one_per_process

PyTree = Any

INNER_OPTIMIZERS: tuple[str, ...] = ("sgd", "adamw")
"""``config.inner_optimizer``: ``sgd`` (with ``inner_momentum``) or ``adamw`` (β1 = 0.9, β2 = 0.999)."""

OUTER_OPTIMIZERS: tuple[str, ...] = ("sgd", "nesterov", "delayed_nesterov")
"""``config.outer_optimizer``: ``sgd`` is today's optimizer (α0, β, ``momentum_rule``); ``nesterov`` is DiLoCo's
outer step; ``delayed_nesterov`` is :func:`sajax.momentum.delayed_nesterov` (Liu et al. 2024)."""

INNER_SCHEDULES: tuple[str, ...] = ("constant", "cosine")
"""``config.inner_schedule``: α_inner as a function of the pulled version j (module docstring)."""

DILOCO_OUTER_LEARNING_RATE = 0.7
"""The outer rate of ``nesterov`` and ``delayed_nesterov`` when ``outer_learning_rate`` is unset (DiLoCo's)."""

DILOCO_OUTER_MOMENTUM = 0.9
"""The outer momentum of ``nesterov`` and ``delayed_nesterov`` when ``outer_momentum`` is unset (DiLoCo's)."""

ADAMW_LEARNING_RATE = 1e-3
"""α_inner of ``adamw`` when ``inner_learning_rate`` is unset (Adam's usual rate; ``sgd``'s is α0)."""


MEASURED_WEIGHT = 0.3
"""DyLU under threads: the weight of a learner's newest round in its measured seconds per inner step."""


class LocalSteps(NamedTuple):
  """A run's local-SGD settings: H, the inner optimizer's direction (without its rate), α_inner(j), and whether
  rounds are DyLU's H_k (``dynamic_local_steps``)."""

  steps: int
  inner: optax.GradientTransformation
  learning_rate: Callable[[int], float]
  dynamic: bool = False


def dynamic_steps(steps: int, step_times: Sequence[float]) -> tuple[int, ...]:
  """DyLU's round lengths (Liu et al. 2024): H_k = max(1, ⌊H · v_k / v_fastest⌋) for the learners whose seconds
  per inner step are ``step_times`` (v_k = 1 / t_k), H = ``steps``. The fastest learner runs H."""
  fastest = min(step_times)
  # ⌊·⌋ with a relative tolerance: H · t / t must give H, not H − 1 after rounding.
  return tuple(max(1, math.floor(steps * fastest / t * (1 + 1e-9))) for t in step_times)


class RoundLengths:
  """How many inner steps learner k runs per push: H, or with DyLU H_k (:func:`dynamic_steps`).

  Args:
    steps: H.
    dynamic: DyLU (``dynamic_local_steps``); False: every learner runs H.
    step_times: each learner's seconds per inner step, known in advance (the simulated speed model's mean
      times): H_k is fixed for the run. None: measured as the learners run (:meth:`record`, threads).

  Thread-safe: learner threads record and read it concurrently.
  """

  def __init__(self, steps: int, dynamic: bool = False, step_times: Optional[Sequence[float]] = None) -> None:
    self.steps, self.dynamic = int(steps), bool(dynamic)
    self.fixed = dynamic_steps(self.steps, step_times) if dynamic and step_times is not None else None
    self.measured: dict[int, float] = {}     # learner -> seconds per inner step (threads)
    self._compiled: set[tuple[int, int]] = set()   # (learner, inner steps) whose first round has been seen
    self._lock = threading.Lock()

  def steps_for(self, learner: int) -> int:
    """The inner steps of learner ``learner``'s next round."""
    if not self.dynamic:
      return self.steps
    if self.fixed is not None:
      return self.fixed[learner]
    with self._lock:
      if learner not in self.measured:
        return self.steps
      return dynamic_steps(self.steps, [min(self.measured.values()), self.measured[learner]])[1]

  def record(self, learner: int, seconds: float, steps: int) -> None:
    """Learner ``learner`` ran a round of ``steps`` inner steps in ``seconds`` (measured rounds only). A learner's
    first round of a length is not a measurement: it compiled that round's programs (seconds, against
    milliseconds per step), which would make the learner look slow for many rounds of the moving average."""
    if not self.dynamic or self.fixed is not None or steps < 1 or not seconds > 0:
      return
    with self._lock:
      if (learner, steps) not in self._compiled:
        self._compiled.add((learner, steps))
        return
      per_step = seconds / steps
      old = self.measured.get(learner)
      self.measured[learner] = per_step if old is None else (1 - MEASURED_WEIGHT) * old + MEASURED_WEIGHT * per_step

  def table(self, learners: Sequence[int]) -> list[int]:
    """H_k of ``learners`` now (for the run's log and telemetry)."""
    return [self.steps_for(k) for k in learners]


def local_steps_of(config: Any) -> int:
  """H, ``config.local_steps`` (1 when absent: a plain gradient per push)."""
  return int(config.get("local_steps", 1))


def step_times(config: Any) -> Optional[tuple[float, ...]]:
  """Each learner's seconds per inner step when known in advance: the simulated speed model's mean times
  (:meth:`sajax.executors.speed.SpeedModel.step_times`); None under the other executors (measured there)."""
  if config.get("executor") != "simulated":
    return None
  from sajax.executors.speed import SpeedModel
  return SpeedModel.from_config(config).step_times(config.learners)


def mean_round(config: Any) -> float:
  """The inner steps per push the run's schedule counts on: H, or with DyLU under the simulated executor the mean
  of its H_k (DyLU makes the learners push about equally often, so a push carries the mean H_k·μ examples).
  Under threads the H_k are measured as the run goes and the schedule counts H: a step schedule's boundaries (in
  PS updates) then come after fewer examples than their epochs say, since a short round's push carries fewer; the
  sample clock counts what each push carried, so evaluations and the end of the run stay at their epochs."""
  steps = local_steps_of(config)
  times = step_times(config) if config.get("dynamic_local_steps", False) else None
  return steps if times is None else float(np.mean(dynamic_steps(steps, times)))


def inner_learning_rate(config: Any) -> float:
  """α_inner: ``config.inner_learning_rate``, or when unset α0 for ``sgd`` and 1e-3 for ``adamw``."""
  value = config.get("inner_learning_rate", None)
  if value is not None:
    return float(value)
  return ADAMW_LEARNING_RATE if config.get("inner_optimizer", "sgd") == "adamw" else float(config.learning_rate)


def outer_learning_rate(config: Any) -> float:
  """The outer optimizer's α (the start of the run's step schedule): ``config.outer_learning_rate``, or when
  unset α0 (``config.learning_rate``, exactly) for ``sgd`` and 0.7 for the two Nesterov optimizers."""
  value = config.get("outer_learning_rate", None)
  if value is not None:
    return value
  return config.learning_rate if config.get("outer_optimizer", "sgd") == "sgd" else DILOCO_OUTER_LEARNING_RATE


def outer_momentum(config: Any) -> float:
  """The outer optimizer's β: ``config.outer_momentum``, or when unset β (``config.momentum``, exactly) for
  ``sgd`` and 0.9 for the two Nesterov optimizers."""
  value = config.get("outer_momentum", None)
  if value is not None:
    return value
  return config.momentum if config.get("outer_optimizer", "sgd") == "sgd" else DILOCO_OUTER_MOMENTUM


@one_per_process
def inner_direction(name: str, *, momentum: float = 0.0, weight_decay: float = 0.0
                    ) -> optax.GradientTransformation:
  """The inner optimizer without its learning rate: its update u is the step's direction, θ ← θ − α_inner·u.

  ``sgd``: u = m, m ← β·m + g + wd·θ (``optax.sgd`` with momentum β, weight decay added to g first);
  ``adamw``: u = Adam's m̂/(√v̂ + ε) + wd·θ (``optax.adamw``: decoupled weight decay).
  """
  if name == "sgd":
    parts = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
    parts.append(optax.trace(decay=momentum) if momentum else optax.identity())
    return optax.chain(*parts)
  if name == "adamw":
    return optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(weight_decay))
  raise ValueError(f"unknown inner_optimizer {name!r}; allowed: {', '.join(INNER_OPTIMIZERS)}")


def inner_schedule(name: str, learning_rate: float, last_update: int) -> Callable[[int], float]:
  """α_inner(j) for a round that pulled version j: ``constant``, or ``cosine`` from α_inner at j = 0 to 0 at
  j = ``last_update`` (T), ½·α_inner·(1 + cos(π·min(1, j/T)))."""
  if name == "constant":
    return lambda version: learning_rate
  if name == "cosine":
    horizon = max(1, int(last_update))
    return lambda version: 0.5 * learning_rate * (1.0 + math.cos(math.pi * min(1.0, version / horizon)))
  raise ValueError(f"unknown inner_schedule {name!r}; allowed: {', '.join(INNER_SCHEDULES)}")


def from_config(config: Any, last_update: int) -> Optional[LocalSteps]:
  """The run's :class:`LocalSteps`, or None when H = 1 (learners push plain gradients, exactly as without the
  key)."""
  steps = local_steps_of(config)
  if steps == 1:
    return None
  inner = inner_direction(config.get("inner_optimizer", "sgd"), momentum=config.get("inner_momentum", 0.0),
                          weight_decay=config.get("inner_weight_decay", 0.0))
  # A learner's first state as one program, not one op per leaf. keep_unused: θ (whose values the state does not
  # read) stays an input, so the state is committed to θ's device as the rounds' states are; without it the first
  # round was a program of its own, compiled again at the second.
  inner = inner._replace(init=jit_once(inner.init, keep_unused=True))
  return LocalSteps(steps, inner, inner_schedule(config.get("inner_schedule", "constant"),
                                                 inner_learning_rate(config), last_update),
                    bool(config.get("dynamic_local_steps", False)))


@one_per_process
def make_local_update(loss_fn: Callable, inner: optax.GradientTransformation) -> Callable:
  """``local_update(θ_j, inner state, images, labels, key, steps, α_inner) -> (Δ, inner state, loss, finite)``:
  one round of H inner steps from θ_j, dispatched without waiting on the device θ_j lives on.

  Args of the returned function:
    params: θ_j, in whatever form ``loss_fn`` takes it (a pytree, or the flat vector of the threads and MPI
      learners: every inner optimizer here is element-wise, so a flat state is the same optimizer).
    inner_state: the learner's inner-optimizer state (kept across rounds), ``inner.init(params)`` at first.
    images, labels: H mini-batches of μ stacked on a leading axis, (H, μ, ...) and (H, μ) (numpy: they follow
      θ_j onto its device).
    key: the learner's key; step h uses ``fold_in(key, steps[h])``, as a plain gradient of that step would.
    steps: the H stream steps of the batches, (H,).
    learning_rate: α_inner of this round (a float32 scalar).

  Returns (of the returned function):
    Δ = θ_j − θ_local (shaped like θ_j), the new inner state (the one it started from when Δ is not finite),
    the mean of the H inner losses (each on the weights it stepped from), and whether Δ is finite.

  ``loss_fn`` is ``loss(θ, images, labels, rng)`` (:func:`sajax.steps.make_loss_fn`); ``inner`` the inner
  optimizer's direction (:func:`inner_direction`). The H steps are H calls of one compiled step (and a compiled
  Δ), not a ``lax.scan``: on XLA CPU the scan was 8× slower for the small CNN (module docstring). One object per
  (loss, inner optimizer) in a process (:func:`sajax.steps.one_per_process`): runs that share them share its
  programs.
  """
  @jax.jit
  def inner_step(local, state, images, labels, key, step, learning_rate):
    loss, grads = jax.value_and_grad(loss_fn)(local, images, labels, jax.random.fold_in(key, step))
    direction, state = inner.update(grads, state, local)
    local = jax.tree.map(lambda p, u: p - learning_rate.astype(p.dtype) * u, local, direction)
    return local, state, loss

  @jax.jit
  def finish(params, local, state, start_state, losses):
    delta = jax.tree.map(lambda a, b: a - b, params, local)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(delta)]))
    state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), state, start_state)
    return delta, state, jnp.mean(jnp.stack(losses)), finite

  def local_update(params, inner_state, images, labels, key, steps, learning_rate):
    local, state, losses = params, inner_state, []
    learning_rate = np.float32(learning_rate)
    for h in range(len(steps)):
      local, state, loss = inner_step(local, state, images[h], labels[h], key, steps[h], learning_rate)
      losses.append(loss)
    return finish(params, local, state, inner_state, tuple(losses))

  return local_update


def stack_batches(batches: list[tuple[np.ndarray, np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """H draws ``(images, labels, step)`` of one learner as (images (H, μ, ...), labels int32 (H, μ), steps
  uint32 (H,))."""
  return (np.stack([b[0] for b in batches]), np.stack([np.asarray(b[1], np.int32) for b in batches]),
          np.asarray([b[2] for b in batches], np.uint32))


def state_arrays(states: Mapping[int, PyTree], learners: int) -> dict[str, np.ndarray]:
  """The learners' inner states for a checkpoint: ``inner_state`` (λ, d_s) float32, learner k's state flattened
  (``ravel_pytree``'s order; an integer count is exact in float32 below 2²⁴), and ``inner_state_saved`` (λ,) bool,
  whether row k holds one (a learner not yet started, or one run by another MPI rank, has none). Empty when the
  inner optimizer keeps no arrays (SGD without momentum or weight decay)."""
  rows = {k: np.asarray(_flat_float32(s)) for k, s in states.items() if s is not None}
  size = next(iter(rows.values())).size if rows else 0
  if not size:
    return {}
  table = np.zeros((learners, size), np.float32)
  saved = np.zeros(learners, bool)
  for k, row in rows.items():
    table[k], saved[k] = row, True
  return {"inner_state": table, "inner_state_saved": saved}


@jax.jit
def _flat_float32(state: PyTree) -> jax.Array:
  """``ravel_pytree(state)[0]`` as float32, as one compiled program (ravel_pytree runs one op per leaf shape)."""
  leaves = [jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(state)]
  return jnp.concatenate(leaves) if leaves else jnp.zeros(0, jnp.float32)   # plain SGD keeps no arrays


def restore_states(arrays: Mapping[str, np.ndarray], like: PyTree) -> dict[int, PyTree]:
  """The inner states a checkpoint holds (:func:`state_arrays`), learner k -> its state shaped like ``like`` (on
  the host); {} when it holds none."""
  if "inner_state" not in arrays:
    return {}
  unravel = ravel_pytree(like)[1]
  return {k: unravel(jnp.asarray(row)) for k, (row, saved) in enumerate(zip(arrays["inner_state"],
                                                                          arrays["inner_state_saved"])) if saved}
