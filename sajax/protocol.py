"""Synchronisation protocols of the paper: hardsync, n-softsync and async.

λ learners push gradients to the parameter server, which applies one update every c gradients:

* hardsync (SSGD): c = λ and learners wait for the new weights, so σ = 0 always;
* n-softsync: c = ⌊λ/n⌋ with 1 ≤ n ≤ λ, learners never wait, and the mean staleness ⟨σ⟩ ≈ n;
* async: the λ-softsync case, c = 1.
"""

from __future__ import annotations

import dataclasses

PROTOCOLS: tuple[str, ...] = ("hardsync", "softsync", "async")


@dataclasses.dataclass(frozen=True)
class Protocol:
  """A protocol: ``name``, λ (``learners``), n (softsync only) and the derived c and waiting rule."""

  name: str
  learners: int
  n: int

  @property
  def gradients_per_update(self) -> int:
    """c: gradients the PS collects before one update (λ, ⌊λ/n⌋ or 1)."""
    return max(1, self.learners // self.n)

  @property
  def learners_wait(self) -> bool:
    """Whether a learner waits for the next version before computing again (hardsync only)."""
    return self.name == "hardsync"

  @classmethod
  def hardsync(cls, learners: int) -> "Protocol":
    """SSGD: c = λ, learners wait; every gradient has σ = 0."""
    _check_learners(learners)
    return cls("hardsync", learners, 1)

  @classmethod
  def softsync(cls, learners: int, n: int) -> "Protocol":
    """n-softsync: c = ⌊λ/n⌋ gradients per update, learners never wait."""
    _check_learners(learners)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= learners:
      raise ValueError(f"n={n!r} is out of range for softsync with {learners} learners; allowed: 1 <= n <= {learners}")
    return cls("softsync", learners, n)

  @classmethod
  def asynchronous(cls, learners: int) -> "Protocol":
    """async (λ-softsync): every gradient is applied alone, c = 1."""
    _check_learners(learners)
    return cls("async", learners, learners)

  @classmethod
  def from_name(cls, name: str, learners: int, n: int = 1) -> "Protocol":
    """Builds a protocol from config values (``protocol``, ``learners``, ``n``)."""
    if name == "hardsync":
      return cls.hardsync(learners)
    if name == "softsync":
      return cls.softsync(learners, n)
    if name == "async":
      return cls.asynchronous(learners)
    raise ValueError(f"unknown protocol {name!r}; allowed: {', '.join(PROTOCOLS)}")


def _check_learners(learners: int) -> None:
  if isinstance(learners, bool) or not isinstance(learners, int) or learners < 1:
    raise ValueError(f"learners={learners!r} is invalid; allowed: an integer >= 1")
