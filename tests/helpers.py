"""Shared by the executor tests: the smoke config switched to an executor, the reproducible metric fields, and the
environment of a child process, a CLI run that must be refused."""

import os
import subprocess
import sys

from configs import smoke
from sajax import metrics as metrics_lib


SMOKE_EXAMPLES = 512
"""Training examples of the executor tests' runs: half of configs/smoke.py's slice. Enough for the properties
they check (staleness, faults, resume), and the suite's in-process runs are half as long."""


def smoke_config(executor, protocol, *, n=1, learners, batch_per_learner, **overrides):
  """configs/smoke.py (2 epochs) on :data:`SMOKE_EXAMPLES` examples with ``executor``/``protocol``, λ, μ,
  momentum 0.5."""
  config = smoke.get_config()
  config.executor, config.protocol, config.n = executor, protocol, n
  config.learners, config.batch_per_learner = learners, batch_per_learner
  config.momentum = 0.5
  config.train_examples = SMOKE_EXAMPLES
  for key, value in overrides.items():
    config[key] = value
  return config


def reproducible(records):
  """The metrics records without their wall-clock fields."""
  return [{k: v for k, v in r.items() if k not in metrics_lib.TIMING_KEYS} for r in records]


def stop_with_gradients_buffered(monkeypatch, after, condition=lambda run: True):
  """Requests a stop (what the first Ctrl-C does) at the first push past the ``after``-th that leaves gradients
  buffered toward the next update and satisfies ``condition(run)``. Pass the returned callbacks to the run it
  should stop (they find it); ``monkeypatch.undo()`` before the next run. ``stopped`` (returned) gets the number
  of gradients buffered when it asked."""
  from sajax.server import ParameterServer

  runs, pushes, stopped = [], [0], []
  original = ParameterServer.push

  def push(self, *args, **kwargs):
    result = original(self, *args, **kwargs)
    pushes[0] += 1
    if runs and not stopped and pushes[0] > after and self.buffered and condition(runs[0]):
      stopped.append(self.buffered)
      runs[0].request_stop()
    return result

  monkeypatch.setattr(ParameterServer, "push", push)
  return [lambda run: runs.append(run) if not runs else None], stopped


def child_env():
  """``os.environ`` for a child process that sets its own device count (launch/train.py, each mpiexec rank):
  XLA_FLAGS without tests/conftest.py's device count, its other flags (single-threaded Eigen) kept."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags)
  return env


def every_model_is_the_mlp(monkeypatch):
  """From now on, in this process and in every Python child process the test starts (a grid's cells, through
  tests/mlp_children/sitecustomize.py), sajax builds the MLP whatever model a config names: for tests of a grid's
  machinery (which cells run, resume, what the report says), not of a model. Compiling a convolutional model in
  each cell was most of such a test's time."""
  from sajax import models
  for name in models.MODELS:
    monkeypatch.setitem(models._REGISTRY, name, models.MLP)
  here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mlp_children")
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p))


def refused_smoke_run(workdir, *flags):
  """Runs ``launch/train.py --config configs/smoke.py FLAGS --workdir WORKDIR`` as a user would and returns the
  ``error:`` lines of a run that must be refused: it checks that it exited 2 and wrote nothing to the workdir."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, os.path.join(root, "launch", "train.py"), "--config",
                         os.path.join(root, "configs", "smoke.py"), *flags, "--workdir", str(workdir)],
                        env=child_env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert not os.path.exists(workdir)
  return [line for line in proc.stderr.splitlines() if line.startswith("error:")]
