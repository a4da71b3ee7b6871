"""The processes of an ``mpiexec`` job for ``executor="mpi"`` (and pmap across processes): joining them, and
the point-to-point transport the MPI executor moves raw byte buffers with (:mod:`mpi_wire` encodes them).

Calls poll with a short sleep instead of blocking: MPICH's blocking calls spin a core, which learner threads
on a few cores cannot spare. An uncaught exception on any rank tells rank 0 and ends the whole job.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import traceback
from typing import Any, Callable, Optional

import jax
import numpy as np

from sajax import config as config_lib
from sajax.executors import mpi_wire as wire

SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")   # set by mpiexec (MPICH/Open MPI) and srun
_world = None
ABORT_GRACE_S = 2.0   # how long a rank that ends the job waits for its last lines to reach mpiexec's output


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
  if config.executor == "mpi":
    comm = world()
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


def rank0_outcome(config: Any, error: Optional[Exception]) -> Optional[Exception]:
  """Rank 0's refusal of the workdir (a ConfigError, or None) on every process of an ``mpiexec`` job, so that a
  refused run ends on every rank at once instead of leaving the others waiting for rank 0. Outside a
  multi-process job: ``error`` unchanged."""
  if config.executor not in ("mpi", "pmap") or world_size_from_env() <= 1:
    return error
  text = world().bcast(None if error is None else str(error), root=0)   # one small control message
  return None if text is None else config_lib.ConfigError(text)


def rank_metrics(run: Any) -> dict:
  """What ``sajax.train`` returns on a rank > 0 (rank 0 returns the run's metrics)."""
  comm = world()
  return {"rank": comm.Get_rank(), "processes": comm.Get_size(), **getattr(run, "rank_summary", {})}


# ---- transport -----------------------------------------------------------------------------------------
def _wait(request, stop: Callable[[], bool] = lambda: False) -> bool:
  """Polls an MPI request until done (True) or ``stop()`` (False), sleeping 50 µs → 2 ms between tests."""
  pause = 5e-5
  while not request.Test():
    if stop():
      return False
    time.sleep(pause)
    pause = min(2 * pause, 2e-3)
  return True


def send(comm, buf: np.ndarray, dest: int, tag: int) -> None:
  from mpi4py import MPI
  _wait(comm.Isend([buf, MPI.BYTE], dest=dest, tag=tag))


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


def _install_abort_hooks(comm) -> None:
  """An uncaught exception in any thread of any rank tells rank 0 and ends the whole job (MPI_Abort)."""
  def fatal(text: str) -> None:
    rank = comm.Get_rank()
    print(f"rank {rank}: {text}", file=sys.stderr, flush=True)
    if rank != 0:   # rank 0 prints why the job ends; give it a moment to do so
      try:
        req = comm.Isend([wire.encode(wire.FAIL, text=text[-2000:]), _byte()], dest=0, tag=wire.TAG_TO_SERVER)
        deadline = time.monotonic() + 5
        _wait(req, stop=lambda: time.monotonic() > deadline)
      except Exception:  # noqa: BLE001 - we are aborting anyway
        pass
    # mpiexec's proxy forwards each rank's output asynchronously and MPI_Abort kills it: on a loaded machine
    # (CI, 2 cores) the lines printed just before were lost, so a job ended without its reason. Give it time.
    time.sleep(ABORT_GRACE_S)
    comm.Abort(1)

  previous = sys.excepthook

  def excepthook(kind, value, tb):
    if issubclass(kind, (KeyboardInterrupt, SystemExit)):
      return previous(kind, value, tb)
    fatal("".join(traceback.format_exception(kind, value, tb)).rstrip())

  sys.excepthook = excepthook
  threading.excepthook = lambda args: excepthook(args.exc_type, args.exc_value, args.exc_traceback)
  global fatal_error
  fatal_error = fatal


def fatal_error(text: str) -> None:
  """Ends the job with ``text``: once :func:`world` installed the hooks, prints ``rank N: text`` and calls
  MPI_Abort (after :data:`ABORT_GRACE_S`); else raises RuntimeError(text)."""
  raise RuntimeError(text)


def _byte():
  from mpi4py import MPI
  return MPI.BYTE


def _exit_together(comm) -> None:
  """At exit, wait (without spinning) until every rank is done, so MPI_Finalize does not busy-wait."""
  try:
    _wait(comm.Ibarrier())
  except Exception:  # noqa: BLE001 - exiting anyway
    pass
