"""Bounded staleness (ssp, Ho et al. 2013): the one gate every executor uses, and its properties end to end.

The rule: learner k starts a gradient only while pushes_k − min over live learners of pushes ≤ s (pushes
counted as the PS accepted them). So when the PS accepts a gradient of learner k, k had at most s more accepted
gradients than the slowest live learner; the tests check exactly that from what the PS recorded, not from the
gate. s = 0 with c = λ is hardsync (σ = 0); a dead learner leaves the minimum.
"""

import random
import threading
import time

import pytest
from hypothesis import given, settings, strategies as st

import sajax
from sajax import config as config_lib, trainer
from sajax.protocol import Protocol, SpreadGate
from tests.helpers import SMOKE_EXAMPLES, reproducible, smoke_config, stop_with_gradients_buffered
from tests.test_mpi import ARGS as MPI_ARGS, _mpiexec, _records, needs_mpiexec


# ---- the gate (pure) -------------------------------------------------------------------------------------
def test_s_0_is_lockstep_rounds():
  gate = SpreadGate(3, 0)
  assert gate.start() == [0, 1, 2]
  assert gate.pushed(1) == [] and gate.pushed(0) == []       # one ahead of learner 2: wait
  assert gate.pushed(2) == [0, 1, 2]                          # the slowest pushed: everyone starts again
  assert gate.waits == 2 and gate.max_lead == 0 and not gate.waiting


def test_s_1_lets_a_learner_lead_by_one_gradient():
  gate = SpreadGate(3, 1)
  gate.start()
  assert gate.pushed(0) == [0]                                # 1 ahead: may start
  assert gate.pushed(0) == []                                 # 2 ahead: waits
  assert gate.pushed(1) == [1]
  assert gate.pushed(2) == [0, 2]                             # min 1: learner 0 (2 pushes) is 1 ahead again
  assert gate.max_lead == 1


def test_a_dropped_gradient_does_not_count_and_its_learner_recomputes_at_once():
  gate = SpreadGate(2, 0)
  gate.start()
  assert gate.pushed(0) == []
  assert gate.pushed(1, accepted=False) == [1]                # NaN: not counted, learner 1 is still the slowest
  assert gate.counts == [1, 0] and gate.pushed(1) == [0, 1]


def test_a_death_releases_the_learners_waiting_for_the_dead_one():
  gate = SpreadGate(3, 0)
  gate.start()
  gate.pushed(0), gate.pushed(1)
  assert gate.died(2) == [0, 1] and gate.alive == {0, 1}
  assert gate.pushed(0) == [] and gate.died(1) == [0]         # the last live learner is never held back
  assert gate.died(0) == [] and gate.start() == []


def test_a_resumed_gate_starts_only_the_learners_within_s():
  gate = SpreadGate(3, 1, counts=[5, 3, 4], alive={0, 1, 2})
  assert gate.start() == [1, 2] and gate.waiting == {0}


@settings(max_examples=300, deadline=None)
@given(learners=st.integers(1, 6), spread=st.integers(0, 3), seed=st.integers(0, 2**32 - 1))
def test_random_runs_keep_the_spread_and_never_deadlock(learners, spread, seed):
  """Any order of pushes (some dropped) and deaths: each learner starts only within s of the slowest live
  one (checked from the counts, not the gate's own record), the waiting ones are exactly those more than s
  ahead, and some live learner is always computing."""
  rng = random.Random(seed)
  gate = SpreadGate(learners, spread)
  counts, alive, running = [0] * learners, set(range(learners)), set()

  def started(ks):
    for k in ks:
      assert k in alive and k not in running and counts[k] - min(counts[j] for j in alive) <= spread
      running.add(k)

  started(gate.start())
  for _ in range(60):
    if not alive:
      break
    assert running, "every live learner waits: deadlock"
    k = rng.choice(sorted(running))
    running.discard(k)
    if rng.random() < 0.1:
      alive.discard(k)
      started(gate.died(k))
    else:
      accepted = rng.random() < 0.9
      counts[k] += accepted
      started(gate.pushed(k, accepted))
    if alive:
      low = min(counts[j] for j in alive)
      assert gate.waiting == alive - running == {j for j in alive if counts[j] - low > spread}
      assert max(counts[j] for j in alive) - low <= spread + 1
  assert gate.max_lead <= spread


# ---- the protocol and its config -------------------------------------------------------------------------
def test_bounded_protocol_takes_c_from_n():
  p = Protocol.bounded(learners=8, n=2, max_spread=3)
  assert (p.name, p.gradients_per_update, p.max_spread, p.learners_wait) == ("ssp", 4, 3, False)
  assert Protocol.from_name("ssp", 8, 1, 0) == Protocol.bounded(8, 1, 0)
  assert p.with_learners(1).gradients_per_update == 1
  with pytest.raises(ValueError, match=r"max_spread=-1 is invalid for ssp; allowed: an integer >= 0"):
    Protocol.bounded(4, 1, max_spread=-1)
  with pytest.raises(ValueError, match=r"n=5 is out of range for ssp with 4 learners; allowed: 1 <= n <= 4"):
    Protocol.bounded(4, 5, max_spread=0)


def test_a_negative_spread_is_refused_in_one_line(tmp_path):
  with pytest.raises(config_lib.ConfigError, match=r"^config.ssp_spread=-2 is invalid; allowed: an integer >= 0"):
    sajax.train(_config("simulated", spread=-2), workdir=str(tmp_path / "x"))
  assert not (tmp_path / "x").exists()
  config = _config("simulated")
  config.protocol = "sync"
  with pytest.raises(config_lib.ConfigError, match="allowed: hardsync, softsync, async, ssp"):
    config_lib.validate(config)


# ---- end to end ------------------------------------------------------------------------------------------
def _config(executor, *, n=4, spread=1, **overrides):
  """λ = 4, μ = 8, 1 epoch of the executor tests' slice (tests/helpers.SMOKE_EXAMPLES); n = 4 (c = 1) unless
  given."""
  overrides.setdefault("epochs", 1)
  overrides.setdefault("lr_boundaries_epochs", (0.5,))
  return smoke_config(executor, "ssp", n=n, learners=4, batch_per_learner=8, ssp_spread=spread, **overrides)


class LeadRecorder:
  """A callback: with c = 1 every update is one accepted push, so the counts the PS recorded before it give the
  pushing learner's lead over the slowest live learner."""

  def __init__(self):
    self.before, self.leads = None, []

  def __call__(self, run):
    per = run.executor.ps.stats.per_learner
    counts = [per[k].count if k in per else 0 for k in range(run.config.learners)]
    before = self.before or [0] * len(counts)
    (k,) = [j for j in range(len(counts)) if counts[j] != before[j]]
    self.leads.append(before[k] - min(before[j] for j in run.executor.deaths.alive))
    self.before = counts


def _check_spread(result, recorder, s):
  final = result.metrics
  assert final["gradients_per_update"] == 1 and len(recorder.leads) == final["updates"]
  assert max(recorder.leads) <= s and final["ssp_max_spread"] <= s and final["ssp_spread"] == s
  counts = [v["count"] for v in final["staleness_per_learner"].values()]
  assert max(counts) - min(counts) <= s + 1      # softsync would let the fast learners run far ahead
  assert final["ssp_waits"] > 0


def test_simulated_straggler_holds_the_others_within_s(tmp_path):
  """Learner 0 is 4× slower: under softsync it would push a quarter as often; here the others wait for it."""
  recorder = LeadRecorder()
  result = sajax.train(_config("simulated", sim_profile="one_slow"), workdir=str(tmp_path), callbacks=[recorder])
  _check_spread(result, recorder, 1)
  assert result.metrics["sim_time"] >= 0.9 * result.metrics["updates"]   # paced by learner 0: 4 pushes in 4 s


def test_threads_slow_learner_holds_the_others_within_s(tmp_path, monkeypatch):
  """Learner 0 sleeps before each mini-batch (a slower host, no fault)."""
  next_batch = trainer.Run.next_batch

  def slow(self, learner):
    if learner == 0:
      time.sleep(0.1)
    return next_batch(self, learner)

  monkeypatch.setattr(trainer.Run, "next_batch", slow)
  recorder = LeadRecorder()
  result = sajax.train(_config("threads"), workdir=str(tmp_path), callbacks=[recorder])
  _check_spread(result, recorder, 1)


@pytest.mark.parametrize("executor", ["threads", "simulated"])
def test_s_0_with_c_lambda_is_hardsync_even_with_a_dropped_gradient(executor, tmp_path):
  """n = 1 (c = λ), s = 0: σ = 0 exactly and one gradient per learner per update; learner 2's NaN gradient at
  its step 3 is dropped, not counted, and recomputed at once."""
  result = sajax.train(_config(executor, n=1, spread=0, nan_learners=(2,), nan_at_step=3), workdir=str(tmp_path))
  final = result.metrics
  assert final["gradients_per_update"] == 4 and final["staleness_max"] == 0
  assert final["staleness_histogram"] == {"0": 4 * final["updates"]}
  assert {v["count"] for v in final["staleness_per_learner"].values()} == {final["updates"]}
  assert final["gradients_dropped"] == 1 and final["ssp_max_spread"] == 0


@pytest.mark.parametrize("executor, n, spread", [("threads", 1, 0), ("simulated", 4, 1)])
def test_a_dead_learner_never_holds_the_others_back(executor, n, spread, tmp_path):
  """The slowest learner (0; 4× slower in the simulation) dies at its step 2: the others go on past it."""
  overrides = {"sim_profile": "one_slow"} if executor == "simulated" else {}
  result = sajax.train(_config(executor, n=n, spread=spread, fault_learner=0, fault_at_step=2, **overrides),
                       workdir=str(tmp_path))
  final = result.metrics
  assert final["learners_alive"] == 3 and "injected fault" in final["learners_dead"]["0"]
  assert final["samples"] >= SMOKE_EXAMPLES
  per = final["staleness_per_learner"]
  assert per["0"]["count"] == 2 and min(per[k]["count"] for k in "123") > 2 + spread + 1
  if n == 1:
    assert final["gradients_per_update"] == 3 and final["staleness_max"] == 0   # c re-derived, still σ = 0


def test_a_simulation_stopped_between_two_updates_resumes_bit_identical(tmp_path, monkeypatch):
  """c = 2: stopped (as by Ctrl-C) right after a push that left a gradient buffered toward the next update, while
  learners wait at the gate; the checkpoint holds that gradient, counted in the gate's counts, so the resumed run
  ends with every record equal to the uninterrupted run's."""
  config = _config("simulated", n=2, train_examples=512, epochs=2, sim_jitter=0.5, sim_profile="lognormal",
                   checkpoint_every_epochs=2)
  whole = sajax.train(config, workdir=str(tmp_path / "whole"))
  callbacks, stopped = stop_with_gradients_buffered(monkeypatch, 60, lambda run: run.executor.gate.waiting)
  with pytest.raises(KeyboardInterrupt):
    sajax.train(config, workdir=str(tmp_path / "stopped"), callbacks=callbacks)
  monkeypatch.undo()
  assert stopped == [1]
  resumed = sajax.train(config, workdir=str(tmp_path / "stopped"))
  assert reproducible(resumed.history) == reproducible(whole.history)
  assert whole.metrics["ssp_waits"] > 0 and whole.metrics["gradients_per_update"] == 2


# ---- mpiexec -n 2 ----------------------------------------------------------------------------------------
@pytest.mark.slow
@needs_mpiexec
def test_mpi_s_0_with_c_lambda_is_hardsync_even_when_a_permit_is_corrupted_and_sent_again(tmp_path):
  """Rank 1's learners (2, 3) start only on rank 0's permission, after the weights it names: σ = 0 exactly. Rank 0
  corrupts its first PERMIT to rank 1: the rank rejects it and asks again (RESEND); rank 0 resends that learner's
  outstanding permit, so the run ends (it waited forever before) and s = 0, c = λ still gives σ = 0."""
  workdir = tmp_path / "run"
  result = _mpiexec(2, *MPI_ARGS, "--config.executor=mpi", "--config.protocol=ssp", "--config.n=1",
                    "--config.ssp_spread=0", "--config.epochs=1", "--config.fault_mpi_corrupt_permits=1",
                    "--workdir", str(workdir), timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "rank 1: rejected a malformed message from rank 0" in result.stderr and "asking again" in result.stderr
  final = _records(workdir)[-1]
  assert min(final["pushes_per_rank"]) > 0 and final["gradients_per_update"] == 4
  assert final["staleness_max"] == 0 and final["ssp_max_spread"] == 0
  assert final["messages_rejected"] == 0          # rank 0 rejected nothing: only its message to rank 1 was bad
  assert {v["count"] for v in final["staleness_per_learner"].values()} == {final["updates"]}


def test_a_rank_grants_each_permit_serial_once_so_a_resent_permit_never_starts_a_second_gradient():
  pytest.importorskip("mpi4py")
  from sajax.executors import mpi_wire as wire
  from sajax.executors.learners import Published
  from sajax.executors.mpi import LearnerRank
  rank = LearnerRank.__new__(LearnerRank)   # only what _handle reads
  rank.local, rank._granted, rank.published, rank.rejected, rank.rank = [2, 3], {2: 0, 3: 0}, Published(5, None), 0, 1
  stop = threading.Event()

  def permit(k, serial, version=5):
    rank._handle(wire.Message(wire.PERMIT, k, version, float(serial)))

  permit(2, 1)
  assert rank.published.take(2, stop)                    # granted and used
  permit(2, 1)                                           # resent after a RESEND: already granted
  assert 2 not in rank.published._permits
  permit(2, 2)
  permit(3, 1)
  assert rank.published._permits == {2: 5, 3: 5}
  permit(0, 1)                                           # another rank's learner: rejected, never granted
  assert rank.rejected == 1 and 0 not in rank.published._permits
