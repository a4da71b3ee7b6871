"""Seconds-long run for tests: mnist5k, the one-hidden-layer MLP, pmap SSGD, 2 epochs on a 1,024-example slice of
the train split (the threads tests switch the executor themselves). The MLP, not the default small CNN: its XLA
programs compile in milliseconds, and compiling is most of a short run's time (the executor tests ran 2.7× faster)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import default  # noqa: E402


def get_config():
  config = default.get_config()
  config.model = "mlp"
  config.executor = "pmap"
  config.protocol = "hardsync"
  config.n = 1
  config.learning_rate = 0.03
  config.momentum = 0.9
  config.learners = 4
  config.batch_per_learner = 16
  config.train_examples = 1024        # use the first 1,024 training examples only
  config.epochs = 2
  config.lr_boundaries_epochs = (1.5,)
  config.eval_every_epochs = 1
  config.checkpoint_every_epochs = 1
  config.progress = False
  config.plots = False                # matplotlib costs more than such a run's steps (tests of the PNGs ask for them)
  return config
