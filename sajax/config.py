"""Config checking and the arithmetic that turns epochs into parameter-server updates.

Every check raises :class:`ConfigError` (a ``ValueError``) with one line naming the bad value and what is
allowed; the launcher prints it and exits with code 2 before anything is written.
"""

from __future__ import annotations

import json
import math
import re
from typing import TYPE_CHECKING, Any, Mapping

import ml_collections

from sajax import elastic
from sajax.protocol import PROTOCOLS, Protocol

if TYPE_CHECKING:
  from sajax.optim import StalenessPolicy

EXECUTORS: tuple[str, ...] = ("pmap", "threads", "simulated", "mpi", "ray")
"""pmap: SSGD data parallel (no PS); threads: λ learner threads around one parameter server; simulated:
deterministic discrete-event asynchrony around the same parameter server; mpi: learner threads on every
``mpiexec`` rank, the same parameter server on rank 0; ray: learners in Ray actors (a local Ray, or a cluster's),
the same parameter server in the process that runs the job."""

# Every key a config may have, with the Python types it accepts.
SCHEMA: Mapping[str, tuple[type, ...]] = {
    "dataset": (str,), "data_dir": (str,), "download": (bool,), "train_examples": (int,),
    "model": (str,), "executor": (str,), "protocol": (str,), "n": (int,), "learners": (int,),
    "batch_per_learner": (int,), "policy": (str,), "learning_rate": (float, int), "momentum": (float, int),
    "weight_decay": (float, int), "lr_boundaries_epochs": (tuple, list), "lr_decay": (float, int),
    "lr_warmup_epochs": (float, int),
    "epochs": (float, int), "eval_every_epochs": (float, int), "eval_batch_size": (int,),
    "checkpoint_every_epochs": (float, int), "keep_checkpoints": (int,), "seed": (int,),
    "progress": (bool,), "plots": (bool,), "workdir": (str,), "fail_fast": (bool,), "fault_learner": (int,),
    "fault_at_step": (int,), "nan_learners": (tuple, list), "nan_at_step": (int,), "nan_steps": (int,),
    "divergence_after": (int,), "mpi_timeout_s": (float, int), "fault_mpi_corrupt_weights": (int,),
    "fault_mpi_corrupt_permits": (int,), "fault_mpi_corrupt_pushes": (int,),
    "fault_mpi_corrupt_version": (int,), "sim_base_time": (float, int),
    "sim_push_time": (float, int), "sim_example_time": (float, int), "sim_jitter": (float, int),
    "sim_stragglers": (float, int), "sim_slowdown": (float, int), "sim_poisson": (bool,),
    "sim_speeds": (tuple, list), "policy_args": (str, dict),
    "sim_bandwidth": (float, int), "sim_latency": (float, int),
    "sim_profile": (str,), "ssp_spread": (int,), "momentum_rule": (str,), "momentum_rule_period": (int,),
    "momentum_rule_staleness_decay": (float, int), "local_steps": (int,), "inner_optimizer": (str,),
    "inner_learning_rate": (float, int, type(None)), "inner_momentum": (float, int),
    "inner_weight_decay": (float, int), "inner_schedule": (str,), "outer_optimizer": (str,),
    "outer_learning_rate": (float, int, type(None)), "outer_momentum": (float, int, type(None)),
    "dynamic_local_steps": (bool,), "ray_address": (str,), "ray_learners_per_actor": (int,),
    **elastic.KEYS,
}
OPTIONAL_KEYS = frozenset({"workdir", "train_examples", "data_dir", "download", "progress", "plots", "weight_decay",
                           "lr_warmup_epochs", "fail_fast", "fault_learner", "fault_at_step", "nan_learners",
                           "nan_at_step", "nan_steps", "divergence_after", "mpi_timeout_s",
                           "fault_mpi_corrupt_weights", "fault_mpi_corrupt_permits", "fault_mpi_corrupt_pushes",
                           "fault_mpi_corrupt_version", "sim_base_time", "sim_push_time", "sim_example_time", "sim_jitter",
                           "sim_stragglers", "sim_slowdown", "sim_poisson", "sim_speeds", "policy_args",
                           "sim_bandwidth", "sim_latency",
                           "sim_profile", "ssp_spread", "momentum_rule", "momentum_rule_period",
                           "momentum_rule_staleness_decay", "local_steps", "inner_optimizer", "inner_learning_rate",
                           "inner_momentum", "inner_weight_decay", "inner_schedule", "outer_optimizer",
                           "outer_learning_rate", "outer_momentum", "dynamic_local_steps", "ray_address",
                           "ray_learners_per_actor", *elastic.KEYS})

# Keys of earlier versions that no longer mean anything (the simulated executor's version ring and slot
# batching, gone since it dispatches each gradient at its pull): a saved run that has them still resumes.
RETIRED_KEYS = frozenset({"sim_ring", "sim_batching"})

DEFAULT_SSP_SPREAD = 3   # s of protocol ssp when a config does not set ssp_spread (configs/default.py sets it)

# What an optional key that a saved config lacks means (so a run saved before the key existed still resumes).
ABSENT_MEANS: Mapping[str, Any] = {
    "policy_args": "{}", "sim_profile": "", "lr_warmup_epochs": 0.0, "ssp_spread": DEFAULT_SSP_SPREAD,
    "sim_push_time": 0.0,
    "sim_bandwidth": 0.0, "sim_latency": 0.0,
    "sim_example_time": 0.0, "nan_learners": (), "nan_at_step": 0, "nan_steps": 1, "divergence_after": 100,
    "mpi_timeout_s": 600.0, "fault_mpi_corrupt_weights": 0,
    "fault_mpi_corrupt_permits": 0, "fault_mpi_corrupt_pushes": 0, "fault_mpi_corrupt_version": 0,
    "momentum_rule": "plain", "momentum_rule_period": 0, "momentum_rule_staleness_decay": 0.99,
    "local_steps": 1, "inner_optimizer": "sgd", "inner_learning_rate": None, "inner_momentum": 0.0,
    "inner_weight_decay": 0.0, "inner_schedule": "constant", "outer_optimizer": "sgd", "outer_learning_rate": None,
    "outer_momentum": None, "dynamic_local_steps": False, "ray_address": "", "ray_learners_per_actor": 1,
    **elastic.ABSENT_MEANS}

# Executors whose learners send θ_j's version to a parameter server, so a policy that reads θ_j can run there.
STALE_PARAMS_EXECUTORS: tuple[str, ...] = ("threads", "simulated", "mpi", "ray")

# Keys that may change between a run and its resumption in the same workdir (λ and the elastic keys: a run resumes
# with another set of learners, see sajax.elastic and the README's "Elastic learners").
RESUMABLE_CHANGES = frozenset({"epochs", "eval_every_epochs", "checkpoint_every_epochs", "keep_checkpoints",
                               "progress", "plots", "workdir", "eval_batch_size", "ray_address",
                               "ray_learners_per_actor", "learners", *elastic.KEYS})
# Keys with one entry per learner: they may change on a resume that changes λ (and then must), never otherwise.
PER_LEARNER_KEYS = frozenset({"sim_speeds"})


class ConfigError(ValueError):
  """A bad config value; the message is one line naming the value and what is allowed."""


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every key of ``config``; raises :class:`ConfigError` on the first bad one."""
  from sajax import data, models, optim  # heavy imports, only when validating a whole run

  values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  for key in values:
    if key not in SCHEMA:
      raise ConfigError(f"unknown config key {key!r}; allowed: {', '.join(sorted(SCHEMA))}")
  for key in SCHEMA:
    if key not in values and key not in OPTIONAL_KEYS:
      raise ConfigError(f"config key {key!r} is missing; start from configs/default.py")
  for key, value in values.items():
    types = SCHEMA[key]
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
      names = " or ".join(t.__name__ for t in types)
      raise ConfigError(f"config.{key}={value!r} has the wrong type; allowed: {names}")

  def positive(key: str) -> None:
    if not values[key] > 0:
      raise ConfigError(f"config.{key}={values[key]!r} is invalid; allowed: a number > 0")

  _one_of("executor", values["executor"], EXECUTORS)
  _one_of("protocol", values["protocol"], PROTOCOLS)
  _one_of("model", values["model"], models.MODELS)
  _one_of("policy", values["policy"], (*optim.available_policies(), *optim.policy_presets()))
  if values["dataset"] not in data.DATASETS and not _is_tfds_name(values["dataset"]):
    raise ConfigError(f"unknown dataset {values['dataset']!r}; allowed: {', '.join(data.DATASETS)} "
                      "or any TFDS dataset name")
  if values["learners"] < 1:
    raise ConfigError(f"config.learners={values['learners']!r} is invalid; allowed: an integer >= 1")
  if values["batch_per_learner"] < 1:
    raise ConfigError(f"config.batch_per_learner={values['batch_per_learner']!r} is invalid; "
                      "allowed: an integer >= 1")
  for key in ("learning_rate", "epochs", "eval_every_epochs", "checkpoint_every_epochs", "eval_batch_size",
              "keep_checkpoints", "lr_decay"):
    positive(key)
  _check_policy(config, values)
  if not 0 <= values["momentum"] < 1:
    raise ConfigError(f"config.momentum={values['momentum']!r} is invalid; allowed: 0 <= momentum < 1")
  _check_momentum_rule(values)
  _check_local_steps(values)
  if values.get("lr_warmup_epochs", 0) < 0:
    raise ConfigError(f"config.lr_warmup_epochs={values['lr_warmup_epochs']!r} is invalid; allowed: a number "
                      ">= 0 (0: no warm-up)")
  if values.get("weight_decay", 0) < 0:
    raise ConfigError(f"config.weight_decay={values['weight_decay']!r} is invalid; allowed: a number >= 0")
  if values.get("train_examples", 0) < 0:
    raise ConfigError(f"config.train_examples={values['train_examples']!r} is invalid; "
                      "allowed: 0 (all) or a positive integer")
  for b in values["lr_boundaries_epochs"]:
    if isinstance(b, bool) or not isinstance(b, (int, float)) or b <= 0:
      raise ConfigError(f"config.lr_boundaries_epochs={tuple(values['lr_boundaries_epochs'])!r} is invalid; "
                        "allowed: positive epoch numbers")
  for key in ("sim_base_time", "sim_slowdown"):
    if key in values and not values[key] > 0:
      raise ConfigError(f"config.{key}={values[key]!r} is invalid; allowed: a number > 0")
  for key in ("sim_push_time", "sim_example_time"):
    if values.get(key, 0) < 0:
      raise ConfigError(f"config.{key}={values[key]!r} is invalid; allowed: seconds >= 0 (0: not used)")
  if not (math.isfinite(values.get("sim_bandwidth", 0)) and values.get("sim_bandwidth", 0) >= 0):
    raise ConfigError(f"config.sim_bandwidth={values['sim_bandwidth']!r} is invalid; allowed: bytes per simulated "
                      "second, a finite number >= 0 (0: free communication)")
  if not (math.isfinite(values.get("sim_latency", 0)) and values.get("sim_latency", 0) >= 0):
    raise ConfigError(f"config.sim_latency={values['sim_latency']!r} is invalid; allowed: seconds per message, a "
                      "finite number >= 0")
  if values.get("sim_jitter", 0) < 0:
    raise ConfigError(f"config.sim_jitter={values['sim_jitter']!r} is invalid; allowed: a number >= 0")
  if not 0 <= values.get("sim_stragglers", 0) <= 1:
    raise ConfigError(f"config.sim_stragglers={values['sim_stragglers']!r} is invalid; allowed: 0 <= fraction <= 1")
  _check_speed_profile(values)
  _check_faults(values)
  if not -1 <= values.get("fault_learner", -1) < values["learners"]:
    raise ConfigError(f"config.fault_learner={values['fault_learner']!r} is invalid; "
                      f"allowed: -1 (no fault) or a learner id 0..{values['learners'] - 1}")
  if values.get("ssp_spread", 0) < 0:
    raise ConfigError(f"config.ssp_spread={values['ssp_spread']!r} is invalid; allowed: an integer >= 0 (accepted "
                      "gradients a learner may be ahead of the slowest live learner)")
  try:
    Protocol.from_name(values["protocol"], values["learners"], values["n"],
                       values.get("ssp_spread", DEFAULT_SSP_SPREAD))
    elastic.check(values)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _check_faults(values: Mapping[str, Any]) -> None:
  """The reliability knobs: divergence bound, MPI wait bound, and the fault-injection keys."""
  learners = values["learners"]
  nan = tuple(values.get("nan_learners", ()))
  if not all(isinstance(k, int) and not isinstance(k, bool) and 0 <= k < learners for k in nan):
    raise ConfigError(f"config.nan_learners={nan!r} is invalid; allowed: learner ids 0..{learners - 1}, "
                      "e.g. (3,) or () for none")
  for key in ("nan_at_step", "nan_steps", "fault_mpi_corrupt_weights", "fault_mpi_corrupt_permits",
              "fault_mpi_corrupt_pushes", "fault_mpi_corrupt_version"):
    if values.get(key, 0) < 0:
      raise ConfigError(f"config.{key}={values[key]!r} is invalid; allowed: an integer >= 0")
  if values.get("divergence_after", 1) < 1:
    raise ConfigError(f"config.divergence_after={values['divergence_after']!r} is invalid; allowed: an integer "
                      ">= 1 (consecutive non-finite gradients that end the run)")
  if not values.get("mpi_timeout_s", 1) > 0:
    raise ConfigError(f"config.mpi_timeout_s={values['mpi_timeout_s']!r} is invalid; allowed: seconds > 0")
  _check_ray(values)


RAY_ADDRESS = re.compile(r"^(auto|(ray://)?[A-Za-z0-9_.\-\[\]:]+:[0-9]{1,5})$")


def _check_ray(values: Mapping[str, Any]) -> None:
  """``ray_address`` and ``ray_learners_per_actor`` (read by executor ray only)."""
  address = values.get("ray_address", "")
  if address and not RAY_ADDRESS.match(address):
    raise ConfigError(f"config.ray_address={address!r} is invalid; allowed: '' (a local Ray, or RAY_ADDRESS), "
                      "'auto' (the cluster of `ray start`), or host:port / ray://host:port of a cluster's head")
  per_actor = values.get("ray_learners_per_actor", 1)
  if not 1 <= per_actor <= values["learners"]:
    raise ConfigError(f"config.ray_learners_per_actor={per_actor!r} is invalid; allowed: 1..{values['learners']} "
                      "(learners in one Ray actor, at most λ)")


def _is_tfds_name(name: str) -> bool:
  """Whether TFDS knows a builder called ``name`` (``name:version`` and ``name/config`` allowed); no network."""
  from tensorflow_datasets.core import registered
  base = name.split(":")[0].split("/")[0]
  return base in registered.list_imported_builders()


def _one_of(key: str, value: Any, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise ConfigError(f"unknown {key} {value!r}; allowed: {', '.join(allowed)}")


def _check_policy(config: Any, values: Mapping[str, Any]) -> None:
  """``policy_args`` builds ``policy`` (see :func:`policy_of`), and an executor without θ_j gets no policy
  that reads it."""
  try:
    policy = policy_of(config)
  except ValueError as e:
    raise ConfigError(f"config.policy_args={values.get('policy_args', '{}')!r} is invalid for policy "
                      f"{values['policy']!r}: {e}") from None
  if policy.needs_stale_params and values["executor"] not in STALE_PARAMS_EXECUTORS:
    raise ConfigError(f"policy {policy.name!r} needs θ_j (the weights each gradient was computed on), which "
                      f"executor {values['executor']!r} does not keep; allowed executors: "
                      f"{', '.join(STALE_PARAMS_EXECUTORS)}")


def _check_momentum_rule(values: Mapping[str, Any]) -> None:
  """``momentum_rule`` (:mod:`sajax.momentum`) and its arguments."""
  from sajax import momentum
  rule = values.get("momentum_rule", "plain")
  _one_of("momentum_rule", rule, momentum.MOMENTUM_RULES)
  if values.get("momentum_rule_period", 0) < 0:
    raise ConfigError(f"config.momentum_rule_period={values['momentum_rule_period']!r} is invalid; allowed: an "
                      "integer >= 0 (gradients per momentum step of delayed_nesterov; 0: λ)")
  if not 0 <= values.get("momentum_rule_staleness_decay", 0.99) <= 1:
    raise ConfigError(f"config.momentum_rule_staleness_decay={values['momentum_rule_staleness_decay']!r} is "
                      "invalid; allowed: 0 <= ρ <= 1 (the per-gradient decay of the smoothed ⟨σ⟩; 1: running mean)")
  if rule == "delayed_nesterov" and values["executor"] == "pmap":
    raise ConfigError("momentum_rule 'delayed_nesterov' counts the gradients arriving at a parameter server, which "
                      "executor 'pmap' (SSGD) has none of; allowed executors: threads, simulated, mpi, ray (under SSGD "
                      "it is Nesterov momentum: momentum_rule 'lookahead' gives it)")


def _check_local_steps(values: Mapping[str, Any]) -> None:
  """``local_steps`` (H) and the inner and outer optimizers of asynchronous local-SGD (:mod:`sajax.local_steps`)."""
  from sajax import local_steps
  steps = values.get("local_steps", 1)
  if steps < 1:
    raise ConfigError(f"config.local_steps={steps!r} is invalid; allowed: an integer >= 1 (inner steps per push; "
                      "1: a plain gradient)")
  _one_of("inner_optimizer", values.get("inner_optimizer", "sgd"), local_steps.INNER_OPTIMIZERS)
  _one_of("inner_schedule", values.get("inner_schedule", "constant"), local_steps.INNER_SCHEDULES)
  outer = values.get("outer_optimizer", "sgd")
  _one_of("outer_optimizer", outer, local_steps.OUTER_OPTIMIZERS)
  for key in ("inner_learning_rate", "outer_learning_rate"):
    if values.get(key) is not None and not values[key] > 0:
      raise ConfigError(f"config.{key}={values[key]!r} is invalid; allowed: a number > 0, or None (the "
                        "optimizer's default)")
  for key in ("inner_momentum", "outer_momentum"):
    if values.get(key) is not None and not 0 <= values[key] < 1:
      raise ConfigError(f"config.{key}={values[key]!r} is invalid; allowed: 0 <= momentum < 1"
                        + (", or None (the optimizer's default)" if key == "outer_momentum" else ""))
  if values.get("inner_weight_decay", 0) < 0:
    raise ConfigError(f"config.inner_weight_decay={values['inner_weight_decay']!r} is invalid; allowed: a number "
                      ">= 0")
  if values.get("inner_momentum", 0) and values.get("inner_optimizer", "sgd") != "sgd":
    raise ConfigError(f"config.inner_momentum={values['inner_momentum']!r} is read by inner_optimizer 'sgd' only; "
                      f"allowed with {values['inner_optimizer']!r}: 0")
  rule = values.get("momentum_rule", "plain")
  if outer != "sgd" and rule not in ("plain", outer):
    raise ConfigError(f"outer_optimizer {outer!r} is its own momentum, so momentum_rule {rule!r} cannot apply; "
                      "allowed: momentum_rule 'plain' with it, or outer_optimizer 'sgd' with any momentum_rule")
  if outer == "delayed_nesterov" and values["executor"] == "pmap":
    raise ConfigError("outer_optimizer 'delayed_nesterov' counts the pushes arriving at a parameter server, which "
                      "executor 'pmap' (SSGD) has none of; allowed executors: threads, simulated, mpi, ray")
  if steps > 1 and values["executor"] == "pmap":
    raise ConfigError(f"config.local_steps={steps!r} needs learners that push to a parameter server, which "
                      "executor 'pmap' (SSGD) has none of; allowed: local_steps 1 with pmap, or executors "
                      "threads, simulated, mpi, ray")
  if values.get("dynamic_local_steps", False) and values["executor"] not in ("threads", "simulated"):
    raise ConfigError(f"config.dynamic_local_steps=True needs the learners' speeds (the simulated speed model, or "
                      f"step times measured in one process), which executor {values['executor']!r} does not have; "
                      "allowed executors: threads, simulated")


def _check_speed_profile(values: Mapping[str, Any]) -> None:
  """``sim_profile`` and the ``sim_*`` keys it reads (see :mod:`sajax.executors.speed`)."""
  from sajax.executors import speed
  profile = values.get("sim_profile", "")
  if profile not in speed.PROFILES:
    raise ConfigError(f"unknown sim_profile {profile!r}; allowed: {', '.join(map(repr, speed.PROFILES))}")
  speeds = tuple(values.get("sim_speeds", ()))
  if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in speeds):
    raise ConfigError(f"config.sim_speeds={speeds!r} is invalid; allowed: positive time factors")
  if profile == "heterogeneous":
    return    # sim_speeds, of any length, is the pattern cycled over the learners
  if speeds and (profile or len(speeds) != values["learners"]):
    allowed = f"() or {values['learners']} positive time factors, one per learner" if not profile else \
        "() (sim_speeds is read by sim_profile '' or 'heterogeneous')"
    raise ConfigError(f"config.sim_speeds={speeds!r} is invalid with sim_profile={profile!r}; allowed: {allowed}")
  if profile and values.get("sim_stragglers", 0):
    raise ConfigError(f"config.sim_stragglers={values['sim_stragglers']!r} is invalid with sim_profile="
                      f"{profile!r}; allowed: 0 (sim_stragglers is read by sim_profile '' only)")
  if profile == "lognormal" and not values.get("sim_jitter", 0) > 0:
    raise ConfigError(f"config.sim_jitter={values.get('sim_jitter', 0)!r} is invalid with sim_profile='lognormal'; "
                      "allowed: a number > 0 (the σ of the log of each gradient's time)")


def policy_args_of(config: Any) -> dict[str, Any]:
  """``config.policy_args`` as a dict: a JSON object (as ``--config.policy_args='{"a": 0.5}'`` gives it) or a
  dict; absent or ``""`` is ``{}``."""
  raw = config.get("policy_args", "{}")
  if hasattr(raw, "to_dict"):
    raw = raw.to_dict()
  if isinstance(raw, dict):
    return dict(raw)
  try:
    args = json.loads(raw or "{}")
  except (TypeError, ValueError):
    args = None
  if not isinstance(args, dict):
    raise ValueError(f"config.policy_args={raw!r} is not a JSON object; allowed: e.g. '{{\"a\": 0.5}}' or '{{}}'")
  return args


def policy_of(config: Any) -> StalenessPolicy:
  """The run's staleness policy: ``config.policy`` built with ``config.policy_args``. A policy taking
  ``learners`` (λ) or ``learning_rate`` (α0) gets ``config.learners`` / ``config.learning_rate`` unless
  ``policy_args`` sets it. Raises ValueError (one line) for a bad argument."""
  from sajax import optim
  args = policy_args_of(config)
  names = optim.policy_arg_names(config.policy)
  for key in ("learners", "learning_rate"):
    if key in names:
      args.setdefault(key, config[key])
  return optim.get_policy(config.policy, **args)


def protocol_of(config: ml_collections.ConfigDict) -> Protocol:
  """The run's protocol; the pmap executor is SSGD, i.e. hardsync, whatever ``config.protocol`` says."""
  if config.executor == "pmap":
    return Protocol.hardsync(config.learners)
  return Protocol.from_name(config.protocol, config.learners, config.n,
                            config.get("ssp_spread", DEFAULT_SSP_SPREAD))


def updates_per_epoch(num_examples: int, protocol: Protocol, batch_per_learner: int, local_steps: int = 1) -> float:
  """N / (c·H·μ): parameter-server updates in one pass over the N training examples, each update combining c
  pushes of H mini-batches of μ (H = ``local_steps``, 1 for plain gradients)."""
  return num_examples / (protocol.gradients_per_update * batch_per_learner * local_steps)


def epoch_to_update(epoch: float, per_epoch: float) -> int:
  """The update count at which ``epoch`` ends (rounded to the nearest update, at least 1 for epoch > 0)."""
  return max(1, int(round(epoch * per_epoch))) if epoch > 0 else 0


def schedule_boundaries(config: ml_collections.ConfigDict, per_epoch: float) -> dict[int, float]:
  """``{update: lr_decay}`` for ``optax.piecewise_constant_schedule`` from boundaries given in epochs."""
  out: dict[int, float] = {}
  for b in config.lr_boundaries_epochs:
    step = epoch_to_update(b, per_epoch)
    out[step] = out.get(step, 1.0) * config.lr_decay
  return out


def _json_or_same(value: Any) -> Any:
  try:
    return json.loads(value) if isinstance(value, str) else value
  except ValueError:
    return value


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  """Keys whose values differ between a saved run config and a new one, ignoring resumable keys."""
  diffs = []
  for key in sorted(set(old) | set(new)):
    if key in RESUMABLE_CHANGES or key in RETIRED_KEYS:
      continue
    if key in PER_LEARNER_KEYS and old.get("learners") != new.get("learners"):
      continue
    a, b = old.get(key, ABSENT_MEANS.get(key)), new.get(key, ABSENT_MEANS.get(key))
    if key == "policy_args":
      a, b = _json_or_same(a), _json_or_same(b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
      a, b = list(a), list(b)
    if isinstance(a, float) or isinstance(b, float):
      if isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b):
        continue
    if a != b:
      diffs.append(f"{key}: {a!r} -> {b!r}")
  return diffs
