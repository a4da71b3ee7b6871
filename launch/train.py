#!/usr/bin/env python
"""Train with sajax: ``python launch/train.py [--config configs/x.py] [--config.key=value ...] [--workdir DIR]``.

With no flags it runs configs/default.py (embedded mnist5k, no network) into a fresh ``runs/`` folder and says
where. Rerunning with the same ``--workdir`` resumes from its last checkpoint. Bad input prints one line and
exits with code 2; a diverged run (too many non-finite gradients in a row) prints one line naming the update,
the count and the newest checkpoint and exits with code 3; a learner failure under ``fail_fast`` (or every learner
dead) prints one line and exits with code 4 (each learner failure is one line; its traceback goes to
``<workdir>/errors.log``); under MPI, a rank that fails or stops answering ends the job with one line and exit
code 5 (``sajax.executors.mpi_comm.EXIT_RANK_FAILED``); Ctrl-C saves a checkpoint and exits with code 130, even
when every learner has stalled.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

DEFAULT_CONFIG = os.path.join(ROOT, "configs", "default.py")

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_LEARNERS_FAILED = 4
EXIT_INTERRUPTED = 130


def _one_line(error: BaseException) -> str:
  text = " ".join(str(error).split())
  text = re.sub(r"^(Flags parsing error|FATAL Flags parsing error):\s*", "", text)
  return text


# XLA CPU aborts a run whose collective (the pmap all-reduce) waits more than 40 s for a participant; on a
# loaded 2-core machine with 8 emulated devices that happened once in a dozen runs. Wait longer instead.
COLLECTIVE_TIMEOUT_FLAG = "--xla_cpu_collective_call_terminate_timeout_seconds=1800"


# The simulated executor spreads its learners' gradients over at most this many devices (learner k on device
# k mod D), and on CPU over at most one per core: more only add compilations (one per device) and contention (a
# simulated λ = 16 run on 2 loaded cores: 7–13 s with 2 devices, 11–31 s with 1, 45–56 s with 8).
SIMULATED_DEVICES = 8


def threads_learner_devices(learners: int, cores: int | None = None) -> int:
  """Devices for the threads executor's learners on the CPU platform: min(λ, cores). Emulated devices beyond
  the cores add no compute, and each compiles the learner step again: on 2 cores the default run's first epoch
  took 23 s with 8 learner devices, 12 s with 2, at the same speed afterwards (docs/benchmarks.md)."""
  return max(1, min(learners, cores or os.cpu_count() or 1))


def mpi_rank_size() -> tuple[int, int]:
  """This process's rank and the number of processes, from the variables mpiexec (MPICH, Open MPI) or srun
  set; (0, 1) outside them. Read before jax (and mpi4py) are imported."""
  for rank_var, size_var in (("PMI_RANK", "PMI_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                             ("PMIX_RANK", "PMIX_SIZE")):
    if os.environ.get(rank_var, "").isdigit() and os.environ.get(size_var, "").isdigit():
      return int(os.environ[rank_var]), int(os.environ[size_var])
  return 0, 1


def cpu_device_flags(learners: int, executor: str, flags_now: str = "") -> str:
  """``flags_now`` (XLA_FLAGS) plus a request for λ CPU-emulated devices (one per learner; for the threads
  executor min(λ, cores) and one more for the PS; min(λ, cores, 8) for the simulated executor; one, the PS's, for the
  ray executor, whose learner actors each see one) unless it already names a count, plus a long collective
  timeout. It only affects the CPU platform. Under mpiexec each process asks for its share:
  executor=mpi its block of learners (+1 for the PS on rank 0, blocks as in ``mpi_wire.learner_blocks``),
  executor=pmap λ/P."""
  count = {"threads": threads_learner_devices(learners) + 1,
           "simulated": min(threads_learner_devices(learners), SIMULATED_DEVICES), "ray": 1}.get(executor, learners)
  rank, size = mpi_rank_size()
  if executor == "mpi":
    count = max(1, (rank + 1) * learners // size - rank * learners // size) + (rank == 0)
  elif executor == "pmap" and size > 1:
    count = max(1, learners // size)
  if count > 1 and "xla_force_host_platform_device_count" not in flags_now:
    flags_now = f"{flags_now} --xla_force_host_platform_device_count={count}"
  if "xla_cpu_collective_call_terminate_timeout_seconds" not in flags_now:
    flags_now = f"{flags_now} {COLLECTIVE_TIMEOUT_FLAG}"
  return flags_now.strip()


def set_cpu_device_count(learners: int, executor: str) -> None:
  """Sets XLA_FLAGS to ``cpu_device_flags``; must run before jax is imported (it does nothing after)."""
  if "jax" not in sys.modules:
    os.environ["XLA_FLAGS"] = cpu_device_flags(learners, executor, os.environ.get("XLA_FLAGS", ""))


def _config_path(argv: list[str]) -> str | None:
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1].split(":")[0]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1].split(":")[0]
  return None


def _load_config_file(path: str):
  """The ConfigDict of the config file at ``path``, loaded without importing jax."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("sajax_user_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _config_keys(path: str) -> list[str]:
  return sorted(_load_config_file(path).keys())


def _bad_value_message(error: BaseException, path: str) -> str | None:
  """'config.key=value is invalid ...; allowed: <type>' for an override that does not parse as its type."""
  match = re.search(r"flag --config\.([\w.]+)=(.*?): (.*)", _one_line(error))
  if not match:
    return None
  key, value, reason = match.groups()
  try:
    kind = type(_load_config_file(path)[key.split(".")[0]]).__name__
  except Exception:  # noqa: BLE001 - only used to phrase the message
    kind = ""
  expected = {"int": "an integer", "float": "a number", "bool": "True or False", "str": "a string",
              "tuple": "a tuple such as (120, 130)"}.get(kind, "a value of the key's type")
  return f"config.{key}={value!r} is invalid ({reason}); allowed: {expected}"


def _unknown_override(argv: list[str], path: str) -> str | None:
  """The first ``--config.<key>`` override whose key the config file does not have."""
  keys = set(_config_keys(path))
  for a in argv:
    if a.startswith("--config."):
      key = a[len("--config."):].split("=", 1)[0].split(".")[0]
      if key not in keys:
        return key
  return None


def _define_flags(argv: list[str]) -> tuple[flags.FlagValues, Any]:
  """Fresh flags for one parse of ``argv``: ``--config`` (with its ``--config.*`` overrides, which config_flags
  finds in the argv it is given, not in sys.argv) and ``--workdir``. A parse of its own each call, so that
  ``main(argv)`` reads exactly ``argv``, also when called twice in one process (absl's global FLAGS would keep
  the first call's override flags and refuse to define them again)."""
  values = flags.FlagValues()
  # No default: config_flags would apply --config.* overrides while defining the flag, outside our error
  # handling; parse_config puts the default config in front of the arguments instead.
  config = config_flags.DEFINE_config_file("config", None, "ml_collections config file (default: "
                                           "configs/default.py).", flag_values=values, lock_config=True,
                                           sys_argv=argv)
  flags.DEFINE_string("workdir", None, "Run folder (created; an existing one is resumed). Default: a fresh "
                      "runs/<config>-<date>-<time>.", flag_values=values)
  return values, config


def parse_args(argv: list[str]) -> tuple[Any, str | None, str]:
  """(config, --workdir or None, the config file's path) from ``argv`` (``argv[0]`` is the program). Raises
  ValueError with one line for a missing file, an unknown key or a bad value."""
  path = _config_path(argv[1:])
  if path is None:
    argv = [argv[0], f"--config={DEFAULT_CONFIG}", *argv[1:]]
  elif not os.path.isfile(path):
    raise ValueError(f"config file {path!r} does not exist; allowed: a path to an ml_collections config file, "
                     f"e.g. configs/default.py")
  path = path or DEFAULT_CONFIG
  values, config_flag = _define_flags(argv)
  try:
    values(argv)
    config = config_flag.value
    config.learners  # noqa: B018 - a config file that failed to load raises here
  except (flags.Error, KeyError, AttributeError, TypeError, OSError) as e:
    key = _unknown_override(argv[1:], path)
    if key is not None:
      raise ValueError(f"unknown config key {key!r}; allowed: {', '.join(_config_keys(path))}") from None
    raise ValueError(_bad_value_message(e, path) or _one_line(e)) from None
  return config, values["workdir"].value, path


def parse_config(argv: list[str]):
  """The run's config from ``argv``; raises ValueError with one line (see :func:`parse_args`)."""
  return parse_args(argv)[0]


def main(argv: list[str]) -> int:
  try:
    config, workdir_flag, config_path = parse_args(argv)
  except ValueError as e:
    print(f"error: {_one_line(e)}", file=sys.stderr)
    return EXIT_BAD_INPUT
  set_cpu_device_count(int(config.learners) if isinstance(config.learners, int) else 1, str(config.executor))
  if config.executor == "ray":   # the PS here and learner actors may share a GPU: JAX allocates on demand
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  rank = mpi_rank_size()[0] if config.executor in ("mpi", "pmap") else 0
  say = (lambda text: print(text, file=sys.stderr)) if rank == 0 else (lambda text: None)  # noqa: E731

  logging.basicConfig(level=logging.INFO, format="%(message)s" if rank == 0 else f"[rank {rank}] %(message)s",
                      stream=sys.stderr)
  for noisy in ("absl", "jax", "orbax", "tensorflow_datasets"):
    logging.getLogger(noisy).setLevel(logging.ERROR)
  import sajax
  from sajax import config as config_lib, data, metrics, trainer as train_lib

  config_name = os.path.splitext(os.path.basename(config_path))[0]
  workdir = workdir_flag or config.get("workdir") or train_lib.default_workdir(config_name)
  try:
    config_lib.validate(config)
    train_lib.check_workdir_writable(workdir)
  except ValueError as e:
    say(f"error: {_one_line(e)}")
    return EXIT_BAD_INPUT
  from sajax.checkpoint import CheckpointMismatch
  from sajax.executors.common import LearnersFailed
  from sajax.server import DivergenceError
  try:
    result = sajax.train(config, workdir=workdir)
  except (config_lib.ConfigError, data.DatasetError, CheckpointMismatch) as e:
    say(f"error: {_one_line(e)}")
    return EXIT_BAD_INPUT
  except DivergenceError as e:
    say(f"error: {_one_line(e)}")
    return EXIT_DIVERGED
  except LearnersFailed as e:
    say(f"error: {_one_line(e)}")
    return EXIT_LEARNERS_FAILED
  except KeyboardInterrupt:
    say(f"\ninterrupted; rerun with --workdir {workdir} to resume from its last checkpoint")
    return EXIT_INTERRUPTED
  if rank == 0:
    print(metrics.summary(config.to_dict(), result.metrics, os.path.abspath(workdir)))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
