"""A local Ray that ends with the process that started it (:func:`sajax.executors.ray_engine.connect`).

Ray ties a local Ray's GCS server, raylet and workers to the driver: killed with SIGKILL (the PS of
``executor="ray"`` is the driver), it takes them with it. Not the agents the raylet starts: with ray 2.60,
``ray::DashboardAgent`` and ``ray::RuntimeEnvAgent`` log that the raylet is dead and stay another 61 s, waiting on
the dead GCS (``RAY_gcs_rpc_server_reconnect_timeout_s`` does not shorten it). So when ``connect`` starts a local
Ray, it also starts a watchdog: this file run as a script (standard library only, so it starts in milliseconds).
The watchdog reads a pipe only the driver holds; end of file is the driver's death, and it then kills every
process of that local Ray it has seen (the driver's children that ``ray.init`` started and all their
descendants, rescanned every ``SCAN_S``, kept once seen; a pid is killed only while its start time is the one
seen). A normal end (:func:`stop`) writes ``done`` on the pipe, and the watchdog exits without killing anything.

Linux only (it reads /proc); elsewhere no watchdog is started and the agents end on Ray's own timeout.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from typing import Optional

SCAN_S = 0.5                       # how often the watchdog rescans the local Ray's processes
DONE = b"done\n"                   # what a normal end writes on the pipe
_watchdog: Optional[tuple[subprocess.Popen, int]] = None   # (process, write end of its pipe), while one runs


# ---- /proc ------------------------------------------------------------------------------------------------
def _stat(pid: int) -> Optional[list[str]]:
  """The fields of /proc/<pid>/stat after the command name (field 3, the state, first), or None."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()
  except (OSError, IndexError):
    return None


def children_of() -> dict[int, list[int]]:
  """Every live process's children, by parent pid."""
  table: dict[int, list[int]] = {}
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      fields = _stat(int(entry))
      if fields and fields[0] != "Z":
        table.setdefault(int(fields[1]), []).append(int(entry))
  return table


def descendants(roots: list[int], table: dict[int, list[int]]) -> list[int]:
  """``roots`` and every process below them in ``table`` (parent pid -> children), each once."""
  seen, todo = [], list(roots)
  while todo:
    pid = todo.pop()
    if pid not in seen:
      seen.append(pid)
      todo.extend(table.get(pid, []))
  return seen


def started(pid: int) -> Optional[str]:
  """The start time of process ``pid`` (clock ticks since boot, field 22 of its stat), or None: a pid with
  another start time is another process."""
  fields = _stat(pid)
  return fields[19] if fields else None


# ---- the driver's side ------------------------------------------------------------------------------------
def own_children() -> set[int]:
  """This process's live children (none without /proc)."""
  return set(children_of().get(os.getpid(), [])) if os.path.isdir("/proc") else set()


def start(before: set[int]) -> None:
  """Starts the watchdog of the local Ray that ``ray.init`` has just started: this process's children not in
  ``before`` (:func:`own_children` before ``ray.init``) and their descendants. None (Ray was joined, not
  started) or no /proc: nothing is started."""
  global _watchdog
  roots = sorted(own_children() - before)
  if not roots or _watchdog is not None:
    return
  read_end, write_end = os.pipe()
  try:
    process = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__), *map(str, roots)],
                               stdin=read_end, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  finally:
    os.close(read_end)
  _watchdog = (process, write_end)


def stop() -> None:
  """A normal end (after ``ray.shutdown``): the watchdog exits without killing anything."""
  global _watchdog
  if _watchdog is None:
    return
  process, write_end = _watchdog
  _watchdog = None
  try:
    os.write(write_end, DONE)
  except OSError:
    pass                           # it is gone already
  os.close(write_end)
  try:
    process.wait(timeout=5)
  except subprocess.TimeoutExpired:
    process.kill()


# ---- the watchdog -----------------------------------------------------------------------------------------
def watch(roots: list[int], pipe: int = 0) -> int:
  """Rescans ``roots`` and their descendants every ``SCAN_S`` until ``pipe`` says ``done`` (exit, nothing killed)
  or ends (the driver died: SIGKILL to every process last seen that is still the same process)."""
  seen: dict[int, str] = {}          # every process seen below the roots that has not ended, with its start time
  while True:
    seen = {pid: when for pid, when in seen.items() if started(pid) == when}   # those reparented stay in it
    for pid in descendants(roots, children_of()):
      seen[pid] = started(pid) or ""     # "": already gone, never killed
    readable, _, _ = select.select([pipe], [], [], SCAN_S)
    if not readable:
      continue
    if os.read(pipe, len(DONE)):
      return 0
    for pid, when in seen.items():
      if when and started(pid) == when:
        try:
          os.kill(pid, signal.SIGKILL)
        except OSError:
          pass
    return 0


if __name__ == "__main__":
  signal.signal(signal.SIGINT, signal.SIG_IGN)   # a Ctrl-C reaches the driver's whole group; the driver decides
  sys.exit(watch([int(a) for a in sys.argv[1:]]))
