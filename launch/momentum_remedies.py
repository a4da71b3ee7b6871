#!/usr/bin/env python
"""The declared momentum-remedies experiment (issue #20, item 5): can a staleness-aware momentum rule bring
asynchronous learners within 0.5 point of SSGD at the SSGD-tuned momentum 0.9 on Fashion-MNIST?

``python launch/momentum_remedies.py [--phase 1|2|all] [--seeds 0 1 2 3 4] [--train-examples 20000]
[--epochs E] [--root runs/momentum_remedies] [--out docs/momentum_remedies.md] [--data-dir DIR]
[--cell-timeout-s S] [--report-only]``

Every cell is launch/reproduce.py's Fashion-MNIST cell (configs/fashion_mnist.py unchanged: α0, momentum 0.9 and
the step schedule chosen on SSGD, no hyperparameter tuned per remedy; λ = 30 learners of μ = ⌈128/λ⌉ = 5;
:data:`launch.reproduce.EVALS` evaluations per run) on the simulated executor under the ``heterogeneous`` speed
profile (sajax/executors/speed.py), SSGD included, so simulated times compare. Rows (:data:`ROWS`):

* **phase 1**, on the first ``--train-examples`` training images (default 20,000) and seeds 0..4: SSGD
  (hardsync, c = λ), then for each n ∈ {1, 4, λ} (n-softsync, c = ⌊λ/n⌋; n = λ is async) the paper's inverse
  policy (α0/σ) with plain momentum, ``delayed_nesterov`` (N = λ), ``compensation`` (ρ: the config's),
  ``lookahead`` (sajax/momentum.py), and the warm-up (plain momentum, α ramped over the first epoch):
  1 + 3 × 5 = 16 cells × 5 seeds = 80 runs, seed-major (a partial grid has complete seeds);
* **phase 2**, once every phase-1 run is done: the remedy :func:`select_remedy` picks (a rule fixed here and
  stated in the report before any result) and SSGD, on all 60,000 training images at n = λ, the first
  :data:`PHASE2_SEEDS` seeds.

Each run trains in a child process of its own through launch/grid_runner.py: done once its ``final.json``
exists, resumed from its checkpoint when half done; a run that diverged or collapsed is a result. The report
(launch/momentum_remedies_report.py) says first what was declared (from this module's constants), then the
tables, the time to SSGD's error + 0.5 point, the curves and where the goal was reached; ``--report-only``
writes it from the runs done so far (none at all: the declaration alone). Bad input prints one line and exits 2
before anything is written; Ctrl-C keeps the running cell's checkpoint and exits 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
import time
from typing import Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from launch import grid_runner, reproduce  # noqa: E402
from launch.seed_stats import FAILED, TRAINED, seed_outcome  # noqa: E402

DATASET = "fashion_mnist"
LEARNERS = 30                           # λ; μ = ⌈128/λ⌉ = 5, as in launch/reproduce.py
NS = ("1", "4", "lambda")               # n of n-softsync ("lambda": n = λ, async)
PROFILE = "heterogeneous"               # sajax/executors/speed.py, in every cell (SSGD too)
SEEDS = (0, 1, 2, 3, 4)
TRAIN_EXAMPLES = 20000                  # phase 1; phase 2: all (0)
PHASE2_SEEDS = 3                        # phase 2 runs the first this many of --seeds
WARMUP_EPOCHS = 1.0                     # the warm-up row: α ramps linearly over the first epoch
GOAL_POINTS = reproduce.P4_POINTS       # the goal: within 0.5 point of SSGD
SSGD, PLAIN, WARMUP = "ssgd", "plain", "warmup"
REMEDIES = ("delayed_nesterov", "compensation", "lookahead", WARMUP)   # the fixed order: a tie goes to the first
ROWS = (PLAIN, *REMEDIES)               # per n, after SSGD
PHASES = ("1", "2", "all")


@dataclasses.dataclass(frozen=True)
class RemedyCell:
  """One run: ``row`` (SSGD or a row of :data:`ROWS`) at n (0 for SSGD), a seed, λ learners, on the first
  ``train_examples`` training images (0: all of them, phase 2)."""

  row: str
  n: int
  seed: int
  learners: int = LEARNERS
  train_examples: int = TRAIN_EXAMPLES

  @property
  def batch(self) -> int:
    """μ = ⌈128/λ⌉."""
    return math.ceil(reproduce.BATCH_TOTAL / self.learners)

  @property
  def policy(self) -> str:
    return SSGD if self.row == SSGD else "inverse"

  @property
  def c(self) -> int:
    """Gradients per update: λ for SSGD, ⌊λ/n⌋ for n-softsync."""
    return self.learners if self.row == SSGD else max(1, self.learners // self.n)

  @property
  def momentum_rule(self) -> str:
    """config.momentum_rule (sajax/momentum.py): the row's, plain for SSGD, plain and the warm-up."""
    return PLAIN if self.row in (SSGD, PLAIN, WARMUP) else self.row

  def name(self, epochs: float) -> str:
    proto = SSGD if self.row == SSGD else f"n{self.n}-inverse-{self.row}"
    data = f"t{self.train_examples}" if self.train_examples else "tall"
    return (f"{DATASET}-{PROFILE}-lambda{self.learners}-mu{self.batch}-{proto}-e{epochs:g}-{data}"
            f"-seed{self.seed}")


def ns_of(learners: int) -> list[int]:
  """The n of :data:`NS` for λ learners, each n ≤ λ once, ascending."""
  return sorted({learners if v == "lambda" else int(v) for v in NS} & set(range(1, learners + 1)))


def phase1_cells(seeds: Sequence[int], learners: int = LEARNERS,
                 train_examples: int = TRAIN_EXAMPLES) -> list[RemedyCell]:
  """Phase 1 in run order, seed-major: per seed, SSGD, then per n every row of :data:`ROWS`."""
  return [cell for seed in seeds for cell in
          [RemedyCell(SSGD, 0, seed, learners, train_examples)] +
          [RemedyCell(row, n, seed, learners, train_examples) for n in ns_of(learners) for row in ROWS]]


def phase2_cells(remedy: str, seeds: Sequence[int], learners: int = LEARNERS) -> list[RemedyCell]:
  """Phase 2 in run order: per seed of the first :data:`PHASE2_SEEDS`, SSGD and ``remedy`` at n = λ, on all the
  training images."""
  return [cell for seed in list(seeds)[:PHASE2_SEEDS] for cell in
          (RemedyCell(SSGD, 0, seed, learners, 0), RemedyCell(remedy, learners, seed, learners, 0))]


def cell_config(cell: RemedyCell, epochs: float, data_dir: str = ""):
  """launch/reproduce.py's cell (its α0, momentum and step schedule, :data:`launch.reproduce.EVALS` evaluations)
  under the heterogeneous profile, with the row's momentum rule (the config's N and ρ) or warm-up."""
  base = reproduce.Cell(cell.learners, cell.n, cell.policy, cell.seed, DATASET)
  config = reproduce.cell_config(base, epochs, cell.train_examples)
  config.sim_profile = PROFILE
  config.momentum_rule = cell.momentum_rule
  config.lr_warmup_epochs = WARMUP_EPOCHS if cell.row == WARMUP else 0.0
  if data_dir:
    config.data_dir = data_dir
  return config


# ---- the phase-2 rule (pure) ------------------------------------------------------------------------------
def outcome(final: dict, classes: int) -> str:
  """What a run became (launch/seed_stats.py): trained, collapsed, diverged, or why it stopped."""
  return seed_outcome(final.get("test_error"), final.get("train_loss"), classes, grid_runner.unfinished(final))


def select_remedy(runs: Sequence[tuple[RemedyCell, dict]], classes: int) -> list[dict]:
  """The remedies of :data:`REMEDIES` ranked by the phase-2 rule over their n = λ cells of ``runs`` (phase 1):
  the lowest mean final test error over the trained seeds first; a remedy with a collapsed or diverged seed after
  every remedy without; ties (and remedies with no trained seed) in :data:`REMEDIES` order. Each entry: row,
  mean (%, None without a trained seed), trained, failed, seeds. The first is phase 2's remedy."""
  ranking = []
  for row in REMEDIES:
    finals = [f for c, f in runs if c.row == row and c.n == c.learners]
    outcomes = [outcome(f, classes) for f in finals]
    errors = [100 * f["test_error"] for f, o in zip(finals, outcomes) if o == TRAINED]
    ranking.append({"row": row, "mean": sum(errors) / len(errors) if errors else None, "trained": len(errors),
                    "failed": sum(o in FAILED for o in outcomes), "seeds": len(finals)})
  return sorted(ranking, key=lambda r: (r["failed"] > 0, math.inf if r["mean"] is None else r["mean"],
                                       REMEDIES.index(r["row"])))


# ---- running a cell ---------------------------------------------------------------------------------------
def final_path(cell: RemedyCell, epochs: float, root: str) -> str:
  return os.path.join(root, cell.name(epochs), "final.json")


def read_final(cell: RemedyCell, epochs: float, root: str) -> Optional[dict]:
  """The cell's final record, None when it is not done."""
  path = final_path(cell, epochs, root)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def cell_head(cell: RemedyCell, epochs: float) -> dict:
  """What a cell's record says about the cell, whatever its outcome."""
  return {"cell": {**dataclasses.asdict(cell), "policy": cell.policy}, "epochs": epochs}


def run_cell(cell: RemedyCell, epochs: float, root: str, data_dir: str = "",
             timeout_s: Optional[float] = None) -> tuple[dict, bool]:
  """Trains one cell in a child process (``momentum_remedies.py --cell``) unless it is done; (final, trained)."""
  return grid_runner.run_script_cell(__file__, cell, epochs, root, data_dir, final_path(cell, epochs, root),
                                     cell_head(cell, epochs), timeout_s)


def train_cell(cell: RemedyCell, epochs: float, root: str, data_dir: str = "") -> dict:
  """In the child: trains and writes the cell's final.json (a diverged run is recorded as such)."""
  return grid_runner.train_and_record(cell_config(cell, epochs, data_dir), final_path(cell, epochs, root),
                                      cell_head(cell, epochs))


# ---- command line -----------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  """The flags, checked; raises ValueError with one line naming the bad value and what is allowed."""
  p = grid_runner.OneLineParser(prog="momentum_remedies.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--root", default=os.path.join("runs", "momentum_remedies"), help="folder of the runs")
  p.add_argument("--out", default=os.path.join("docs", "momentum_remedies.md"), help="report; its PNG beside it")
  p.add_argument("--phase", default="all", help="1 (phase 1 only), 2 (phase 2; phase 1 must be done) or all "
                 "(phase 1, then phase 2 once it is done; the default)")
  p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS), help="phase 1's seeds (phase 2: the first "
                 f"{PHASE2_SEEDS})")
  p.add_argument("--train-examples", type=int, default=TRAIN_EXAMPLES, help="phase 1 uses the first N training "
                 f"images (default {TRAIN_EXAMPLES:,}); phase 2 all of them")
  p.add_argument("--epochs", type=float, default=None, help="default: the config's (12)")
  p.add_argument("--learners", type=int, default=LEARNERS, help=f"λ (default {LEARNERS}, the declared "
                 "experiment's; another λ is a trial with folders of its own)")
  p.add_argument("--data-dir", default="", help="a folder with the Fashion-MNIST IDX files (default: where sajax "
                 "finds them, e.g. Debian's dataset-fashion-mnist)")
  p.add_argument("--report-only", action="store_true", help="write the report from the runs done so far (none: "
                 "the declaration alone), training nothing")
  grid_runner.add_cell_timeout(p)
  p.add_argument("--cell", default=None, help=argparse.SUPPRESS)   # internal: train one cell (see run_cell)
  args = p.parse_args(list(argv))
  args.seeds = list(dict.fromkeys(args.seeds))
  args.epochs = args.epochs if args.epochs is not None else float(reproduce.base_config(DATASET).epochs)
  if args.phase not in PHASES:
    raise ValueError(f"--phase {args.phase!r} is invalid; allowed: {', '.join(PHASES)}")
  if not 2 <= args.learners <= reproduce.BATCH_TOTAL:
    raise ValueError(f"--learners {args.learners} is invalid; allowed: integers 2..{reproduce.BATCH_TOTAL}")
  reproduce.check_run_args(args)
  return args


def command_text(argv: Sequence[str]) -> str:
  """The command that runs this grid (without --report-only and --phase, which choose what one invocation does)."""
  kept, skip = [], False
  for a in argv:
    if skip or a == "--report-only":
      skip = False
      continue
    if a == "--phase":
      skip = True
      continue
    if not a.startswith("--phase="):
      kept.append(a)
  return ("python launch/momentum_remedies.py " + shlex.join(kept)).strip()


def main(argv: Sequence[str]) -> int:
  try:
    args = parse_args(argv[1:])
    if args.cell is None:
      from sajax import data
      from launch.reproduce_report import kept_note
      classes = data.load_dataset(DATASET, data_dir=args.data_dir or None).num_classes   # missing: one line now
      note = kept_note(args.out)      # a note with numbers: one line now, not after the runs
      first = phase1_cells(args.seeds, args.learners, args.train_examples)
      waiting = [c for c in first if read_final(c, args.epochs, args.root) is None]
      if args.phase == "2" and waiting and not args.report_only:
        raise ValueError(f"--phase 2: {len(waiting)} of the {len(first)} phase-1 runs under --root {args.root!r} "
                         "are not done; allowed: --phase 1 or all first (phase 2 starts once phase 1 is done)")
  except ValueError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return grid_runner.EXIT_BAD_INPUT
  grid_runner.quiet_logging()
  if args.cell is not None:
    cell = RemedyCell(**json.loads(args.cell))
    return grid_runner.child_main(lambda: train_cell(cell, args.epochs, args.root, args.data_dir))
  from launch import momentum_remedies_report as report

  ran: dict[str, dict] = {}      # this invocation's records (a timed-out run's is nowhere else)
  trained, start = 0, time.perf_counter()

  def run(cells: Sequence[RemedyCell]) -> None:
    nonlocal trained
    finals, count = grid_runner.run_cells(
        cells, lambda c: run_cell(c, args.epochs, args.root, args.data_dir, args.cell_timeout_s),
        lambda c: c.name(args.epochs), desc="remedies")
    ran.update({c.name(args.epochs): f for c, f in zip(cells, finals)})
    trained += count

  def gather(cells: Sequence[RemedyCell]) -> list[tuple[RemedyCell, Optional[dict]]]:
    return [(c, ran.get(c.name(args.epochs)) or read_final(c, args.epochs, args.root)) for c in cells]

  try:
    if not args.report_only and args.phase in ("1", "all"):
      run(first)
    done = all(read_final(c, args.epochs, args.root) is not None for c in first)
    ranking = select_remedy([(c, f) for c, f in gather(first) if f is not None], classes) if done else None
    second = phase2_cells(ranking[0]["row"], args.seeds, args.learners) if ranking else []
    if second and not args.report_only and args.phase in ("2", "all"):
      run(second)
  except grid_runner.GridStopped as e:
    return e.code
  wall = time.perf_counter() - start
  from sajax import metrics
  history = lambda c, f: metrics.read_metrics(os.path.join(args.root, c.name(args.epochs))) if f else []  # noqa: E731
  phase1 = [(c, f, history(c, f)) for c, f in gather(first)]
  phase2 = [(c, f, history(c, f)) for c, f in gather(second)]
  folder = os.path.splitext(args.out)[0]
  os.makedirs(folder, exist_ok=True)
  png = report.plot_curves(phase1, phase2, os.path.join(folder, "test_error.png"), classes)
  text = report.render(phase1, phase2, ranking, learners=args.learners, seeds=args.seeds, epochs=args.epochs,
                       train_examples=args.train_examples, command=command_text(argv[1:]), note=note,
                       classes=classes, trained=trained, wall_s=wall,
                       figure=os.path.relpath(png, os.path.dirname(os.path.abspath(args.out))))
  grid_runner.write_text(args.out, text)
  print(f"phase 1: {sum(map(report.is_done, phase1))} of {len(phase1)} runs done; phase 2: "
        + (f"{sum(map(report.is_done, phase2))} of {len(phase2)} done ({ranking[0]['row']})" if ranking
           else "waits for phase 1") + f"; {trained} trained in {wall:.0f} s; report: {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
