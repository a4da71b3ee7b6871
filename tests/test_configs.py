"""The paper's CIFAR10 and ImageNet configs run in simulated mode with λ, μ and n overridden (TFDS mock data)."""

import pytest

import sajax
from configs import cifar10, imagenet
from sajax import config as config_lib
from tests.tfds_mock import mock_tfds


def _tiny(config, *, learners, batch, n, examples, epochs):
  config.executor, config.learners, config.batch_per_learner, config.n = "simulated", learners, batch, n
  config.train_examples = examples
  config.epochs, config.eval_every_epochs, config.checkpoint_every_epochs = epochs, epochs, epochs
  config.lr_boundaries_epochs = (epochs / 2,)
  config.eval_batch_size = 8
  config.progress = False
  config.plots = False     # the PNGs are tested elsewhere; drawing them is a second here
  return config


@pytest.mark.parametrize("module", [cifar10, imagenet])
def test_paper_configs_switch_to_the_simulated_executor_with_only_the_executor_overridden(module):
  config = module.get_config()
  config.executor = "simulated"
  config_lib.validate(config)            # λ = 1, 1-softsync: no conflicting key to override as well
  p = config_lib.protocol_of(config)
  assert (p.learners, p.gradients_per_update) == (1, 1)
  config.learners, config.n = 8, 2
  assert config_lib.protocol_of(config).gradients_per_update == 4
  config.n = 9
  with pytest.raises(config_lib.ConfigError, match=r"n=9.*1 <= n <= 8"):
    config_lib.validate(config)


def test_cifar10_config_trains_simulated_2_softsync(tmp_path):
  """λ = 4, μ = 8, 2-softsync (c = 2) on 64 mock images: 64/(2·8) = 4 updates per epoch, 2 epochs."""
  config = _tiny(cifar10.get_config(), learners=4, batch=8, n=2, examples=64, epochs=2)
  with mock_tfds(64):
    result = sajax.train(config, workdir=str(tmp_path))
  m = result.metrics
  assert [r["updates"] for r in result.history] == [8]
  assert (m["protocol"], m["gradients_per_update"], m["samples"]) == ("softsync", 2, 2 * 64)
  assert sum(m["staleness_histogram"].values()) == 16        # every gradient accepted and counted
  assert 0.5 <= m["staleness_mean"] <= 2.5 and m["sim_time"] > 0   # ⟨σ⟩ ≈ n = 2
  assert 0.0 <= m["test_error"] <= 1.0 and m["train_loss"] > 0


@pytest.mark.slow
def test_imagenet_config_trains_simulated_async_alexnet(tmp_path):
  """AlexNet at 224×224, λ = 2, μ = 2, async (n = λ, c = 1): 4 updates over 8 mock images, top-5 reported."""
  config = _tiny(imagenet.get_config(), learners=2, batch=2, n=2, examples=8, epochs=1)
  with mock_tfds(8):
    result = sajax.train(config, workdir=str(tmp_path))
  m = result.metrics
  assert (m["updates"], m["gradients_per_update"], m["samples"]) == (4, 1, 8)
  assert set(m["staleness_histogram"]) <= {"0", "1", "2"} and m["staleness_max"] >= 1   # two learners interleave
  assert 0.0 <= m["test_error_top5"] <= m["test_error"] <= 1.0


def test_fashion_mnist_config_is_ssgd_at_128_and_trains_on_idx_files_in_data_dir(tmp_path):
  """The tuned SSGD baseline: λμ = 128, pmap; 2 epochs on 256 tiny IDX images written here (no Debian package)."""
  import numpy as np
  from configs import fashion_mnist
  from sajax import idx
  config = fashion_mnist.get_config()
  config_lib.validate(config)
  assert (config.dataset, config.executor, config.model) == ("fashion_mnist", "pmap", "small_cnn")
  assert config.learners * config.batch_per_learner == 128 and config.momentum == 0.9
  assert config_lib.protocol_of(config).gradients_per_update == config.learners       # SSGD: c = λ
  config.executor, config.learners, config.batch_per_learner, config.n = "simulated", 8, 16, 2
  config_lib.validate(config)                                      # the grid's overrides alone switch it to async
  assert config_lib.protocol_of(config).gradients_per_update == 4

  rng = np.random.default_rng(0)
  for split, n in (("train", 256), ("t10k", 64)):
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = (labels[:, None, None] * 25 + rng.integers(0, 5, (n, 28, 28))).astype(np.uint8)   # learnable
    idx.write(str(tmp_path / f"{split}-images-idx3-ubyte.gz"), images)
    idx.write(str(tmp_path / f"{split}-labels-idx1-ubyte"), labels)
  config = fashion_mnist.get_config()
  config.data_dir, config.train_examples, config.epochs = str(tmp_path), 256, 2
  config.lr_boundaries_epochs, config.eval_every_epochs, config.checkpoint_every_epochs = (1.5,), 1, 2
  config.progress = False
  result = sajax.train(config, workdir=str(tmp_path / "run"))
  m = result.metrics
  assert [r["updates"] for r in result.history] == [2, 4] and m["samples"] == 512
  assert m["staleness_max"] == 0 and 0.0 <= m["test_error"] <= 1.0 and np.isfinite(m["train_loss"])


def test_a_run_saved_before_an_optional_key_existed_still_resumes():
  """A config.json without a newer optional key means that key's default (ABSENT_MEANS = configs/default.py)."""
  from configs import default
  from sajax import config as config_lib
  values = default.get_config().to_dict()
  for key, absent in config_lib.ABSENT_MEANS.items():
    assert values[key] == absent or list(values[key]) == list(absent), key
    older = {k: v for k, v in values.items() if k != key}
    assert config_lib.config_differences(older, values) == [], key
