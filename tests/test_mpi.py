"""The mpi executor and pmap across processes: ``mpiexec -n P python launch/train.py`` on localhost, the wire
format (malformed and truncated messages are rejected, never applied), and each rank's side driven in-process.

Test cost: every mpiexec job starts 2–3 JAX processes, so independent faults share one job per protocol (a
session-scoped fixture runs it once; each test asserts its own part of it). Under pytest-xdist the tests of one
job share an ``xdist_group`` (``--dist loadgroup``), so they run in one worker, which runs the job once. Not
module-scoped: pytest tears a module's fixture down as soon as the worker's next test comes from another module,
and sets it up again for the next test that needs it (a per-test CPU profile showed each job run twice)."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest

from sajax.executors import mpi_wire as wire
from tests.helpers import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "launch", "train.py")
SMOKE = os.path.join(ROOT, "configs", "smoke.py")
MPIEXEC = shutil.which("mpiexec") or os.path.join(os.path.dirname(sys.executable), "mpiexec")
needs_mpiexec = pytest.mark.skipif(not os.path.exists(MPIEXEC), reason="mpiexec not installed (pip install '.[mpi]')")
# configs/smoke.py (its MLP) on 1,024 examples, λ = 4 over the ranks, μ = 8, momentum 0.5 (as in tests/helpers.smoke_config)
ARGS = ["--config", SMOKE, "--config.learners=4", "--config.batch_per_learner=8", "--config.momentum=0.5"]


def _pmap_env(devices=None):
  """For pmap across processes against one process: XLA_FLAGS with LLVM at level 0 alone. With single-threaded
  Eigen, pmap over two processes no longer matched one process under the same flags (train loss 1.5908 vs
  1.6381); with multi-threaded Eigen it does."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0" + (f" --xla_force_host_platform_device_count={devices}"
                                                               if devices else "")
  return env


def _mpiexec(ranks, *args, timeout=600, env=None):   # timeout: a bound on a hang (load 17 once took > 240 s)
  """``mpiexec -n ranks launch/train.py args``; by default the ranks get tests/conftest.py's XLA flags (single-threaded
  Eigen, LLVM at level 0) without its device count, which the launcher sets for each rank (tests/helpers.child_env)."""
  return subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable, TRAIN, *args], capture_output=True,
                        text=True, env=env or child_env(), timeout=timeout)


def _said(result):
  """What a failed assertion shows: the exit code and both streams (mpiexec reports a rank's crash on stdout)."""
  return f"exit {result.returncode}\nstdout: {result.stdout[-1500:]}\nstderr: {result.stderr[-3000:]}"


def _records(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


# ---- the wire format -------------------------------------------------------------------------------------
def test_push_round_trips_through_the_wire():
  g = np.arange(10, dtype=np.float32)
  buf = wire.encode(wire.PUSH, learner=3, version=17, value=0.25, payload=g)
  assert buf.dtype == np.uint8 and buf.size == wire.HEADER_BYTES + 40
  msg = wire.decode(buf, dim=10, learners=4, expect=frozenset({wire.PUSH}))
  assert (msg.kind, msg.learner, msg.version, msg.value) == (wire.PUSH, 3, 17, 0.25)
  np.testing.assert_array_equal(msg.payload, g)


@pytest.mark.parametrize("damage, match", [
    (lambda b: b[:wire.HEADER_BYTES + 36], "truncated"),        # one float short
    (lambda b: b[:20], "shorter than"),                         # not even a header
    (lambda b: np.concatenate([b, np.zeros(4, np.uint8)]), "allowed: 10 float32"),   # one float too many
    (lambda b: np.concatenate([np.zeros(4, np.uint8), b[4:]]), "bad magic"),
])
def test_truncated_or_malformed_pushes_are_rejected(damage, match):
  buf = wire.encode(wire.PUSH, learner=1, version=0, payload=np.ones(10, np.float32))
  with pytest.raises(wire.WireError, match=match):
    wire.decode(damage(buf.copy()), dim=10, learners=4, expect=frozenset({wire.PUSH}))


def test_out_of_range_learner_and_unexpected_kind_are_rejected():
  with pytest.raises(wire.WireError, match="learner 4 is out of range"):
    wire.decode(wire.encode(wire.PUSH, learner=4, payload=np.ones(10, np.float32)), dim=10, learners=4,
                expect=frozenset({wire.PUSH}))
  with pytest.raises(wire.WireError, match="not accepted here"):
    wire.decode(wire.encode(wire.WEIGHTS, payload=np.ones(10, np.float32)), dim=10, learners=4,
                expect=frozenset({wire.PUSH}))


def test_learner_blocks_cover_every_learner_once_and_need_one_per_rank():
  blocks = wire.learner_blocks(8, 3)
  assert [list(b) for b in blocks] == [[0, 1], [2, 3, 4], [5, 6, 7]]
  with pytest.raises(ValueError, match="learners=2 is invalid with 3 MPI ranks"):
    wire.learner_blocks(2, 3)


@pytest.mark.parametrize("kind, value", [(wire.PERMIT, math.nan), (wire.PERMIT, math.inf), (wire.PERMIT, 0.0),
                                         (wire.PERMIT, 1.5), (wire.DRAW, -math.inf), (wire.DRAW, -1.0)])
def test_a_count_that_is_not_a_whole_number_is_malformed(kind, value):
  """A permit's serial and a draw's step are whole numbers; NaN, ±Inf or a fraction used to reach int()."""
  buf = wire.encode(kind, learner=1, version=3, value=value)
  with pytest.raises(wire.WireError, match="is not a count; allowed: a whole number"):
    wire.decode(buf, dim=10, learners=4, expect=frozenset({kind}))
  ok = wire.decode(wire.encode(kind, learner=1, version=3, value=7.0), dim=10, learners=4, expect=frozenset({kind}))
  assert ok.value == 7.0


@pytest.mark.parametrize("version, held, last, hardsync, match", [
    (4, 5, 100, False, "older than version 5"),          # rank 0 only ever sends newer weights
    (101, 5, 100, False, "past the run's last update 100"),
    (5 + 2 ** 40, 5, 100, False, "past the run's last update"),
    (7, 5, 100, True, "skips past version 6 under hardsync"),
    (4, 3, 3, False, "past the run's last update 3"),    # before START: exactly the setup's version
])
def test_a_weights_version_no_exchange_explains_is_rejected(version, held, last, hardsync, match):
  with pytest.raises(wire.WireError, match=match):
    wire.check_weights_version(version, held, last, hardsync)


@pytest.mark.parametrize("version, held, last, hardsync", [
    (5, 5, 100, False), (90, 5, 100, False), (100, 5, 100, False), (6, 5, 100, True), (3, 3, 3, False),
    (50, -1, 100, True)])
def test_a_weights_version_rank_0_can_have_sent_is_accepted(version, held, last, hardsync):
  wire.check_weights_version(version, held, last, hardsync)


# ---- one rank's side, in-process (no mpiexec) -----------------------------------------------------------------
class _NeverDone:
  """An MPI request that never completes (its other side stopped answering)."""

  def Test(self):
    return False

  def Cancel(self):
    pass


class _Done:
  def Test(self):
    return True


class _Comm:
  """What a rank reads of its communicator: its rank and the job's size; records sends and MPI_Abort; its
  ranks in ``silent`` never send anything."""

  def __init__(self, rank=1, size=2, silent=()):
    self.rank, self.size, self.silent, self.aborted, self.sent = rank, size, set(silent), [], []

  def Get_rank(self):
    return self.rank

  def Get_size(self):
    return self.size

  def Isend(self, message, dest, tag):
    self.sent.append((message[0], dest))
    return _Done()

  def Irecv(self, message, source, tag):
    return _NeverDone() if source in self.silent else _Done()

  def Abort(self, code):
    self.aborted.append(code)


def _run(protocol, tmp_path, learners=4, dim=10, total_samples=800, batch=8):
  """What a rank reads of a Run: config, flat parameters of ``dim`` floats, protocol, streams, total samples."""
  import ml_collections
  from sajax import streams
  config = ml_collections.ConfigDict({"learners": learners, "batch_per_learner": batch, "mpi_timeout_s": 0.3,
                                      "seed": 0})
  samplers = [streams.LearnerSampler(64, batch, seed=0, learner=k) for k in range(learners)]
  return types.SimpleNamespace(config=config, params={"w": np.zeros(dim, np.float32)}, protocol=protocol,
                               total_samples=total_samples, workdir=str(tmp_path),
                               streams=streams.learner_streams(samplers))


class _Wire:
  """In place of mpi_comm.receive/send for one rank: hands out queued buffers from rank 0, records what it sends."""

  def __init__(self, monkeypatch):
    from sajax.executors import mpi_learner_rank
    self.inbox, self.sent = [], []
    monkeypatch.setattr(mpi_learner_rank, "receive", self.receive)
    monkeypatch.setattr(mpi_learner_rank, "send", lambda comm, buf, dest, tag, **waits: self.sent.append(
        (dest, wire.KINDS[int(np.frombuffer(buf[4:8].tobytes(), "<u4")[0])])))

  def receive(self, comm, tag, stop, source=None):
    return (0, self.inbox.pop(0)) if self.inbox else None


def _learner_rank(protocol, tmp_path, monkeypatch, *, held=None, started=True, setup_version=0):
  pytest.importorskip("mpi4py")
  from sajax.executors import mpi_comm
  from sajax.executors.mpi_learner_rank import LearnerRank
  monkeypatch.setattr(mpi_comm, "_error_log", mpi_comm._error_log)
  link = _Wire(monkeypatch)
  rank = LearnerRank(_run(protocol, tmp_path), _Comm(rank=1, size=2))   # learners 2, 3; last update 800/8 + c
  rank.setup_version, rank.started = setup_version, started
  if held is not None:
    rank.published.set(held, np.zeros(10, np.float32))
  return rank, link


def _weights(version):
  return wire.encode(wire.WEIGHTS, version=version, payload=np.full(10, version, np.float32))


def _take(rank, link, *bufs):
  """Delivers ``bufs`` from rank 0 to the rank's receive loop, one at a time; the versions it holds after each."""
  from sajax.executors.mpi_learner_rank import RUN_EXPECTS
  held = []
  for buf in bufs:
    link.inbox.append(buf)
    rank._handle(rank._next(RUN_EXPECTS, "weights", None))
    held.append(rank.published.version)
  return held


@pytest.mark.parametrize("protocol, held, bad, good", [
    ("async", 5, 5 + 2 ** 40, 9),     # a flipped high bit: past the run's last update (100 + 1)
    ("async", 5, 3, 6),               # older than what it holds: rank 0 never sends that
    ("hardsync", 5, 7, 6),            # under hardsync the next update needs this rank's gradient on 5
])
def test_a_rank_rejects_a_weights_version_rank_0_cannot_have_sent_and_takes_the_next_real_one(
    protocol, held, bad, good, tmp_path, monkeypatch):
  """A bad version used to be taken: the rank then refused every real version (it takes newer ones only) and
  rank 0 rejected its pushes as newer than the PS, so under async its gradients were lost for the rest of the
  run. Now it is rejected like a bad magic number (RESEND) and the next real weights are taken."""
  import sajax
  make = {"async": sajax.Protocol.asynchronous, "hardsync": sajax.Protocol.hardsync}[protocol]
  rank, link = _learner_rank(make(learners=4), tmp_path, monkeypatch, held=held)
  assert _take(rank, link, _weights(bad), _weights(good)) == [held, good]
  assert link.sent == [(0, "resend")] and rank.rejected == 1


def test_before_the_start_a_rank_takes_only_the_setup_version(tmp_path, monkeypatch):
  import sajax
  rank, link = _learner_rank(sajax.Protocol.asynchronous(learners=4), tmp_path, monkeypatch, started=False,
                             setup_version=3)
  assert _take(rank, link, _weights(4), _weights(3)) == [-1, 3]
  assert link.sent == [(0, "resend")]


@pytest.mark.parametrize("serial", [math.nan, math.inf])
def test_a_permit_with_a_non_finite_serial_is_rejected_not_a_traceback(serial, tmp_path, monkeypatch):
  """int(nan) raised ValueError in the receive thread (a traceback, then MPI_Abort); now: malformed, RESEND, and
  the next real permit is granted."""
  import sajax
  rank, link = _learner_rank(sajax.Protocol.bounded(learners=4, n=1, max_spread=0), tmp_path, monkeypatch, held=5)
  _take(rank, link, wire.encode(wire.PERMIT, learner=2, version=5, value=serial),
        wire.encode(wire.PERMIT, learner=2, version=5, value=1.0))
  assert link.sent == [(0, "resend")] and rank.rejected == 1
  assert rank.published.take(2, threading.Event())      # the real one was granted


def test_a_rank_waiting_for_rank_0_gives_up_after_mpi_timeout_s_naming_itself(tmp_path, monkeypatch):
  import sajax
  from sajax.executors import mpi_learner_rank
  rank, _ = _learner_rank(sajax.Protocol.asynchronous(learners=4), tmp_path, monkeypatch)
  monkeypatch.setattr(mpi_learner_rank, "receive", lambda comm, tag, stop, source=None: None if _until(stop) else None)
  start = time.monotonic()
  with pytest.raises(RuntimeError, match=r"rank 1: nothing from rank 0 within 0.3 s while waiting for its setup "
                                          r"\(config.mpi_timeout_s\)"):
    rank._next(frozenset({wire.SETUP}), "its setup", time.monotonic() + 0.3)
  assert 0.25 < time.monotonic() - start < 5


def test_a_rank_that_hears_nothing_from_rank_0_for_mpi_timeout_s_ends_the_job_and_alive_keeps_it_waiting(
    tmp_path, monkeypatch):
  """Under hardsync a rank whose learners wait for rank 0's weights waited for ever if rank 0 stopped answering.
  Now rank 0 sends an ALIVE to a rank it has told nothing for mpi_timeout_s / 4, and a rank that has heard
  nothing at all for mpi_timeout_s ends the job (RankTimeout: one line, exit 5)."""
  import sajax
  from sajax.executors import mpi_comm
  rank, link = _learner_rank(sajax.Protocol.hardsync(learners=4), tmp_path, monkeypatch, held=5)
  rank.wait_s = 0.3                                     # a rank > 0 waits 1.5 × that for any word: 0.45 s
  rank.heard = time.monotonic() - 10                    # long silent ...
  _take(rank, link, wire.encode(wire.ALIVE))            # ... then rank 0 says it is busy, not gone
  heard = rank.heard
  assert time.monotonic() - heard < 5
  rank.check_rank_0_alive(heard + 0.4)                  # 0.4 s after the ALIVE: still waiting
  assert link.sent == [] and rank.published.version == 5
  with pytest.raises(mpi_comm.RankTimeout, match=r"^rank 0 sent nothing for 0.45 s \(1.5 × config.mpi_timeout_s\), "
                                                 r"not even that it is alive: it stopped answering$"):
    rank.check_rank_0_alive(heard + 0.5)


def test_a_send_waits_for_a_busy_rank_that_says_it_is_alive_and_gives_up_on_a_silent_one():
  """A rank > 0's push waits while rank 0 is busy (its queue full while it evaluates) but sends ALIVEs: the send
  gives up only after ``wait_s`` of silence, not ``wait_s`` after it started (a healthy run ended with exit 5)."""
  pytest.importorskip("mpi4py")
  from sajax.executors import mpi_comm

  class NeverTaken:
    def Test(self):
      return False

    def Cancel(self):
      pass

  class Comm:
    def Isend(self, buf, dest, tag):
      return NeverTaken()

  buf = wire.encode(wire.PUSH, learner=1, version=0, payload=np.ones(4, np.float32))
  start = time.monotonic()
  alive_until = start + 0.6                                  # rank 0 says it is alive for 0.6 s, then nothing
  with pytest.raises(mpi_comm.RankTimeout, match=r"^rank 0 did not take a \w+ message within 0.2 s"):
    mpi_comm.send(Comm(), buf, 0, wire.TAG_TO_SERVER, wait_s=0.2, heard=lambda: min(time.monotonic(), alive_until))
  assert time.monotonic() - start >= 0.8                     # 0.6 s alive + 0.2 s of silence
  start = time.monotonic()
  with pytest.raises(mpi_comm.RankTimeout):
    mpi_comm.send(Comm(), buf, 0, wire.TAG_TO_SERVER, wait_s=0.2)   # without heard=: 0.2 s from the start
  assert time.monotonic() - start < 0.6


def test_rank_0_tells_a_rank_it_has_sent_nothing_for_a_quarter_of_mpi_timeout_s_that_it_is_alive(
    tmp_path, monkeypatch):
  import sajax
  from sajax.executors import mpi
  server = _server_rank(sajax.Protocol.hardsync(learners=4), tmp_path)   # rank 1: learner 1; rank 2: 2, 3
  server.wait_s, server._control, server._sent = 4.0, [], {1: 3, 2: 3}
  server._told = {1: time.monotonic() - 1.5, 2: time.monotonic() + 60}   # rank 2 due only in a minute
  sent = []

  def send(comm, buf, dest, tag):
    sent.append((dest, wire.KINDS[int(np.frombuffer(buf[4:8].tobytes(), "<u4")[0])]))
    server._abandoned = True                               # one message is enough: stop the sender

  monkeypatch.setattr(mpi, "send", send)
  _ends_within(server._sender)
  assert sent == [(1, "alive")]                            # 1.5 s >= 4 s / 4; rank 2 was just sent something


def _until(stop):
  """Polls ``stop`` as mpi_comm.receive does when nothing arrives (a rank that never answers)."""
  while not stop():
    time.sleep(0.01)
  return True


def _server_rank(protocol, tmp_path, ranks=3):
  """Rank 0 with only what handling a message needs (no devices, no PS)."""
  pytest.importorskip("mpi4py")
  import queue
  from sajax.executors.learners import Published
  from sajax.executors.mpi import ServerRank
  server = ServerRank.__new__(ServerRank)
  server.comm = _Comm(rank=0, size=ranks)
  server.run, server.protocol, server.ranks = _run(protocol, tmp_path), protocol, ranks
  server.learners, server.dim, server.rejected = 4, 10, 0
  server.blocks = wire.learner_blocks(4, ranks)
  server.owner = {k: r for r, block in enumerate(server.blocks) for k in block}
  server.published, server.stop, server.queue = Published(3, np.zeros(10, np.float32)), threading.Event(), queue.Queue()
  server._lock, server._want, server._outstanding = threading.Condition(), set(), {}
  server._done, server._ready = set(), set()
  server.ps = types.SimpleNamespace(needs_stale_params=False)
  server.deaths, server.wait_s = types.SimpleNamespace(alive=set(range(4))), 0.3
  server._started, server._closing, server._abandoned = True, False, False
  now = time.monotonic()
  server._heard, server._pushed_on, server._last_update, server._next_watch = dict.fromkeys(range(1, ranks), now), {}, now, now
  return server


def test_rank_0_checkpoints_a_remote_learners_stream_past_every_step_it_drew_so_resume_never_replays_it(tmp_path):
  """Rank 0 used to count a remote learner's step when its gradient arrived, so a checkpoint taken while steps were
  being computed (or in flight) saved the stream before them and a resumed run drew them again. Now the rank says
  DRAW at each draw (before computing): learner 3 on rank 2 drew steps 0, 1, 2 and pushed step 0's gradient."""
  import sajax
  from sajax import streams
  server = _server_rank(sajax.Protocol.asynchronous(learners=4), tmp_path)
  for step in range(3):
    server._accept(2, wire.encode(wire.DRAW, learner=3, value=float(step)))
  server._accept(2, wire.encode(wire.PUSH, learner=3, version=3, payload=np.ones(10, np.float32)))
  server._accept(2, wire.encode(wire.DRAW, learner=3, value=1.0))      # a repeat changes nothing
  saved = server.run.streams[3].get_state()
  assert saved["step"] == 3 and server.rejected == 0
  fresh = streams.LearnerSampler(64, 8, seed=0, learner=3)
  for _ in range(3):
    next(fresh)
  resumed = streams.learner_streams([streams.LearnerSampler(64, 8, seed=0, learner=3)])[0]
  resumed.set_state(saved)
  indices, step = resumed.next()
  assert step == 3
  np.testing.assert_array_equal(indices, next(fresh))                # the first batch not drawn before
  assert server.queue.get_nowait().learner == 3                      # the push itself still reached the PS queue


@pytest.mark.parametrize("last_push, named", [(1.0, "[2]"), (np.nan, "[1, 2]")], ids=["finite", "dropped"])
def test_rank_0_ends_the_job_naming_a_rank_that_stopped_answering_mid_run(last_push, named, tmp_path, monkeypatch,
                                                                          capsys):
  """Hardsync, 3 ranks: rank 1's learner pushed on the current version 3 and waits for the next (silent by right);
  rank 2 (learners 2, 3) has sent nothing for mpi_timeout_s and the PS made no update meanwhile. The PS waited for
  rank 2's gradients forever; now rank 0 ends the job with one line naming rank 2 only, exit 5. A learner whose
  push was non-finite (dropped) recomputes at once, so the PS still waits for it: then rank 1 is named too."""
  import sajax
  from sajax.executors import mpi
  comm = _hooked(monkeypatch, rank=0)
  server = _server_rank(sajax.Protocol.hardsync(learners=4), tmp_path)
  server.comm = comm
  server._accept(1, wire.encode(wire.PUSH, learner=1, version=3, payload=np.full(10, last_push, np.float32)))
  monkeypatch.setattr(mpi, "receive", lambda comm, tag, stop, source=None: None if _until(stop) else None)
  capsys.readouterr()
  start = server._last_update = server._heard[2] = time.monotonic()   # silence counted from here
  _ends_within(server._receiver)
  assert 0.25 < time.monotonic() - start
  assert capsys.readouterr().err.splitlines() == [
      f"rank 0: no update for 0.3 s and rank(s) {named}, whose gradients the PS waits for, sent nothing for as long "
      "(config.mpi_timeout_s): stopped answering; ending the job (rerun the same command to resume from the last "
      "checkpoint)"]
  assert comm.aborted == [5]


def test_the_learner_loop_reports_each_draw_before_computing_on_it():
  """What DRAW relies on: ``on_draw(k, s)`` runs once per step, before that step's gradient is handed on."""
  import jax
  import jax.numpy as jnp
  from sajax.executors.learners import Learners, Published, Push
  events, stop = [], threading.Event()
  steps = iter(range(3))

  def next_batch(k):
    step = next(steps)
    if step == 2:
      stop.set()
    return np.ones((1, 3), np.float32), np.zeros(1, np.int32), step

  run = types.SimpleNamespace(
      protocol=types.SimpleNamespace(max_spread=None, learners_wait=False), config={}, params={"w": jnp.zeros(3)},
      loss_fn=lambda params, images, labels, key: jnp.sum(params["w"] * images), key=jax.random.PRNGKey(0),
      next_batch=next_batch, local=None)
  pool = Learners(run, {0: jax.devices()[0]}, Published(0, np.zeros(3, np.float32)),
                  lambda item: events.append(("push", item.learner)) if isinstance(item, Push) else None, stop,
                  to_server=np.asarray, on_draw=lambda k, s: events.append(("draw", k, s)))
  pool._loop(0)
  assert events == [("draw", 0, 0), ("push", 0), ("draw", 0, 1), ("push", 0), ("draw", 0, 2), ("push", 0)]


def test_rank_0_stops_waiting_for_a_rank_that_never_says_done_then_ends_with_one_line_naming_it(
    tmp_path, monkeypatch, capsys):
  """_stop_ranks gives up on rank 2 after mpi_timeout_s; the exit then ends the job at once with one line and
  exit code 5 (it used to wait for rank 2 in the exit barrier, unbounded)."""
  import sajax
  from sajax.executors import mpi_comm
  server = _server_rank(sajax.Protocol.asynchronous(learners=4), tmp_path)
  server.wait_s, server._control, server._closing, server._abandoned, server._done = 0.3, [], False, False, {1}
  comm = _hooked(monkeypatch, rank=0)
  server._stop_ranks(False, [])
  assert server._abandoned and [dest for dest, _ in server._control] == [1, 2]   # STOP was sent to both
  capsys.readouterr()
  _ends_within(mpi_comm._exit_together, comm)
  assert capsys.readouterr().err.splitlines() == [
      "rank 0: rank(s) [2] did not stop within 0.3 s (config.mpi_timeout_s); ending the job (rerun the same "
      "command to resume from the last checkpoint)"]
  assert comm.aborted == [mpi_comm.EXIT_RANK_FAILED] == [5]


def _hooked(monkeypatch, rank, grace=0.0):
  """Installs the abort hooks on a fake communicator (all restored after the test); ``grace``: ABORT_GRACE_S."""
  pytest.importorskip("mpi4py")
  from sajax.executors import mpi_comm
  comm = _Comm(rank=rank)
  monkeypatch.setattr(sys, "excepthook", sys.excepthook)
  monkeypatch.setattr(threading, "excepthook", threading.excepthook)
  for name in ("_hooked", "_missing", "_error_log", "_wait_s"):
    monkeypatch.setattr(mpi_comm, name, getattr(mpi_comm, name))
  monkeypatch.setattr(mpi_comm, "_ending", threading.Lock())
  if grace is not None:
    monkeypatch.setattr(mpi_comm, "ABORT_GRACE_S", grace)
  mpi_comm._install_abort_hooks(comm)
  return comm


def _ends_within(fn, *args, seconds=10):
  """Runs fn(*args) in a thread; fails (instead of hanging the suite) if it has not returned within ``seconds``."""
  t = threading.Thread(target=fn, args=args, daemon=True)
  t.start()
  t.join(seconds)
  assert not t.is_alive(), f"{fn.__name__} still waiting after {seconds} s"


@pytest.mark.parametrize("rank, size, silent", [(0, 3, [2]), (1, 3, [0])])
def test_the_exit_barrier_gives_up_after_mpi_timeout_s_with_one_line_naming_the_rank(
    rank, size, silent, monkeypatch, capsys):
  """The barrier at exit waited without a bound (MPI_Ibarrier), so one rank that never got there hung the job."""
  from sajax.executors import mpi_comm
  comm = _hooked(monkeypatch, rank=rank)
  comm.size, comm.silent = size, set(silent)
  monkeypatch.setattr(mpi_comm, "_wait_s", 0.3)
  start = time.monotonic()
  _ends_within(mpi_comm._exit_together, comm)
  assert 0.25 < time.monotonic() - start
  assert capsys.readouterr().err.splitlines() == [
      f"rank {rank}: rank(s) {silent} did not reach the end of the job within 0.3 s (config.mpi_timeout_s); "
      "ending the job (rerun the same command to resume from the last checkpoint)"]
  assert comm.aborted == [5]


def test_the_exit_handshake_passes_when_every_rank_comes(monkeypatch, capsys):
  from sajax.executors import mpi_comm
  comm = _hooked(monkeypatch, rank=0)
  comm.size = 3
  _ends_within(mpi_comm._exit_together, comm)
  assert comm.aborted == [] and [dest for _, dest in comm.sent] == [1, 2] and capsys.readouterr().err == ""


def test_a_send_that_a_silent_rank_never_takes_fails_naming_it():
  """Sends used to wait for completion without a bound: a rank that stopped receiving hung its peer."""
  pytest.importorskip("mpi4py")
  from sajax.executors import mpi_comm
  comm = _Comm(rank=0)
  comm.Isend = lambda *args, **kwargs: _NeverDone()
  errors = []

  def send():
    try:
      mpi_comm.send(comm, _weights(1), 2, wire.TAG_TO_LEARNERS, wait_s=0.3)
    except mpi_comm.RankTimeout as e:
      errors.append(str(e))
  _ends_within(send)
  assert errors == ["rank 2 did not take a weights message within 0.3 s (config.mpi_timeout_s): it stopped "
                    "answering"]


@pytest.mark.parametrize("rank", [0, 1])
def test_an_error_on_a_rank_ends_the_job_with_one_line_and_its_traceback_in_the_workdir(
    rank, tmp_path, monkeypatch, capsys):
  """An uncaught exception on any rank printed its whole traceback, then MPI_Abort(1). Now: one line
  ``rank N: Type: message; ending the job (...)``, exit code 5, the traceback in <workdir>/errors.log
  (rank 0 writes it; a rank > 0 sends it to rank 0 in its FAIL message); the line is printed before the grace
  wait, so mpiexec forwards it before MPI_Abort kills the proxy."""
  import sajax
  from sajax.executors import mpi_comm
  comm = _hooked(monkeypatch, rank, grace=None)
  mpi_comm.set_error_log(str(tmp_path))
  events = []
  monkeypatch.setattr(mpi_comm.time, "sleep", lambda s: events.append(("sleep", s, capsys.readouterr().err)))
  try:
    raise ValueError("the reason\nover two lines")
  except ValueError as e:
    sys.excepthook(type(e), e, e.__traceback__)
  line = (f"rank {rank}: ValueError: the reason over two lines; ending the job (rerun the same command to resume "
          f"from the last checkpoint; traceback in {tmp_path / 'errors.log'})")
  assert events == [("sleep", mpi_comm.ABORT_GRACE_S, line + "\n")] and comm.aborted == [5]
  assert mpi_comm.ABORT_GRACE_S >= 1
  if rank == 1:   # rank 0 receives the FAIL message, writes the traceback and ends the job without a second line
    (buf, dest), = comm.sent
    assert dest == 0 and not (tmp_path / "errors.log").exists()
    server = _server_rank(sajax.Protocol.asynchronous(learners=4), tmp_path, ranks=2)
    server._accept(1, buf)
    assert events[-1] == ("sleep", mpi_comm.ABORT_GRACE_S, "") and comm.aborted == [5, 5]
  log = (tmp_path / "errors.log").read_text()
  assert line in log and "Traceback (most recent call last)" in log and 'raise ValueError("the reason' in log


def test_a_second_reason_while_the_job_is_ending_prints_nothing_more(tmp_path, monkeypatch, capsys):
  """Rank 0's sender timed out on a silent rank and its watch named the same rank a moment later: two lines for
  one end. Only the first prints; the second goes to the error log."""
  from sajax.executors import mpi_comm
  comm = _hooked(monkeypatch, rank=0)
  mpi_comm.set_error_log(str(tmp_path))
  mpi_comm.fatal_error("the first reason")
  mpi_comm.fatal_error("the second reason")
  assert capsys.readouterr().err.splitlines() == ["rank 0: the first reason"] and comm.aborted == [5, 5]
  assert "rank 0: the second reason (while the job was ending)" in (tmp_path / "errors.log").read_text()


def test_an_error_before_the_workdir_is_known_says_how_to_see_its_traceback(monkeypatch, capsys):
  comm = _hooked(monkeypatch, rank=1)
  monkeypatch.setenv("SAJAX_DEBUG", "1")
  try:
    raise KeyError("x")
  except KeyError as e:
    sys.excepthook(type(e), e, e.__traceback__)
  err = capsys.readouterr().err
  assert err.startswith("Traceback (most recent call last)") and comm.aborted == [5]
  assert err.splitlines()[-1] == ("rank 1: KeyError: 'x'; ending the job (rerun the same command to resume from "
                                  "the last checkpoint; SAJAX_DEBUG=1 prints the traceback)")


def test_the_mpi_executor_refuses_an_mpi_without_thread_multiple(monkeypatch):
  """The receive, send and learner threads call MPI at once: an MPI that gives less than MPI_THREAD_MULTIPLE
  would corrupt or crash mid-run; it is refused at start-up with one line (exit 2, ConfigError)."""
  pytest.importorskip("mpi4py")
  from mpi4py import MPI
  from sajax import config as config_lib
  from sajax.executors import mpi_comm
  from tests.helpers import smoke_config
  monkeypatch.setattr(mpi_comm, "world", lambda: _Comm(rank=0, size=2))
  monkeypatch.setattr(mpi_comm, "_wait_s", mpi_comm._wait_s)
  monkeypatch.setattr(MPI, "Query_thread", lambda: MPI.THREAD_SERIALIZED)
  with pytest.raises(config_lib.ConfigError, match=r"^the MPI library gives thread level MPI_THREAD_SERIALIZED; "
                                                   r"executor 'mpi' needs MPI_THREAD_MULTIPLE .*; allowed: "):
    mpi_comm.prepare_processes(smoke_config("mpi", "async", learners=4, batch_per_learner=8))
  monkeypatch.setattr(MPI, "Query_thread", lambda: MPI.THREAD_MULTIPLE)
  assert mpi_comm.prepare_processes(smoke_config("mpi", "async", learners=4, batch_per_learner=8))


# ---- mpiexec on localhost: one job per protocol carries every fault it survives --------------------------------
def _check_consistent(final, c, rejected=0):
  """Every rank's learners contributed, and the staleness statistics add up to the pushes."""
  per_rank = final["pushes_per_rank"]
  assert len(per_rank) == 3 and min(per_rank) > 0, per_rank
  per_learner = final["staleness_per_learner"]
  assert sorted(per_learner) == ["0", "1", "2", "3"]
  accepted = sum(v["count"] for v in per_learner.values())
  assert sum(per_rank) == accepted + final["gradients_dropped"]
  assert sum(final["staleness_histogram"].values()) == accepted == final["updates"] * c
  assert final["staleness_mean"] == pytest.approx(
      sum(int(s) * n for s, n in final["staleness_histogram"].items()) / accepted)
  assert final["messages_rejected"] == rejected and final["learners_alive"] == 4


def _check_trained(result, workdir, c, rejected=0, maybe=(), examples=2 * 1024, plots=True):
  """Exit 0, one summary (rank 0's), at least ``examples`` samples (two epochs of 1,024), consistent statistics,
  it learned, the usual workdir (the files in ``maybe`` allowed too; the PNGs when the run drew them)."""
  assert result.returncode == 0, _said(result)
  assert result.stdout.count("sajax run:") == 1
  final = _records(workdir)[-1]
  assert final["samples"] >= examples and final["gradients_per_update"] == c
  _check_consistent(final, c, rejected)
  # It learned: below a uniform guess's loss ln 10 and chance error 0.9. Not tighter: under load the ranks' σ
  # grows, α0/σ shrinks, and one async run on a loaded machine ended 2 epochs at 0.83 test error.
  assert final["train_loss"] < math.log(10) and final["test_error"] < 0.9
  pngs = ["curves.png", "staleness.png"] if plots else []
  assert sorted(set(os.listdir(workdir)) - set(maybe)) == sorted(["checkpoints", "config.json", "metrics.jsonl",
                                                                  "tensorboard", *pngs])
  return final


# λ = 4 over 3 ranks: rank 0 runs learner 0, rank 1 learner 1, rank 2 learners 2 and 3. Every run below also
# corrupts, to each rank, the first weights message (bad magic) and the first one after the start (a version
# 2⁴⁰ ahead), and makes learner 3's gradient at its step 1 NaN: never rank 2's first push (the async job corrupts
# that one), and early: under load learner 3 made as few as 9 of an async run's 256 pushes. With the NaN at step 2
# a full suite once ended this job with gradients_dropped 0; a starved rank 2 is the likely cause (not confirmed:
# 22 reruns under load passed).
FAULTS = ("--config.nan_learners=(3,)", "--config.nan_at_step=1", "--config.fault_mpi_corrupt_weights=1",
          "--config.fault_mpi_corrupt_version=1")


def _job(tmp_path_factory, name, *args):
  workdir = tmp_path_factory.mktemp(name) / "run"
  return _mpiexec(3, *ARGS, "--config.executor=mpi", "--config.plots=True", *args, "--workdir", str(workdir)), workdir


@pytest.fixture(scope="session")
def async_job(tmp_path_factory):
  """3 ranks, async, the faults above, and each rank > 0's first push corrupted (rank 0 rejects 2 pushes)."""
  if not os.path.exists(MPIEXEC):
    pytest.skip("mpiexec not installed (pip install '.[mpi]')")
  return _job(tmp_path_factory, "mpi-async", "--config.protocol=async", *FAULTS,
              "--config.fault_mpi_corrupt_pushes=1")


@pytest.fixture(scope="session")
def hardsync_job(tmp_path_factory):
  """3 ranks, hardsync, the faults above (a corrupt push would end a hardsync job: tested apart)."""
  if not os.path.exists(MPIEXEC):
    pytest.skip("mpiexec not installed (pip install '.[mpi]')")
  return _job(tmp_path_factory, "mpi-hardsync", "--config.protocol=hardsync", *FAULTS)


on_async_job = pytest.mark.xdist_group("mpi-async")
on_hardsync_job = pytest.mark.xdist_group("mpi-hardsync")


@pytest.mark.slow
@on_async_job
def test_three_ranks_train_async_with_learners_on_every_rank(async_job):
  _check_trained(*async_job, c=1, rejected=2)


@pytest.mark.slow
@on_hardsync_job
def test_three_ranks_train_hardsync_with_sigma_0_and_one_push_each_per_update(hardsync_job):
  final = _check_trained(*hardsync_job, c=4)
  assert final["staleness_max"] == 0   # every rank's learners wait for each new version: σ = 0
  assert {v["count"] for v in final["staleness_per_learner"].values()} == {final["updates"]}


@pytest.mark.slow
@pytest.mark.parametrize("job", [pytest.param("async_job", marks=on_async_job),
                                 pytest.param("hardsync_job", marks=on_hardsync_job)])
def test_a_remote_nan_gradient_is_dropped_and_the_run_goes_on(job, request):
  """Learner 3 (rank 2) at its step 1: dropped and counted; under hardsync the round still completes (σ = 0)."""
  result, workdir = request.getfixturevalue(job)
  assert result.returncode == 0, _said(result)
  final = _records(workdir)[-1]
  assert final["gradients_dropped"] == 1 and final["staleness_per_learner"]["3"]["dropped"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("job", [pytest.param("async_job", marks=on_async_job),
                                 pytest.param("hardsync_job", marks=on_hardsync_job)])
def test_corrupt_weights_and_a_corrupt_version_are_rejected_and_asked_for_again(job, request):
  """Each rank > 0 rejects the bad magic and the bad version and asks again (RESEND). Taking the bad version
  used to make the rank refuse every real one and rank 0 reject all its pushes as newer than the PS."""
  result, workdir = request.getfixturevalue(job)
  assert result.returncode == 0, _said(result)
  for rank in (1, 2):
    said = [line for line in result.stderr.splitlines()
            if f"rank {rank}: rejected a malformed message from rank 0" in line and "asking again" in line]
    assert len(said) == 2 and "bad magic" in said[0] and "past the run's last update" in said[1], said
  assert _records(workdir)[-1]["messages_rejected"] == (2 if job == "async_job" else 0)


@pytest.mark.slow
@on_async_job
def test_a_corrupt_push_is_rejected_and_async_goes_on_without_it(async_job):
  result, workdir = async_job
  assert result.returncode == 0, _said(result)
  for rank in (1, 2):
    assert f"rank 0: rejected a malformed message from rank {rank}" in result.stderr
  assert _records(workdir)[-1]["messages_rejected"] == 2


@pytest.mark.slow
@needs_mpiexec
def test_a_corrupt_push_under_hardsync_ends_the_job_with_one_line_and_exit_5(tmp_path):
  """Rank 1 corrupts its first gradient. Hardsync would wait for it forever (the round needs every learner's),
  so rank 0 ends the job naming the rank: one line, exit 5 (MPI_Abort's code), no traceback."""
  workdir = tmp_path / "run"
  result = _mpiexec(2, *ARGS, "--config.executor=mpi", "--config.protocol=hardsync", "--config.epochs=1",
                    "--config.fault_mpi_corrupt_pushes=1", "--workdir", str(workdir), timeout=300)
  assert result.returncode == 5, _said(result)
  assert "rank 0: rejected a malformed message from rank 1" in result.stderr, _said(result)
  ending = [line for line in result.stderr.splitlines() if line.startswith("rank 0: a malformed message")]
  assert ending == ["rank 0: a malformed message from rank 1 may have been a gradient that protocol hardsync "
                    "waits for; ending the job (rerun the same command to resume from the last checkpoint)"]
  assert "Traceback" not in result.stderr + result.stdout


def _rank_pid(workdir, rank):
  """The pid of the training process of ``rank`` (from its PMI_RANK) among those writing to ``workdir``."""
  for pid in os.listdir("/proc"):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        cmdline = f.read().split(b"\0")
      with open(f"/proc/{pid}/environ", "rb") as f:
        environ = f.read().split(b"\0")
    except OSError:
      continue
    if TRAIN.encode() in cmdline and workdir.encode() in cmdline and f"PMI_RANK={rank}".encode() in environ:
      return int(pid)
  raise AssertionError(f"no rank {rank} process found")


@pytest.mark.slow
@needs_mpiexec
def test_a_killed_rank_ends_the_job_and_rerunning_resumes_and_trains_softsync(tmp_path):
  """3 ranks, 2-softsync: rank 2 killed after the first checkpoint ends the job; the same command resumes and
  trains to the end with every rank's learners (the softsync case of the three-rank runs above)."""
  workdir = tmp_path / "run"
  args = [*ARGS, "--config.executor=mpi", "--config.protocol=softsync", "--config.n=2", "--config.epochs=3",
          "--config.train_examples=512", "--workdir", str(workdir)]
  proc = subprocess.Popen([MPIEXEC, "-n", "3", sys.executable, TRAIN, *args], env=child_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
  try:
    deadline = time.time() + 400                  # c = 2, μ = 8: 32 updates per epoch of 512 examples
    while time.time() < deadline and not (workdir / "checkpoints" / "32").exists():
      time.sleep(0.2)
    assert (workdir / "checkpoints" / "32").exists(), "no checkpoint after epoch 1"
    os.kill(_rank_pid(str(workdir), rank=2), signal.SIGKILL)
    proc.communicate(timeout=180)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  assert proc.returncode != 0                     # MPI semantics: one rank dies, the job ends
  resumed = _mpiexec(3, *args)
  assert "resuming from the checkpoint" in resumed.stderr, _said(resumed)
  assert [r["epoch"] for r in _records(workdir)] == [1.0, 2.0, 3.0]
  # Statistics carried over the restart, still consistent. errors.log: when a rank saw the killed one's end
  # before mpiexec ended the job, it kept its traceback there.
  _check_trained(resumed, workdir, c=2, maybe=("errors.log",), examples=3 * 512, plots=False)   # configs/smoke.py


@pytest.mark.slow
@needs_mpiexec
def test_fewer_learners_than_ranks_exits_2_with_one_line(tmp_path):
  result = _mpiexec(2, *ARGS, "--config.executor=mpi", "--config.learners=1", "--workdir", str(tmp_path / "run"),
                    timeout=120)
  assert result.returncode == 2, _said(result)
  lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "learners=1 is invalid with 2 MPI ranks" in lines[0] and "allowed" in lines[0]
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
@needs_mpiexec
def test_pmap_across_two_processes_matches_one_process(tmp_path):
  """Global batch λμ = 32 over 4 devices: 2 processes × 2 devices vs 1 process × 4, one epoch (32 steps). The
  same shards, the same keys and the same order of the gradient sum (``sync.ordered_mean`` across processes),
  so the training is bitwise the same: train losses equal exactly, not approximately.

  Why exactly, not within a tolerance: rounding-level differences in the first steps mostly stay that small,
  but some move the whole run. With ``lax.pmean`` across the processes (gloo's ring all-reduce adds in another
  order than one process's all-reduce) the step losses differed by up to 2.4e-7 and the epoch-1 loss by 6e-9
  here, yet with one ulp of noise on the initial weights (the same in both runs) the epoch-1 loss was 1.948410
  with 2 processes and 1.947042 with 1: the 8.6e-4 that failed issue #10's run at rel=1e-5 (which got 1.948410
  vs 1.946744). Now they are equal with and without that noise. A process feeding the other's shards gives
  2.30. Only evaluation differs: rank 0 evaluates on its 2 devices, one process on 4, so the float32 test-loss
  sums are grouped differently (measured within 1.5e-7).
  """
  one_epoch = [*ARGS, "--config.executor=pmap", "--config.epochs=1"]
  two = _mpiexec(2, *one_epoch, "--workdir", str(tmp_path / "two"), env=_pmap_env())
  assert two.returncode == 0, two.stderr[-3000:]
  one = subprocess.run([sys.executable, TRAIN, *one_epoch, "--workdir", str(tmp_path / "one")],
                       capture_output=True, text=True, env=_pmap_env(devices=4), timeout=240)
  assert one.returncode == 0, one.stderr[-3000:]
  a, b = _records(tmp_path / "two"), _records(tmp_path / "one")
  assert [r["updates"] for r in a] == [r["updates"] for r in b] == [32]
  assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]          # bitwise: the same 32 steps
  for x, y in zip(a, b):
    assert x["test_loss"] == pytest.approx(y["test_loss"], rel=1e-6)
    assert abs(x["test_error"] - y["test_error"]) <= 0.002      # at most 2 of 1,000 test images flip
  assert os.listdir(tmp_path / "two" / "checkpoints")


@pytest.mark.slow
@needs_mpiexec
def test_a_diverged_mpi_run_exits_3_with_one_line(tmp_path):
  workdir = tmp_path / "run"
  result = _mpiexec(2, *ARGS, "--config.executor=mpi", "--config.protocol=async", "--config.learning_rate=1e9",
                    "--config.divergence_after=20", "--workdir", str(workdir))
  assert result.returncode == 3, _said(result)
  lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "diverged: 20 consecutive non-finite gradients at update" in lines[0], lines


@pytest.mark.slow
@needs_mpiexec
@pytest.mark.parametrize("executor", ["mpi", "pmap"])
def test_a_workdir_refused_on_rank_0_ends_every_rank_at_once(executor, tmp_path):
  """Rank 0 refuses a workdir holding another run's config: every rank exits 2 at once (the others used to wait
  for rank 0's first message, up to mpi_timeout_s)."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps({"learners": 99}))
  start = time.time()
  result = _mpiexec(2, *ARGS, f"--config.executor={executor}", "--workdir", str(workdir), timeout=300)
  assert result.returncode == 2, _said(result)
  lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "holds a run with another config" in lines[0]
  assert time.time() - start < 200


def test_a_checkpoint_that_does_not_fit_found_by_rank_0_alone_stops_every_rank_with_its_one_line(tmp_path, monkeypatch):
  """Only rank 0 restores, so only it finds a checkpoint that does not fit the run. Its refusal goes to every rank
  (rank0_outcome, as a refused workdir does): each stops with the one line and exit 2, instead of the others
  waiting mpi_timeout_s for rank 0 and ending with exit 5."""
  import sajax
  from sajax import checkpoint, config as config_lib, trainer
  from sajax.executors import mpi_comm
  from tests.helpers import smoke_config
  told = []

  def refuse(*args, **kwargs):
    raise checkpoint.CheckpointMismatch("checkpoint x does not fit this run's state; allowed: a fresh --workdir")

  def everyone(config, error):
    told.append(error)
    return None if error is None else config_lib.ConfigError(str(error))

  monkeypatch.setattr(trainer, "Run", refuse)
  monkeypatch.setattr(mpi_comm, "rank0_outcome", everyone)
  with pytest.raises(config_lib.ConfigError, match=r"^checkpoint x does not fit this run's state; allowed"):
    sajax.train(smoke_config("mpi", "async", learners=2, batch_per_learner=8), workdir=str(tmp_path / "run"))
  assert told[0] is None and isinstance(told[1], checkpoint.CheckpointMismatch)   # the workdir, then the restore


@pytest.mark.slow
@needs_mpiexec
@pytest.mark.xdist_group("mpi-elastic")
def test_learner_threads_on_rank_0_and_on_another_rank_leave_and_hardsync_keeps_sigma_0(tmp_path):
  """3 ranks, hardsync, λ = 4 on 512 examples, one epoch: learner 0 (rank 0) and learner 2 (rank 2) leave after
  update 5 (elastic_events); each finishes its round, its leave reaches rank 0's PS, c becomes 2, σ stays 0."""
  workdir = tmp_path / "run"
  result = _mpiexec(3, *ARGS, "--config.executor=mpi", "--config.protocol=hardsync", "--config.train_examples=512",
                    "--config.epochs=1", "--config.elastic_events=leave 0,2 at update 5", "--workdir", str(workdir))
  assert result.returncode == 0, _said(result)
  final = _records(workdir)[-1]
  assert final["learners_live"] == [1, 3] and final["learners_left"] == 2 and final["gradients_per_update"] == 2
  assert final["staleness_max"] == 0 and final["samples"] >= 512
  per = {k: v["count"] for k, v in final["staleness_per_learner"].items()}
  assert per["0"] == per["2"] == 5 and per["1"] == per["3"] == final["updates"]


@needs_mpiexec
@pytest.mark.xdist_group("mpi-elastic")
def test_a_run_resumes_from_its_checkpoint_with_another_lambda(tmp_path):
  """2 ranks, hardsync on 512 examples: one epoch at λ = 4 (c = 4, learners 0, 1 on rank 0 and 2, 3 on rank 1),
  then the same workdir to two epochs at λ = 2 (c = 2, one learner per rank): the update count, the samples and
  the PS's statistics go on from the checkpoint, learners 2 and 3 are counted as leaves, and the learner on each
  rank pushes once per update after the resume. (Hardsync, so that rank 1's learner must push: under async c = 1
  the learner beside the PS on rank 0 did every update of a loaded machine while rank 1 was still compiling.)"""
  workdir = tmp_path / "run"
  common = [*ARGS[:2], "--config.batch_per_learner=8", "--config.momentum=0.5", "--config.executor=mpi",
            "--config.protocol=hardsync", "--config.train_examples=512", "--config.lr_boundaries_epochs=()",
            "--workdir", str(workdir)]
  first = _mpiexec(2, *common, "--config.learners=4", "--config.epochs=1")
  assert first.returncode == 0, _said(first)
  before = _records(workdir)[-1]
  assert (before["updates"], before["samples"], before["gradients_per_update"]) == (16, 512, 4)
  second = _mpiexec(2, *common, "--config.learners=2", "--config.epochs=2")
  assert second.returncode == 0, _said(second)
  records = _records(workdir)
  assert records[0] == before                      # the first run's record is kept as it was
  final = records[-1]
  assert final["updates"] == 16 + 512 // 16 and final["samples"] == 1024 and final["gradients_per_update"] == 2
  assert final["learners_live"] == [0, 1] and (final["learners_left"], final["learners_joined"]) == (2, 0)
  counts = lambda record: {k: v["count"] for k, v in record["staleness_per_learner"].items()}  # noqa: E731
  was, now = counts(before), counts(final)
  assert was == {"0": 16, "1": 16, "2": 16, "3": 16}
  assert now == {"0": 16 + 32, "1": 16 + 32, "2": 16, "3": 16}   # learner 0 on rank 0 and learner 1 on rank 1
