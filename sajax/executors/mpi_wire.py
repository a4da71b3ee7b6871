"""The MPI executor's wire format: one message = a fixed 40-byte header + a raw contiguous payload, never pickled.

    header (little-endian): magic u4 | kind u4 | learner i8 | version i8 | value f8 | length i8
    payload: ``length`` float32 (a flat gradient g or flat weights θ_j, from ``ravel_pytree``) or UTF-8 bytes
    (an error text, or the JSON sampler states of a rank's learners)

A push carries learner k, the version j its gradient was computed on and its training loss (``value``); a
weights message carries version i and θ_i; a permission (ssp) carries learner k, the version i it starts on
at the earliest and its serial number (``value``: 1, 2, … per learner, so a resent one is recognised).
Everything here is pure: :func:`encode` builds the byte buffer,
:func:`decode` checks a received one (size, magic, kind, length, learner range, version) and raises
:class:`WireError` naming what is wrong, so a malformed or truncated message is rejected, never applied.
"""

from __future__ import annotations

import dataclasses
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
# kinds: PS -> learners
WEIGHTS = 11  # θ_i with version i
STOP = 12     # stop learning; value = 1.0 when the run was interrupted (Ctrl-C), 0.0 when finished
SETUP = 13    # first message to a rank: its learners' sampler states as UTF-8 JSON (rank 0 restored them)
START = 14    # every rank is READY: start the learners
PERMIT = 15   # ssp: learner k may start one gradient, on weights of this version or newer; value = k's serial
KINDS = {PUSH: "push", DEATH: "death", FAIL: "fail", DONE: "done", READY: "ready", RESEND: "resend",
         WEIGHTS: "weights", STOP: "stop", SETUP: "setup", START: "start", PERMIT: "permit"}
FLOAT_KINDS = frozenset({PUSH, WEIGHTS})
TEXT_KINDS = frozenset({DEATH, FAIL, SETUP})

# MPI tags: one per direction (the kind is in the header).
TAG_TO_SERVER = 7001
TAG_TO_LEARNERS = 7002


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
  if kind in (PUSH, DEATH, PERMIT) and not 0 <= learner < learners:
    raise WireError(f"learner {learner} is out of range; allowed: 0..{learners - 1}")
  if version < 0:
    raise WireError(f"version {version} is negative")
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


def learner_blocks(learners: int, ranks: int) -> list[range]:
  """The λ learners split over P ranks in contiguous blocks, rank 0 (which also holds the PS) smallest.

  Raises ValueError when λ < P (every rank must run at least one learner).
  """
  if learners < ranks:
    raise ValueError(f"config.learners={learners} is invalid with {ranks} MPI ranks; allowed: learners >= "
                     f"{ranks} (at least one learner per rank)")
  bounds = [r * learners // ranks for r in range(ranks + 1)]
  return [range(bounds[r], bounds[r + 1]) for r in range(ranks)]
