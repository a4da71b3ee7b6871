"""Shared by the executor tests: the smoke config switched to an executor, and the reproducible metric fields."""

from configs import smoke
from sajax import metrics as metrics_lib


def smoke_config(executor, protocol, *, n=1, learners, batch_per_learner, **overrides):
  """configs/smoke.py (1,024 examples, 2 epochs) with ``executor``/``protocol``, λ, μ, momentum 0.5."""
  config = smoke.get_config()
  config.executor, config.protocol, config.n = executor, protocol, n
  config.learners, config.batch_per_learner = learners, batch_per_learner
  config.momentum = 0.5
  for key, value in overrides.items():
    config[key] = value
  return config


def reproducible(records):
  """The metrics records without their wall-clock fields."""
  return [{k: v for k, v in r.items() if k not in metrics_lib.TIMING_KEYS} for r in records]
