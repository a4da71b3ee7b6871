"""The fault matrix (docs/reliability.md): every run ends, with the documented outcome, and nothing saved is lost.

Rows: a non-finite gradient at learner k, step s; every gradient non-finite (divergence); a learner that raises;
Ctrl-C/kill then rerun and a corrupt or mismatched checkpoint (tests/test_train.py, tests/test_cli.py hold
more); bad config (tests/test_cli.py). Columns: threads and simulated here, MPI in tests/test_mpi.py;
hardsync, softsync, async.
"""

import contextlib
import json
import os
import signal
import time

import numpy as np
import pytest

import sajax
from sajax import metrics as metrics_lib
from sajax.server import DivergenceError
from tests.helpers import smoke_config

PROTOCOLS = [("hardsync", 1), ("softsync", 2), ("async", 1)]
EXECUTORS = ["threads", "simulated"]


def _config(executor, protocol, n=1, **overrides):
  overrides.setdefault("epochs", 1.0)
  overrides.setdefault("train_examples", 256)     # 32 gradients of μ = 8 per epoch: short, for CI
  return smoke_config(executor, protocol, n=n, learners=4, batch_per_learner=8, **overrides)


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("protocol, n", PROTOCOLS)
def test_a_non_finite_gradient_is_dropped_and_the_run_goes_on(executor, protocol, n, tmp_path):
  """Learner 2's gradient at its step 1 is NaN: dropped, counted, never applied, and its learner goes on (under
  hardsync it recomputes on its next batch, so the round completes with σ = 0)."""
  # 64 gradients: in a threads run under load, learner 2 must still get to its step 1 before the run ends
  config = _config(executor, protocol, n, nan_learners=(2,), nan_at_step=1, train_examples=512)
  final = sajax.train(config, workdir=str(tmp_path)).metrics
  assert final["gradients_dropped"] == 1
  assert final["staleness_per_learner"]["2"]["dropped"] == 1
  assert final["samples"] >= 256 and np.isfinite(final["train_loss"])
  c = final["gradients_per_update"]
  assert sum(final["staleness_histogram"].values()) == final["updates"] * c   # the drop did not count toward c
  if protocol == "hardsync":
    assert final["staleness_max"] == 0


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("protocol, n", PROTOCOLS)
def test_every_gradient_non_finite_ends_the_run_as_diverged(executor, protocol, n, tmp_path):
  """From each learner's step 10 on every gradient is NaN: the run stops after divergence_after of them in a
  row, naming the update, the count and the newest checkpoint, which holds the last finite state."""
  config = _config(executor, protocol, n, nan_learners=(0, 1, 2, 3), nan_at_step=10, nan_steps=0,
                   divergence_after=12, checkpoint_every_epochs=0.25, eval_every_epochs=0.25, epochs=2.0)
  with pytest.raises(DivergenceError, match=r"diverged: 12 consecutive non-finite gradients at update \d+; "
                                            r"(newest checkpoint: .*checkpoints/\d+|no checkpoint was saved)$") as caught:
    sajax.train(config, workdir=str(tmp_path))
  error = caught.value
  assert error.count == 12
  # 40 = 4 × 10 finite gradients, c per update, then nothing: exactly so where learners move in step (the
  # simulation's equal speeds; hardsync's rounds), at most so where a fast thread's NaNs may come first
  c = sajax.Protocol.from_name(protocol, 4, n).gradients_per_update
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
  if executor == "simulated" or protocol == "hardsync":
    assert error.update == 40 // c and error.checkpoint is not None
  else:
    assert 1 <= error.update <= 40 // c
  if error.checkpoint is None:    # it diverged before the first checkpoint (every 8 gradients) was due
    assert not steps
  else:
    assert os.path.isdir(error.checkpoint) and int(os.path.basename(error.checkpoint)) == steps[-1] <= error.update
    assert metrics_lib.read_metrics(str(tmp_path))     # the evaluations before it are kept


def test_a_learner_that_raises_in_the_simulation_is_reported_and_hardsync_goes_on(tmp_path):
  final = sajax.train(_config("simulated", "hardsync", fault_learner=1, fault_at_step=5),
                      workdir=str(tmp_path)).metrics
  assert final["learners_alive"] == 3 and "injected fault" in final["learners_dead"]["1"]
  assert final["gradients_per_update"] == 3 and final["staleness_max"] == 0
  assert final["staleness_per_learner"]["1"]["count"] == 5
  assert final["samples"] >= 256


def test_train_restores_sigint_and_closes_its_writers_on_any_error(tmp_path):
  seen = {}

  def fail(run):
    seen["run"] = run
    raise RuntimeError("boom from a callback")

  with _sentinel_sigint() as sentinel:
    with pytest.raises(RuntimeError, match="boom"):
      sajax.train(_config("threads", "async"), workdir=str(tmp_path), callbacks=[fail])
    assert signal.getsignal(signal.SIGINT) is sentinel
  run = seen["run"]
  assert run.writer is None and run.checkpointer is None and run._bar is None


def test_a_ctrl_c_while_the_run_compiles_stops_it_even_where_jax_would_drop_it(tmp_path, monkeypatch):
  """A Ctrl-C during the start-up compilations, under Python's default handler, raised inside JAX, which can drop
  it: a reproduce cell trained on to its end. Here the model's initialisation is hit by one and drops the
  exception as such a call would; the run must still stop before training, with its handler restored."""
  from sajax import models
  real_init = models.init_params

  def init_params_hit_by_ctrl_c(*args, **kwargs):
    try:
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.2)                  # the handler runs here
    except KeyboardInterrupt:          # what a call that drops the default handler's exception does
      pass
    return real_init(*args, **kwargs)

  monkeypatch.setattr(models, "init_params", init_params_hit_by_ctrl_c)
  with _sentinel_sigint() as sentinel:
    with pytest.raises(KeyboardInterrupt):
      sajax.train(_config("simulated", "async"), workdir=str(tmp_path))
    assert signal.getsignal(signal.SIGINT) is sentinel             # the caller's handler is back
  assert metrics_lib.read_metrics(str(tmp_path)) == []            # stopped before the first evaluation


def test_a_run_that_fails_while_building_restores_sigint(tmp_path, monkeypatch):
  from sajax import models

  def broken_init(*args, **kwargs):
    raise RuntimeError("boom while building")

  monkeypatch.setattr(models, "init_params", broken_init)
  with _sentinel_sigint() as sentinel:
    with pytest.raises(RuntimeError, match="boom while building"):
      sajax.train(_config("threads", "async"), workdir=str(tmp_path))
    assert signal.getsignal(signal.SIGINT) is sentinel


@contextlib.contextmanager
def _sentinel_sigint():
  """A SIGINT handler of the test's own in place (pytest's is Python's default, the same one a Run installs
  after a first Ctrl-C, so "restored" could not be told apart from it)."""
  def sentinel(signum, frame):
    raise KeyboardInterrupt
  previous = signal.signal(signal.SIGINT, sentinel)
  try:
    yield sentinel
  finally:
    signal.signal(signal.SIGINT, previous)


def test_threads_resume_continues_every_learner_stream_and_keeps_the_dead(tmp_path, monkeypatch):
  """Stopped at update 20 and resumed: each learner's first draw is the (step, mini-batch) its checkpointed stream
  was at, and its steps go on consecutively from there, so no key fold_in(fold_in(key, k), step) replays from
  the first session's past; a dead learner stays dead (hardsync keeps c = λ − 1 and σ = 0)."""
  from sajax import streams
  from sajax.data import LearnerSampler
  draws = {}
  original = streams.LearnerStream.next

  def recording_next(self):
    indices, step = original(self)
    draws.setdefault(self.sampler.learner, []).append((step, indices.copy()))
    return indices, step

  monkeypatch.setattr(streams.LearnerStream, "next", recording_next)
  config = _config("threads", "hardsync", fault_learner=3, fault_at_step=2, train_examples=1024)

  def stop(run):
    if run.updates == 20:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    sajax.train(config, workdir=str(tmp_path), callbacks=[stop])
  meta = json.loads((tmp_path / "checkpoints" / "20" / "meta" / "metadata").read_text())
  saved = {k: s["step"] for k, s in enumerate(meta["samplers"])}
  assert min(saved[k] for k in range(3)) >= 20 and saved[3] == 3   # learner 3 drew its step 2, then raised
  assert meta["executor"]["dead"] == {"3": "RuntimeError: injected fault: learner 3 raised at its step 2 "
                                           "(config.fault_learner)"}
  draws.clear()
  result = sajax.train(config, workdir=str(tmp_path))
  assert 3 not in draws                                              # the dead learner was not restarted
  for k in range(3):
    steps = [step for step, _ in draws[k]]
    assert steps == list(range(saved[k], saved[k] + len(steps))), (k, steps[:5], saved[k])
    fresh = LearnerSampler(1024, 8, seed=config.seed, learner=k)     # the uninterrupted stream of learner k
    for _ in range(saved[k]):
      next(fresh)
    for _, indices in draws[k][:3]:
      np.testing.assert_array_equal(indices, next(fresh))
  final = result.metrics
  assert final["learners_alive"] == 3 and final["gradients_per_update"] == 3 and final["staleness_max"] == 0
  assert "3" in final["learners_dead"]


def test_one_ctrl_c_stops_a_run_whose_learners_all_stalled(tmp_path, monkeypatch, capsys):
  """Every learner blocked (no gradient ever reaches the PS): one Ctrl-C still stops the run within seconds,
  through the CLI's interrupted path (a checkpoint, exit 130). A second Ctrl-C, sent only if the first was not
  enough after STALL_DEADLINE_S, keeps this test from hanging."""
  import threading
  from launch import train as launcher
  from sajax.executors import learners
  stalled, stopped = threading.Event(), threading.Event()
  second_needed = []

  def stalled_loop(self, k):        # the learner blocks, as on a hung device, until the run stops
    stalled.set()
    self.stop.wait()

  def press_ctrl_c():
    if not stalled.wait(120):
      return
    time.sleep(0.5)                 # the PS loop is waiting for a gradient by now
    os.kill(os.getpid(), signal.SIGINT)
    if not stopped.wait(STALL_DEADLINE_S):
      second_needed.append(True)
      os.kill(os.getpid(), signal.SIGINT)

  monkeypatch.setattr(learners.Learners, "_loop", stalled_loop)
  presser = threading.Thread(target=press_ctrl_c, daemon=True)
  presser.start()
  workdir = tmp_path / "run"
  config_file = tmp_path / "stalled.py"   # in-process, absl takes no --config.key overrides: a config file
  config_file.write_text("from configs import smoke\n\n\ndef get_config():\n  config = smoke.get_config()\n"
                         "  config.executor, config.protocol, config.learners = 'threads', 'async', 2\n"
                         "  return config\n")
  try:
    code = launcher.main(["train.py", f"--config={config_file}", "--workdir", str(workdir)])
  finally:
    stopped.set()
    presser.join()
  assert not second_needed, "the first Ctrl-C did not stop the stalled run"
  assert code == launcher.EXIT_INTERRUPTED
  assert "interrupted; rerun with --workdir" in capsys.readouterr().err
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["0"]   # saved at update 0


STALL_DEADLINE_S = 30
