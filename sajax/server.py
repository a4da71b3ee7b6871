"""The parameter-server core: plain single-threaded logic that every executor drives.

The PS holds weights θ with a timestamp (version) i. A learner pulls ``(j, θ_j)``, computes a gradient and
pushes ``(j, g)``; the PS gives it staleness σ = i − j, buffers it, and once it holds c gradients
(``protocol.gradients_per_update``) applies them all in one jit-compiled update through the staleness-aware
optax transform — (1/c) Σ s(σ_l) g_l through the base optimizer — and increments i. A gradient with a NaN or
Inf is dropped, counted, and does not count toward c; a long enough run of them in a row is divergence
(:class:`DivergenceError`). For a scale policy the PS keeps one running sum per update, not c gradients. Nothing here has threads or queues: executors own
concurrency, so the staleness bookkeeping can be checked exactly by driving the PS from a plain loop.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from sajax.optim import get_policy, remember_policy, same_policy, transform_policy
from sajax.protocol import Protocol
from sajax.stats import StalenessStats
from sajax.steps import jit_once, one_per_process

PyTree = Any


class PushResult(NamedTuple):
  """What happened to one pushed gradient."""

  applied_update: bool   # this push completed a set of c gradients and the PS applied an update
  staleness: int         # σ = i − j at the PS when it arrived
  dropped: bool          # it was dropped (not buffered, not counted toward c): NaN/Inf, or too stale
  stale: bool = False    # dropped because the policy does not accept its σ (e.g. ``drop``: σ ≥ R)


def all_finite(tree: PyTree) -> jax.Array:
  """A scalar bool array: whether every element of every leaf is finite (no NaN, no Inf)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


all_finite_jit = jax.jit(all_finite)


@jax.jit
def _copy(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def _private_copy(tree: PyTree, device: jax.Device) -> PyTree:
  """A copy of ``tree`` on ``device`` that aliases no buffer of the caller's (one compiled program for the whole
  tree, not one per leaf shape: every program costs a process tracing and lowering it, or loading it)."""
  return _copy(jax.device_put(tree, device))


@one_per_process
def flat_transform(tx: optax.GradientTransformationExtraArgs, unravel: Any
                   ) -> optax.GradientTransformationExtraArgs:
  """``tx`` acting on flat parameter vectors (from ``jax.flatten_util.ravel_pytree``).

  Executors move weights and gradients as one contiguous vector (one transfer instead of one per leaf); the
  optimizer itself still sees the model's pytree, so per-leaf transforms behave as usual. Updates may be a
  vector (d,) or c stacked vectors (c, d); ``stale_params`` likewise.
  """
  def to_tree(x):
    return None if x is None else (jax.vmap(unravel)(x) if x.ndim == 2 else unravel(x))

  def init_fn(flat_params):
    return tx.init(unravel(flat_params))

  def update_fn(updates, state, params=None, **extra_args):
    if "stale_params" in extra_args:
      extra_args["stale_params"] = to_tree(extra_args["stale_params"])
    new_updates, state = tx.update(to_tree(updates), state, to_tree(params), **extra_args)
    return ravel_pytree(new_updates)[0], state

  remember_policy(update_fn, transform_policy(tx))
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@one_per_process
def _make_apply(tx: optax.GradientTransformationExtraArgs):
  """``apply(params, opt_state, grads_list, staleness, stale_list) -> (params, opt_state)``: one PS update of
  c gradients kept one by one (policies that adjust each gradient, or a tx whose policy the PS does not know)."""

  def apply(params, opt_state, grads_list, staleness, stale_params_list):
    stacked = jax.tree.map(lambda *g: jnp.stack(g), *grads_list)
    stale = None if stale_params_list is None else jax.tree.map(lambda *p: jnp.stack(p), *stale_params_list)
    updates, opt_state = tx.update(stacked, opt_state, params, staleness=staleness, stale_params=stale)
    return optax.apply_updates(params, updates), opt_state

  return jax.jit(apply, donate_argnums=(1,))


@one_per_process
def _make_apply_combined(tx: optax.GradientTransformationExtraArgs):
  """``apply(params, opt_state, total, count, staleness)``: one PS update from the running sum
  Σ_l s(σ_l)·g_l of ``count`` (= c) gradients, handed to ``tx`` as (1/c)·Σ with ``combined=True``."""

  def apply(params, opt_state, total, count, staleness):
    mean = jax.tree.map(lambda t: t / count.astype(t.dtype), total)
    updates, opt_state = tx.update(mean, opt_state, params, staleness=staleness, combined=True)
    return optax.apply_updates(params, updates), opt_state

  return jax.jit(apply, donate_argnums=(1, 2))


@one_per_process
def _make_accumulate(scale: Any):
  """``(total, g, σ) -> total + s(σ)·g`` (``total`` None for the first gradient of an update), compiled."""
  first = jax.jit(lambda g, sigma: jax.tree.map(lambda x: x * scale(sigma).astype(x.dtype), g))
  add = jax.jit(lambda total, g, sigma: jax.tree.map(lambda t, x: t + x * scale(sigma).astype(x.dtype), total, g),
                donate_argnums=0)
  return lambda total, g, sigma: first(g, sigma) if total is None else add(total, g, sigma)


def _policy_of(tx: optax.GradientTransformation, policy: Any) -> Any:
  """The PS's policy: ``policy`` or, when None, ``tx``'s own; raises ValueError when the two differ."""
  own = transform_policy(tx)
  if policy is None:
    return own
  policy = get_policy(policy)
  if own is not None and not same_policy(policy, own):
    raise ValueError(f"policy={policy.name!r} {dict(policy.args)} differs from the policy tx was built with "
                     f"({own.name!r} {dict(own.args)}); allowed: the same policy, or no policy= (the PS takes tx's)")
  return policy


DEFAULT_DIVERGENCE_AFTER = 100
"""Consecutive non-finite gradients after which a run counts as diverged. A healthy run drops a non-finite
gradient rarely and never many in a row; a diverged one (α0 far too large) drops every gradient."""


class DivergenceError(RuntimeError):
  """``divergence_after`` consecutive gradients were non-finite: the run diverged (θ stays the last finite one,
  since a non-finite gradient is never applied)."""

  def __init__(self, update: int, count: int, checkpoint: Optional[str] = None) -> None:
    self.update, self.count, self.checkpoint = update, count, checkpoint
    where = f"; newest checkpoint: {checkpoint}" if checkpoint else "; no checkpoint was saved"
    super().__init__(f"diverged: {count} consecutive non-finite gradients at update {update}{where}")


class ParameterServer:
  """The PS core: ``pull`` / ``push`` / ``version`` / ``stats``, and its state for checkpoints.

  Args:
    params: initial weights θ_0 (a pytree of arrays).
    tx: the optimizer, normally ``sajax.staleness_aware(base, policy)``; its ``update`` must accept
      ``staleness=`` (an int vector of length c) and ``stale_params=``.
    protocol: the :class:`~sajax.Protocol` (gives c and whether learners wait).
    device: where θ lives and updates run (default: the first local device).
    policy: the staleness policy ``tx`` was built with; default: the policy of a ``tx`` built by
      :func:`~sajax.staleness_aware` (:func:`~sajax.optim.transform_policy`), and a different one given here is
      refused. The PS asks it whether to accept each σ (``drop`` refuses σ ≥ R before the gradient counts toward
      c). For a scale policy s(σ) the PS keeps only the running sum Σ s(σ_l)·g_l of the current update (O(d)
      memory, like ``optax.MultiSteps``) and hands it to ``tx`` with ``combined=True``; for a policy that reads
      θ_j it keeps each gradient and a reference to its θ_j until the update. For a ``tx`` whose policy is not
      visible (a ``staleness_aware`` inside an ``optax.chain``) and no ``policy``, the c gradients are kept and
      handed to ``tx`` stacked, and every finite gradient counts toward c: pass ``policy=`` for such a ``tx``.
    divergence_after: consecutive non-finite pushes after which :meth:`push` raises :class:`DivergenceError`.
  """

  def __init__(self, params: PyTree, tx: optax.GradientTransformationExtraArgs, protocol: Protocol, *,
               device: Optional[jax.Device] = None, policy: Any = None,
               divergence_after: int = DEFAULT_DIVERGENCE_AFTER) -> None:
    if isinstance(divergence_after, bool) or not isinstance(divergence_after, int) or divergence_after < 1:
      raise ValueError(f"divergence_after={divergence_after!r} is invalid; allowed: an integer >= 1")
    self.protocol = protocol
    self.device = device or jax.local_devices()[0]
    self.params = jax.device_put(params, self.device)
    # The optimizer state is donated to each update: never an alias of the caller's arrays. A compiled init's
    # outputs are new buffers (XLA aliases an input to an output only when it is donated). They are committed to
    # θ's device here, as every update's outputs are: jit leaves uncommitted the leaves that do not depend on
    # θ's values, which made the first update a program of its own, compiled again at the second.
    self.opt_state = jax.device_put(jit_once(tx.init)(self.params), self.device)
    self.version = 0
    self.stats = StalenessStats()
    self.gradients_per_update = protocol.gradients_per_update
    self.divergence_after = divergence_after
    self.nonfinite_streak = 0                                 # consecutive non-finite pushes
    self.policy = _policy_of(tx, policy)
    self._needs_stale = self.policy is not None and self.policy.needs_stale_params
    self._running = (self.policy is not None and self.policy.scale is not None and not self._needs_stale
                     and not self.policy.stateful)
    if self._running:
      self._accumulate = _make_accumulate(self.policy.scale)
      self._apply_combined = _make_apply_combined(tx)
    else:
      self._apply = _make_apply(tx)
    self._staleness: list[int] = []                          # σ of each gradient of the current update
    self._total: PyTree = None                               # Σ s(σ_l)·g_l (scale policies)
    self._buffer: list[PyTree] = []                          # the gradients themselves (other policies)
    self._stale_buffer: list[PyTree] = []
    self._snapshots: dict[int, PyTree] = {}                  # version -> θ_j, only for policies that read θ_j
    self._snapshot_readers: dict[int, int] = {}

  # ---- the learner-facing API ----------------------------------------------------------------------
  def pull(self, learner: Optional[int] = None) -> tuple[int, PyTree]:
    """``(version j, θ_j)``. No copy: JAX arrays are immutable, so this is a reference to version j.

    For a policy that reads θ_j, ``learner=k`` registers the snapshot so that the push can find it (callers
    that pass ``stale_params=`` to :meth:`push` themselves need not).
    """
    version, params = self.version, self.params
    if self._needs_stale and learner is not None:
      self._snapshots[version] = params
      self._snapshot_readers[version] = self._snapshot_readers.get(version, 0) + 1
    return version, params

  def push(self, learner: int, version: int, grads: PyTree, *, finite: Optional[bool] = None,
           stale_params: PyTree = None) -> PushResult:
    """Accepts learner ``learner``'s gradient computed on version ``version``.

    ``finite`` may be given when the caller already checked the gradient for NaN/Inf (e.g. on the learner's
    device); otherwise the PS checks it, which waits for the gradient to be computed. ``stale_params`` is θ_j
    (a reference) for policies that read it, when the learner did not register it with ``pull(learner=)``.
    A non-finite gradient is dropped and counted; the ``divergence_after``-th in a row raises
    :class:`DivergenceError`. A finite gradient whose σ the policy does not accept (``policy.accepts``) is
    dropped and counted apart (``stats.stale_dropped``). Neither counts toward c.
    """
    if not 0 <= version <= self.version:
      raise ValueError(f"version={version!r} is invalid; allowed: 0 <= version <= {self.version} (the PS version)")
    staleness = self.version - version
    if self._needs_stale:
      stale_params = self._release_snapshot(version, given=stale_params)
    if finite is None:
      finite = bool(all_finite_jit(grads))
    if not finite:
      self.stats.record_dropped(learner)
      self.nonfinite_streak += 1
      if self.nonfinite_streak >= self.divergence_after:
        raise DivergenceError(self.version, self.nonfinite_streak)
      return PushResult(applied_update=False, staleness=staleness, dropped=True)
    self.nonfinite_streak = 0
    if self.policy is not None and not self.policy.accepts(staleness):
      self.stats.record_stale_dropped(learner)
      return PushResult(applied_update=False, staleness=staleness, dropped=True, stale=True)
    self.stats.record(learner, staleness)
    grads = jax.device_put(grads, self.device)
    if self._running:
      self._total = self._accumulate(self._total, grads, np.int32(staleness))
    else:
      self._buffer.append(grads)
      if self._needs_stale:
        self._stale_buffer.append(stale_params)
    self._staleness.append(staleness)
    if len(self._staleness) >= self.gradients_per_update:
      self._apply_pending()
      return PushResult(applied_update=True, staleness=staleness, dropped=False)
    return PushResult(applied_update=False, staleness=staleness, dropped=False)

  def set_gradients_per_update(self, c: int) -> bool:
    """Changes c (e.g. re-derived from the learners still alive); applies at once if ≥ c are buffered."""
    if c < 1:
      raise ValueError(f"gradients_per_update={c!r} is invalid; allowed: an integer >= 1")
    self.gradients_per_update = c
    if len(self._staleness) >= c:
      self._apply_pending()
      return True
    return False

  def set_live_learners(self, live: int) -> bool:
    """Re-derives c for ``live`` live learners (a death, a leave or a join) by the protocol's one rule,
    :meth:`~sajax.Protocol.gradients_for`; applies at once if ≥ c are buffered (under hardsync a learner that
    left mid-round: the round completes with the live learners' gradients, all with σ = 0). Returns whether
    that applied an update."""
    return self.set_gradients_per_update(self.protocol.gradients_for(live))

  @property
  def buffered(self) -> int:
    """Gradients waiting for the next update."""
    return len(self._staleness)

  @property
  def needs_stale_params(self) -> bool:
    """Whether the policy reads θ_j, so the PS keeps each pulled version until its gradient is applied."""
    return self._needs_stale

  def snapshot(self, version: int) -> PyTree:
    """θ_j of a version a learner holds (only kept for policies that read it, see :attr:`needs_stale_params`)."""
    if version == self.version:
      return self.params
    if version not in self._snapshots:
      raise ValueError(f"no snapshot of version {version} is held; allowed: versions pulled and not yet pushed")
    return self._snapshots[version]

  def hold_snapshot(self, version: int, params: PyTree) -> None:
    """Registers θ_j for one more learner holding ``version`` (e.g. an in-flight learner restored from a
    checkpoint), as :meth:`pull` does."""
    if not self._needs_stale:
      return
    self._snapshots.setdefault(version, params)
    self._snapshot_readers[version] = self._snapshot_readers.get(version, 0) + 1

  def release(self, version: int) -> None:
    """Forgets one reader of θ_j registered by ``pull(learner=)`` whose gradient will never come (a learner
    that died holding it)."""
    if self._needs_stale and version in self._snapshot_readers:
      self._release_snapshot(version, given=self.params)

  # ---- internals -------------------------------------------------------------------------------------
  def _release_snapshot(self, version: int, given: PyTree = None) -> PyTree:
    params = self._snapshots.get(version, self.params if version == self.version else None)
    if version in self._snapshot_readers:
      self._snapshot_readers[version] -= 1
      if self._snapshot_readers[version] == 0:
        del self._snapshot_readers[version]
        self._snapshots.pop(version, None)
    if given is not None:
      return given
    if params is None:
      raise ValueError(f"no snapshot of version {version} is held; pull(learner=...) before pushing, or pass "
                       "stale_params=")
    return params

  def _apply_pending(self) -> None:
    staleness = np.array(self._staleness, np.int32)
    if self._running:
      count = np.float32(len(self._staleness))
      self.params, self.opt_state = self._apply_combined(self.params, self.opt_state, self._total, count, staleness)
    else:
      stale = list(self._stale_buffer) if self._needs_stale else None
      self.params, self.opt_state = self._apply(self.params, self.opt_state, self._buffer, staleness, stale)
    self.version += 1
    self._staleness, self._total, self._buffer, self._stale_buffer = [], None, [], []

  # ---- checkpoints -----------------------------------------------------------------------------------
  def state_arrays(self) -> dict:
    """The array part of the PS state for an orbax checkpoint: θ, the optimizer state, and the gradients
    buffered toward the next update (:meth:`pending_arrays`)."""
    return {"params": self.params, "opt_state": self.opt_state, **self.pending_arrays()}

  def pending_arrays(self) -> dict:
    """The gradients accepted toward the next update (fewer than c) as flat float32 numpy arrays, empty when
    none is: ``pending_total`` (d,), the running sum Σ s(σ_l)·g_l of a scale policy, or ``pending_grads`` (b, d)
    and, for a policy that reads θ_j, ``pending_stale_params`` (b, d). Their σ are in :meth:`state_meta`. They
    are saved because they are already counted in :attr:`stats` (and so in the SSP gate's counts) and their
    mini-batches already drawn: a resumed run applies them in the next update, as the uninterrupted one would."""
    if not self._staleness:
      return {}
    flat = lambda tree: np.asarray(ravel_pytree(tree)[0], np.float32)  # noqa: E731
    if self._running:
      return {"pending_total": flat(self._total)}
    arrays = {"pending_grads": np.stack([flat(g) for g in self._buffer])}
    if self._needs_stale:
      arrays["pending_stale_params"] = np.stack([flat(p) for p in self._stale_buffer])
    return arrays

  def state_meta(self) -> dict:
    """The JSON part: version, c, staleness statistics, and the σ of the buffered gradients."""
    return {"version": self.version, "gradients_per_update": self.gradients_per_update,
            "stats": self.stats.to_json(), "nonfinite_streak": self.nonfinite_streak,
            "pending_staleness": list(self._staleness)}

  def restore(self, arrays: dict, meta: dict) -> None:
    """Restores a state saved by :meth:`state_arrays` (``params``, ``opt_state``, any ``pending_*``) and
    :meth:`state_meta`."""
    self.params = jax.device_put(arrays["params"], self.device)
    self.opt_state = _private_copy(arrays["opt_state"], self.device)
    self.version = int(meta["version"])
    self.gradients_per_update = int(meta["gradients_per_update"])
    self.stats = StalenessStats.from_json(meta["stats"])
    self.nonfinite_streak = int(meta.get("nonfinite_streak", 0))
    self._staleness, self._total, self._buffer, self._stale_buffer = [], None, [], []
    self._snapshots, self._snapshot_readers = {}, {}
    pending = [int(s) for s in meta.get("pending_staleness", [])]
    if not pending:
      return
    unravel = ravel_pytree(self.params)[1]
    tree = lambda v: jax.device_put(unravel(jnp.asarray(v)), self.device)  # noqa: E731
    if self._running:
      self._total = tree(arrays["pending_total"])
    else:
      self._buffer = [tree(g) for g in arrays["pending_grads"]]
      if self._needs_stale:
        self._stale_buffer = [tree(p) for p in arrays["pending_stale_params"]]
    self._staleness = pending
