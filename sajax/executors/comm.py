"""Communication for the simulated clock: the seconds each pull and push of the d parameters takes, and the
bytes they move.

A message (one pull of θ_j, PS → learner, or one push of g, learner → PS) carries the d parameters, M bytes
(M = 4·d in float32: the sum of the parameters' sizes in their own dtypes). Each learner has its own link to
the PS, of ``bandwidth`` B bytes per simulated second and ``latency`` L seconds per message; the PS side is
not a bottleneck, so transfers of different learners overlap. A message takes

    τ = L + M / B        (M / B = 0 when B = 0: communication is free, as it was before these keys)

and one learner's cycle, pull → compute → push, lasts ``duration + 2τ``: the learner asks at t, the PS hands
it θ_j of the version it holds at t, and the push reaches the PS at t + duration + 2τ, where ``duration`` is
:meth:`~sajax.executors.speed.SpeedModel.duration`, (``push_time`` + compute time × factor) × the learner's
random factors. τ is not scaled by those factors (a link's speed is not the learner's), and ``push_time``
keeps its meaning: a fixed per-gradient cost inside ``duration`` (the PS update, say); with B and L set it
need not stand for communication any more. Staleness counts the updates applied during the whole cycle,
transfers included.

Bytes: every pull and every push moves M bytes, a dropped (non-finite or too stale) gradient included (it was
sent); a learner that raised instead of pushing sent nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from sajax.stats import StalenessStats


def tree_bytes(tree: Any) -> int:
  """M: the bytes of one copy of ``tree`` (a push of g or a pull of θ_j), Σ size × itemsize over its leaves."""
  return sum(int(np.size(x)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@dataclasses.dataclass(frozen=True)
class CommModel:
  """Seconds and bytes of the simulated messages (see the module docstring)."""

  message_bytes: int = 0       # M, the bytes of one pull or one push
  bandwidth: float = 0.0       # B, bytes per simulated second on a learner's link (0: free)
  latency: float = 0.0         # L, seconds per message

  @classmethod
  def from_config(cls, config: Any, params: Any) -> "CommModel":
    """The model of ``sim_bandwidth`` and ``sim_latency`` for messages the size of ``params``."""
    return cls(message_bytes=tree_bytes(params), bandwidth=float(config.get("sim_bandwidth", 0.0)),
               latency=float(config.get("sim_latency", 0.0)))

  @property
  def message_time(self) -> float:
    """τ = L + M / B: the seconds of one pull or one push (L when B = 0)."""
    return self.latency + (self.message_bytes / self.bandwidth if self.bandwidth else 0.0)

  @property
  def cycle_time(self) -> float:
    """2τ: what one pull and one push add to a learner's time per gradient."""
    return 2 * self.message_time

  def telemetry(self, stats: StalenessStats, *, died: int, in_flight: int) -> dict:
    """``bytes_pushed``, ``bytes_pulled`` and their sum ``bytes_moved`` so far, counted from the PS's
    statistics (so a resumed run goes on from its checkpoint's): every push is accepted or dropped, and every
    pull was followed by a push, by the learner's death (``died``), or is still ``in_flight`` (learners
    holding a version now)."""
    pushes = stats.count + stats.dropped + stats.stale_dropped
    pulls = pushes + died + in_flight
    pushed, pulled = pushes * self.message_bytes, pulls * self.message_bytes
    return {"bytes_pushed": pushed, "bytes_pulled": pulled, "bytes_moved": pushed + pulled}
