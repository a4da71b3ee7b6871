"""Runs of the same model in one process share their compiled programs (sajax.steps.one_per_process): a sweep or
a notebook's second ``sajax.train`` does not trace, lower and compile (or load) its gradient and evaluation
programs again."""

import logging

import jax
import numpy as np
import pytest

import sajax
from sajax import data, models, steps
from sajax.executors import learners
from tests.helpers import smoke_config


@pytest.fixture
def compiled(caplog):
  """The names of the programs JAX compiles (or loads from its cache) from now on, in every thread."""
  jax.config.update("jax_log_compiles", True)
  try:
    with caplog.at_level(logging.WARNING, logger="jax"):
      yield lambda: [r.getMessage().split("(")[1].split(")")[0] for r in caplog.records
                     if r.getMessage().startswith("Compiling ")]
  finally:
    jax.config.update("jax_log_compiles", False)


@pytest.mark.parametrize("executor", ["simulated", "threads"])
def test_a_second_run_of_the_same_model_compiles_no_gradient_or_evaluation_program(executor, tmp_path, compiled):
  """Another α0, seed and momentum: the optimizer's programs are new (their constants differ), the model's are
  not. Without the reuse the second run compiled its gradient ``step`` and the evaluation's pmap (``_fun``) again
  (loaded from the persistent cache where there is one, after tracing and lowering them)."""
  def run(name, **overrides):
    sajax.train(smoke_config(executor, "async", learners=2, batch_per_learner=8, epochs=1, plots=False,
                             **overrides), workdir=str(tmp_path / name))
  run("first")
  before = len(compiled())
  run("second", learning_rate=0.03, seed=1, momentum=0.9)
  second = compiled()[before:]
  assert "apply" in second, second                       # the PS's update: this run's optimizer, compiled
  assert "step" not in second and "_fun" not in second, second


LOCAL_DC_ASGD = {"local_steps": 2, "inner_optimizer": "adamw", "outer_optimizer": "nesterov", "policy": "dc_asgd"}


@pytest.mark.parametrize("executor, keys", [("simulated", {}), ("threads", {}), ("pmap", {}),
                                            ("simulated", LOCAL_DC_ASGD), ("threads", LOCAL_DC_ASGD)],
                         ids=["simulated", "threads", "pmap", "simulated-local-dc_asgd", "threads-local-dc_asgd"])
def test_a_second_run_with_another_seed_compiles_nothing(executor, keys, tmp_path, compiled):
  """A seed sweep: the policy, the schedule, the optimizer, the parameter server's update and accumulation, the
  SSGD step and the local-SGD round are one object per setting in a process, so the second run traces, lowers and
  compiles (or loads) no program at all. Before, it did all of the optimizer's again: init_fn, apply, schedule,
  the accumulation's lambdas, the pmapped step, inner_step and finish."""
  def run(name, seed):
    sajax.train(smoke_config(executor, "async", learners=2, batch_per_learner=8, epochs=1, plots=False, seed=seed,
                             **keys), workdir=str(tmp_path / name))
  run("first", 0)
  before = len(compiled())
  run("second", 1)
  assert compiled()[before:] == []


def test_equal_settings_give_the_same_policy_schedule_and_optimizer():
  from sajax import config as config_lib, optim, run_optimizer
  config = smoke_config("simulated", "async", learners=2, batch_per_learner=8, policy="polynomial",
                        policy_args='{"a": 0.5}')
  policy = config_lib.policy_of(config)
  assert optim.get_policy("polynomial", a=0.5) is policy and optim.get_policy("polynomial", a=1.0) is not policy
  schedule = run_optimizer.make_schedule(config, 10.0)
  assert run_optimizer.make_schedule(config, 10.0) is schedule
  tx = run_optimizer.make_optimizer(config, schedule, policy)
  assert run_optimizer.make_optimizer(config, schedule, policy) is tx
  config.momentum = 1 - config.momentum / 2
  assert run_optimizer.make_optimizer(config, schedule, policy) is not tx


def test_equal_models_and_datasets_give_the_same_loss_evaluation_and_unravel():
  dataset = data.load_dataset("mnist5k")
  model = models.create_model("mlp", dataset.num_classes)
  preprocess = data.make_preprocess(dataset)
  assert data.make_preprocess(data.load_dataset("mnist5k")) is preprocess
  loss = steps.make_loss_fn(model, preprocess)
  assert steps.make_loss_fn(models.create_model("mlp", dataset.num_classes), preprocess) is loss
  assert steps.make_loss_fn(models.create_model("mlp", 3), preprocess) is not loss
  params = models.init_params(model, jax.random.PRNGKey(0), dataset.input_shape)
  unravel = learners.unravel_of(params)
  assert learners.unravel_of(jax.tree.map(np.asarray, params)) is unravel
  assert learners.make_grad_step(loss, unravel) is learners.make_grad_step(loss, unravel)
  flat = learners.flatten(params)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()), unravel(flat), params))


def test_arguments_that_cannot_be_hashed_build_anew_each_time():
  calls = []

  @steps.one_per_process
  def build(spec):
    calls.append(spec)
    return lambda x: x

  assert build(("a", 1)) is build(("a", 1)) and len(calls) == 1
  unhashable = ["a", 1]
  assert build(unhashable) is not build(unhashable) and len(calls) == 3


def test_a_policy_registered_again_is_built_anew_not_taken_from_the_reuse(monkeypatch):
  """The reuse is keyed by the policy's factory, not its name: a notebook that registers a policy again with
  ``overwrite=True`` gets the new one."""
  from sajax import optim
  monkeypatch.setattr(optim, "_POLICIES", dict(optim._POLICIES))   # the registry as it was, after the test
  optim.register_policy("test_reuse_scaled", overwrite=True,
                        factory=lambda b: optim.StalenessPolicy("test_reuse_scaled", scale=lambda s: b + 0 * s))
  assert optim.get_policy("test_reuse_scaled", b=2.0) is optim.get_policy("test_reuse_scaled", b=2.0)
  optim.register_policy("test_reuse_scaled", overwrite=True,
                        factory=lambda b: optim.StalenessPolicy("test_reuse_scaled", scale=lambda s: -b + 0 * s))
  assert float(optim.get_policy("test_reuse_scaled", b=2.0).scale(np.int32(1))) == -2.0
