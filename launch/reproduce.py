#!/usr/bin/env python
"""The paper's experiment grid in one command (Zhang et al. 2016, §5), simulated, on mnist5k or Fashion-MNIST.

``python launch/reproduce.py [--dataset mnist5k|fashion_mnist] [--quick] [--seeds 0 1 2] [--epochs E]
[--learners 4 8] [--n 1 2 lambda] [--constant-n 4 lambda] [--train-examples N]``

Grid: λ ∈ {4, 8, 16, 30} learners of μ = ⌈128/λ⌉ (λμ ≈ 128 as in the paper, so α0 stays right), n-softsync
with n ∈ {1, 2, 4, λ} (c = ⌊λ/n⌋ gradients per update; n = λ is async, c = 1; a repeated n is run once) under
the staleness policies ``inverse`` (α0/σ, the paper) and ``constant`` (plain ASGD), plus the SSGD baseline
(hardsync: c = λ, σ = 0, one cell per λ). Every cell is the dataset's base config (:data:`BASE_CONFIGS`:
configs/default.py for the embedded mnist5k, the quick default; configs/fashion_mnist.py, the SSGD baseline
tuned on SSGD alone, for Fashion-MNIST) with its α0 (for a λμ mini-batch), momentum and step schedule unchanged
(boundaries scaled with ``--epochs``), run with ``executor="simulated"``: equal learner speeds with a lognormal
jitter, so the same cell and seed give the same numbers on any machine.

Each cell trains into ``<root>/<cell>`` through ``sajax.train``, in a child process of its own on min(λ, 8)
CPU-emulated devices (one process for a whole grid runs out of memory maps, see ``run_cell``). A cell is done
once its ``final.json`` exists (written atomically after training), so rerunning skips done cells and resumes
a half-done one from its last checkpoint. The report (``--out``, default docs/reproduction.md) has the final
test errors (rows n, λ, μ; columns inverse, constant, SSGD; mean and 95 % Student-t interval over seeds), the
paired difference inverse − SSGD (same λ and seed) with its interval, the three-valued P4 verdict per inverse
cell (within 0.5 point of SSGD, worse, or undecided, with an estimate of the seeds that would decide it), the
staleness distribution per n (⟨σ⟩ ≈ n) and test error against epochs, as PNGs beside it.
``--quick`` runs λ ∈ {4, 8} for 4 epochs (16 runs, ≤ 10 min on 2 cores); the report estimates the full grid's
time from the runs' measured times. Bad input prints one line and exits with code 2 before anything is
written; Ctrl-C keeps a checkpoint of the current run and exits with code 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import shlex
import subprocess
import sys
import time
from typing import Callable, Iterable, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

BATCH_TOTAL = 128                       # λμ ≈ 128
LEARNERS, QUICK_LEARNERS = (4, 8, 16, 30), (4, 8)
NS = ("1", "2", "4", "lambda")          # "lambda": n = λ (async)
EPOCHS, QUICK_EPOCHS = 20.0, 4.0        # 20: configs/default.py (α ÷10 at 13.33 and 17.5)
DATASETS = ("mnist5k", "fashion_mnist")
BASE_CONFIGS = {"mnist5k": "default", "fashion_mnist": "fashion_mnist"}   # modules of configs/
TRAIN_SIZES = {"mnist5k": 4000, "fashion_mnist": 60000}
SIM_JITTER = 0.2                        # σ of the lognormal factor on each learner's time per gradient
P4_POINTS = 0.5
EXIT_BAD_INPUT, EXIT_INTERRUPTED = 2, 130
CACHE_DIR = ".jax_cache"                # under --root: compiled executables shared by the cells' processes
# The speedup figure's learner-speed model (``--speedup``): a gradient of μ examples costs a fixed push time
# plus a time ∝ μ (128 examples: 1 s), each time × a mean-1 lognormal factor (σ = SIM_JITTER), and learner 0
# is a straggler STRAGGLER_SLOWDOWN× slower in its compute (λ ≥ 2).
SPEEDUP_LEARNERS = (1, 2, 4, 8, 16, 30)
EXAMPLE_TIME, PUSH_TIME, STRAGGLER_SLOWDOWN = 1.0 / BATCH_TOTAL, 0.1, 4.0


@dataclasses.dataclass(frozen=True)
class Cell:
  """One run of the grid: λ learners, n of n-softsync (0: the SSGD baseline), policy, seed, dataset, the
  learner-speed model: ``"equal"`` (equal speeds, jitter) or ``"cost"`` (the speedup figure's: push time +
  time ∝ μ, jitter, one straggler), and a momentum replacing the base config's (None: the base config's)."""

  learners: int
  n: int
  policy: str            # inverse | constant | ssgd
  seed: int
  dataset: str = "mnist5k"
  speed: str = "equal"
  momentum: Optional[float] = None

  @property
  def batch(self) -> int:
    """μ = ⌈128/λ⌉."""
    return math.ceil(BATCH_TOTAL / self.learners)

  @property
  def c(self) -> int:
    """Gradients per PS update: λ for SSGD (hardsync), ⌊λ/n⌋ for n-softsync."""
    return self.learners if self.policy == "ssgd" else max(1, self.learners // self.n)

  @property
  def key(self) -> tuple[int, int, str]:
    """The cell without its seed (what the table averages over)."""
    return (self.learners, self.n, self.policy)

  def name(self, epochs: float, train_examples: int = 0) -> str:
    proto = "ssgd" if self.policy == "ssgd" else f"n{self.n}-{self.policy}"
    data = f"-t{train_examples}" if train_examples else ""
    prefix = ("" if self.dataset == "mnist5k" else f"{self.dataset}-") + ("" if self.speed == "equal" else
                                                                             f"{self.speed}-")
    mom = "" if self.momentum is None else f"-m{self.momentum:g}"
    return f"{prefix}lambda{self.learners}-mu{self.batch}-{proto}-e{epochs:g}{data}{mom}-seed{self.seed}"


def grid(learners: Iterable[int], ns: Iterable[str], seeds: Iterable[int], dataset: str = "mnist5k",
         constant_ns: Optional[Iterable[str]] = None, momentum: Optional[float] = None) -> list[Cell]:
  """The cells in run order: per seed and λ, SSGD first, then each distinct n ≤ λ with inverse and (when n is
  in ``constant_ns``, default every n) constant; every cell with ``momentum`` (None: the base config's).

  ``ns``, ``constant_ns``: integers as strings, or ``"lambda"`` for n = λ; an n > λ is no cell for that λ.
  """
  as_ints = lambda values, lam: {lam if v == "lambda" else int(v) for v in values}   # noqa: E731
  cells = []
  for seed in seeds:
    for lam in learners:
      cells.append(Cell(lam, 0, "ssgd", seed, dataset, momentum=momentum))
      constant = as_ints(ns if constant_ns is None else constant_ns, lam)
      for n in sorted(as_ints(ns, lam)):
        if n <= lam:
          cells.append(Cell(lam, n, "inverse", seed, dataset, momentum=momentum))
          cells += [Cell(lam, n, "constant", seed, dataset, momentum=momentum)] if n in constant else []
  return cells


def speedup_cells(learners: Iterable[int], seeds: Iterable[int], dataset: str,
                  momentum: Optional[float] = None) -> list[Cell]:
  """The speedup figure's cells under the ``cost`` speed model: per seed and λ, hardsync (SSGD), 1-softsync
  and async (n = λ) with the inverse rule; for λ = 1 they are one run (c = 1, σ = 0), kept as SSGD."""
  cells = []
  for seed in seeds:
    for lam in learners:
      cells.append(Cell(lam, 0, "ssgd", seed, dataset, "cost", momentum))
      cells += [Cell(lam, n, "inverse", seed, dataset, "cost", momentum) for n in sorted({1, lam})] if lam > 1 else []
  return cells


def base_config(dataset: str):
  """The config every cell of ``dataset`` starts from (configs/<BASE_CONFIGS[dataset]>.py)."""
  return importlib.import_module(f"configs.{BASE_CONFIGS[dataset]}").get_config()


def scaled_boundaries(config, epochs: float) -> tuple[float, ...]:
  """``config``'s step-schedule boundaries (in epochs) scaled to a run of ``epochs``, to 0.01 epoch."""
  scaled = {round(b * epochs / config.epochs, 2) for b in config.lr_boundaries_epochs}
  return tuple(sorted(b for b in scaled if 0 < b < epochs))


def cell_config(cell: Cell, epochs: float, train_examples: int = 0):
  """The dataset's base config for one cell: simulated executor, λ, μ, n, policy, seed; its α0, momentum and
  step schedule unchanged (momentum: the cell's when it names one), the boundaries scaled by epochs / its epochs
  (configs/default.py: ⅔ and ⅞)."""
  config = base_config(cell.dataset)
  if cell.momentum is not None:
    config.momentum = cell.momentum
  boundaries = scaled_boundaries(config, epochs)
  config.executor = "simulated"
  config.learners, config.batch_per_learner, config.seed = cell.learners, cell.batch, cell.seed
  if cell.policy == "ssgd":
    config.protocol, config.n = "hardsync", 1          # c = λ, σ = 0: the policy does not matter
  else:
    config.protocol, config.n, config.policy = "softsync", cell.n, cell.policy
  config.epochs = float(epochs)
  config.lr_boundaries_epochs = boundaries
  config.eval_every_epochs = max(epochs / 12, 0.5) if epochs > 1 else epochs
  config.checkpoint_every_epochs = max(epochs / 6, 1.0)
  config.train_examples = train_examples
  config.sim_jitter = SIM_JITTER
  if cell.speed == "cost":      # the speedup figure: time in simulated seconds, evaluated every ½ epoch
    config.sim_profile = "one_slow" if cell.learners > 1 else "lognormal"
    config.sim_slowdown, config.sim_example_time, config.sim_push_time = STRAGGLER_SLOWDOWN, EXAMPLE_TIME, PUSH_TIME
    config.eval_every_epochs = 0.5
  config.progress = False
  return config


def gradients_of(cell: Cell, epochs: float, train_examples: int = 0) -> float:
  """Mini-batch gradients a cell computes: epochs · N / μ (what its wall time grows with)."""
  size = TRAIN_SIZES[cell.dataset]
  return epochs * (min(train_examples, size) if train_examples else size) / cell.batch


def updates_of(cell: Cell, epochs: float, train_examples: int = 0) -> float:
  """PS updates of a cell: gradients / c (c = λ for SSGD, ⌊λ/n⌋ otherwise)."""
  return gradients_of(cell, epochs, train_examples) / cell.c


def run_cell(cell: Cell, epochs: float, root: str, train_examples: int = 0) -> tuple[dict, bool]:
  """Trains one cell into ``<root>/<cell>`` unless its final.json exists; returns (final record, trained).

  The cell trains in a child process (``reproduce.py --cell``, see :func:`run_in_child`).
  """
  command = [sys.executable, os.path.abspath(__file__), "--cell", json.dumps(dataclasses.asdict(cell)),
             "--epochs", repr(float(epochs)), "--root", root, "--train-examples", str(train_examples)]
  return run_in_child(final_path(cell, epochs, root, train_examples), command, cell_environment(cell, root),
                      cell.name(epochs, train_examples))


def run_in_child(path: str, command: Sequence[str], env: dict, name: str) -> tuple[dict, bool]:
  """Runs ``command`` (a cell's child process, which writes ``path``) unless ``path`` exists; returns (the
  record in ``path``, whether the child ran).

  A child process per cell: XLA CPU never frees a process's compiled executables, and a 20-cell grid in one
  process ran out of memory maps ("LLVM: cannot allocate section memory" with 22 GB free). Raises ConfigError
  (the child's one-line message) when the child exits 2, KeyboardInterrupt once an interrupted child has saved
  its checkpoint, RuntimeError naming the cell ``name`` on any other failure.
  """
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f), False
  child = subprocess.Popen(list(command), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
  try:
    _, err = child.communicate()
  except KeyboardInterrupt:   # Ctrl-C reached the child too: let it save its checkpoint
    child.communicate()
    raise
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


def final_path(cell: Cell, epochs: float, root: str, train_examples: int = 0) -> str:
  """``<root>/<cell>/final.json``: the cell's final record, written once it has trained."""
  return os.path.join(root, cell.name(epochs, train_examples), "final.json")


def cell_environment(cell: Cell, root: str, environ: Optional[dict] = None) -> dict:
  """The environment of a cell's child process: ``environ`` (default os.environ) with XLA_FLAGS asking for
  min(λ, 8) CPU-emulated devices unless it names a count (with one device a λ = 16 cell ran 9× slower, with
  the same numbers), and a persistent compilation cache in ``<root>/.jax_cache`` unless
  JAX_COMPILATION_CACHE_DIR is set: every cell compiles the same few functions, which a fresh process would
  compile again (a 1-epoch cell took 16.4 s with an empty cache, 3.6 s with a warm one). Deleting the folder
  is always safe."""
  from launch.train import cpu_device_flags
  env = dict(os.environ if environ is None else environ)
  env["XLA_FLAGS"] = cpu_device_flags(cell.learners, "simulated", env.get("XLA_FLAGS", ""))
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.abspath(os.path.join(root, CACHE_DIR)))
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")   # on a loaded machine, everything is slow
  return env


def train_cell(cell: Cell, epochs: float, root: str, train_examples: int = 0) -> dict:
  """Trains one cell in this process and writes its final.json atomically; returns the final record."""
  return train_and_record(cell_config(cell, epochs, train_examples), final_path(cell, epochs, root, train_examples),
                          {"cell": dataclasses.asdict(cell), "epochs": epochs,
                           "gradients": gradients_of(cell, epochs, train_examples)})


def train_and_record(config, path: str, head: dict, extra: Optional[Callable[[dict], dict]] = None) -> dict:
  """Trains ``config`` into ``path``'s folder and writes ``head`` plus the run's final metrics (plus what
  ``extra(record)`` returns, computed before the one write) to ``path`` atomically; returns that record. A run
  that diverged (:class:`sajax.server.DivergenceError`) is a result, not a failed cell: its record has
  ``diverged`` (the reason), ``test_error`` None, the telemetry of its last evaluation if it had one (its
  ``updates`` and ``samples`` are that evaluation's) and ``wall_s`` of this session up to the divergence, so
  one diverged cell does not stop a grid (its reports show it as diverged)."""
  import sajax
  from sajax import metrics
  from sajax.server import DivergenceError
  start = time.perf_counter()
  try:
    record = dict(sajax.train(config, workdir=os.path.dirname(path)).metrics)
  except DivergenceError as e:
    history = metrics.read_metrics(os.path.dirname(path))
    record = {**(history[-1] if history else {}), "diverged": str(e), "test_error": None,
              "wall_s": round(time.perf_counter() - start, 3)}
  record = {**head, **record}
  return write_final(path, {**record, **(extra(record) if extra else {})})


def write_final(path: str, record: dict) -> dict:
  """Writes a cell's final ``record`` to ``path`` atomically (the cell is done once it exists), with the
  machine's 1-minute load average and core count; returns what it wrote."""
  final = {"load_avg_1min": round(os.getloadavg()[0], 2), "cpu_count": os.cpu_count(), **record}
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(final, f, indent=1, sort_keys=True)
  os.replace(tmp, path)
  return final


def cell_main(args: argparse.Namespace) -> int:
  """``reproduce.py --cell JSON``: the child process of ``run_cell``."""
  return child_main(lambda: train_cell(Cell(**json.loads(args.cell)), args.epochs, args.root, args.train_examples))


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
  how many cells trained). On bad input, a failed cell or Ctrl-C it prints one line and raises
  :class:`GridStopped` with the exit code (2, 1, 130); the cells done so far stay done."""
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
      finals.append(final)
      trained += ran
  return finals, trained


def quiet_logging() -> None:
  """Warnings and errors only, one line each, on stderr; absl, jax, orbax and TFDS errors only."""
  import logging
  logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
  for noisy in ("absl", "jax", "orbax", "tensorflow_datasets"):
    logging.getLogger(noisy).setLevel(logging.ERROR)


# ---- command line -------------------------------------------------------------------------------------
class OneLineParser(argparse.ArgumentParser):
  """An argument parser whose errors are one-line ValueErrors (the caller prints them and exits 2)."""

  def error(self, message: str):   # one line and exit 2, like launch/train.py
    raise ValueError(f"{message}; allowed: the flags and values of {self.prog} --help")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  """The flags, checked; raises ValueError with one line naming the bad value and what is allowed."""
  p = OneLineParser(prog="reproduce.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--root", default=os.path.join("runs", "reproduce"), help="folder of the cells' runs")
  p.add_argument("--out", default=os.path.join("docs", "reproduction.md"), help="report; PNGs go beside it")
  p.add_argument("--dataset", default="mnist5k", help=f"one of {', '.join(DATASETS)} (default mnist5k)")
  p.add_argument("--quick", action="store_true", help=f"λ ∈ {QUICK_LEARNERS}, {QUICK_EPOCHS:g} epochs (≤ 10 min "
                 "on mnist5k)")
  p.add_argument("--seeds", nargs="+", type=int, default=[0])
  p.add_argument("--epochs", type=float, default=None, help=f"default: the base config's ({EPOCHS:g} for mnist5k; "
                 f"{QUICK_EPOCHS:g} with --quick)")
  p.add_argument("--learners", nargs="+", type=int, default=None, help=f"λ values (default {LEARNERS})")
  p.add_argument("--n", nargs="+", default=list(NS), help="n values: integers or 'lambda' (n = λ)")
  p.add_argument("--constant-n", nargs="+", default=None,
                 help="n values at which the constant policy also runs (default: every --n)")
  p.add_argument("--train-examples", type=int, default=0, help="use the first N training examples (0: all)")
  p.add_argument("--momentum", type=float, default=None,
                 help="a declared second setting: this momentum in every cell, SSGD included (default: the base "
                      "config's); its runs get their own folders")
  p.add_argument("--speedup", nargs="*", type=int, default=None,
                 help=f"also the speedup figure's runs (first seed only) at these λ (no values: "
                      f"{' '.join(map(str, SPEEDUP_LEARNERS))})")
  p.add_argument("--report-only", action="store_true", help="write the report from the cells done so far "
                 "(under --root), training nothing; the others are left out and the report says how many")
  p.add_argument("--cell", default=None, help=argparse.SUPPRESS)   # internal: train one cell (see run_cell)
  args = p.parse_args(list(argv))
  args.learners = list(dict.fromkeys(args.learners or (QUICK_LEARNERS if args.quick else LEARNERS)))
  if args.speedup is not None:
    args.speedup = list(dict.fromkeys(args.speedup or SPEEDUP_LEARNERS))
  args.seeds, args.n = list(dict.fromkeys(args.seeds)), list(dict.fromkeys(args.n))
  if args.dataset not in DATASETS:
    raise ValueError(f"--dataset {args.dataset!r} is invalid; allowed: {', '.join(DATASETS)}")
  args.full_epochs = float(base_config(args.dataset).epochs)
  args.epochs = args.epochs if args.epochs is not None else (QUICK_EPOCHS if args.quick else args.full_epochs)
  for flag, values in (("--learners", args.learners), ("--speedup", args.speedup or [])):
    for lam in values:
      if not 1 <= lam <= BATCH_TOTAL:
        raise ValueError(f"{flag} {lam} is invalid; allowed: integers 1..{BATCH_TOTAL} (μ = ⌈128/λ⌉)")
  for flag, values in (("--n", args.n), ("--constant-n", args.constant_n or [])):
    for v in values:
      if v != "lambda" and not (v.isdigit() and int(v) >= 1):
        raise ValueError(f"{flag} {v!r} is invalid; allowed: integers >= 1 or 'lambda' (n = λ)")
      if flag == "--constant-n" and v not in args.n:
        raise ValueError(f"--constant-n {v!r} is invalid; allowed: values of --n ({' '.join(args.n)})")
  check_run_args(args)
  return args


def check_run_args(args: argparse.Namespace) -> None:
  """The flags every grid script shares: ``seeds``, ``epochs``, ``train_examples``, ``out`` (a .md report), a
  writable ``root`` and, where the script has it, ``momentum``; raises ValueError with one line naming the bad
  value and what is allowed."""
  momentum = getattr(args, "momentum", None)
  if momentum is not None and not 0 <= momentum < 1:
    raise ValueError(f"--momentum {momentum:g} is invalid; allowed: 0 <= momentum < 1")
  if any(s < 0 for s in args.seeds):
    raise ValueError(f"--seeds {min(args.seeds)} is invalid; allowed: integers >= 0")
  if not args.epochs > 0:
    raise ValueError(f"--epochs {args.epochs:g} is invalid; allowed: a number > 0")
  if args.train_examples < 0 or 0 < args.train_examples < BATCH_TOTAL:
    raise ValueError(f"--train-examples {args.train_examples} is invalid; allowed: 0 (all) or >= {BATCH_TOTAL}")
  if not args.out.endswith(".md"):
    raise ValueError(f"--out {args.out!r} is invalid; allowed: a path ending in .md")
  from sajax import trainer
  for path in (args.root, os.path.dirname(os.path.abspath(args.out))):
    trainer.check_workdir_writable(path)


def write_text(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` atomically (a reader sees the old file or the new one, never half of one)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def main(argv: Sequence[str]) -> int:
  from launch.reproduce_report import (aggregate, estimate_text, kept_note, p4_verdicts, plot_error_curves,
                                       plot_error_vs_n, plot_speedup, plot_staleness_by_n, render_markdown,
                                       speedup_markdown, speedup_rows, verdict_counts)
  try:
    args = parse_args(argv[1:])
    cells = grid(args.learners, args.n, args.seeds, args.dataset, args.constant_n, args.momentum)
    speed_cells = speedup_cells(args.speedup, args.seeds[:1], args.dataset, args.momentum) if args.speedup else []
    if args.speedup and 1 not in args.speedup:
      raise ValueError(f"--speedup {' '.join(map(str, args.speedup))} is invalid; allowed: λ values including 1 "
                       "(the λ = 1 run sets the target error)")
    if args.cell is None and not any(c.policy != "ssgd" for c in cells):
      raise ValueError(f"--n {' '.join(args.n)} gives no cell: every n exceeds every λ in "
                       f"{args.learners}; allowed: n <= λ")
    if args.cell is None:
      from sajax import data
      data.load_dataset(base_config(args.dataset).dataset)   # a missing dataset: one line now, not in a cell
  except ValueError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return EXIT_BAD_INPUT
  quiet_logging()
  if args.cell is not None:
    return cell_main(args)
  from sajax import metrics

  start = time.perf_counter()
  missing, command_cells = 0, cells + speed_cells
  if args.report_only:     # the cells done so far, nothing trained: a look at a grid that is still running
    done = lambda c: os.path.exists(final_path(c, args.epochs, args.root, args.train_examples))   # noqa: E731
    missing = sum(not done(c) for c in cells + speed_cells)
    cells, speed_cells = [c for c in cells if done(c)], [c for c in speed_cells if done(c)]
    if not cells:
      print(f"error: --report-only: none of the grid's cells is done under --root {args.root!r}; allowed: run "
            "the grid (without --report-only) first", file=sys.stderr)
      return EXIT_BAD_INPUT
    finals, trained = [], 0
    for c in cells + speed_cells:
      with open(final_path(c, args.epochs, args.root, args.train_examples)) as f:
        finals.append(json.load(f))
  else:
    try:
      finals, trained = run_cells(cells + speed_cells,
                                  lambda c: run_cell(c, args.epochs, args.root, args.train_examples),
                                  lambda c: c.name(args.epochs, args.train_examples))
    except GridStopped as e:
      return e.code
  wall = time.perf_counter() - start
  finals, speed_finals = finals[:len(cells)], finals[len(cells):]

  agg = aggregate(finals)
  verdicts = p4_verdicts(agg)
  folder = os.path.splitext(args.out)[0]
  os.makedirs(folder, exist_ok=True)
  histories: dict[tuple, list] = {}
  for cell, f in zip(cells, finals):
    if not f.get("diverged"):   # a diverged run's shorter curve would cut the others' mean short
      histories.setdefault(cell.key, []).append(
          metrics.read_metrics(os.path.join(args.root, cell.name(args.epochs, args.train_examples))))
  rel = lambda p: os.path.relpath(p, os.path.dirname(os.path.abspath(args.out)))  # noqa: E731
  pngs = [("final test error vs n", plot_error_vs_n(agg, os.path.join(folder, "error_vs_n.png"))),
          ("test error vs epoch", plot_error_curves(histories, os.path.join(folder, "test_error.png")))]
  pngs += [(f"staleness, {n}-softsync", p) for n, p in plot_staleness_by_n(finals, folder)]
  speedup = []
  if speed_cells:
    runs = [(dataclasses.asdict(c), [] if f.get("diverged") else
             metrics.read_metrics(os.path.join(args.root, c.name(args.epochs, args.train_examples))))
            for c, f in zip(speed_cells, speed_finals)]
    target, rows = speedup_rows(runs)
    speedup = (["", "## Speedup in simulated time", "", "No λ = 1 run finished (it diverged, or is not done yet): "
                "no target error, no speedup."]
               if target is None else
               speedup_markdown(target, rows, rel(plot_speedup(rows, target, os.path.join(folder, "speedup.png")))))
  estimate = estimate_text([(f["samples"], f["gradients"], f["updates"], f["wall_s"]) for f in finals
                            if not f.get("diverged")],      # a diverged run stopped early: not the cost model's
                           args.full_epochs if args.quick else args.epochs, dataset=args.dataset,
                           command_cells=[] if args.quick else command_cells, train_examples=args.train_examples)
  command = "python launch/reproduce.py " + shlex.join(a for a in argv[1:] if a != "--report-only")   # the grid's
  text = render_markdown(agg, verdicts, command=command.strip(), epochs=args.epochs, seeds=args.seeds,
                         wall_s=wall, estimate=estimate, figures=[(t, rel(p)) for t, p in pngs],
                         runs=[(c.name(args.epochs, args.train_examples), f)
                               for c, f in zip(cells + speed_cells, finals + speed_finals)],
                         dataset=args.dataset, train_examples=args.train_examples, extra=speedup,
                         momentum=args.momentum, note=kept_note(args.out), missing=missing)
  write_text(args.out, text)
  print(f"{len(cells)} cells ({trained} trained, {len(cells) - trained} already done) in {wall:.0f} s; "
        f"P4 over {len(verdicts)} inverse cells: {verdict_counts(verdicts)}; report: {args.out}\n{estimate}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
