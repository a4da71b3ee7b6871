"""Elastic learners (issue #22 item 2): c re-derived from the live set by the protocol's one rule, learners that
leave, join or are replaced under the simulated and threads executors, membership in metrics.jsonl, the SSP gate
across changes, the elastic_* config keys, and a run resumed with another λ. (Ray: tests/test_ray.py.)"""

import json
import os
import threading

import jax.numpy as jnp
import optax
import pytest

import sajax
from sajax import config as config_lib, elastic
from sajax.executors import common
from sajax.protocol import Protocol, SpreadGate
from sajax.server import ParameterServer
from tests.helpers import refused_smoke_run, reproducible, smoke_config

FIELDS = ("updates", "learners_alive", "learners_live", "learners_joined", "learners_left", "gradients_per_update")


def _config(executor, protocol, learners, **overrides):
  """configs/smoke.py on the executor tests' 512 examples, μ = 8, one epoch, no learning-rate decay, 4 records."""
  overrides.setdefault("epochs", 1)
  overrides.setdefault("eval_every_epochs", 0.25)
  return smoke_config(executor, protocol, learners=learners, batch_per_learner=8, lr_boundaries_epochs=(),
                      checkpoint_every_epochs=1, **overrides)


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


# ---- the pure pieces -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol, live, c", [
    (Protocol.hardsync(8), 8, 8), (Protocol.hardsync(8), 5, 5), (Protocol.hardsync(8), 11, 11),
    (Protocol.softsync(8, 2), 8, 4), (Protocol.softsync(8, 2), 5, 2), (Protocol.softsync(8, 2), 1, 1),
    (Protocol.softsync(8, 4), 3, 1), (Protocol.softsync(8, 4), 12, 3),
    (Protocol.asynchronous(8), 8, 1), (Protocol.asynchronous(2), 5, 1),
    (Protocol.bounded(6, 2, 1), 6, 3), (Protocol.bounded(6, 2, 1), 3, 1), (Protocol.bounded(6, 2, 1), 9, 4),
])
def test_c_for_a_live_count_is_the_protocols_one_rule(protocol, live, c):
  assert protocol.gradients_for(live) == c
  assert protocol.gradients_for(protocol.learners) == protocol.gradients_per_update
  with pytest.raises(ValueError, match="live=0 is invalid; allowed: an integer >= 1"):
    protocol.gradients_for(0)


def test_a_leave_completes_a_hardsync_round_with_the_gradients_buffered():
  """λ = 3, two gradients buffered: a leave (c 3 → 2) applies the update at once, σ = 0; a join (c 2 → 3)
  applies nothing."""
  params = {"w": jnp.zeros(2)}
  ps = ParameterServer(params, sajax.staleness_aware(optax.sgd(1.0), policy="inverse"), Protocol.hardsync(3))
  for k in (0, 1):
    assert not ps.push(k, 0, {"w": jnp.ones(2) * (k + 1)}).applied_update
  assert ps.set_live_learners(2) and ps.version == 1 and ps.gradients_per_update == 2
  assert jnp.allclose(ps.params["w"], -1.5)          # −(1 + 2)/2
  assert not ps.set_live_learners(3) and ps.gradients_per_update == 3 and ps.version == 1
  assert ps.stats.max == 0


def test_a_joining_learner_starts_at_the_minimum_and_a_leaving_one_releases_the_others():
  gate = SpreadGate(3, max_spread=1, counts=[5, 3, 4])
  gate.start()
  assert gate.waiting == {0}                          # 5 − 3 > 1
  assert gate.joined(3) == [3] and gate.counts[3] == 3   # at the minimum: neither blocks nor is blocked
  assert gate.died(1) == [] and gate.waiting == {0}   # the minimum is now 3 (learner 3): 0 still waits
  assert gate.died(3) == [0]                          # the minimum is 4: 5 − 4 ≤ 1, learner 0 starts


def test_membership_records_joins_leaves_and_ends_below_the_minimum_in_one_line():
  ps = ParameterServer({"w": jnp.zeros(1)}, sajax.staleness_aware(optax.sgd(1.0)), Protocol.softsync(4, 2))
  said = []
  members = common.Membership(4, ps.protocol, min_live=2, slots=6, say=said.append)
  assert not members.join(4, ps) and members.alive == {0, 1, 2, 3, 4} and ps.gradients_per_update == 2
  members.leave(0, "elastic_events", ps)
  members.leave(1, "remove_learner", ps)
  assert ps.gradients_per_update == 1 and members.free_slot() == 0
  tele = members.telemetry()
  assert tele["learners_live"] == [2, 3, 4] and tele["learners_joined"] == 1 and tele["learners_left"] == 2
  assert (tele["learners_live_min"], tele["learners_live_max"]) == (3, 5)
  members.leave(2, "x", ps)
  with pytest.raises(common.LearnersFailed) as failed:
    members.died(3, "OSError: gone", ps)
  assert str(failed.value) == ("learner 3 died (OSError: gone): 1 learner(s) live, fewer than "
                               "elastic_min_learners = 2")
  with pytest.raises(ValueError, match="learner=4 cannot join; allowed: a learner id 0..5 that is not live"):
    members.join(4, ps)
  # resumed with another λ: the live set is 0..λ'−1, the difference counted as joins and leaves
  again = common.Membership(3, ps.protocol, slots=6, say=said.append)
  again.restore(members.to_json(), ps, members.state())
  assert again.alive == {0, 1, 2} and again.errors == {} and ps.gradients_per_update == 1
  assert again.joins == members.joins + 3 and again.leaves == members.leaves + 1


@pytest.mark.parametrize("overrides, match", [
    ({"elastic_min_learners": 0}, r"config.elastic_min_learners=0 is invalid; allowed: 1..4"),
    ({"elastic_min_learners": 5}, r"config.elastic_min_learners=5 is invalid; allowed: 1..4"),
    ({"elastic_max_learners": 3}, r"config.elastic_max_learners=3 is invalid; allowed: 0 \(λ = 4\) or an integer >= 4"),
    ({"elastic_events": "leave 1 at noon"}, r"config.elastic_events: 'leave 1 at noon' is invalid; allowed: 'leave|join"),
    ({"elastic_events": "leave 1 at run 3/2"}, r"'at run 3/2' in 'leave 1 at run 3/2' is invalid; allowed: a fraction"),
    ({"elastic_events": "join 3-1 at update 4"}, r"learner ids '3-1' in 'join 3-1 at update 4' are invalid"),
    ({"elastic_events": "join 6 at update 4", "elastic_max_learners": 6},
     r"learner 6 of join is invalid; allowed: ids 0..5 \(elastic_max_learners = 6\)"),
    ({"elastic_events": "leave 1 at update 0"}, r"'at update 0' .* allowed: an update number >= 1"),
    ({"executor": "pmap", "elastic_replace": True}, r"read by executors simulated, threads, ray .*; allowed with executor 'pmap'"),
    ({"executor": "mpi", "elastic_events": "join 1 at update 2"}, r"has a join, which executor .mpi. does not have"),
])
def test_bad_elastic_values_are_refused_in_one_line(overrides, match):
  config = _config("simulated", "hardsync", 4)
  for key, value in overrides.items():
    config[key] = value
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(config)


def test_an_event_schedule_reads_as_ordered_updates():
  events = elastic.parse_events("leave 4-7 at run 1/3; join 4,6 at update 2; join 5 at run 0.5")
  assert events[0] == elastic.Event("leave", (4, 5, 6, 7), "run", 1 / 3)
  assert elastic.schedule(events, 30) == [(2, "join", (4, 6)), (10, "leave", (4, 5, 6, 7)), (15, "join", (5,))]
  pending = elastic.schedule(events, 30)
  assert elastic.due(pending, 10) == [("join", (4, 6)), ("leave", (4, 5, 6, 7))] and len(pending) == 1


@pytest.mark.slow
def test_a_bad_elastic_value_on_the_command_line_exits_2_in_one_line_and_writes_nothing(tmp_path):
  errors = refused_smoke_run(tmp_path / "run", "--config.executor=simulated",
                             "--config.elastic_events=leave 9 at run 1/2")
  assert len(errors) == 1 and "learner 9 of leave is invalid; allowed: ids 0..3" in errors[0]


# ---- whole runs ----------------------------------------------------------------------------------------------
EVENTS = "leave 2-3 at run 1/4; join 2-3 at update 20; join 4 at run 3/4"


@pytest.fixture(scope="module")
def hardsync_events(tmp_path_factory):
  """Simulated hardsync, λ = 4 (max 5): learners 2 and 3 leave after a quarter of the run, learner 4 joins at
  three quarters (update 12), 2 and 3 come back at update 20; the same config run twice."""
  config = _config("simulated", "hardsync", 4, elastic_events=EVENTS, elastic_max_learners=5)
  first = str(tmp_path_factory.mktemp("events") / "a")
  second = str(tmp_path_factory.mktemp("events") / "b")
  sajax.train(config, workdir=first)
  sajax.train(config, workdir=second)
  return _records(first), _records(second)


def test_hardsync_keeps_sigma_0_and_c_the_live_count_across_leaves_and_joins(hardsync_events):
  records, _ = hardsync_events
  assert all(r["staleness_max"] == 0 for r in records)
  assert all(r["gradients_per_update"] == r["learners_alive"] == len(r["learners_live"]) for r in records)
  lives = [r["learners_live"] for r in records]
  assert lives[0] == [0, 1, 2, 3] and [0, 1] in lives and [0, 1, 4] in lives and lives[-1] == [0, 1, 2, 3, 4]
  final = records[-1]
  assert (final["learners_joined"], final["learners_left"]) == (3, 2)
  assert (final["learners_live_min"], final["learners_live_max"]) == (2, 5)
  per = final["staleness_per_learner"]
  assert per["2"]["count"] < per["0"]["count"] and per["4"]["count"] < per["0"]["count"]   # away; joined late
  assert per["0"]["count"] == final["updates"]        # one gradient per update: every round had learner 0


def test_the_same_event_schedule_and_seed_give_the_same_metrics(hardsync_events):
  first, second = hardsync_events
  assert reproducible(first) == reproducible(second)


@pytest.mark.slow
def test_under_ssp_a_learner_that_leaves_or_dies_never_holds_the_others_back(tmp_path):
  """SSP s = 0, c = λ (lockstep) with a slow learner 3 that leaves at update 4, and learner 1 raising at its
  step 3 and replaced (elastic_replace): the run finishes, and the replacement's count started at the minimum."""
  config = _config("simulated", "ssp", 4, n=1, ssp_spread=0, sim_speeds=(1.0, 1.0, 1.0, 3.0),
                   elastic_events="leave 3 at update 4", elastic_replace=True, fault_learner=1, fault_at_step=3)
  final = sajax.train(config, workdir=str(tmp_path)).metrics
  assert final["samples"] >= 512 and final["learners_live"] == [0, 1, 2] and final["gradients_per_update"] == 3
  assert "injected fault" in final["learners_replaced"]["1"] and "learners_dead" not in final
  assert (final["learners_left"], final["learners_joined"]) == (2, 1) and final["ssp_max_spread"] == 0
  assert final["staleness_per_learner"]["3"]["count"] == 4


def test_below_elastic_min_learners_the_run_ends_with_its_one_line_reason(tmp_path):
  config = _config("simulated", "async", 3, elastic_min_learners=3, elastic_events="leave 2 at update 3")
  with pytest.raises(common.LearnersFailed, match=r"^learner 2 left \(elastic_events\): 2 learner\(s\) live, "
                                                  r"fewer than elastic_min_learners = 3$"):
    sajax.train(config, workdir=str(tmp_path))


def test_threads_add_and_remove_learners_while_the_run_goes_with_sigma_0(tmp_path):
  """Threads hardsync λ = 3 (max 4): add_learner from the run's callback at update 5, remove_learner(0) from
  another thread at update 12; every gradient has σ = 0 and c follows the live count."""
  added, removed = [], []

  def elastic_calls(run):
    if run.updates == 5 and not added:
      added.append(run.executor.add_learner())
    if run.updates == 12 and not removed:
      removed.append(threading.Thread(target=run.executor.remove_learner, args=(0,)))
      removed[0].start()

  config = _config("threads", "hardsync", 3, elastic_max_learners=4)
  final = sajax.train(config, workdir=str(tmp_path), callbacks=[elastic_calls]).metrics
  assert added == [3] and final["staleness_max"] == 0
  assert final["learners_live"] == [1, 2, 3] and final["gradients_per_update"] == 3
  assert (final["learners_joined"], final["learners_left"], final["learners_live_max"]) == (1, 1, 4)
  per = final["staleness_per_learner"]
  assert 12 <= per["0"]["count"] < per["1"]["count"] and per["3"]["count"] < per["1"]["count"]
  records = _records(str(tmp_path))
  assert any(r["learners_alive"] == 4 and r["gradients_per_update"] == 4 for r in records)


@pytest.mark.parametrize("executor", ["simulated", pytest.param("threads", marks=pytest.mark.slow)])
def test_a_run_resumes_from_its_checkpoint_with_another_lambda(tmp_path, executor):
  """2-softsync λ = 4 (c = 2) for half an epoch, then the same workdir with λ = 2 (c = 1) to one epoch: the
  update count goes on, learners 2 and 3 are gone (counted as leaves), c comes from the new live set. Simulated
  runs give each learner its speed (sim_speeds), which changes with λ (with the same λ it may not)."""
  workdir = str(tmp_path / "run")
  speeds = lambda learners: {"sim_speeds": (1.0, 2.0, 1.5, 3.0)[:learners]} if executor == "simulated" else {}  # noqa: E731
  first = sajax.train(_config(executor, "softsync", 4, n=2, epochs=0.5, **speeds(4)), workdir=workdir).metrics
  assert first["gradients_per_update"] == 2
  final = sajax.train(_config(executor, "softsync", 2, n=2, epochs=1, **speeds(2)), workdir=workdir).metrics
  assert final["updates"] > first["updates"] and final["samples"] >= 512
  assert final["learners_live"] == [0, 1] and final["gradients_per_update"] == 1 and final["learners_left"] == 2
  per = final["staleness_per_learner"]
  assert per["2"]["count"] == first["staleness_per_learner"]["2"]["count"]   # no push after the resume
  assert per["0"]["count"] > first["staleness_per_learner"]["0"]["count"]


def test_per_learner_keys_may_change_on_a_resume_only_with_lambda():
  """sim_speeds has one entry per learner: a resume with another λ must change it; with the same λ a change is
  another run (refused, as before)."""
  old = {"learners": 4, "sim_speeds": [1.0, 2.0, 1.5, 3.0]}
  assert config_lib.config_differences(old, {"learners": 2, "sim_speeds": [1.0, 2.0]}) == []
  assert config_lib.config_differences(old, {"learners": 4, "sim_speeds": [1.0, 2.0, 1.5, 9.0]}) == [
      "sim_speeds: [1.0, 2.0, 1.5, 3.0] -> [1.0, 2.0, 1.5, 9.0]"]


def test_threads_apply_the_event_schedule_too(tmp_path):
  """Threads async λ = 2 (max 3): learner 2 joins after update 3, learner 0 leaves after half the run and pushes
  nothing after the PS took its leave. (Comparing learner 0's pushes with learner 1's assumed fair threads: on a
  loaded CI machine learner 1 made 18 pushes in the whole run and learner 0 20 in its half.)"""
  config = _config("threads", "async", 2, elastic_max_learners=3, eval_every_epochs=1,
                   elastic_events="join 2 at update 3; leave 0 at run 1/2")
  after_leave = []   # (update, learner 0's pushes) at each update once it has left

  def watch(run):
    if 0 not in run.executor.deaths.alive and run.updates > 3:
      after_leave.append((run.updates, run.executor.ps.stats.per_learner[0].count))

  final = sajax.train(config, workdir=str(tmp_path), callbacks=[watch]).metrics
  assert final["learners_live"] == [1, 2] and (final["learners_joined"], final["learners_left"]) == (1, 1)
  per = final["staleness_per_learner"]
  assert per["2"]["count"] > 0 and final["gradients_per_update"] == 1
  assert after_leave[0][0] >= final["updates"] // 2 and {n for _, n in after_leave} == {per["0"]["count"]}
