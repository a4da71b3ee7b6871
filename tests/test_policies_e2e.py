"""Every staleness policy trains end to end through the parameter server in every executor that has one:
simulated, threads and MPI (all policies, async)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import sajax
from sajax import optim
from tests.helpers import child_env, smoke_config

ARGS = {"polynomial": {"a": 0.5}, "exponential": {}, "hinge": {}, "delay_adaptive": {}, "drop": {"bound": 6},
        "dc_asgd": {}, "dc_asgd_adaptive": {}, "gap_aware": {}, "inverse": {}, "constant": {}}

# The policies tests/mpi_policies.py runs across ranks: those whose θ_j rank 0 must keep for the other rank's pushes
# (dc_asgd, dc_asgd_adaptive, gap_aware), drop (the PS refuses too-stale pushes), and the four σ-scalings that carry
# the momentum rules and local-SGD there. hinge and delay_adaptive scale by σ alone on rank 0's PS, as polynomial
# does: the wire adds nothing for them (both train under threads and simulated below).
# Examples per run of the MPI job: 250 gradients of μ = 8, so rank 1's learners (which get their first weights after
# rank 0's have started) push in every run. With the smoke config's MLP a gradient takes about a millisecond: at 512
# examples a run lasted 0.35–0.6 s, rank 1 pushed 1 to 30 of the 64 gradients, and none once under load (dc_asgd,
# in a clean-clone CI run).
TRAIN_EXAMPLES = 2000     # twice that, the local-SGD run's, is all of mnist5k's 4,000 training digits
MPI_POLICIES = ("constant", "dc_asgd", "dc_asgd_adaptive", "drop", "exponential", "gap_aware", "inverse",
                "polynomial")


def _config(executor, policy, learners=4, **overrides):
  overrides.setdefault("epochs", 1.0)
  overrides.setdefault("train_examples", 256)      # 32 gradients of μ = 8: a smoke test, kept short for CI
  return smoke_config(executor, "async", learners=learners, batch_per_learner=8, policy=policy,
                      policy_args=json.dumps(ARGS[policy]), **overrides)


def test_every_registered_policy_is_exercised_here():
  assert set(ARGS) >= set(optim.available_policies()) - {p for p in optim.available_policies() if p.startswith("test")}


@pytest.mark.parametrize("policy", sorted(ARGS))
def test_each_policy_trains_in_the_simulation(policy, tmp_path):
  final = sajax.train(_config("simulated", policy), workdir=str(tmp_path)).metrics
  # It ran to the end through the PS (how well each policy learns is for a comparison at scale, not a smoke test).
  assert np.isfinite(final["train_loss"]) and final["samples"] >= 256 and final["gradients_dropped"] == 0
  if policy == "drop":   # λ = 4 async: σ ≈ 3, so R = 6 drops only the stalest, and they do not count toward c
    assert final["staleness_max"] < 6
    assert sum(final["staleness_histogram"].values()) == final["updates"]


@pytest.mark.parametrize("policy", sorted(ARGS))
def test_each_policy_trains_with_threads(policy, tmp_path):
  # λ = 2: one compile per learner device, and still stale gradients (σ ≥ 1) for the policy to act on
  final = sajax.train(_config("threads", policy, learners=2), workdir=str(tmp_path)).metrics
  assert np.isfinite(final["train_loss"]) and final["samples"] >= 256
  assert final["staleness_max"] >= 1        # stale gradients did reach the policy (θ_j handed over with the push)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(MPIEXEC), reason="mpiexec not installed (pip install '.[mpi]')")
def test_each_policy_trains_across_mpi_ranks(tmp_path):
  """One ``mpiexec -n 2`` job trains the policies the wire does something for, in turn (tests/mpi_policies.py): rank 1's learners push to
  rank 0's parameter server under each rule (three of the runs under a staleness-aware momentum rule as well, one
as asynchronous local-SGD: Δ after 2 inner steps, outer Nesterov). The policies that read θ_j (gap_aware, stateful; dc_asgd) get it
  for the other rank's pushes too: rank 0 keeps the versions it sent. (dc_asgd_adaptive, with its papers' λ0 = 2,
  diverged at update 83 of a longer run and at update 52 of this one — exit 3, as it should end — and trained
  poorly under threads and simulated alike at α0 = 0.03: a property of the rule at that α0; it runs here at 0.01.)"""
  env = child_env()
  # The runs compile the same steps again (new closures per run): a persistent cache (the test session's, which
  # tests/conftest.py sets) makes the repeats loads.
  env.setdefault("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax_cache"))
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  result = subprocess.run([MPIEXEC, "-n", "2", sys.executable, os.path.join(ROOT, "tests", "mpi_policies.py"),
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  finals = {r["policy"]: r for r in map(json.loads, [l for l in result.stdout.splitlines() if l.startswith("{")])}
  assert sorted(finals) == sorted(MPI_POLICIES) and set(ARGS) - set(finals) == {"hinge", "delay_adaptive"}
  for policy, final in finals.items():
    assert np.isfinite(final["train_loss"]) and final["samples"] >= TRAIN_EXAMPLES, policy
    assert final["gradients_dropped"] == 0, policy
    # rank 1 took part: a push applied, or (drop, when rank 1 started late) pushes dropped as too stale
    assert final["pushes_per_rank"][1] > 0 or (policy == "drop" and final["gradients_stale_dropped"] > 0), policy
  assert finals["drop"]["staleness_max"] < ARGS["drop"]["bound"]
  assert finals["inverse"]["local_steps"] == 2 and finals["inverse"]["samples"] == 2 * TRAIN_EXAMPLES   # Δ over 2μ
  for policy in ("gap_aware", "dc_asgd"):       # stale pushes of rank 1 reached the rule with their θ_j
    assert finals[policy]["pushes_per_rank"][1] > 0 and finals[policy]["staleness_max"] >= 1, policy
