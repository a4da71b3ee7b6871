"""Synchronisation protocols: the paper's hardsync, n-softsync and async, and bounded staleness (SSP).

λ learners push gradients to the parameter server, which applies one update every c gradients:

* hardsync (SSGD): c = λ and learners wait for the new weights, so σ = 0 always;
* n-softsync: c = ⌊λ/n⌋ with 1 ≤ n ≤ λ, learners never wait, and the mean staleness ⟨σ⟩ ≈ n;
* async: the λ-softsync case, c = 1;
* ssp (stale-synchronous parallel, Ho et al., "More Effective Distributed ML via a Stale Synchronous Parallel
  Parameter Server", NIPS 2013): c = ⌊λ/n⌋ as for n-softsync, and a learner that has more than s accepted
  gradients beyond the slowest live learner waits before starting another (:class:`SpreadGate`). s = 0 with
  n = 1 (c = λ) gives σ = 0, like hardsync; a large s is n-softsync.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Optional

PROTOCOLS: tuple[str, ...] = ("hardsync", "softsync", "async", "ssp")


@dataclasses.dataclass(frozen=True)
class Protocol:
  """A protocol: ``name``, λ (``learners``), n (softsync and ssp), s (``max_spread``, ssp only) and the derived
  c and waiting rules."""

  name: str
  learners: int
  n: int
  max_spread: Optional[int] = None

  @property
  def gradients_per_update(self) -> int:
    """c: gradients the PS collects before one update (λ, ⌊λ/n⌋ or 1)."""
    return max(1, self.learners // self.n)

  @property
  def learners_wait(self) -> bool:
    """Whether a learner waits for the next version before computing again (hardsync only)."""
    return self.name == "hardsync"

  def gradients_for(self, live: int) -> int:
    """c for ``live`` learners: the one rule by which every executor re-derives c when learners die, leave or
    join (elastic membership). hardsync: c = live (σ stays 0); n-softsync and ssp: c = ⌊live / min(n, live)⌋
    (n capped at the live count), at least 1; async: c = 1 whatever the count. ``live`` = λ gives
    :attr:`gradients_per_update`.

    Raises ValueError for ``live`` < 1 (a run with no live learner has no c)."""
    if isinstance(live, bool) or not isinstance(live, int) or live < 1:
      raise ValueError(f"live={live!r} is invalid; allowed: an integer >= 1 (live learners)")
    if self.name == "hardsync":
      return live
    if self.name == "async":
      return 1
    return max(1, live // min(self.n, live))

  def with_learners(self, learners: int) -> "Protocol":
    """The same protocol for ``learners`` live learners (n capped at their number), e.g. after a death."""
    return dataclasses.replace(self, learners=learners, n=min(self.n, learners))

  @classmethod
  def hardsync(cls, learners: int) -> "Protocol":
    """SSGD: c = λ, learners wait; every gradient has σ = 0."""
    _check_learners(learners)
    return cls("hardsync", learners, 1)

  @classmethod
  def softsync(cls, learners: int, n: int) -> "Protocol":
    """n-softsync: c = ⌊λ/n⌋ gradients per update, learners never wait."""
    _check_learners(learners)
    _check_n("softsync", learners, n)
    return cls("softsync", learners, n)

  @classmethod
  def asynchronous(cls, learners: int) -> "Protocol":
    """async (λ-softsync): every gradient is applied alone, c = 1."""
    _check_learners(learners)
    return cls("async", learners, learners)

  @classmethod
  def bounded(cls, learners: int, n: int, max_spread: int) -> "Protocol":
    """SSP (Ho et al., 2013): c = ⌊λ/n⌋ as for n-softsync, and a learner more than s = ``max_spread`` accepted
    gradients ahead of the slowest live learner waits (:class:`SpreadGate`). s = 0 with n = 1 gives σ = 0."""
    _check_learners(learners)
    _check_n("ssp", learners, n)
    if isinstance(max_spread, bool) or not isinstance(max_spread, int) or max_spread < 0:
      raise ValueError(f"max_spread={max_spread!r} is invalid for ssp; allowed: an integer >= 0")
    return cls("ssp", learners, n, max_spread)

  @classmethod
  def from_name(cls, name: str, learners: int, n: int = 1, max_spread: int = 0) -> "Protocol":
    """Builds a protocol from config values (``protocol``, ``learners``, ``n``, ``ssp_spread``)."""
    if name == "hardsync":
      return cls.hardsync(learners)
    if name == "softsync":
      return cls.softsync(learners, n)
    if name == "async":
      return cls.asynchronous(learners)
    if name == "ssp":
      return cls.bounded(learners, n, max_spread)
    raise ValueError(f"unknown protocol {name!r}; allowed: {', '.join(PROTOCOLS)}")


class SpreadGate:
  """The SSP rule, in one place for every executor: learner k may start a gradient only while

      pushes_k − min over live learners l of pushes_l ≤ s,

  where pushes_k counts learner k's *accepted* gradients (those that count toward c; a gradient the PS drops,
  NaN/Inf or refused by the policy, contributed nothing to θ and is not counted, so its learner recomputes at
  once, as under hardsync). Pure bookkeeping, no threads: the PS side calls :meth:`start` once, then
  :meth:`pushed` for every push it processes and :meth:`died` for every death, and starts the learners each
  returns. The slowest live learner always may start, so every learner that waits is released by a push of
  the slowest or its death. s = 0 with c = λ is hardsync: each round, every learner pushes once and waits until
  the last push (which applies the update) releases them all on the new weights, σ = 0.

  Args:
    learners: λ.
    max_spread: s ≥ 0.
    counts: accepted pushes per learner so far (a resumed run: the PS's per-learner statistics).
    alive: the live learners (default all).
  """

  def __init__(self, learners: int, max_spread: int, counts: Optional[Iterable[int]] = None,
               alive: Optional[Iterable[int]] = None) -> None:
    self.max_spread = max_spread
    self.counts = list(counts) if counts is not None else [0] * learners
    self.alive = set(range(learners)) if alive is None else set(alive)
    self.waiting: set[int] = set()
    self.max_lead = 0    # the largest pushes_k − min at which a learner started (≤ s): ``ssp_max_spread``
    self.waits = 0       # how often a learner had to wait: ``ssp_waits``

  def lead(self, learner: int) -> int:
    """pushes_k − min over live learners of pushes."""
    return self.counts[learner] - min(self.counts[k] for k in self.alive)

  def may_start(self, learner: int) -> bool:
    """Whether learner k (alive) may start a gradient now."""
    return learner in self.alive and self.lead(learner) <= self.max_spread

  def start(self) -> list[int]:
    """At the start of a run: the live learners that may start; the others wait."""
    return self._admit(sorted(self.alive))

  def pushed(self, learner: int, accepted: bool = True) -> list[int]:
    """The PS processed learner k's push (counted if ``accepted``): the learners that start now (k itself
    unless it is now more than s ahead, and any waiting learner this released), in id order."""
    if accepted:
      self.counts[learner] += 1
    return self._admit(sorted(self.waiting | {learner}))

  def died(self, learner: int) -> list[int]:
    """Learner k died or left: it leaves the minimum; returns the waiting learners that start now."""
    self.alive.discard(learner)
    self.waiting.discard(learner)
    return self._admit(sorted(self.waiting)) if self.alive else []

  def joined(self, learner: int) -> list[int]:
    """Learner k joined (a new learner, or a replacement in a dead learner's slot): its count starts at the
    current minimum over the live learners (0 when none is live), so it neither holds the others back (it is
    not below the minimum) nor waits for them (its lead is 0 ≤ s). Returns the learners that start now (k)."""
    while len(self.counts) <= learner:
      self.counts.append(0)
    self.counts[learner] = min((self.counts[k] for k in self.alive), default=0)
    self.alive.add(learner)
    self.waiting.discard(learner)
    return self._admit([learner])

  def _admit(self, candidates: list[int]) -> list[int]:
    started = []
    for k in candidates:
      if self.may_start(k):
        self.max_lead = max(self.max_lead, self.lead(k))
        self.waiting.discard(k)
        started.append(k)
      elif k in self.alive and k not in self.waiting:
        self.waiting.add(k)
        self.waits += 1
    return started

  def telemetry(self) -> dict:
    return {"ssp_spread": self.max_spread, "ssp_max_spread": self.max_lead, "ssp_waits": self.waits}

  def to_json(self) -> dict:
    return {"max_lead": self.max_lead, "waits": self.waits}

  def restore(self, saved: dict) -> None:
    self.max_lead, self.waits = int(saved.get("max_lead", 0)), int(saved.get("waits", 0))


def _check_learners(learners: int) -> None:
  if isinstance(learners, bool) or not isinstance(learners, int) or learners < 1:
    raise ValueError(f"learners={learners!r} is invalid; allowed: an integer >= 1")


def _check_n(name: str, learners: int, n: int) -> None:
  if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= learners:
    raise ValueError(f"n={n!r} is out of range for {name} with {learners} learners; allowed: 1 <= n <= {learners}")
