"""The MPI executor's wire format: one message = a fixed 40-byte header + a raw contiguous payload, never pickled.

    header (little-endian): magic u4 | kind u4 | learner i8 | version i8 | value f8 | length i8
    payload: ``length`` float32 (a flat gradient g or flat weights θ_j, from ``ravel_pytree``) or UTF-8 bytes
    (an error text, or the JSON sampler states of a rank's learners)

A push carries learner k, the version j its gradient was computed on and its training loss (``value``); a
weights message carries version i and θ_i; a permission (ssp) carries learner k, the version i it starts on
at the earliest and its serial number (``value``: 1, 2, … per learner, so a resent one is recognised); a draw
carries learner k and the step s it just drew (``value``), so rank 0 checkpoints k's stream past it.
Everything here is pure: :func:`encode` builds the byte buffer,
:func:`decode` checks a received one (size, magic, kind, length, learner range, version, a count that is a whole
number) and raises :class:`WireError` naming what is wrong, so a malformed or truncated message is rejected,
never applied; :func:`check_weights_version` is the rule a rank checks a weights version against.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np

MAGIC = 0x584A4153            # b"SAJX" read as a little-endian u4
HEADER = np.dtype([("magic", "<u4"), ("kind", "<u4"), ("learner", "<i8"), ("version", "<i8"), ("value", "<f8"),
                   ("length", "<i8")])
HEADER_BYTES = HEADER.itemsize  # 40

# kinds: learners -> PS
PUSH = 1      # learner k's gradient g computed on version j; value = its loss
DEATH = 2     # learner k raised; payload = UTF-8 error text
FAIL = 3      # the whole rank failed; payload = UTF-8 error text (rank 0 then ends the job)
DONE = 4      # the rank has stopped; nothing more will come from it
READY = 5     # the rank has its weights and has compiled its gradient step
RESEND = 6    # the rank rejected the weights it was sent (malformed): send them again
DRAW = 7      # learner k drew its step s (value = s): rank 0's copy of k's stream is past s from now on
LEAVE = 8     # learner k left (elastic_events), after its last push; payload = UTF-8 reason
# kinds: PS -> learners
WEIGHTS = 11  # θ_i with version i
STOP = 12     # stop learning; value = 1.0 when the run was interrupted (Ctrl-C), 0.0 when finished
SETUP = 13    # first message to a rank: its learners' sampler states as UTF-8 JSON (rank 0 restored them)
START = 14    # every rank is READY: start the learners
PERMIT = 15   # ssp: learner k may start one gradient, on weights of this version or newer; value = k's serial
ALIVE = 16    # rank 0 is alive: sent to a rank that was sent nothing for mpi_timeout_s / 4 (it stops waiting after)
KINDS = {PUSH: "push", DEATH: "death", FAIL: "fail", DONE: "done", READY: "ready", RESEND: "resend", DRAW: "draw",
         LEAVE: "leave",
         WEIGHTS: "weights", STOP: "stop", SETUP: "setup", START: "start", PERMIT: "permit", ALIVE: "alive"}
FLOAT_KINDS = frozenset({PUSH, WEIGHTS})
TEXT_KINDS = frozenset({DEATH, FAIL, SETUP, LEAVE})
LEARNER_KINDS = frozenset({PUSH, DEATH, PERMIT, DRAW, LEAVE})
COUNT_KINDS = {PERMIT: 1, DRAW: 0}   # kinds whose value is a count (a serial, a step): the smallest allowed
MAX_COUNT = 2 ** 53                   # the largest whole number a float64 holds exactly

# MPI tags: one per direction (the kind is in the header).
TAG_TO_SERVER = 7001
TAG_TO_LEARNERS = 7002
TAG_EXIT = 7003      # the exit handshake (mpi_comm.absent_at_exit): one byte each way


class WireError(ValueError):
  """A message that is not a well-formed sajax message; the text says which field is wrong."""


@dataclasses.dataclass(frozen=True)
class Message:
  kind: int
  learner: int
  version: int
  value: float
  payload: Optional[np.ndarray] = None   # float32 (length,) for PUSH/WEIGHTS
  text: str = ""                         # for DEATH/FAIL

  @property
  def name(self) -> str:
    return KINDS.get(self.kind, str(self.kind))


def encode(kind: int, *, learner: int = -1, version: int = 0, value: float = 0.0,
           payload: Optional[np.ndarray] = None, text: str = "") -> np.ndarray:
  """The message as one contiguous uint8 buffer (header + payload), ready for ``comm.Isend([buf, MPI.BYTE])``."""
  if kind in FLOAT_KINDS:
    body = np.ascontiguousarray(payload, dtype=np.float32).reshape(-1).view(np.uint8)
    length = body.size // 4
  elif kind in TEXT_KINDS:
    body = np.frombuffer(text.encode("utf-8"), np.uint8)
    length = body.size
  else:
    body, length = np.empty(0, np.uint8), 0
  buf = np.empty(HEADER_BYTES + body.size, np.uint8)
  header = np.array([(MAGIC, kind, learner, version, value, length)], HEADER)
  buf[:HEADER_BYTES] = header.view(np.uint8)
  buf[HEADER_BYTES:] = body
  return buf


def decode(buf: np.ndarray, *, dim: int, learners: int, expect: frozenset) -> Message:
  """Checks and unpacks a received buffer; raises :class:`WireError` for anything malformed.

  Args:
    buf: the received bytes (uint8).
    dim: d, the number of floats of a flat gradient / weights vector.
    learners: λ; a learner id must lie in 0..λ−1.
    expect: the kinds this side accepts (a learner never accepts a push, the PS never accepts weights).
  """
  if buf.size < HEADER_BYTES:
    raise WireError(f"message of {buf.size} bytes is shorter than the {HEADER_BYTES}-byte header (truncated)")
  h = np.frombuffer(buf[:HEADER_BYTES].tobytes(), HEADER)[0]
  if int(h["magic"]) != MAGIC:
    raise WireError(f"bad magic {int(h['magic']):#x}; allowed: {MAGIC:#x}")
  kind, length, body = int(h["kind"]), int(h["length"]), buf[HEADER_BYTES:]
  if kind not in expect:
    raise WireError(f"kind {kind} ({KINDS.get(kind, 'unknown')}) is not accepted here; allowed: "
                    f"{', '.join(KINDS[k] for k in sorted(expect))}")
  learner, version, value = int(h["learner"]), int(h["version"]), float(h["value"])
  if kind in LEARNER_KINDS and not 0 <= learner < learners:
    raise WireError(f"learner {learner} is out of range; allowed: 0..{learners - 1}")
  if version < 0:
    raise WireError(f"version {version} is negative")
  if kind in COUNT_KINDS and not (math.isfinite(value) and value == int(value)
                                  and COUNT_KINDS[kind] <= value <= MAX_COUNT):
    raise WireError(f"{KINDS[kind]} value {value!r} is not a count; allowed: a whole number "
                    f"{COUNT_KINDS[kind]}..{MAX_COUNT}")
  if kind in FLOAT_KINDS:
    if length != dim or body.size != 4 * dim:
      raise WireError(f"{KINDS[kind]} payload of {body.size} bytes (header says {length} floats); allowed: "
                      f"{dim} float32 = {4 * dim} bytes (truncated or for another model)")
    return Message(kind, learner, version, value, payload=body.view(np.float32))
  if length != body.size:
    raise WireError(f"{KINDS[kind]} payload of {body.size} bytes, header says {length} (truncated)")
  if kind in TEXT_KINDS:
    return Message(kind, learner, version, value, text=body.tobytes().decode("utf-8", errors="replace"))
  return Message(kind, learner, version, value)


def check_weights_version(version: int, held: int, last: int, hardsync: bool) -> None:
  """Raises :class:`WireError` unless a weights message of ``version`` is one rank 0 can have sent a rank
  that holds version ``held`` (−1: none yet), in a run whose last update is ``last``.

  Rank 0 sends a rank the newest θ_i, strictly newer than the last one it sent that rank (the same one again
  only after a RESEND), so i < ``held`` is never sent; i = ``held`` is a repeat (ignored by the caller). The
  PS makes at most ``last`` updates (every update applies at least one gradient of μ examples: ``last`` =
  epochs × N / μ), so i > ``last`` is corrupt. Under hardsync the update after ``held`` needs this rank's own
  gradient on ``held``, so i ≤ ``held`` + 1 once the rank holds weights.
  """
  if version < held:
    raise WireError(f"weights version {version} is older than version {held}, which this rank holds; allowed: "
                    f"{held} or newer (rank 0 sends each rank newer weights only)")
  if version > last:
    raise WireError(f"weights version {version} is past the run's last update {last}; allowed: "
                    f"{max(held, 0)}..{last}")
  if hardsync and held >= 0 and version > held + 1:
    raise WireError(f"weights version {version} skips past version {held + 1} under hardsync, which waits for "
                    f"this rank's gradient on version {held}; allowed: {held}..{held + 1}")


def learner_blocks(learners: int, ranks: int) -> list[range]:
  """The λ learners split over P ranks in contiguous blocks, rank 0 (which also holds the PS) smallest.

  Raises ValueError when λ < P (every rank must run at least one learner).
  """
  if learners < ranks:
    raise ValueError(f"config.learners={learners} is invalid with {ranks} MPI ranks; allowed: learners >= "
                     f"{ranks} (at least one learner per rank)")
  bounds = [r * learners // ranks for r in range(ranks + 1)]
  return [range(bounds[r], bounds[r + 1]) for r in range(ranks)]
