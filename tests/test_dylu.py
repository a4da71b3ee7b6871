"""DyLU, dynamic local updates (Liu et al. 2024, ``dynamic_local_steps``): learner k runs H_k = max(1, ⌊H·v_k/v_fastest⌋)
inner steps per push, so that slow learners push about as often as fast ones.

The runs swap the CNN for tests/test_delayed_reference.py's TinyNet (compiles in milliseconds): what is checked is
how many steps each round runs, how they are counted, and what that does to the learners' push rates.
"""

import threading
import time

import jax
import numpy as np
import pytest

import sajax
from sajax import config as config_lib, local_steps, models
from sajax.executors.speed import HETEROGENEOUS_FACTORS, SpeedModel
from tests.helpers import reproducible, smoke_config, stop_with_gradients_buffered
from tests.test_delayed_reference import TinyNet


@pytest.fixture
def tiny(monkeypatch):
  monkeypatch.setattr(models, "create_model", lambda name, num_classes: TinyNet(num_classes))


def _config(executor="simulated", protocol="async", *, learners=4, batch=4, **overrides):
  overrides.setdefault("train_examples", 512)
  overrides.setdefault("epochs", 1.0)
  overrides.setdefault("lr_boundaries_epochs", ())
  overrides.setdefault("local_steps", 4)
  return smoke_config(executor, protocol, learners=learners, batch_per_learner=batch, **overrides)


# ---- the rule --------------------------------------------------------------------------------------------------
def test_the_round_lengths_follow_the_formula():
  """H_k = max(1, ⌊H·t_fastest/t_k⌋), by hand for the asynchronous local-SGD paper's four workers (0.58, 0.75,
  1.51, 3.33 s per step): H = 32 gives 32·0.58/0.75 = 24.7 → 24, 12.3 → 12, 5.6 → 5. The fastest runs exactly H
  (no rounding down to H − 1), a learner 100× slower still runs one step, H = 1 leaves everyone at 1."""
  assert local_steps.dynamic_steps(32, HETEROGENEOUS_FACTORS) == (32, 24, 12, 5)
  assert local_steps.dynamic_steps(4, HETEROGENEOUS_FACTORS) == (4, 3, 1, 1)
  assert local_steps.dynamic_steps(7, (0.1, 0.3, 0.1)) == (7, 2, 7)
  assert local_steps.dynamic_steps(5, (1.0, 100.0)) == (5, 1)
  assert local_steps.dynamic_steps(1, HETEROGENEOUS_FACTORS) == (1, 1, 1, 1)
  speed = SpeedModel.from_profile("heterogeneous", 6, example_time=0.01, batch=4)
  assert speed.step_times(6) == pytest.approx([0.04 * f for f in (0.58, 0.75, 1.51, 3.33, 0.58, 0.75)])


def test_measured_round_lengths_start_at_h_and_follow_each_learners_average():
  """Threads: a learner runs H until it has been measured; its seconds per step are an exponential moving average
  (weight 0.3 on the newest round) of its rounds but the first of each length (which compiles); the fastest
  measured learner sets v_fastest. Without DyLU every round is H."""
  rounds = local_steps.RoundLengths(8, dynamic=True)
  assert rounds.table([0, 1, 2]) == [8, 8, 8]
  rounds.record(0, 30.0, 8)                    # a first round of 8 steps: it compiled, not a measurement
  rounds.record(1, 30.0, 8)
  assert rounds.measured == {} and rounds.table([0, 1, 2]) == [8, 8, 8]
  rounds.record(0, 0.8, 8)                     # 0.1 s per step
  rounds.record(1, 1.6, 8)                     # 0.2 s per step
  assert rounds.table([0, 1, 2]) == [8, 4, 8]
  rounds.record(1, 30.0, 4)                    # learner 1's first round of 4 steps compiled: skipped too
  assert rounds.measured[1] == pytest.approx(0.2)
  rounds.record(1, 1.6, 4)                     # 0.4 s per step: 0.7·0.2 + 0.3·0.4 = 0.26
  assert rounds.measured[1] == pytest.approx(0.26)
  assert rounds.steps_for(1) == 3              # ⌊8·0.1/0.26⌋ = ⌊3.08⌋
  rounds.record(2, 0.0, 8)                     # a round without a time (non-finite Δ) is not a measurement
  assert 2 not in rounds.measured
  fixed = local_steps.RoundLengths(8, dynamic=False)
  fixed.record(0, 0.8, 8)
  fixed.record(1, 80.0, 8)
  assert fixed.table([0, 1]) == [8, 8]
  simulated = local_steps.RoundLengths(8, dynamic=True, step_times=(1.0, 2.0))
  simulated.record(0, 100.0, 8)                # fixed by the speed model: measurements change nothing
  assert simulated.table([0, 1]) == [8, 4]


@pytest.mark.parametrize("keys, named", [({"executor": "mpi"}, "'mpi'"), ({"executor": "pmap", "local_steps": 1}, "'pmap'")])
def test_dylu_needs_the_learners_speeds(keys, named, tmp_path):
  with pytest.raises(config_lib.ConfigError, match=named) as error:
    sajax.train(_config(dynamic_local_steps=True, **keys), workdir=str(tmp_path / "run"))
  assert "\n" not in str(error.value) and "allowed executors: threads, simulated" in str(error.value)
  assert not (tmp_path / "run").exists()


# ---- the simulated executor ---------------------------------------------------------------------------------------
def _simulated(tmp_path, name, **overrides):
  runs = []
  config = _config(sim_profile="heterogeneous", sim_example_time=0.01, **overrides)
  result = sajax.train(config, workdir=str(tmp_path / name), callbacks=[lambda run: runs[:1] or runs.append(run)])
  return runs[0], result


def test_simulated_dylu_runs_h_k_steps_per_push_and_evens_the_push_rates(tmp_path, tiny):
  """λ = 4 under ``heterogeneous`` (0.58, 0.75, 1.51, 3.33 s per step), H = 32, μ = 2, async: with DyLU the learners
  run (32, 24, 12, 5) steps per push, rounds of 18.6, 18.0, 18.1 and 16.7 s; each stream drew exactly H_k
  mini-batches per push (plus the round in flight), the sample clock counts Σ H_k·μ, and the push rates are
  nearly even, where with H for everyone the slowest learner pushes 5.7× less often (and staler)."""
  overrides = dict(local_steps=32, batch=2, train_examples=2048)
  run, result = _simulated(tmp_path, "dylu", dynamic_local_steps=True, **overrides)
  base_run, base = _simulated(tmp_path, "fixed", **overrides)
  final, stats, rounds = result.metrics, run.executor.ps.stats.per_learner, (32, 24, 12, 5)
  assert final["inner_steps"] == list(rounds) and "inner_steps" not in base.metrics
  pushes = [stats[k].count for k in range(4)]
  assert [s.step for s in run.streams] == [(p + 1) * h for p, h in zip(pushes, rounds)]
  assert final["samples"] == sum(p * h for p, h in zip(pushes, rounds)) * 2 >= 2048
  assert final["samples"] - 2048 < 32 * 2                    # the run ends at the first update past an epoch
  base_pushes = [base_run.executor.ps.stats.per_learner[k].count for k in range(4)]
  assert max(base_pushes) / min(base_pushes) > 4             # 32·3.33 / (32·0.58) = 5.7 without DyLU
  assert max(pushes) / min(pushes) < 1.3                     # 18.6 / 16.7 = 1.1 with it
  assert stats[3].mean < base_run.executor.ps.stats.per_learner[3].mean
  assert len(result.history) == 1 and final["epoch"] == pytest.approx(final["samples"] / 2048, abs=1e-4)
  assert np.isfinite(final["train_loss"])


def test_simulated_dylu_stopped_between_two_updates_resumes_bit_identical(tmp_path, tiny):
  """c = 2 (2-softsync of λ = 4): stopped right after a push that left a round of H_k batches buffered toward the
  next update; the checkpoint keeps how many batches the buffered pushes carried, so the resumed run's every record
  (samples included) equals the uninterrupted run's."""
  overrides = dict(protocol="softsync", n=2, dynamic_local_steps=True, epochs=2.0, checkpoint_every_epochs=2.0,
                   sim_jitter=0.3)
  _, whole = _simulated(tmp_path, "whole", **overrides)
  config = _config(sim_profile="heterogeneous", sim_example_time=0.01, **overrides)
  with pytest.MonkeyPatch.context() as patch:    # not ``monkeypatch``: its undo would bring the CNN back
    # ... at a push of a learner whose round is shorter than H (the one being pushed holds no version now)
    short = lambda run: any(v is None and run.executor.rounds.steps_for(k) < 4  # noqa: E731
                            for k, v in enumerate(run.executor.version))
    callbacks, stopped = stop_with_gradients_buffered(patch, 30, short)
    with pytest.raises(KeyboardInterrupt):
      sajax.train(config, workdir=str(tmp_path / "stopped"), callbacks=callbacks)
  assert stopped == [1]
  resumed = sajax.train(config, workdir=str(tmp_path / "stopped"))
  assert reproducible(resumed.history) == reproducible(whole.history)
  assert whole.metrics["gradients_per_update"] == 2 and whole.metrics["inner_steps"] == [4, 3, 1, 1]


# ---- threads: measured speeds ------------------------------------------------------------------------------------
def test_threads_dylu_measures_a_slow_learner_and_shortens_its_rounds(tmp_path, monkeypatch, tiny):
  """Learner 0's rounds are made slower than learner 1's (sleeps inside the local update, the part of a round DyLU
  times: 10 ms per inner step for both, and for learner 0 another 15 ms per step plus 3× the time the update took,
  so a loaded machine that slows every step does not hide the difference): its measured H_k drops below H while
  the other stays near H. Both learners wait for each other after their first round, which compiles (and is not a
  measurement), so the fast one cannot finish the run while the slow one compiles. Each push's mini-batches are
  counted (samples equal the streams' draws minus the rounds in flight, which are discarded)."""
  original = local_steps.make_local_update
  seen = set()                 # (learner thread, inner steps) of the rounds done: empty until both first rounds meet
  compiled = threading.Barrier(2, timeout=300)

  def slow_for_learner_0(loss_fn, inner):
    update = original(loss_fn, inner)

    def local_update(params, state, images, labels, key, steps, learning_rate):
      start = time.perf_counter()
      out = jax.block_until_ready(update(params, state, images, labels, key, steps, learning_rate))
      name, took = threading.current_thread().name, time.perf_counter() - start
      took *= (name, len(steps)) in seen                          # a first round of a length compiled: not a step
      if not seen:
        compiled.wait()                                           # both learners' first rounds done
      seen.add((name, len(steps)))
      time.sleep(0.010 * len(steps) + (0.015 * len(steps) + 3 * took if name == "learner-0" else 0))
      return out
    return local_update

  monkeypatch.setattr(local_steps, "make_local_update", slow_for_learner_0)
  runs = []
  result = sajax.train(_config("threads", learners=2, local_steps=8, dynamic_local_steps=True, epochs=2.0),
                       workdir=str(tmp_path), callbacks=[lambda run: runs[:1] or runs.append(run)])
  final = result.metrics
  slow, fast = final["inner_steps"]
  assert slow < 8 // 2 and fast >= 6, final["inner_steps"]
  assert final["samples"] >= 1024 and final["samples"] % 4 == 0 and np.isfinite(final["train_loss"])
  assert final["gradients_dropped"] == 0
