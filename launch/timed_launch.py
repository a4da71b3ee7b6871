"""Commands run as a user runs them, bounded in time: launch/fault_matrix.py's subprocesses.

Each command runs in a session of its own (mpiexec and its ranks form one process group), its output in a log
file; past its timeout the whole group is killed, so every launch ends. :func:`rank_pid` finds an MPI rank's
process under mpiexec (from /proc), for faults aimed at one rank; :func:`descendants` and :func:`still_running`
tell whether a killed run left processes behind.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import subprocess
import time
from typing import Callable, Optional


@dataclasses.dataclass
class Launch:
  """One subprocess: the command as a user types it, its exit code (None: timed out), seconds, output."""

  command: str
  code: Optional[int]
  seconds: float
  output: str


def _stop(process: subprocess.Popen) -> None:
  """Kills the process group the run started (mpiexec and its ranks too)."""
  try:
    os.killpg(process.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass
  process.wait()


def launch(argv: list[str], executable: list[str], log: str, timeout: float, *, cwd: str, env: dict,
           during: Optional[Callable] = None) -> Launch:
  """Runs ``executable`` (``argv`` as a user types it, resolved) from ``cwd`` in a session of its own, output to
  ``log``; ``during(process)`` is polled while it runs. Past ``timeout`` seconds the whole group is killed and the
  code is None."""
  start = time.monotonic()
  with open(log, "w") as out:
    process = subprocess.Popen(executable, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
      code = _wait(process, start, timeout, during)
    finally:
      if process.poll() is None:
        _stop(process)
  with open(log, errors="replace") as f:
    output = f.read()
  return Launch(shlex.join(argv), code, time.monotonic() - start, output)


def _wait(process: subprocess.Popen, start: float, timeout: float, during: Optional[Callable]) -> Optional[int]:
  while process.poll() is None:
    if time.monotonic() - start > timeout:
      _stop(process)
      return None
    if during is not None:
      during(process)
    time.sleep(0.2)
  return process.returncode


def _children() -> dict[int, list[int]]:
  table: dict[int, list[int]] = {}
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/stat") as f:
          parent = int(f.read().rsplit(")", 1)[1].split()[1])
      except (OSError, IndexError, ValueError):
        continue
      table.setdefault(parent, []).append(int(entry))
  return table


def descendants(root: int) -> list[int]:
  """Every process below ``root`` now (children first)."""
  table, found, todo = _children(), [], [root]
  while todo:
    for child in table.get(todo.pop(0), []):
      found.append(child)
      todo.append(child)
  return found


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except (OSError, IndexError):
    return False


def still_running(pids: list[int], wait_s: float) -> list[int]:
  """Those of ``pids`` still running (a zombie is not) after waiting up to ``wait_s`` for all of them to end."""
  deadline = time.monotonic() + wait_s
  while any(_alive(p) for p in pids) and time.monotonic() < deadline:
    time.sleep(0.2)
  return [p for p in pids if _alive(p)]


def rank_pid(root: int, rank: int, script: str) -> Optional[int]:
  """The process of MPI rank ``rank`` under ``root`` (mpiexec): a descendant running ``script`` with PMI_RANK."""
  table, todo = _children(), [root]
  while todo:
    pid = todo.pop(0)
    for child in table.get(pid, []):
      try:
        with open(f"/proc/{child}/environ", "rb") as f:
          env = f.read().split(b"\0")
        with open(f"/proc/{child}/cmdline", "rb") as f:
          cmdline = f.read()
      except OSError:
        continue
      if f"PMI_RANK={rank}".encode() in env and script.encode() in cmdline:
        return child
      todo.append(child)
  return None
