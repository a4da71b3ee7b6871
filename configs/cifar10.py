"""The paper's CIFAR10 setup (Zhang et al. 2016, §5): Caffe's cifar10_full network, μ = 128 on a single
learner, 140 epochs, momentum 0.9, α0 = 0.001 divided by 10 at epochs 120 and 130.

λμ ≈ 128 rule: the paper keeps the total mini-batch λ·μ ≈ 128 as learners are added, so that α0 (tuned for
one learner with μ = 128) stays right: with `--config.learners=8` use `--config.batch_per_learner=16`,
with 30 learners μ = 4 (⌈128/30⌉ = 5 is also used).
Asynchronous runs: `--config.executor=threads` (learner threads) or `--config.executor=simulated`
(deterministic), with λ, μ and n overridden, e.g. `--config.learners=8 --config.batch_per_learner=16
--config.n=2` for 2-softsync. Needs the TFDS cifar10 dataset prepared once:
`pip install -e '.[tf]' && tfds build cifar10 --file_format=array_record`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import default  # noqa: E402


def get_config():
  config = default.get_config()
  config.dataset = "cifar10"
  config.executor = "pmap"            # the single-learner baseline; threads or simulated for the PS
  config.protocol = "softsync"        # with λ = 1 and n = 1: c = 1, σ = 0 (pmap ignores it) ...
  config.n = 1                        # ... so --config.learners/--config.n can be overridden alone
  config.model = "cifar10_full"
  config.learners = 1                 # λ
  config.batch_per_learner = 128      # μ (λμ ≈ 128)
  config.learning_rate = 0.001        # α0
  config.momentum = 0.9
  config.weight_decay = 0.004         # Caffe cifar10_full: decay_mult 1 on weights (applied here to all)
  config.epochs = 140
  config.lr_boundaries_epochs = (120, 130)
  config.lr_decay = 0.1
  config.eval_every_epochs = 5
  config.eval_batch_size = 1000
  config.checkpoint_every_epochs = 5
  return config
