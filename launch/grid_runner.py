"""Running a grid of training runs: one child process per run, resumable, every failure one line.

Shared by launch/reproduce.py, launch/compare_policies.py and launch/momentum_staleness.py. A run (a *cell*)
trains in a child process of its own (:func:`run_in_child`; XLA CPU never frees a process's compiled code) that
writes the run's ``final.json`` atomically once trained (:func:`train_and_record`, :func:`write_final`): a cell
is done once that file exists, so a rerun skips it, and a half-done one resumes from its checkpoint. A run that
diverged, whose learners failed, or that ran past ``--cell-timeout-s`` (killed, not written: a rerun resumes it)
is a result, not a failure (:func:`unfinished`). :func:`run_cells` runs cells in order under a progress bar and
stops a grid with one line and the exit code (2 bad input, 1 a failed cell, 130 Ctrl-C); :func:`child_main` maps
a child's outcome onto those codes. The cells' processes share compiled XLA code through ``<root>/.jax_cache``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Optional, Sequence

EXIT_BAD_INPUT, EXIT_INTERRUPTED = 2, 130
WAIT_SLICE_S = 0.2                      # how often a waiting grid looks at a Ctrl-C (:func:`_wait`)
CACHE_DIR = ".jax_cache"                # under --root: compiled executables shared by the cells' processes
# A run that did not train to its end is still a result: its record holds one of these keys (the one-line
# reason), ``test_error`` None, and the reports show the word, never averaging it in.
UNFINISHED = {"diverged": "diverged", "learners_failed": "learners failed", "timed_out": "timed out"}


def unfinished(record: dict) -> str:
  """'' for a run that trained to its end, else what stopped it: 'diverged', 'learners failed' or 'timed out'."""
  return next((word for key, word in UNFINISHED.items() if record.get(key)), "")


def outcome_counts(records: Sequence[dict]) -> dict[str, int]:
  """How many of ``records`` ended each unfinished way ({'diverged': 2, 'timed out': 1}), in UNFINISHED order."""
  words = [unfinished(r) for r in records]
  return {word: words.count(word) for word in UNFINISHED.values() if word in words}


def run_in_child(path: str, command: Sequence[str], env: dict, name: str, *, head: Optional[dict] = None,
                 timeout_s: Optional[float] = None) -> tuple[dict, bool]:
  """Runs ``command`` (a cell's child process, which writes ``path``) unless ``path`` exists; returns (the
  record in ``path``, whether the child ran).

  A child process per cell: XLA CPU never frees a process's compiled executables, and a 20-cell grid in one
  process ran out of memory maps ("LLVM: cannot allocate section memory" with 22 GB free). The child runs in a
  process group of its own; past ``timeout_s`` seconds the whole group is killed and the record is ``head`` with
  ``timed_out`` (the reason) and no test error, written nowhere: a rerun resumes the cell from its last
  checkpoint. A Ctrl-C is passed on to the child, which saves its checkpoint (a second one kills it). Raises
  ConfigError (the child's one-line message) when the child exits 2, KeyboardInterrupt once an interrupted
  child has stopped, RuntimeError naming the cell ``name`` on any other failure.
  """
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f), False
  start = time.monotonic()
  child = subprocess.Popen(list(command), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                           start_new_session=True)
  try:
    err = _wait(child, None if timeout_s is None else start + timeout_s)
  except subprocess.TimeoutExpired:
    _kill_group(child, signal.SIGKILL)
    child.communicate()
    return {**machine_fields(), **(head or {}), "timed_out": f"ran past --cell-timeout-s {timeout_s:g} s; its "
            "process group was killed (rerun to resume it from its last checkpoint)", "test_error": None,
            "wall_s": round(time.monotonic() - start, 3)}, True
  except KeyboardInterrupt:   # the child has a process group of its own: pass the Ctrl-C on, let it save
    _kill_group(child, signal.SIGINT)
    try:
      child.communicate()
    except KeyboardInterrupt:  # a second Ctrl-C: stop now
      _kill_group(child, signal.SIGKILL)
      child.communicate()
    raise KeyboardInterrupt from None
  if child.returncode == EXIT_INTERRUPTED:
    raise KeyboardInterrupt
  if child.returncode == EXIT_BAD_INPUT:
    from sajax import config as config_lib
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    raise config_lib.ConfigError(lines[-1][len("error: "):] if lines else err.strip())
  if child.returncode != 0 or not os.path.exists(path):
    raise RuntimeError(f"cell {name} failed (exit code {child.returncode}); rerun "
                       f"to resume it from its last checkpoint. Its stderr ends:\n{err[-3000:]}")
  with open(path) as f:
    return json.load(f), True


def _wait(child: subprocess.Popen, deadline: Optional[float]) -> str:
  """``child.communicate()`` until ``deadline`` (monotonic; TimeoutExpired past it), in slices of WAIT_SLICE_S.

  A Ctrl-C that the kernel hands to another thread of this process (JAX's and the libraries' threads take
  process signals too) only sets Python's flag; the main thread acts on it when it next runs bytecode. One long
  ``communicate`` would leave a grid deaf to it until the cell ended; each slice returns to the interpreter, so a
  Ctrl-C is seen within one slice."""
  while True:
    slice_s = WAIT_SLICE_S if deadline is None else min(WAIT_SLICE_S, max(0.0, deadline - time.monotonic()))
    try:
      return child.communicate(timeout=slice_s)[1]
    except subprocess.TimeoutExpired:
      if deadline is not None and time.monotonic() >= deadline:
        raise


def _kill_group(child: subprocess.Popen, signum: int) -> None:
  """Sends ``signum`` to ``child``'s process group (the child and anything it started)."""
  try:
    os.killpg(child.pid, signum)
  except ProcessLookupError:
    pass


def run_script_cell(script: str, cell: Any, epochs: float, root: str, data_dir: str, final: str, head: dict,
                    timeout_s: Optional[float] = None) -> tuple[dict, bool]:
  """Trains ``cell`` in a child process of a grid ``script`` (``script --cell <json> --epochs E --root R
  --data-dir D``) unless its ``final`` exists; (final record, trained). One command line for every grid."""
  command = [sys.executable, os.path.abspath(script), "--cell", json.dumps(dataclasses.asdict(cell)),
             "--epochs", repr(float(epochs)), "--root", root, "--data-dir", data_dir]
  return run_in_child(final, command, cell_environment(cell, root), cell.name(epochs), head=head, timeout_s=timeout_s)


def cell_environment(cell, root: str, environ: Optional[dict] = None) -> dict:
  """The environment of a cell's child process (``cell.learners``: its λ): ``environ`` (default os.environ) with
  XLA_FLAGS asking for min(λ, cores, 8) CPU-emulated devices unless it names a count (the numbers do not depend on
  it: tests/test_simulated.py), and a persistent compilation cache in ``<root>/.jax_cache`` unless
  JAX_COMPILATION_CACHE_DIR is set: every cell compiles the same few functions, which a fresh process would
  compile again (a 1-epoch cell took 16.4 s with an empty cache, 3.6 s with a warm one). Deleting the folder is
  always safe."""
  from launch.train import cpu_device_flags
  env = dict(os.environ if environ is None else environ)
  env["XLA_FLAGS"] = cpu_device_flags(cell.learners, "simulated", env.get("XLA_FLAGS", ""))
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.abspath(os.path.join(root, CACHE_DIR)))
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")   # on a loaded machine, everything is slow
  return env


def train_and_record(config, path: str, head: dict, extra: Optional[Callable[[dict], dict]] = None) -> dict:
  """Trains ``config`` into ``path``'s folder and writes ``head`` plus the run's final metrics (plus what
  ``extra(record)`` returns, computed before the one write) to ``path`` atomically; returns that record. A run
  that diverged (:class:`sajax.server.DivergenceError`) or whose learners failed (every one died, or one did
  under ``fail_fast``: :class:`sajax.executors.common.LearnersFailed`) is a result, not a failed cell: its
  record has ``diverged`` or ``learners_failed`` (the one-line reason), ``test_error`` None, the telemetry of its
  last evaluation if it had one (its ``updates`` and ``samples`` are that evaluation's) and ``wall_s`` of this
  session up to the end, so one such cell does not stop a grid (its reports show it as such)."""
  import sajax
  from sajax import metrics
  from sajax.executors.common import LearnersFailed
  from sajax.server import DivergenceError
  start = time.perf_counter()
  try:
    record = dict(sajax.train(config, workdir=os.path.dirname(path)).metrics)
  except (DivergenceError, LearnersFailed) as e:
    history = metrics.read_metrics(os.path.dirname(path))
    key = "diverged" if isinstance(e, DivergenceError) else "learners_failed"
    record = {**(history[-1] if history else {}), key: " ".join(str(e).split()), "test_error": None,
              "wall_s": round(time.perf_counter() - start, 3)}
  record = {**head, **record}
  return write_final(path, {**record, **(extra(record) if extra else {})})


def write_final(path: str, record: dict) -> dict:
  """Writes a cell's final ``record`` to ``path`` atomically (the cell is done once it exists), with the
  machine's 1-minute load average and core count; returns what it wrote."""
  final = {**machine_fields(), **record}
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(final, f, indent=1, sort_keys=True)
  os.replace(tmp, path)
  return final


def machine_fields() -> dict:
  """The machine's 1-minute load average and core count, for a cell's record."""
  return {"load_avg_1min": round(os.getloadavg()[0], 2), "cpu_count": os.cpu_count()}


def child_main(train: Callable[[], object]) -> int:
  """Runs a cell's ``train()`` in its child process; returns the exit code :func:`run_in_child` reads: 0, 2
  (bad input, one line on stderr) or 130 (interrupted after saving a checkpoint)."""
  from sajax import config as config_lib, data
  try:
    train()
  except (config_lib.ConfigError, data.DatasetError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return EXIT_BAD_INPUT
  except KeyboardInterrupt:
    return EXIT_INTERRUPTED
  return 0


class GridStopped(Exception):
  """:func:`run_cells` stopped (its reason already printed); ``code`` is the exit code."""

  def __init__(self, code: int) -> None:
    super().__init__(code)
    self.code = code


def run_cells(cells: Sequence, run: Callable[[object], tuple[dict, bool]], name: Callable[[object], str],
              desc: str = "reproduce") -> tuple[list[dict], int]:
  """Runs ``run(cell) -> (final, trained)`` for each cell in order under a progress bar; returns (the finals,
  how many cells trained). A cell that did not train to its end (:func:`unfinished`: diverged, its learners
  failed, timed out) is a result: one line says so and the grid goes on. On bad input, a failed cell or Ctrl-C
  it prints one line and raises :class:`GridStopped` with the exit code (2, 1, 130); the cells done so far stay
  done."""
  from tqdm import tqdm
  from sajax import config as config_lib
  finals, trained = [], 0
  with tqdm(cells, desc=desc, unit=" cell", dynamic_ncols=True) as bar:
    for cell in bar:
      bar.set_postfix_str(name(cell), refresh=True)
      try:
        final, ran = run(cell)
      except config_lib.ConfigError as e:   # bar.write: on a line of its own, not after the bar
        bar.write(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        raise GridStopped(EXIT_BAD_INPUT) from None
      except RuntimeError as e:
        bar.write(f"error: {e}", file=sys.stderr)
        raise GridStopped(1) from None
      except KeyboardInterrupt:
        bar.write(f"interrupted; rerun the same command to resume ({len(finals)} of {len(cells)} cells done)",
                  file=sys.stderr)
        raise GridStopped(EXIT_INTERRUPTED) from None
      if unfinished(final) and ran:
        key = next(k for k, word in UNFINISHED.items() if word == unfinished(final))
        bar.write(f"{name(cell)}: {unfinished(final)}: {final[key]}", file=sys.stderr)
      finals.append(final)
      trained += ran
  return finals, trained


def quiet_logging() -> None:
  """Warnings and errors only, one line each, on stderr; absl, jax, orbax and TFDS errors only."""
  import logging
  logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
  for noisy in ("absl", "jax", "orbax", "tensorflow_datasets"):
    logging.getLogger(noisy).setLevel(logging.ERROR)


def add_cell_timeout(parser: argparse.ArgumentParser) -> None:
  """The ``--cell-timeout-s`` flag of every grid command (checked by :func:`check_cell_timeout`)."""
  parser.add_argument("--cell-timeout-s", type=float, default=None,
                      help="kill a cell's process group after this many seconds and record it as timed out "
                           "(rerun to resume it); default: no limit")


def check_cell_timeout(seconds: Optional[float]) -> None:
  """Raises ValueError with one line unless ``seconds`` (``--cell-timeout-s``) is None or a finite number > 0."""
  if seconds is not None and not 0 < seconds < float("inf"):
    raise ValueError(f"--cell-timeout-s {seconds:g} is invalid; allowed: seconds > 0 (default: no limit)")


class OneLineParser(argparse.ArgumentParser):
  """An argument parser whose errors are one-line ValueErrors (the caller prints them and exits 2)."""

  def error(self, message: str):   # one line and exit 2, like launch/train.py
    raise ValueError(f"{message}; allowed: the flags and values of {self.prog} --help")


def write_text(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` atomically (a reader sees the old file or the new one, never half of one)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)
