"""Test set-up: 8 CPU-emulated devices, set before jax is imported anywhere."""
import os
import sys

import pytest

# 8 emulated devices, and a long collective timeout (XLA CPU aborts a pmap all-reduce that waits > 40 s for a
# participant, which a loaded 2-core CI machine can reach).
# XLA CPU's multi-threaded Eigen (convolutions) spins threads that a 2-core machine running two pytest-xdist
# workers and their child processes cannot spare: single-threaded Eigen made a test subset 28 % faster (72.8 ->
# 52.5 s, CPU 134 -> 97 s). Child processes that keep XLA_FLAGS inherit it.
# The tests' programs are small and run a few hundred steps at most, so compiling them is much of their cost: LLVM
# at optimisation level 0 compiles XLA's generated code faster (the full suite 305/307 s -> 278/255 s, CPU 520 ->
# 467/424 s; tests/test_models.py alone 45.8 -> 20.9 s of CPU). The same programs and operations; some float sums
# round differently (a 1-epoch small_cnn run's train loss 2.652828125 -> 2.652828153), and every comparison a test
# makes is between runs under the same flags. (The mpiexec jobs drop XLA_FLAGS: tests/test_mpi.py says why.)
for _flag in ("--xla_force_host_platform_device_count=8",
              "--xla_cpu_collective_call_terminate_timeout_seconds=1800",
              "--xla_cpu_multi_thread_eigen=false", "intra_op_parallelism_threads=1",
              "--xla_backend_optimization_level=0"):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# JAX's older (non-partitionable) threefry, for this process and its children: XLA CPU compiles random-number code
# slowly, and the partitionable threefry's about 3× slower again (the init program of small_cnn: 2.87 -> 0.94 CPU-s,
# of cifar10_full: 4.72 -> 1.24; 10 jax.random.normal calls: 5.1 -> 2.6). Every run draws its init, dropout and
# augmentation from it, and the tests start dozens of JAX processes, each compiling its own programs at least once.
# Six in-process test files (models, configs, threads, local_sgd, simulated, train), alternated: busy CPU 247/218 s
# without, 197/186 s with; wall 128/114 s, 105/97 s. The same keys give other bits, the same distributions; no test
# compares against numbers drawn under the default (their runs are all under this setting).
os.environ.setdefault("JAX_THREEFRY_PARTITIONABLE", "0")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# One persistent XLA compilation cache for the whole test session, in-process and for the train.py / mpiexec
# processes tests start: every sajax.train call builds new jitted closures, which JAX compiles again; with the
# cache the repeats are loads (a warm cache made a 1-epoch reproduce cell 4.5× faster). Compiled code is the
# same, so no number changes. Removed when the session ends.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile
    _cache = tempfile.mkdtemp(prefix="sajax-test-jax-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def _one_cache_entry_for_every_cpu_device():
  """Keys the persistent cache as JAX keys it on GPU: without the device assignment. A test process has 8 emulated
  CPU devices and each learner's step runs on its own, so the same computation compiled once per device, about
  three quarters of the in-process tests' time. XLA CPU code does not depend on the device it runs on: loading it
  for another device gives the same results on that device. JAX's cache-key code is private: where its shape
  differs from this JAX's, nothing is changed (and only the time is lost)."""
  import inspect
  try:
    from jax._src import cache_key
    hash_options = cache_key._hash_serialized_compile_options
  except (ImportError, AttributeError):
    return
  if "strip_device_assignment" not in inspect.signature(hash_options).parameters:
    return

  def without_device_assignment(hash_obj, compile_options_obj, strip_device_assignment=False):
    del strip_device_assignment
    return hash_options(hash_obj, compile_options_obj, strip_device_assignment=True)

  cache_key._hash_serialized_compile_options = without_device_assignment


_one_cache_entry_for_every_cpu_device()


MAX_WORKERS = 4


def pytest_xdist_auto_num_workers(config):
  """``-n auto`` (pyproject's addopts): one pytest-xdist worker per core, at most MAX_WORKERS. Each worker is a
  JAX process with 8 emulated devices, and the MPI tests start 2–3 more: more workers than cores only adds
  contention (XLA runs each computation on every core)."""
  del config
  return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


def pytest_configure(config):
  """Under ``--dist loadgroup`` pytest-xdist sends the tests marked ``xdist_group`` to one worker, which then runs
  the group's session fixture (an mpiexec job, a local Ray, built models) once. pytest-xdist ≤ 3.8 does it by
  renaming ``item._nodeid``, which pytest 9 no longer reads: the grouping silently stopped and each of those jobs
  ran in both workers. Refuse that pair in one line instead of paying for it again (pyproject.toml pins pytest < 9)."""
  from packaging.version import Version
  if getattr(config.option, "dist", "no") != "loadgroup":
    return
  import xdist
  if Version(pytest.__version__).major >= 9 and Version(xdist.__version__) <= Version("3.8.0"):
    raise pytest.UsageError(f"pytest {pytest.__version__} with pytest-xdist {xdist.__version__} does not group "
                            f"xdist_group tests under --dist loadgroup; allowed: pytest < 9 (pip install -e '.[test]')")


def pytest_collection_modifyitems(config, items):
  """The ``slow`` tests (end-to-end runs in child processes, mpiexec jobs, Ray runs) first, each group in its
  order: pytest-xdist hands work out in collection order, and a long test that starts last keeps one worker busy
  while the other has nothing left (longest first is the usual remedy for that tail)."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
