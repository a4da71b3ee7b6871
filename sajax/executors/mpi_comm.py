"""The processes of an ``mpiexec`` job for ``executor="mpi"`` (and pmap across processes): joining them, and
the point-to-point transport the MPI executor moves raw byte buffers with (:mod:`mpi_wire` encodes them).

Calls poll with a short sleep instead of blocking: MPICH's blocking calls spin a core, which learner threads
on a few cores cannot spare. Every wait for another rank here is bounded by ``config.mpi_timeout_s``: a send
another rank does not take, and the handshake at exit (:func:`absent_at_exit`), which names who never came. The executor's threads call MPI at once (receive, send, learner
threads), so ``executor="mpi"`` needs ``MPI_THREAD_MULTIPLE`` and refuses to start without it (exit 2).

An uncaught exception on any rank ends the whole job (``MPI_Abort``) with one line, ``rank N: Type: message;
ending the job (...)``, and exit code :data:`EXIT_RANK_FAILED` (5), as does a rank that stops answering; the
full traceback goes to ``<workdir>/errors.log`` (rank 0 writes it; a rank > 0 sends it there), and to the
terminal as well with ``SAJAX_DEBUG=1``.
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading
import time
import traceback
from typing import Any, Callable, Optional

import jax
import numpy as np

from sajax import config as config_lib
from sajax.workdir import ERRORS_LOG, keep_traceback
from sajax.executors import mpi_wire as wire

SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")   # set by mpiexec (MPICH/Open MPI) and srun
_world = None
ABORT_GRACE_S = 2.0   # how long a rank that ends the job waits for its last lines to reach mpiexec's output
EXIT_RANK_FAILED = 5  # the exit code of a job ended by a failed or silent rank (MPI_Abort's code, mpiexec's exit)
DEFAULT_WAIT_S = 600.0   # waits for another rank (a first compilation under load is slow); config.mpi_timeout_s
RESUME_HINT = "rerun the same command to resume from the last checkpoint"
_wait_s = DEFAULT_WAIT_S
_error_log: Optional[str] = None   # rank 0: where full tracebacks go (set once the workdir is known)
_missing: Optional[str] = None     # why rank 0 stopped waiting for some rank: the job cannot end together


def world_size_from_env() -> int:
  """The number of processes mpiexec/srun started, from the environment (1 outside mpiexec)."""
  for var in SIZE_VARS:
    if os.environ.get(var, "").isdigit():
      return int(os.environ[var])
  return 1


def world():
  """``MPI.COMM_WORLD`` (importing mpi4py initialises MPI); fatal errors on any rank then end the job."""
  global _world
  if _world is None:
    try:
      from mpi4py import MPI
    except ImportError:
      raise config_lib.ConfigError("executor 'mpi' needs mpi4py and mpiexec; allowed: after "
                                   "pip install 'sajax[mpi]' (mpi4py + mpich), or another executor") from None
    _world = MPI.COMM_WORLD
    if _world.Get_size() > 1:
      _install_abort_hooks(_world)
      atexit.register(_exit_together, _world)
  return _world


def prepare_processes(config: Any) -> bool:
  """Joins the processes of an ``mpiexec`` job; returns whether this one writes the outputs (rank 0).

  ``executor="mpi"``: checks that every rank gets a learner (raises ConfigError otherwise, before anything is
  written). ``executor="pmap"`` with several processes: ``jax.distributed.initialize`` through mpi4py, so
  pmap spans every process's devices. Any other run: one process, nothing to do.
  """
  global _wait_s
  _wait_s = float(config.get("mpi_timeout_s", DEFAULT_WAIT_S))
  if config.executor == "mpi":
    comm = world()
    if comm.Get_size() > 1:
      from mpi4py import MPI
      check_thread_level(MPI)
    try:
      wire.learner_blocks(config.learners, comm.Get_size())
    except ValueError as e:
      raise config_lib.ConfigError(str(e)) from None
    return comm.Get_rank() == 0
  if config.executor == "pmap" and world_size_from_env() > 1:
    world()
    if not jax.distributed.is_initialized():
      jax.distributed.initialize(cluster_detection_method="mpi4py")
    return jax.process_index() == 0
  return True


def check_thread_level(mpi: Any) -> None:
  """Raises ConfigError unless the MPI library (``mpi``: mpi4py's ``MPI`` module, once initialised) runs
  threads at ``MPI_THREAD_MULTIPLE``: the executor's receive, send and learner threads call MPI at once."""
  names = {getattr(mpi, n): n for n in ("THREAD_SINGLE", "THREAD_FUNNELED", "THREAD_SERIALIZED",
                                        "THREAD_MULTIPLE")}
  provided = mpi.Query_thread()
  if provided < mpi.THREAD_MULTIPLE:
    raise config_lib.ConfigError(
        f"the MPI library gives thread level MPI_{names.get(provided, provided)}; executor 'mpi' needs "
        "MPI_THREAD_MULTIPLE (its receive, send and learner threads call MPI at once); allowed: an MPI built "
        "with thread support (the mpich wheel of pip install 'sajax[mpi]') and mpi4py.rc.thread_level "
        "'multiple' (the default)")


def rank0_outcome(config: Any, error: Optional[Exception]) -> Optional[Exception]:
  """Rank 0's refusal of the run (its workdir, or a checkpoint that does not fit: a bad-input error, or None) on
  every process of an ``mpiexec`` job, as a ConfigError with its one line (exit 2), so that a refused run ends on
  every rank at once instead of leaving the others waiting for rank 0. Outside a multi-process job: ``error``
  unchanged."""
  if config.executor not in ("mpi", "pmap") or world_size_from_env() <= 1:
    return error
  text = world().bcast(None if error is None else str(error), root=0)   # one small control message
  return None if text is None else config_lib.ConfigError(text)


def rank_metrics(run: Any) -> dict:
  """What ``sajax.train`` returns on a rank > 0 (rank 0 returns the run's metrics)."""
  comm = world()
  return {"rank": comm.Get_rank(), "processes": comm.Get_size(), **getattr(run, "rank_summary", {})}


# ---- transport -----------------------------------------------------------------------------------------
class RankTimeout(RuntimeError):
  """Another rank did not answer within ``config.mpi_timeout_s``."""


def _wait(request, stop: Callable[[], bool] = lambda: False) -> bool:
  """Polls an MPI request until done (True) or ``stop()`` (False), sleeping 50 µs → 2 ms between tests."""
  pause = 5e-5
  while not request.Test():
    if stop():
      return False
    time.sleep(pause)
    pause = min(2 * pause, 2e-3)
  return True


def send(comm, buf: np.ndarray, dest: int, tag: int, wait_s: Optional[float] = None,
         heard: Optional[Callable[[], float]] = None) -> None:
  """Sends ``buf`` to rank ``dest``; raises :class:`RankTimeout` naming it if the send has not completed
  within ``wait_s`` (default ``config.mpi_timeout_s``): the rank stopped receiving. With ``heard`` (when
  ``dest`` last sent anything, ``time.monotonic()``), the wait is counted from then instead: a rank that is busy
  (rank 0 evaluating, its queue full) but still says it is alive is waited for."""
  wait_s = _wait_s if wait_s is None else wait_s
  start = time.monotonic()
  since = (lambda: max(start, heard())) if heard is not None else (lambda: start)  # noqa: E731
  request = comm.Isend([buf, _byte()], dest=dest, tag=tag)
  if not _wait(request, stop=lambda: time.monotonic() > since() + wait_s):
    request.Cancel()
    kind = int(np.frombuffer(buf[4:8].tobytes(), "<u4")[0]) if buf.size >= 8 else -1
    raise RankTimeout(f"rank {dest} did not take a {wire.KINDS.get(kind, 'message')} message within {wait_s:g} s "
                      "(config.mpi_timeout_s): it stopped answering")


def receive(comm, tag: int, stop: Callable[[], bool], source: Optional[int] = None
            ) -> Optional[tuple[int, np.ndarray]]:
  """The next message with ``tag`` from ``source`` (default: any) as (source, bytes), or None once ``stop()``."""
  from mpi4py import MPI
  status = MPI.Status()
  src = MPI.ANY_SOURCE if source is None else source
  pause = 5e-5
  while not comm.Iprobe(source=src, tag=tag, status=status):
    if stop():
      return None
    time.sleep(pause)
    pause = min(2 * pause, 2e-3)
  buf = np.empty(status.Get_count(MPI.BYTE), np.uint8)
  comm.Recv([buf, MPI.BYTE], source=status.Get_source(), tag=tag)
  return status.Get_source(), buf


def describe(error: BaseException) -> str:
  """``Type: message`` on one line (without the ``rank N:`` a message of ours may already start with)."""
  text = re.sub(r"^rank \d+: ", "", " ".join(str(error).split()))
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def set_error_log(workdir: str) -> None:
  """Where full tracebacks go: the run's ``<workdir>/errors.log`` (written by rank 0 only; every rank names it)."""
  global _error_log
  _error_log = os.path.join(workdir, ERRORS_LOG)


def write_error_log(what: str, text: str) -> None:
  """Rank 0: appends ``text`` (a one-line reason and a traceback of ``what``, e.g. 'rank 2') to the error log
  (:func:`sajax.workdir.keep_traceback`), if one is set."""
  if _error_log is None or not text:
    return
  try:
    keep_traceback(os.path.dirname(_error_log), what, text)
  except OSError:
    pass   # ending anyway; the one line was printed


def ending_line(error: BaseException) -> str:
  """The one line a job ended by ``error`` prints after ``rank N:``: the error, how to resume, the log."""
  where = f"; traceback in {_error_log}" if _error_log else "; SAJAX_DEBUG=1 prints the traceback"
  return f"{describe(error)}; ending the job ({RESUME_HINT}{where})"


_hooked = None   # the communicator once :func:`_install_abort_hooks` ran (ranks of an mpiexec job)
_ending = threading.Lock()   # held by the first thread that ends the job: the job ends with its line alone


def _install_abort_hooks(comm) -> None:
  """An uncaught exception in any thread of any rank ends the whole job with one line (:func:`fatal_error`)."""
  global _hooked
  _hooked = comm
  previous = sys.excepthook

  def excepthook(kind, value, tb):
    if issubclass(kind, (KeyboardInterrupt, SystemExit)):
      return previous(kind, value, tb)
    fatal_error(ending_line(value), "".join(traceback.format_exception(kind, value, tb)))

  sys.excepthook = excepthook
  threading.excepthook = lambda args: excepthook(args.exc_type, args.exc_value, args.exc_traceback)


def fatal_error(text: str, detail: str = "") -> None:
  """Ends the job: prints the one line ``rank N: text``, hands ``detail`` (a traceback) to the error log (rank
  0 writes it, a rank > 0 sends it to rank 0 in a FAIL message; ``SAJAX_DEBUG=1`` prints it too), then calls
  MPI_Abort with :data:`EXIT_RANK_FAILED` after :data:`ABORT_GRACE_S`. Only the first call prints: a second
  reason found while the job is ending (another thread timing out on the same silent rank) goes to the log.
  Outside an mpiexec job (no hooks installed) raises RuntimeError(text)."""
  comm = _hooked
  if comm is None:
    raise RuntimeError(text)
  rank = comm.Get_rank()
  line = f"rank {rank}: {text}"
  if not _ending.acquire(blocking=False):   # another thread is ending the job already, with its own line
    if rank == 0:
      write_error_log("rank 0", f"{line} (while the job was ending)\n{detail}")
    abort()
    return
  if detail and os.environ.get("SAJAX_DEBUG"):
    print(detail.rstrip(), file=sys.stderr)
  print(line, file=sys.stderr, flush=True)
  report = f"{line}\n{detail}" if detail else line
  if rank == 0:
    write_error_log("rank 0", report)
  else:
    try:   # rank 0 writes the traceback to the error log, then ends the job too
      req = comm.Isend([wire.encode(wire.FAIL, text=report[-20000:]), _byte()], dest=0, tag=wire.TAG_TO_SERVER)
      deadline = time.monotonic() + 5
      _wait(req, stop=lambda: time.monotonic() > deadline)
    except Exception:  # noqa: BLE001 - we are aborting anyway
      pass
  abort()


def abort() -> None:
  """MPI_Abort with :data:`EXIT_RANK_FAILED`, after :data:`ABORT_GRACE_S`: mpiexec's proxy forwards each rank's
  output asynchronously and MPI_Abort kills it, so on a loaded machine (CI, 2 cores) the lines printed just
  before were lost and a job ended without its reason."""
  time.sleep(ABORT_GRACE_S)
  _hooked.Abort(EXIT_RANK_FAILED)


def stopped_waiting_for(reason: str) -> None:
  """Rank 0 gave up on some rank (``reason`` names it): the job cannot end together, so its exit ends the job
  with the one line ``rank 0: <reason>; ending the job ...`` (:func:`_exit_together`)."""
  global _missing
  _missing = reason


def _byte():
  from mpi4py import MPI
  return MPI.BYTE


def _exit_together(comm) -> None:
  """At exit, waits (without spinning) until every rank is at the end, for at most ``config.mpi_timeout_s``, so
  MPI_Finalize neither busy-waits nor hangs. A rank that never comes, or one rank 0 already stopped waiting
  for, ends the job with one line naming it and :data:`EXIT_RANK_FAILED`."""
  if _missing:
    fatal_error(f"{_missing}; ending the job ({RESUME_HINT})")
    return
  late = absent_at_exit(comm, _wait_s)
  if late:
    fatal_error(f"rank(s) {late} did not reach the end of the job within {_wait_s:g} s (config.mpi_timeout_s); "
                f"ending the job ({RESUME_HINT})")


def absent_at_exit(comm, wait_s: float) -> list[int]:
  """The exit handshake, a barrier that can name who is missing: each rank > 0 tells rank 0 it is at the end and
  waits for rank 0's answer, which comes once every rank is there. Returns the ranks this one waited for in vain
  for ``wait_s`` (rank 0: those that never came; a rank > 0: [0])."""
  deadline = time.monotonic() + wait_s
  late = lambda: time.monotonic() > deadline  # noqa: E731
  here = np.zeros(1, np.uint8)
  if comm.Get_rank() > 0:
    arrived = _wait(comm.Isend([here, _byte()], dest=0, tag=wire.TAG_EXIT), stop=late)
    return [] if arrived and _wait(comm.Irecv([np.empty(1, np.uint8), _byte()], source=0, tag=wire.TAG_EXIT),
                                   stop=late) else [0]
  buffers = {r: np.empty(1, np.uint8) for r in range(1, comm.Get_size())}
  waits = {r: comm.Irecv([buf, _byte()], source=r, tag=wire.TAG_EXIT) for r, buf in buffers.items()}
  absent = [r for r, request in waits.items() if not _wait(request, stop=late)]
  if not absent:
    for r in buffers:
      _wait(comm.Isend([here, _byte()], dest=r, tag=wire.TAG_EXIT), stop=late)
  return absent
