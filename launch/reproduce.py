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

Each cell trains into ``<root>/<cell>`` through ``sajax.train``, in a child process of its own on min(λ, cores, 8)
CPU-emulated devices (one process for a whole grid runs out of memory maps, see ``run_cell``). A cell is done
once its ``final.json`` exists (written atomically after training), so rerunning skips done cells and resumes
a half-done one from its last checkpoint. The report (``--out``, default docs/reproduction.md) has the final
test errors (rows n, λ, μ; columns inverse, constant, SSGD; mean and 95 % Student-t interval over the trained
seeds, a collapsed or diverged seed counted apart), the paired difference inverse − SSGD (same λ and seed) with
its interval, the three-valued P4 verdict per inverse cell (within 0.5 point of SSGD, worse, or undecided, with
the seeds a paired t test would need for 80 % power), the staleness distribution per n (⟨σ⟩ ≈ n) and test error
against epochs, as PNGs beside it. Every run evaluates :data:`EVALS` times. A hand-written note kept in the
report (between its markers) may hold no number: one that does is one line and exit 2 before any training.
``--quick`` runs λ ∈ {4, 8} for 4 epochs (16 runs, ≤ 10 min on 2 cores); the report estimates the full grid's
time from the runs' measured times. Bad input prints one line and exits with code 2 before anything is
written; Ctrl-C keeps a checkpoint of the current run and exits with code 130. ``--cell-timeout-s S`` kills a cell
that runs longer than S seconds (its whole process group) and records it as timed out, then goes on with the
next; a rerun resumes it from its last checkpoint. A cell that diverged, or whose learners all died, is recorded
as such (one line each) and the grid goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import shlex
import sys
import time
from typing import Iterable, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from launch.grid_runner import (EXIT_BAD_INPUT, GridStopped, OneLineParser, add_cell_timeout,  # noqa: E402
                                cell_environment, check_cell_timeout, child_main, quiet_logging, run_cells,
                                outcome_counts, run_in_child, train_and_record, unfinished, write_text)

BATCH_TOTAL = 128                       # λμ ≈ 128
LEARNERS, QUICK_LEARNERS = (4, 8, 16, 30), (4, 8)
NS = ("1", "2", "4", "lambda")          # "lambda": n = λ (async)
EPOCHS, QUICK_EPOCHS = 20.0, 4.0        # 20: configs/default.py (α ÷10 at 13.33 and 17.5)
DATASETS = ("mnist5k", "fashion_mnist")
BASE_CONFIGS = {"mnist5k": "default", "fashion_mnist": "fashion_mnist"}   # modules of configs/
TRAIN_SIZES = {"mnist5k": 4000, "fashion_mnist": 60000}
SIM_JITTER = 0.2                        # σ of the lognormal factor on each learner's time per gradient
P4_POINTS = 0.5
EVALS = 40                              # evaluations per run, evenly spaced: the resolution of a time to target
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
  config.eval_every_epochs = epochs / EVALS
  config.checkpoint_every_epochs = max(epochs / 6, 1.0)
  config.train_examples = train_examples
  config.sim_jitter = SIM_JITTER
  if cell.speed == "cost":      # the speedup figure: time in simulated seconds
    config.sim_profile = "one_slow" if cell.learners > 1 else "lognormal"
    config.sim_slowdown, config.sim_example_time, config.sim_push_time = STRAGGLER_SLOWDOWN, EXAMPLE_TIME, PUSH_TIME
  config.progress = False
  return config


def gradients_of(cell: Cell, epochs: float, train_examples: int = 0) -> float:
  """Mini-batch gradients a cell computes: epochs · N / μ (what its wall time grows with)."""
  size = TRAIN_SIZES[cell.dataset]
  return epochs * (min(train_examples, size) if train_examples else size) / cell.batch


def updates_of(cell: Cell, epochs: float, train_examples: int = 0) -> float:
  """PS updates of a cell: gradients / c (c = λ for SSGD, ⌊λ/n⌋ otherwise)."""
  return gradients_of(cell, epochs, train_examples) / cell.c


def run_cell(cell: Cell, epochs: float, root: str, train_examples: int = 0,
             timeout_s: Optional[float] = None) -> tuple[dict, bool]:
  """Trains one cell into ``<root>/<cell>`` unless its final.json exists; returns (final record, trained).

  The cell trains in a child process (``reproduce.py --cell``, see :func:`run_in_child`), killed and recorded as
  timed out past ``timeout_s`` seconds.
  """
  command = [sys.executable, os.path.abspath(__file__), "--cell", json.dumps(dataclasses.asdict(cell)),
             "--epochs", repr(float(epochs)), "--root", root, "--train-examples", str(train_examples)]
  return run_in_child(final_path(cell, epochs, root, train_examples), command, cell_environment(cell, root),
                      cell.name(epochs, train_examples), head=cell_head(cell, epochs, train_examples),
                      timeout_s=timeout_s)


def cell_head(cell: Cell, epochs: float, train_examples: int = 0) -> dict:
  """What a cell's record says about the cell, whatever its outcome."""
  return {"cell": dataclasses.asdict(cell), "epochs": epochs, "gradients": gradients_of(cell, epochs, train_examples)}


def final_path(cell: Cell, epochs: float, root: str, train_examples: int = 0) -> str:
  """``<root>/<cell>/final.json``: the cell's final record, written once it has trained."""
  return os.path.join(root, cell.name(epochs, train_examples), "final.json")


def train_cell(cell: Cell, epochs: float, root: str, train_examples: int = 0) -> dict:
  """Trains one cell in this process and writes its final.json atomically; returns the final record."""
  return train_and_record(cell_config(cell, epochs, train_examples), final_path(cell, epochs, root, train_examples),
                          cell_head(cell, epochs, train_examples))


def cell_main(args: argparse.Namespace) -> int:
  """``reproduce.py --cell JSON``: the child process of ``run_cell``."""
  return child_main(lambda: train_cell(Cell(**json.loads(args.cell)), args.epochs, args.root, args.train_examples))


# ---- command line -------------------------------------------------------------------------------------
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
  add_cell_timeout(p)
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
  writable ``root`` and, where the script has them, ``momentum`` and ``cell_timeout_s``; raises ValueError with
  one line naming the bad value and what is allowed."""
  check_cell_timeout(getattr(args, "cell_timeout_s", None))
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


def main(argv: Sequence[str]) -> int:
  from launch.reproduce_figures import plot_error_curves, plot_error_vs_n, plot_staleness_by_n
  from launch.reproduce_report import (TRAINED, aggregate, estimate_text, kept_note, outcome_of, p4_verdicts,
                                       render_markdown, verdict_counts)
  from launch.speedup_report import plot_speedup, speedup_ladder, speedup_markdown
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
      classes = data.load_dataset(base_config(args.dataset).dataset).num_classes   # missing: one line now
      note = kept_note(args.out)      # a note with numbers: one line now, not after the grid
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
                                  lambda c: run_cell(c, args.epochs, args.root, args.train_examples,
                                                     args.cell_timeout_s),
                                  lambda c: c.name(args.epochs, args.train_examples))
    except GridStopped as e:
      return e.code
  wall = time.perf_counter() - start
  finals, speed_finals = finals[:len(cells)], finals[len(cells):]

  agg = aggregate(finals, classes)
  verdicts = p4_verdicts(agg)
  folder = os.path.splitext(args.out)[0]
  os.makedirs(folder, exist_ok=True)
  histories: dict[tuple, list] = {}
  for cell, f in zip(cells, finals):
    if outcome_of(f, classes) == TRAINED:   # never averaged with a collapsed run; a diverged one ends short
      histories.setdefault(cell.key, []).append(
          metrics.read_metrics(os.path.join(args.root, cell.name(args.epochs, args.train_examples))))
  rel = lambda p: os.path.relpath(p, os.path.dirname(os.path.abspath(args.out)))  # noqa: E731
  pngs = [("final test error vs n", plot_error_vs_n(agg, os.path.join(folder, "error_vs_n.png"))),
          ("test error vs epoch", plot_error_curves(histories, os.path.join(folder, "test_error.png")))]
  pngs += [(f"staleness, {n}-softsync", p) for n, p in plot_staleness_by_n(finals, folder)]
  speedup = []
  if speed_cells:
    runs = [(dataclasses.asdict(c), [] if unfinished(f) else
             metrics.read_metrics(os.path.join(args.root, c.name(args.epochs, args.train_examples))))
            for c, f in zip(speed_cells, speed_finals)]
    ladder = speedup_ladder(runs)
    speedup = (speedup_markdown(ladder, rel(plot_speedup(ladder, os.path.join(folder, "speedup.png")))) if ladder
               else ["", "## Speedup in simulated time", "", "No λ = 1 run finished (it diverged, failed, timed "
                     "out, or is not done yet): no target error, no speedup."])
  estimate = estimate_text([(f["samples"], f["gradients"], f["updates"], f["wall_s"]) for f in finals
                            if not unfinished(f)],      # an unfinished run stopped early: not the cost model's
                           args.full_epochs if args.quick else args.epochs, dataset=args.dataset,
                           command_cells=[] if args.quick else command_cells, train_examples=args.train_examples)
  command = "python launch/reproduce.py " + shlex.join(a for a in argv[1:] if a != "--report-only")   # the grid's
  text = render_markdown(agg, verdicts, command=command.strip(), epochs=args.epochs, seeds=args.seeds,
                         wall_s=None if args.report_only else wall, estimate=estimate,
                         figures=[(t, rel(p)) for t, p in pngs],
                         runs=[(c.name(args.epochs, args.train_examples), f)
                               for c, f in zip(cells + speed_cells, finals + speed_finals)],
                         dataset=args.dataset, train_examples=args.train_examples, extra=speedup,
                         momentum=args.momentum, note=note, missing=missing, classes=classes)
  write_text(args.out, text)
  ends = "".join(f", {k} {word}" for word, k in outcome_counts(finals + speed_finals).items())
  print(f"{len(cells)} cells ({trained} trained, {len(cells) - trained} already done{ends}) in {wall:.0f} s; "
        f"P4 over {len(verdicts)} inverse cells: {verdict_counts(verdicts)}; report: {args.out}\n{estimate}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
