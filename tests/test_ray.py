"""The ray executor: learners in Ray actors around the PS core in this process, on a local Ray of 2 CPUs started
once for the module (and shut down after it). Every run starts 2–3 actor processes (each builds the run and
compiles: most of a run's time), so the runs are marked slow; the checks of the pieces are not."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types

import numpy as np
import pytest
import ray

import sajax
from sajax import config as config_lib
from sajax.executors import ray_actors, ray_engine, ray_local
from sajax.executors.learners import Published
from sajax.server import ParameterServer
from tests.helpers import child_env, refused_smoke_run, smoke_config

pytestmark = pytest.mark.xdist_group("ray")   # one worker runs them all: one local Ray, not one per worker


@pytest.fixture(scope="module")
def local_ray():
  ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
  yield
  ray.shutdown()
  assert not ray.is_initialized()   # the next module starts without a Ray of ours


def _config(protocol, learners, **overrides):
  """configs/smoke.py on the executor tests' 512 examples, μ = 8, one epoch, no learning-rate decay."""
  overrides.setdefault("epochs", 1)
  return smoke_config("ray", protocol, learners=learners, batch_per_learner=8, lr_boundaries_epochs=(),
                      eval_every_epochs=1, checkpoint_every_epochs=1, **overrides)


# ---- the pieces ----------------------------------------------------------------------------------------------
def test_actor_blocks_cover_every_learner_once():
  assert ray_engine.actor_blocks(5, 1) == [[0], [1], [2], [3], [4]]
  assert ray_engine.actor_blocks(5, 2) == [[0, 1], [2, 3], [4]]
  assert ray_engine.actor_blocks(3, 3) == [[0, 1, 2]]


def test_an_actor_gets_a_gpu_of_its_own_a_share_or_none():
  assert ray_engine.actor_options(0, 4) == {}
  own = ray_engine.actor_options(8, 4)
  assert own["num_gpus"] == 1.0 and own["runtime_env"]["env_vars"]["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
  assert ray_engine.actor_options(1, 3)["num_gpus"] == 0.3333   # 3 actors on one GPU: Ray's 4 decimals


@pytest.mark.parametrize("key, value, match", [
    ("ray_address", "not an address", "config.ray_address='not an address' is invalid; allowed: ''"),
    ("ray_address", "head:port", "config.ray_address='head:port' is invalid"),
    ("ray_learners_per_actor", 0, r"config.ray_learners_per_actor=0 is invalid; allowed: 1..3"),
    ("ray_learners_per_actor", 4, r"config.ray_learners_per_actor=4 is invalid; allowed: 1..3"),
])
def test_bad_ray_keys_are_refused_in_one_line(key, value, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(_config("async", 3, **{key: value}))


@pytest.mark.parametrize("address", ["", "auto", "10.0.0.1:6379", "ray://head.example:10001", "[::1]:6379"])
def test_good_ray_addresses_pass(address):
  config_lib.validate(_config("async", 3, ray_address=address))


def test_dylu_is_refused_under_ray_in_one_line():
  with pytest.raises(config_lib.ConfigError, match="allowed executors: threads, simulated"):
    config_lib.validate(_config("async", 2, local_steps=2, dynamic_local_steps=True))


def test_a_remote_error_reads_as_one_line():
  try:
    ray_engine.probe("127.0.0.1:1", timeout_s=2)
  except ConnectionError as e:
    line = ray_engine.one_line(e)
  assert line.startswith("ConnectionError: nothing answers at 127.0.0.1:1") and "\n" not in line



class _SlowToRead(Published):
  """Published whose version takes 50 ms to read: it widens the window between a check and a set."""

  @property
  def version(self):
    held = super().version
    time.sleep(0.05)
    return held


def test_weights_that_overtake_each_other_in_an_actor_never_take_its_learners_back_to_an_older_version():
  """Two ``weights`` calls run at once on the actor's threads, θ_9 first, then θ_8: the actor keeps θ_9. (With
  a check and a set as two steps, both calls passed the check and θ_8 replaced θ_9: a learner then pushed on 8
  after pushing on 9, the PS had released θ_8, and a dc_asgd run under Ray ended with KeyError: 8.)"""
  actor = types.SimpleNamespace(published=_SlowToRead(7, "θ7"))
  calls = [threading.Thread(target=ray_actors.LearnerActor.weights, args=(actor, v, f"θ{v}")) for v in (9, 8)]
  for call in calls:
    call.start()
    time.sleep(0.01)
  for call in calls:
    call.join()
  assert actor.published.value == (9, "θ9")


def _alive(pid):
  fields = ray_local._stat(pid)
  return fields is not None and fields[0] != "Z"


def _gone_within(pids, seconds):
  """Waits until none of ``pids`` is alive (a zombie is not), at most ``seconds``; those still alive."""
  deadline = time.monotonic() + seconds
  while any(_alive(p) for p in pids) and time.monotonic() < deadline:
    time.sleep(0.1)
  return [p for p in pids if _alive(p)]


FAKE_DRIVER = textwrap.dedent("""
    import importlib.util, subprocess, sys, time
    spec = importlib.util.spec_from_file_location("ray_local", sys.argv[1])
    ray_local = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ray_local)
    other = subprocess.Popen(["sleep", "60"])               # not Ray's: started before ray.init
    before = ray_local.own_children()
    # "ray.init": a raylet that starts an agent of its own (its grandchild), as Ray's does
    raylet = subprocess.Popen([sys.executable, "-c", "import subprocess, time; "
                               "print(subprocess.Popen(['sleep', '60']).pid, flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    agent = int(raylet.stdout.readline())
    ray_local.start(before)
    if sys.argv[2] == "stop":
      ray_local.stop()
    print(other.pid, raylet.pid, agent, flush=True)
    time.sleep(60)
""")


@pytest.mark.parametrize("end", ["killed", "stop"])
def test_a_killed_driver_takes_its_local_ray_with_it_and_a_normal_end_kills_nothing(end):
  """The watchdog of ray_local: the driver SIGKILLed, the processes started by "ray.init" (a raylet and the agent
  it started, reparented once the raylet is gone) are killed within seconds, not the driver's other child; after
  stop() (a normal end, after ray.shutdown), nothing is killed."""
  driver = subprocess.Popen([sys.executable, "-c", FAKE_DRIVER, ray_local.__file__, end], stdout=subprocess.PIPE,
                            text=True)
  other, raylet, agent = (int(p) for p in driver.stdout.readline().split())
  try:
    time.sleep(2 * ray_local.SCAN_S)        # the watchdog has scanned the tree
    driver.kill()
    driver.wait()
    if end == "killed":
      assert _gone_within([raylet, agent], 10) == [] and _alive(other)
    else:
      assert _gone_within([raylet, agent, other], 1) == [raylet, agent, other]
  finally:
    for pid in (other, raylet, agent):
      if _alive(pid):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_an_address_where_no_cluster_answers_exits_2_with_one_line_and_writes_nothing(tmp_path):
  errors = refused_smoke_run(tmp_path / "run", "--config.executor=ray", "--config.ray_address=127.0.0.1:1")
  assert len(errors) == 1 and "config.ray_address='127.0.0.1:1': no Ray cluster could be joined" in errors[0]
  assert "allowed:" in errors[0]


# ---- whole runs on a local Ray -----------------------------------------------------------------------------
@pytest.mark.slow
def test_hardsync_with_two_actors_has_sigma_0_and_one_push_per_learner_per_update(local_ray, tmp_path):
  final = sajax.train(_config("hardsync", 2, plots=True), workdir=str(tmp_path)).metrics
  assert final["gradients_per_update"] == 2 and final["staleness_max"] == 0
  assert final["staleness_histogram"] == {"0": 2 * final["updates"]}
  assert {v["count"] for v in final["staleness_per_learner"].values()} == {final["updates"]}
  assert final["samples"] == final["updates"] * 2 * 8 >= 512
  assert min(final["pushes_per_actor"]) >= final["updates"]   # each actor's pushes came through Ray
  assert final["test_error"] < 0.8
  assert os.path.getsize(tmp_path / "staleness.png") > 0


@pytest.mark.slow
def test_ssp_s_0_with_c_lambda_is_lockstep_even_with_a_dropped_gradient(local_ray, tmp_path):
  """n = 1 (c = λ), s = 0: the gate alone (learners do not wait under ssp) gives σ = 0 and one gradient per
  learner per update; learner 1's NaN gradient at its step 3 (injected in its actor) is dropped, not counted."""
  final = sajax.train(_config("ssp", 2, n=1, ssp_spread=0, nan_learners=(1,), nan_at_step=3),
                      workdir=str(tmp_path)).metrics
  assert final["gradients_per_update"] == 2 and final["staleness_max"] == 0
  assert final["staleness_histogram"] == {"0": 2 * final["updates"]}
  assert {v["count"] for v in final["staleness_per_learner"].values()} == {final["updates"]}
  assert final["gradients_dropped"] == 1 and final["ssp_max_spread"] == 0


@pytest.mark.slow
def test_async_dc_asgd_gets_each_gradients_weights_and_goes_on_when_an_actor_is_killed(local_ray, tmp_path,
                                                                                       monkeypatch):
  """Async (c = 1) with three learners in two actors ([0, 1] and [2]) under a policy that reads θ_j: each push
  reaches the PS with θ_j equal to the PS's weights of version j; ⟨σ⟩ > 0 with three learners in flight; actor 1,
  killed at update 10, is reported as learner 2's death and the other two finish the run. (One run for the
  three properties: each run starts Ray actors that build the run and compile.)"""
  versions, mismatched, checked = {}, [], [0]
  push = ParameterServer.push

  def checking(self, learner, version, grads, **kwargs):
    versions.setdefault(self.version, np.asarray(self.params))
    stale = kwargs.get("stale_params")
    if kwargs.get("finite", True):
      checked[0] += 1
      if stale is None or not np.array_equal(np.asarray(stale), versions[version]):
        mismatched.append((learner, version))
    return push(self, learner, version, grads, **kwargs)

  def kill(run):
    if run.updates == 10:
      ray.kill(run.executor.actors[1])

  monkeypatch.setattr(ParameterServer, "push", checking)
  final = sajax.train(_config("async", 3, policy="dc_asgd", ray_learners_per_actor=2),
                      workdir=str(tmp_path), callbacks=[kill]).metrics
  assert len(final["pushes_per_actor"]) == 2 and checked[0] >= final["updates"] and not mismatched
  assert final["gradients_per_update"] == 1 and final["staleness_mean"] > 0 and np.isfinite(final["train_loss"])
  assert sum(final["staleness_histogram"].values()) == final["updates"]
  assert final["samples"] == final["updates"] * 8 >= 512
  assert final["learners_alive"] == 2 and "its Ray actor 1 ended" in final["learners_dead"]["2"]
  per = final["staleness_per_learner"]
  assert per["0"]["count"] + per["1"]["count"] > final["updates"] - 12   # the survivors pushed the rest


@pytest.mark.slow
def test_an_interrupted_run_checkpoints_and_resumes_from_the_ps_state(local_ray, tmp_path):
  """2-softsync with λ = 2 (c = 1) and local steps (H = 2, inner SGD with momentum, whose state lives in the
  actors): stopped at update 20 (a checkpoint, as Ctrl-C makes), rerun in the same workdir: the update count, the
  statistics, the learners' streams and their inner states go on from there."""
  workdir = str(tmp_path / "run")
  config = _config("softsync", 2, n=2, local_steps=2, inner_momentum=0.9)
  saved = {}

  def stop(run):
    if run.updates == 20:
      saved.update(run.executor.checkpoint_arrays())   # what the checkpoint of the interruption holds
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    sajax.train(config, workdir=workdir, callbacks=[stop])
  resumed_at = []
  result = sajax.train(config, workdir=workdir, callbacks=[lambda run: resumed_at.append(run.updates)])
  final = result.metrics
  assert list(saved["inner_state_saved"]) == [True, True] and np.isfinite(saved["inner_state"]).all()
  assert resumed_at[0] == 21 and final["samples"] >= 512
  assert sum(final["staleness_histogram"].values()) == final["updates"]   # both sessions counted once
  assert [r["epoch"] for r in result.history] == [1.0]


@pytest.mark.slow
def test_a_run_resumes_from_its_checkpoint_with_another_lambda(local_ray, tmp_path):
  """2-softsync λ = 4 (c = 2) for half an epoch, then the same workdir with λ = 2 (c = 1) to one epoch, as
  tests/test_elastic.py runs it under threads and simulated (all learners in one actor: one actor process per
  run): the update count goes on, learners 2 and 3 are gone (counted as leaves), c comes from the new live set."""
  workdir = str(tmp_path / "run")
  small = {"train_examples": 256}                  # 16 gradients of μ = 8 per epoch: the resume is what is checked
  first = sajax.train(_config("softsync", 4, n=2, epochs=0.5, ray_learners_per_actor=4, **small),
                      workdir=workdir).metrics
  assert first["gradients_per_update"] == 2 and first["learners_live"] == [0, 1, 2, 3]
  final = sajax.train(_config("softsync", 2, n=2, ray_learners_per_actor=2, **small), workdir=workdir).metrics
  assert final["updates"] > first["updates"] and final["samples"] >= 256
  assert final["learners_live"] == [0, 1] and final["gradients_per_update"] == 1 and final["learners_left"] == 2
  per = final["staleness_per_learner"]
  assert per["2"]["count"] == first["staleness_per_learner"]["2"]["count"]   # no push after the resume
  assert per["0"]["count"] > first["staleness_per_learner"]["0"]["count"]


@pytest.mark.slow
def test_half_the_actors_killed_and_added_back_is_a_leave_then_a_join_of_a_new_actor(local_ray, tmp_path):
  """Kill half of them and add them back, under Ray, in one run: async λ = 2, one actor each; at update 5 actor 0
  is killed (ray.kill; half the learners): learner 0's leave, learner 1 goes on alone (c = 1 throughout); once the PS
  has taken that leave, add_learner() brings learner 0 back in a new actor, and a second add_learner() a learner
  past λ (id 2 of elastic_max_learners = 3) in another (the callback waits until both are ready, so they join
  early, on the then current weights); all three finish the run."""
  import time
  killed, added, counts = [], [], {}

  def kill_half_then_add_back(run):
    executor = run.executor
    per = executor.ps.stats.per_learner
    if run.updates == 5 and not killed:
      killed.append(run.updates)
      ray.kill(executor.actors[0])
    elif killed and not added and 0 not in executor.deaths.alive:    # the leave is taken: its id is free
      counts["at_leave"] = per[0].count if 0 in per else 0   # on a loaded machine actor 0 may die before its first push
      added.extend([executor.add_learner(), executor.add_learner()])
      deadline = time.monotonic() + 300
      while not set(added) <= set(executor._ready) and time.monotonic() < deadline:
        time.sleep(0.2)

  final = sajax.train(_config("async", 2, epochs=2, elastic_max_learners=3), workdir=str(tmp_path),
                      callbacks=[kill_half_then_add_back]).metrics
  assert killed == [5] and added == [0, 2] and final["samples"] >= 1024
  assert final["learners_live"] == [0, 1, 2] and final["learners_alive"] == 3 and final["gradients_per_update"] == 1
  assert (final["learners_joined"], final["learners_left"], final["learners_live_max"]) == (2, 1, 3)
  assert len(final["pushes_per_actor"]) == 4 and min(final["pushes_per_actor"][2:]) >= 3   # the new actors pushed
  per = final["staleness_per_learner"]
  assert per["0"]["count"] >= counts["at_leave"] + 3 and per["2"]["count"] >= 3
  assert sum(per[k]["count"] for k in ("0", "1", "2")) == final["updates"]


@pytest.mark.slow
def test_with_elastic_replace_a_killed_actor_is_replaced_by_a_new_one(local_ray, tmp_path):
  """elastic_replace under Ray: async λ = 2, one actor each; at update 5 actor 0 is killed (ray.kill), and the
  executor starts a new actor for learner 0 by itself, with no add_learner call (the callback only waits until it
  is ready, so it rejoins early). Under Ray a replacement is a leave, then the new actor's join (README)."""
  import time
  killed, waited = [], []

  def kill_then_wait_for_the_replacement(run):
    executor = run.executor
    if run.updates == 5 and not killed:
      killed.append(run.updates)
      ray.kill(executor.actors[0])
    elif killed and not waited and 0 in executor._joining:   # the PS took the death and started a new actor
      waited.append(run.updates)
      deadline = time.monotonic() + 300
      while 0 not in executor._ready and time.monotonic() < deadline:   # until it is ready
        time.sleep(0.2)

  final = sajax.train(_config("async", 2, epochs=2, elastic_replace=True), workdir=str(tmp_path),
                      callbacks=[kill_then_wait_for_the_replacement]).metrics
  assert killed == [5] and waited and final["samples"] >= 1024 and final["learners_live"] == [0, 1]
  assert (final["learners_left"], final["learners_joined"], final["learners_alive"]) == (1, 1, 2)
  assert len(final["pushes_per_actor"]) == 3 and final["pushes_per_actor"][2] >= 1   # the new actor pushed


@pytest.mark.slow
def test_the_ps_killed_then_the_same_command_resumes_from_its_checkpoint_and_leaves_no_ray_behind(tmp_path):
  """Killing the PS is killing the driver: launch/train.py with executor ray is SIGKILLed after its first
  checkpoint (as kill -9 does). No process of the local Ray it started outlives it by more than seconds
  (ray_local's watchdog); the same command again starts a fresh local Ray (neither hangs nor joins the dead one),
  says it resumes from that checkpoint, goes on counting updates from there, keeps every checkpoint and
  metrics.jsonl record saved before the kill, and exits 0. (λ = 2 in one actor: one actor process per run.)"""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = tmp_path / "run"
  command = [sys.executable, os.path.join(root, "launch", "train.py"), "--config", os.path.join(root, "configs",
             "smoke.py"), "--config.executor=ray", "--config.protocol=async", "--config.learners=2",
             "--config.ray_learners_per_actor=2", "--config.batch_per_learner=16", "--config.train_examples=512",
             "--config.lr_boundaries_epochs=()", "--workdir", str(workdir)]
  env = child_env()
  env.pop("RAY_ADDRESS", None)
  with open(tmp_path / "killed.log", "w") as log:
    driver = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not _checkpoint_steps(workdir) and driver.poll() is None and time.monotonic() < deadline:
      time.sleep(0.1)
    ray_processes = ray_local.descendants([driver.pid], ray_local.children_of())[1:]
    steps, records = _checkpoint_steps(workdir), _records(workdir)
    driver.kill()
    assert driver.wait() == -signal.SIGKILL and steps, (tmp_path / "killed.log").read_text()[-3000:]
  assert len(ray_processes) >= 4 and _gone_within(ray_processes, 10) == []   # GCS, raylet, agents, actor
  rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"resuming from the checkpoint at update {steps[-1]} " in rerun.stderr
  after = _records(workdir)
  assert set(steps) <= set(_checkpoint_steps(workdir)) and after[:len(records)] == records
  assert [r["epoch"] for r in after] == [1.0, 2.0] and after[-1]["updates"] > steps[-1]


def _checkpoint_steps(workdir):
  folder = workdir / "checkpoints"
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if folder.is_dir() else []


def _records(workdir):
  path = workdir / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
