"""The simulated executor's 1-softsync with equal learner speeds against a plain delayed-gradient SGD loop.

What the executor does, exactly (λ learners, c = λ, every gradient takes one simulated second, simultaneous
pushes go in learner-id order, and a learner pulls right after its push, so after the update that push
completed, if it completed one):

- round 0 (pushes at simulated second 1): all λ gradients were computed on θ_0, σ = 0; the λ-th push applies
  update 1. Learners 0..λ−2 have already pulled again, before that update (θ_0); learner λ−1 pulls θ_1.
- round i ≥ 1 (second i + 1): learners 0..λ−2 push gradients on θ_{i−1} (σ = 1); learner λ−1 pushes last, a
  gradient on θ_i (σ = 0), and applies update i + 1. Over K updates ⟨σ⟩ = (λ − 1)(K − 1)/(λK): every update
  but the first averages λ − 1 gradients one update late and one fresh one.
- learner k's gradient of round i uses its own i-th mini-batch and augmentation key fold_in(fold_in(key, k), i).
- θ_{i+1} = θ_i − α·v_{i+1}, v_{i+1} = m·v_i + (1/λ) Σ_k s(σ_k)·g_k, summed in push (learner-id) order; the
  ``inverse`` policy has s(0) = s(1) = 1, so the staleness scale changes nothing here.

The reference is a plain loop (no ParameterServer, no executor, no optax: its own momentum) told only which
version each learner's gradient of each round reads, fed the very mini-batches the executor drew (recorded
from the learner streams as the executor takes them). Driven through ``sajax.train`` (with a 12,730-parameter
network in place of the CNN, so that it compiles in milliseconds), the executor's whole trajectory θ_1..θ_K
equals the reference's to float32 rounding after every update, at momentum 0 and 0.9. The same loop with any
other delay lands far outside that tolerance, so the comparison can fail: every gradient one update late (the
textbook delayed SGD, which differs only in learner λ−1's gradient of each round), no delay (SSGD), or two
updates late.
"""

import functools
import operator

import jax
import numpy as np
import pytest

import sajax
from sajax import data, models, steps, trainer
from tests.helpers import smoke_config

LEARNERS, BATCH, UPDATES, LEARNING_RATE = 3, 4, 6, 0.1
ATOL = 1e-6   # on θ after each update: float32 rounding only (see the test)


# 784 → 16 relu → classes (sajax's MLP, narrower): compiles in milliseconds, so the test costs seconds.
TinyNet = functools.partial(models.MLP, hidden=16)


def delayed_sgd(grad, theta0, batch, *, learners, rounds, lr, momentum, read):
  """Plain SGD with momentum in which learner k's gradient of round i is taken on θ_{read(k, i)}.

  θ_{i+1} = θ_i − lr·v_{i+1}, v_{i+1} = momentum·v_i + (1/λ) Σ_k ∇L(θ_{read(k,i)}; batch(k, i)), v_0 = 0.
  Returns [θ_1, ..., θ_rounds].
  """
  thetas = [theta0]
  velocity = jax.tree.map(np.zeros_like, theta0)
  for i in range(rounds):
    grads = [grad(thetas[read(k, i)], *batch(k, i)) for k in range(learners)]
    mean = jax.tree.map(lambda *g: functools.reduce(operator.add, g) / learners, *grads)
    velocity = jax.tree.map(lambda v, g: momentum * v + g, velocity, mean)
    thetas.append(jax.tree.map(lambda p, v: p - lr * v, thetas[-1], velocity))
  return thetas[1:]


def executor_reads(k, i):
  """The executor's 1-softsync at equal speeds: one update late, except learner λ−1 (fresh) and round 0."""
  return i if k == LEARNERS - 1 else max(i - 1, 0)


def train_recording(config, workdir, monkeypatch):
  """Trains ``config`` through ``sajax.train`` with the simulated executor; returns the run, its θ after each update
  [θ_1..θ_K], learner k's s-th mini-batch {(k, s): (images, labels)} as its stream gave it to the executor, and the
  result. (tests/test_local_sgd.py checks DiLoCo the same way.)"""
  drawn, trajectory, run_of = {}, [], []
  next_batch = trainer.Run.next_batch

  def recording_next_batch(run, learner):
    images, labels, step = next_batch(run, learner)
    drawn[learner, step] = (images, labels)
    return images, labels, step

  def after_update(run):   # run.params is the run's θ_0; the PS holds θ_i
    run_of[:] = [run]
    trajectory.append(jax.tree.map(np.array, run.executor.ps.params))

  monkeypatch.setattr(trainer.Run, "next_batch", recording_next_batch)
  result = sajax.train(config, workdir=workdir, callbacks=[after_update])
  monkeypatch.setattr(trainer.Run, "next_batch", next_batch)
  return run_of[0], trajectory, drawn, result


def run_executor(tmp_path, monkeypatch, momentum):
  """Trains through ``sajax.train`` (:func:`train_recording`); returns θ_0, [θ_1..θ_K], the run's key, the
  mini-batches drawn {(k, s): (images, labels)}, and the final metrics."""
  monkeypatch.setattr(models, "create_model", lambda name, num_classes: TinyNet(num_classes))
  config = smoke_config("simulated", "softsync", n=1, learners=LEARNERS, batch_per_learner=BATCH,
                        train_examples=LEARNERS * BATCH * UPDATES, epochs=1, lr_boundaries_epochs=(),
                        learning_rate=LEARNING_RATE, momentum=momentum, policy="inverse")
  run, trajectory, drawn, result = train_recording(config, str(tmp_path), monkeypatch)
  monkeypatch.undo()
  return jax.tree.map(np.array, run.params), trajectory, run.key, drawn, result.metrics


def max_gap(a, b):
  """The largest |a − b| over every leaf of two pytrees of the same structure."""
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
             zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_one_softsync_at_equal_speeds_is_plain_sgd_with_one_update_late_gradients(tmp_path, monkeypatch,
                                                                                    momentum):
  theta0, trajectory, key, drawn, metrics = run_executor(tmp_path, monkeypatch, momentum)
  assert metrics["updates"] == len(trajectory) == UPDATES
  assert metrics["sim_time"] == UPDATES                          # equal speeds: one simulated second a round
  late, fresh = (LEARNERS - 1) * (UPDATES - 1), LEARNERS + UPDATES - 1
  assert metrics["staleness_histogram"] == {"0": fresh, "1": late}
  assert metrics["staleness_per_learner"][str(LEARNERS - 1)]["max"] == 0   # the learner that completes each update

  dataset = data.load_dataset("mnist5k")
  loss_fn = steps.make_loss_fn(TinyNet(dataset.num_classes), data.make_preprocess(dataset))
  grad = jax.jit(jax.grad(loss_fn))

  def batch(k, i):   # learner k's i-th mini-batch as the executor drew it, and its augmentation key
    return (*drawn[k, i], jax.random.fold_in(jax.random.fold_in(key, k), i))

  reference = functools.partial(delayed_sgd, grad, theta0, batch, learners=LEARNERS, rounds=UPDATES,
                                lr=LEARNING_RATE, momentum=momentum)
  # The gradients are bit-identical to the executor's; its update is one compiled XLA program (division by c,
  # momentum, step fused, with fused multiply-adds), this loop's runs op by op: θ differs by float32 rounding,
  # a few ulps (≤ 8e-8 observed over 6 updates at |θ| < 1), far below ATOL and far below any other delay.
  gaps = [max_gap(a, b) for a, b in zip(trajectory, reference(read=executor_reads))]
  assert max(gaps) < ATOL, f"executor vs the reference, max |Δθ| after each update: {gaps}"

  others = {"every gradient one update late": lambda k, i: max(i - 1, 0),
            "no delay (SSGD)": lambda k, i: i,
            "two updates late": lambda k, i: max(i - 2, 0)}
  for name, read in others.items():
    gap = max_gap(trajectory[-1], reference(read=read)[-1])
    assert gap > 1000 * ATOL, f"{name}: final θ only {gap} from the executor's; the test cannot tell them apart"
