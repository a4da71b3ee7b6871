"""The paper's ImageNet setup (Zhang et al. 2016, §5): AlexNet, μ = 256, 35 epochs, momentum 0.9,
α0 = 0.01 divided by 5 at epochs 20 and 30; top-1 and top-5 test error on the validation split.

Keep λμ ≈ 256 when adding learners (`--config.learners=4 --config.batch_per_learner=64`). Asynchronous runs:
`--config.executor=threads` or `--config.executor=simulated` with `--config.n=...` (n-softsync, 1 ≤ n ≤ λ). Needs
imagenet2012 prepared for TFDS (manual download of the ILSVRC2012 tars, then `tfds build imagenet2012`).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import default  # noqa: E402


def get_config():
  config = default.get_config()
  config.dataset = "imagenet2012"
  config.executor = "pmap"            # the single-learner baseline; threads or simulated for the PS
  config.protocol = "softsync"        # with λ = 1 and n = 1: c = 1, σ = 0 (pmap ignores it) ...
  config.n = 1                        # ... so --config.learners/--config.n can be overridden alone
  config.model = "alexnet"
  config.learners = 1
  config.batch_per_learner = 256
  config.learning_rate = 0.01
  config.momentum = 0.9
  config.weight_decay = 0.0005
  config.epochs = 35
  config.lr_boundaries_epochs = (20, 30)
  config.lr_decay = 0.2               # ÷5
  config.eval_every_epochs = 1
  config.eval_batch_size = 500
  config.checkpoint_every_epochs = 1
  return config
