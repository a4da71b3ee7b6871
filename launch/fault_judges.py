"""The fault matrix's judges (launch/fault_matrix.py): pure functions that read a cell's output and workdir and say
whether it ended with its row's documented outcome (README "When things go wrong", docs/reliability.md). Every
judge refuses an output that holds a Python traceback: every known failure ends with one line."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Sequence

from launch.timed_launch import Launch

LEARNERS = 4          # λ of every cell
TAIL_LINES = 15
RESUMED = "resuming from the checkpoint at update"
UNREADABLE = "is unreadable"
EXCEPTION = re.compile(r"^[\w.]*(Error|Exception|Interrupt): ")   # the last line of a traceback
MPI_ENDING = re.compile(r"^rank \d+: .*ending the job")          # how an MPI job ends (exit 5), one line
REJECTED_BY_RANK_1 = "rank 1: rejected a malformed message from rank 0"


@dataclasses.dataclass(frozen=True)
class Kept:
  """What a workdir holds after a run."""

  exists: bool = False
  checkpoints: tuple = ()
  corrupt: tuple = ()
  epochs: tuple = ()
  final: dict = dataclasses.field(default_factory=dict)


# ---- pure helpers: reading output and workdirs, judging ----------------------------------------------------
def error_lines(output: str) -> list[str]:
  """The lines of ``output`` that start with ``error:`` (the CLI's one-line reasons)."""
  return [line.strip() for line in output.splitlines() if line.strip().startswith("error:")]


def ending_lines(output: str) -> list[str]:
  """The lines of ``output`` with which a rank ended an MPI job (``rank N: ...; ending the job (...)``)."""
  return [line.strip() for line in output.splitlines() if MPI_ENDING.match(line.strip())]


def reason(output: str) -> str:
  """The one-line reason a run gave: its ``error:`` line(s) or the line that ended an MPI job, else the exception
  line that ends its traceback, else ''."""
  errors = error_lines(output) + ending_lines(output)
  if errors:
    return " / ".join(errors)
  if "Traceback" in output:
    lines = [line.strip() for line in output.splitlines()]
    return next((line for line in reversed(lines) if EXCEPTION.match(line)), "")
  return ""


def has_traceback(output: str) -> bool:
  """Whether ``output`` holds a Python traceback: never a documented outcome (every known failure is one line)."""
  return "Traceback (most recent call last)" in output


def tail(output: str, lines: int = TAIL_LINES) -> str:
  """The last ``lines`` non-empty lines of ``output``."""
  return "\n".join([line for line in output.splitlines() if line.strip()][-lines:])


def read_kept(workdir: str) -> Kept:
  """Checkpoint steps, corrupt-* folders, and the epochs (in file order) and last record of metrics.jsonl."""
  if not os.path.isdir(workdir):
    return Kept()
  folder = os.path.join(workdir, "checkpoints")
  names = os.listdir(folder) if os.path.isdir(folder) else []
  records = []
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      records = [json.loads(line) for line in f if line.strip()]
  aside = [n for n in os.listdir(workdir) + names if n.startswith("corrupt-")]   # beside checkpoints/ or in it
  return Kept(exists=True, checkpoints=tuple(sorted(int(n) for n in names if n.isdigit())),
              corrupt=tuple(sorted(aside)),
              epochs=tuple(r.get("epoch") for r in records), final=records[-1] if records else {})


def describe_kept(kept: Kept) -> str:
  """'ckpt 32, 64 · 2 records (epochs 1, 2) · corrupt-64' for the table."""
  if not kept.exists:
    return "no workdir"
  steps = ", ".join(str(s) for s in kept.checkpoints) or "none"
  epochs = ", ".join(f"{e:g}" for e in kept.epochs)
  parts = [f"ckpt {steps}", f"{len(kept.epochs)} records" + (f" (epochs {epochs})" if epochs else "")]
  return " · ".join(parts + list(kept.corrupt))


def code_text(launch: Launch) -> str:
  return "timeout" if launch.code is None else str(launch.code)


def judge_dropped(launch: Launch, kept: Kept) -> bool:
  """Row 1: exit 0 and exactly one gradient dropped."""
  return launch.code == 0 and kept.final.get("gradients_dropped") == 1


def judge_diverged(launch: Launch) -> bool:
  """Row 2: exit 3 and one ``error: diverged: ...`` line."""
  errors = error_lines(launch.output)
  return launch.code == 3 and len(errors) == 1 and errors[0].startswith("error: diverged: ")


def judge_survived(launch: Launch, kept: Kept, learners: int = LEARNERS) -> bool:
  """Row 3: exit 0 with λ − 1 learners alive."""
  return launch.code == 0 and kept.final.get("learners_alive") == learners - 1


def judge_fail_fast(launch: Launch) -> bool:
  """Row 3, fail_fast: exit 4 with one ``error:`` line naming fail_fast, and no traceback."""
  errors = error_lines(launch.output)
  return (launch.code == 4 and len(errors) == 1 and "fail_fast" in errors[0]
          and not has_traceback(launch.output))


def judge_resumed(killed: Launch, rerun: Launch, kept: Kept, epochs: Sequence[float]) -> bool:
  """Row 4: the first run was killed (did not exit 0), the rerun exits 0, says it resumed, and metrics.jsonl
  has one record per epoch, in order."""
  return (killed.code not in (0, None) and rerun.code == 0 and RESUMED in rerun.output
          and list(kept.epochs) == list(epochs))


def judge_corrupt(rerun: Launch, kept: Kept, corrupt_step: int, previous_step: int) -> bool:
  """Row 5: exit 0, the damaged checkpoint moved to corrupt-<step> with a warning, resumed from the previous."""
  return (rerun.code == 0 and f"corrupt-{corrupt_step}" in kept.corrupt and UNREADABLE in rerun.output
          and f"{RESUMED} {previous_step} " in rerun.output)


def judge_bad_config(launch: Launch, kept: Kept) -> bool:
  """Row 6: exit 2, one ``error:`` line, no traceback, and the workdir not created."""
  return (launch.code == 2 and len(error_lines(launch.output)) == 1 and not has_traceback(launch.output)
          and not kept.exists)


def judge_damaged_config(rerun: Launch, before: Kept, after: Kept, config_kept: bool) -> bool:
  """Row 6c: exit 2, one ``error:`` line naming config.json, no traceback, and the workdir as it was (the
  damaged config.json byte for byte, every checkpoint and metrics record)."""
  errors = error_lines(rerun.output)
  return (rerun.code == 2 and len(errors) == 1 and "config.json" in errors[0]
          and not has_traceback(rerun.output) and config_kept and before.exists and after == before)


def judge_resent(launch: Launch, kept: Kept) -> bool:
  """Row 7: exit 0; rank 1 rejected the bad magic and the bad version and asked again each time."""
  asked = [line for line in launch.output.splitlines() if REJECTED_BY_RANK_1 in line and "asking again" in line]
  return (launch.code == 0 and len(asked) == 2 and "bad magic" in asked[0]
          and "past the run's last update" in asked[1] and kept.final.get("messages_rejected") == 0)


def judge_corrupt_push(launch: Launch, kept: Kept, protocol: str) -> bool:
  """Row 7p: async and softsync exit 0 with messages_rejected = 1; hardsync (which would wait for that gradient
  forever) exits 5 with one ``rank 0: ...; ending the job`` line and no traceback."""
  if protocol == "hardsync":
    return launch.code == 5 and len(ending_lines(launch.output)) == 1 and not has_traceback(launch.output)
  return launch.code == 0 and kept.final.get("messages_rejected") == 1


def judge_silent_rank(launch: Launch, rank: int = 1) -> bool:
  """Rows 8, 8r0: exit 5 with one ``rank N: ...; ending the job`` line naming the stopped ``rank`` (after its
  ``rank N:`` prefix), no traceback on the terminal."""
  endings = ending_lines(launch.output)
  said = endings[0].split(":", 1)[1] if len(endings) == 1 else ""
  return (launch.code == 5 and len(endings) == 1 and (f"rank {rank} " in said or f"[{rank}]" in said)
          and not has_traceback(launch.output))
