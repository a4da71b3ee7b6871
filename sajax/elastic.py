"""Elastic learners: the config keys that let learners leave and join a running job, and their schedule.

The paper's λ learners are a fixed set; here λ (``learners``) is the set a run starts with, and learners may
leave (die, be removed, an event) or join (be added, an event, or replace a dead one) while it runs. The parameter
server re-derives c from the live set on every change by the protocol's one rule
(:meth:`sajax.Protocol.gradients_for`: hardsync c = live, n-softsync and ssp ⌊live / min(n, live)⌋, async 1);
the executors only report the changes (:class:`sajax.executors.common.Membership`). The keys:

* ``elastic_min_learners`` (default 1): the run goes on while at least this many learners are live; a leave or
  death below it ends the run with one line (exit 4), as every learner dying always did.
* ``elastic_max_learners`` (default 0, meaning λ): learner ids are 0..max−1; a join takes a free id below it.
* ``elastic_replace`` (default False): a learner that dies is replaced at once by a fresh learner in its slot
  (same id, its data stream going on, no inner-optimizer state); otherwise the run goes on without it.
* ``elastic_events`` (default ``""``): scheduled leaves and joins, e.g.
  ``"leave 4-7 at run 1/3; join 4-7 at run 2/3"``: ``leave`` or ``join``, learner ids (``3``, ``4-7``, ``1,5``),
  ``at run F`` (F a fraction of the run's updates, ``1/3`` or ``0.5``) or ``at update U``. An event takes effect
  right after the update it names (fractions are rounded to the nearest update, at least 1). Read by the
  simulated, threads and ray executors; mpi reads its leaves (each rank applies those of its learners).

This module parses and checks them (``ValueError`` naming the bad value and what is allowed; the CLI turns it
into one line and exit 2 before anything is written). Pure: no JAX, no threads.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any, Mapping, NamedTuple

KEYS: Mapping[str, tuple[type, ...]] = {
    "elastic_min_learners": (int,), "elastic_max_learners": (int,), "elastic_replace": (bool,),
    "elastic_events": (str,),
}
ABSENT_MEANS: Mapping[str, Any] = {"elastic_min_learners": 1, "elastic_max_learners": 0, "elastic_replace": False,
                                   "elastic_events": ""}
EVENT_EXECUTORS: tuple[str, ...] = ("simulated", "threads", "ray")
"""Executors that read ``elastic_events`` (MPI's learners are spread over ranks; pmap has no parameter server)."""

_EVENT = re.compile(r"^\s*(leave|join)\s+([0-9][0-9,\- ]*?)\s+at\s+(run|update)\s+([0-9./]+)\s*$")
_EVENT_FORM = "'leave|join IDS at run F|update U' separated by ';', e.g. 'leave 4-7 at run 1/3; join 4-7 at run 2/3'"


class Event(NamedTuple):
  """One scheduled change: ``kind`` ('leave' or 'join') of ``learners`` at ``at`` (a fraction of the run when
  ``unit`` is 'run', an update number when 'update')."""

  kind: str
  learners: tuple[int, ...]
  unit: str
  at: float

  def update(self, total_updates: int) -> int:
    """The update after which the event takes effect (a fraction: rounded, at least 1)."""
    if self.unit == "update":
      return int(self.at)
    return max(1, int(round(self.at * total_updates)))


def _ids(text: str, event: str) -> tuple[int, ...]:
  ids: list[int] = []
  for part in text.replace(" ", "").split(","):
    m = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", part)
    if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
      raise ValueError(f"config.elastic_events: learner ids {text.strip()!r} in {event.strip()!r} are invalid; "
                       "allowed: ids like 3, 4-7 or 1,5")
    last = int(m.group(2)) if m.group(2) is not None else int(m.group(1))
    ids.extend(range(int(m.group(1)), last + 1))
  return tuple(dict.fromkeys(ids))


def parse_events(text: str) -> list[Event]:
  """The events of an ``elastic_events`` string, in its order; raises ValueError (one line) for a bad one."""
  events = []
  for part in [p for p in text.split(";") if p.strip()]:
    m = _EVENT.match(part)
    if not m:
      raise ValueError(f"config.elastic_events: {part.strip()!r} is invalid; allowed: {_EVENT_FORM}")
    kind, ids, unit, at = m.groups()
    try:
      value = float(Fraction(at))
    except (ValueError, ZeroDivisionError):
      value = -1.0
    if unit == "run" and not 0 < value <= 1:
      raise ValueError(f"config.elastic_events: 'at run {at}' in {part.strip()!r} is invalid; allowed: a fraction "
                       "0 < F <= 1 of the run, e.g. 1/3 or 0.5")
    if unit == "update" and not (value >= 1 and value == int(value)):
      raise ValueError(f"config.elastic_events: 'at update {at}' in {part.strip()!r} is invalid; allowed: an "
                       "update number >= 1")
    events.append(Event(kind, _ids(ids, part), unit, value))
  return events


def max_learners(values: Mapping[str, Any]) -> int:
  """The number of learner slots (ids 0..max−1): ``elastic_max_learners``, or λ when it is 0 (absent)."""
  return int(values.get("elastic_max_learners", 0)) or int(values["learners"])


def check(values: Mapping[str, Any]) -> None:
  """Checks the ``elastic_*`` keys of a config (its values as a dict, types already checked); raises ValueError
  naming the bad value and what is allowed."""
  learners = values["learners"]
  top = values.get("elastic_max_learners", 0)
  if top != 0 and top < learners:
    raise ValueError(f"config.elastic_max_learners={top!r} is invalid; allowed: 0 (λ = {learners}) or an integer "
                     f">= {learners} (learner ids a join may take; the run starts with λ)")
  least = values.get("elastic_min_learners", 1)
  if not 1 <= least <= learners:
    raise ValueError(f"config.elastic_min_learners={least!r} is invalid; allowed: 1..{learners} (the run goes on "
                     "while at least this many learners are live)")
  slots = max_learners(values)
  elastic = bool(values.get("elastic_replace", False) or top
                 or (values.get("elastic_events", "") and values["executor"] != "mpi"))
  if elastic and values["executor"] not in EVENT_EXECUTORS:
    raise ValueError(f"elastic_max_learners, elastic_replace and elastic_events are read by executors "
                     f"{', '.join(EVENT_EXECUTORS)} (mpi: elastic_events leaves only); allowed with executor "
                     f"{values['executor']!r}: their defaults (0, False, '')")
  events = parse_events(values.get("elastic_events", ""))
  if values["executor"] == "mpi" and any(e.kind == "join" for e in events):
    raise ValueError(f"config.elastic_events={values['elastic_events']!r} has a join, which executor 'mpi' does not "
                     "have (its learners are spread over the ranks at the start); allowed with mpi: leaves only")
  for event in events:
    bad = [k for k in event.learners if k >= slots]
    if bad:
      raise ValueError(f"config.elastic_events: learner {bad[0]} of {event.kind} is invalid; allowed: ids "
                       f"0..{slots - 1} (elastic_max_learners = {slots})")


def schedule(events: list[Event], total_updates: int) -> list[tuple[int, str, tuple[int, ...]]]:
  """``(update, kind, learners)`` of each event, ordered by update (events of one update in the string's
  order): what an executor applies right after that update."""
  timed = [(e.update(total_updates), i, e) for i, e in enumerate(events)]
  return [(u, e.kind, e.learners) for u, _, e in sorted(timed)]


def due(pending: list[tuple[int, str, tuple[int, ...]]], updates: int) -> list[tuple[str, tuple[int, ...]]]:
  """Removes from ``pending`` (a :func:`schedule`, consumed in place) the events due once ``updates`` updates are
  applied, and returns them as ``(kind, learners)`` in order."""
  out = []
  while pending and pending[0][0] <= updates:
    _, kind, learners = pending.pop(0)
    out.append((kind, learners))
  return out


def run_schedule(config: Any, total_updates: int, updates_done: int) -> list[tuple[int, str, tuple[int, ...]]]:
  """The run's ``elastic_events`` as a :func:`schedule`, without those a resumed run already applied (at or
  before ``updates_done``: its checkpoint's membership holds them)."""
  events = schedule(parse_events(config.get("elastic_events", "")), total_updates)
  return [e for e in events if e[0] > updates_done]
