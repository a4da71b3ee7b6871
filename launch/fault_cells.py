"""The fault matrix's cells (launch/fault_matrix.py): its columns (executor × protocol), the ``launch/train.py``
command of a cell, :class:`Matrix`, which runs a cell's commands bounded in time (launch/timed_launch.py) into a
scratch folder and records each cell, and :func:`cell_result`, a cell's outcome from its runs (✘ whenever an
output holds a traceback)."""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import sys
from typing import Callable, Optional, Sequence

from launch import timed_launch
from launch.fault_judges import Kept, code_text, describe_kept, has_traceback, reason, tail
from launch.fault_report import Cell, mark
from launch.timed_launch import Launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRAIN = os.path.join("launch", "train.py")
# The small CNN, not configs/smoke.py's MLP: rows 4, 8 and 8r0 strike "after the first checkpoint", found by
# polling the workdir, and a run of the MLP can finish its second epoch between two polls (the matrix's cells were
# recorded with the small CNN, smoke.py's model until 2026-12-06).
BASE = ("--config", "configs/smoke.py", "--config.model=small_cnn", "--config.learners=4",
        "--config.batch_per_learner=8", "--config.momentum=0.5")
MPI_RANKS = 2
EXECUTORS = ("threads", "simulated", "mpi", "ray")
RAY_ACTORS = ("--config.ray_learners_per_actor=2",)   # λ = 4 in 2 actor processes, as mpi's 2 ranks
RAY_LEFT_WAIT_S = 10   # row 4 under ray: how long the killed PS's Ray processes may outlive it
PROTOCOLS = (("hardsync", 1), ("softsync", 2), ("async", 1))
TIMEOUT_S = 300
NAN_ALL = ("--config.nan_learners=(0,1,2,3)", "--config.nan_steps=0")


@dataclasses.dataclass(frozen=True)
class Column:
  """One column of the matrix: an executor and a protocol (n of n-softsync)."""

  executor: str
  protocol: str
  n: int

  @property
  def name(self) -> str:
    return f"{self.executor} {self.protocol}" + (f" n={self.n}" if self.protocol == "softsync" else "")

  @property
  def slug(self) -> str:
    return f"{self.executor}-{self.protocol}{self.n if self.protocol == 'softsync' else ''}"


COLUMNS = tuple(Column(e, p, n) for e in EXECUTORS for p, n in PROTOCOLS)


# ---- running ------------------------------------------------------------------------------------------------
def train_command(column: Column, workdir: str, *extra: str) -> list[str]:
  """``[mpiexec -n 2] python launch/train.py`` with the base config, the column and ``extra`` overrides."""
  prefix = ["mpiexec", "-n", str(MPI_RANKS)] if column.executor == "mpi" else []
  actors = RAY_ACTORS if column.executor == "ray" else ()
  return [*prefix, "python", TRAIN, *BASE, f"--config.executor={column.executor}",
          f"--config.protocol={column.protocol}", f"--config.n={column.n}", *actors, *extra, "--workdir", workdir]


def executable(argv: list[str]) -> list[str]:
  """The command with this interpreter (and its mpiexec) in place of the names a user types."""
  bindir = os.path.dirname(sys.executable)
  names = {"python": sys.executable, "mpiexec": shutil.which("mpiexec", path=bindir) or shutil.which("mpiexec")}
  head = argv.index(TRAIN)
  return [names.get(a, a) for a in argv[:head]] + argv[head:]


def child_env() -> dict:
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  env.pop("XLA_FLAGS", None)   # the launcher sets the device count itself
  env.pop("RAY_ADDRESS", None)  # ray cells start a local Ray of their own
  return env


class Matrix:
  """Runs the cells into ``scratch`` and keeps their results, rewriting the report after every cell."""

  def __init__(self, scratch: str, timeout: float, report: Callable[["Matrix"], None], results: dict) -> None:
    self.scratch, self.timeout, self.report, self.results = scratch, timeout, report, results
    os.makedirs(os.path.join(scratch, "logs"), exist_ok=True)

  def workdir(self, row: str, column: Column, suffix: str = "") -> str:
    return os.path.join(self.scratch, f"{row}-{column.slug}{suffix}")

  def launch(self, argv: list[str], name: str, during: Optional[Callable] = None) -> Launch:
    print(f"  $ {shlex.join(argv)}", file=sys.stderr, flush=True)
    return timed_launch.launch(argv, executable(argv), os.path.join(self.scratch, "logs", f"{name}.log"),
                               self.timeout, cwd=ROOT, env=child_env(), during=during)

  def record(self, row: str, column: Column, cell: Cell) -> None:
    self.results.setdefault(row, {})[column.slug] = cell
    said = cell.note if cell.ok is None else f"exit {cell.code} in {cell.seconds} s {cell.reason}"
    print(f"  {row} {column.name}: {mark(cell.ok)} {said}", file=sys.stderr, flush=True)
    self.report(self)


def failure(*launches: Launch) -> str:
  return "\n".join(f"$ {run.command}\n# exit {code_text(run)} after {run.seconds:.0f} s\n{tail(run.output)}"
                   for run in launches)


def cell_result(ok: bool, runs: Sequence[Launch], kept: Kept, *, seconds: str = "", note: str = "") -> Cell:
  """The cell of ``runs`` that its row judged ``ok``: a ✘ all the same when any run's output holds a traceback
  (every known failure ends with one line), with a note saying so."""
  last = runs[-1]
  if any(has_traceback(run.output) for run in runs):
    ok, note = False, "; ".join(filter(None, [note, "a traceback in the output"]))
  return Cell(ok=ok, code=" → ".join(code_text(r) for r in runs), seconds=seconds or f"{last.seconds:.0f}",
              reason=reason(last.output) if last.code != 0 else "", kept=describe_kept(kept), note=note,
              failure="" if ok else failure(*runs))
