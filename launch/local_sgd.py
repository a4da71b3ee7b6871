#!/usr/bin/env python
"""The declared asynchronous local-SGD comparison (issue #21, item 4): at equal accuracy, how much communication
and simulated time does asynchrony with local steps save over SSGD, and which staleness rule is right for
pseudo-gradients?

``python launch/local_sgd.py [--seeds 0 1 2] [--learners 4 16] [--train-examples 20000] [--epochs E]
[--root runs/local_sgd] [--out docs/local_sgd.md] [--data-dir DIR] [--cell-timeout-s S] [--report-only]``

Every cell is launch/reproduce.py's Fashion-MNIST cell (configs/fashion_mnist.py unchanged: α0, momentum 0.9 and
the step schedule chosen on SSGD, nothing tuned per row; μ = ⌈128/λ⌉ so λμ ≈ 128;
:data:`launch.reproduce.EVALS` evaluations per run) on the first ``--train-examples`` training images, on the simulated executor under the
``heterogeneous`` speed profile and one communication model (:data:`SIM_BANDWIDTH`, :data:`SIM_LATENCY`: a pull
plus a push of the small CNN costs about one mean gradient step), SSGD included, so simulated times and bytes
compare. Rows (:data:`ROWS`), for each λ of ``--learners``:

* SSGD (hardsync, c = λ, H = 1) — the reference whose mean final error + 0.5 point is the target;
* async SGD (c = 1, H = 1) with the paper's inverse policy α0/σ;
* synchronous local-SGD / DiLoCo (hardsync, H ∈ :data:`STEPS`, outer Nesterov lr 0.7, momentum 0.9);
* asynchronous local-SGD (c = 1, H ∈ :data:`STEPS`) with each weighting of :data:`WEIGHTINGS` (constant,
  polynomial (1 + σ)^−0.5, inverse), outer :data:`ASYNC_OUTER` (Liu et al. 2024);
* DyLU: asynchronous local-SGD with H_k = ⌊H·v_k/v_fastest⌋, H = :data:`DYLU_STEPS`, the ``async_local_sgd``
  weighting.

Inner optimizer everywhere: SGD at α0, no inner momentum, constant (sajax/local_steps.py's defaults). The runs go
seed-major (a partial grid has complete seeds), each in a child process of its own through launch/grid_runner.py:
done once its ``final.json`` exists, resumed from its checkpoint when half done; a run that diverged or collapsed
is a result. The report (launch/local_sgd_report.py) says first what was declared (from this module's constants
and the flags), then per λ the final errors, the paired difference to SSGD, and the simulated time and bytes to
SSGD's error + 0.5 point; ``--report-only`` writes it from the runs done so far (none at all: the declaration
alone). Bad input prints one line and exits 2 before anything is written; Ctrl-C keeps the running cell's
checkpoint and exits 130.
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

DATASET = "fashion_mnist"
PROFILE = "heterogeneous"               # sajax/executors/speed.py, in every cell (SSGD too)
LEARNERS = (4, 16)                      # λ; μ = ⌈128/λ⌉ = 32, 8
SEEDS = (0, 1, 2)
TRAIN_EXAMPLES = 20000
GOAL_POINTS = reproduce.P4_POINTS       # the target: SSGD's mean final error (same λ) + 0.5 point
STEPS = (8, 32)                         # H of the local-SGD rows
WEIGHTINGS = ("constant", "polynomial", "inverse")   # s(σ) of the asynchronous local-SGD rows
POLYNOMIAL_A = 0.5                      # (1 + σ)^−a, a of Liu et al. 2024
ASYNC_OUTER = "delayed_nesterov"        # outer optimizer of asynchronous local-SGD (Liu et al. 2024)
DILOCO_OUTER = "nesterov"               # outer optimizer of synchronous local-SGD (DiLoCo)
DYLU_STEPS = 32
DYLU_POLICY = "async_local_sgd"         # the preset: polynomial, a = 0.5
# The communication model (sajax/executors/comm.py): τ = L + M/B per pull or push, M the CNN's bytes. With these a
# pull plus a push, 2τ, costs about one mean gradient step of the heterogeneous profile (tests check both).
MESSAGE_BYTES = 1_686_568               # M: the small CNN's 421,642 float32 parameters (Fashion-MNIST, 10 classes)
SIM_BANDWIDTH = 2.2e6                   # B, bytes per simulated second on each learner's link
SIM_LATENCY = 0.01                      # L, seconds per message
# Measured on this machine (2 cores shared with a background grid at nice 19; 1-minute load 12.5 and 14.7 when they
# ended): seconds one full-size run of each λ trained, MEASURED_EPOCHS epochs on TRAIN_EXAMPLES images (the report
# estimates the grid's CPU time from these, per gradient).
MEASURED_EPOCHS = 12.0
MEASURED_RUN_S = {4: 441.0, 16: 343.0}   # λ = 4: local-h8-polynomial; λ = 16: async (collapsed)


@dataclasses.dataclass(frozen=True)
class Row:
  """One row of the comparison: its protocol (hardsync: c = λ; async: c = 1), H, the staleness weighting s(σ)
  (no effect under hardsync: σ = 0), the outer optimizer of what learners push, and whether H is DyLU's H_k."""

  name: str
  protocol: str
  steps: int
  policy: str
  outer: str
  dynamic: bool = False


SSGD = "ssgd"
ROWS: tuple[Row, ...] = (
    Row(SSGD, "hardsync", 1, "constant", "sgd"),
    Row("async", "async", 1, "inverse", "sgd"),
    *(Row(f"diloco-h{h}", "hardsync", h, "constant", DILOCO_OUTER) for h in STEPS),
    *(Row(f"local-h{h}-{w}", "async", h, w, ASYNC_OUTER) for h in STEPS for w in WEIGHTINGS),
    Row(f"dylu-h{DYLU_STEPS}", "async", DYLU_STEPS, DYLU_POLICY, ASYNC_OUTER, dynamic=True),
)
ROW_OF = {r.name: r for r in ROWS}


@dataclasses.dataclass(frozen=True)
class LocalCell:
  """One run: a row of :data:`ROWS` at λ learners, a seed, on the first ``train_examples`` training images."""

  row: str
  learners: int
  seed: int
  train_examples: int = TRAIN_EXAMPLES

  @property
  def batch(self) -> int:
    """μ = ⌈128/λ⌉."""
    return math.ceil(reproduce.BATCH_TOTAL / self.learners)

  def name(self, epochs: float) -> str:
    data = f"t{self.train_examples}" if self.train_examples else "tall"
    return f"{DATASET}-{PROFILE}-lambda{self.learners}-mu{self.batch}-{self.row}-e{epochs:g}-{data}-seed{self.seed}"


def cells(seeds: Sequence[int], learners: Sequence[int] = LEARNERS,
          train_examples: int = TRAIN_EXAMPLES) -> list[LocalCell]:
  """The grid in run order, seed-major: per seed, per λ, every row of :data:`ROWS` (SSGD first)."""
  return [LocalCell(row.name, lam, seed, train_examples) for seed in seeds for lam in learners for row in ROWS]


def cell_config(cell: LocalCell, epochs: float, data_dir: str = ""):
  """launch/reproduce.py's cell (its α0, momentum, step schedule and evaluations) under the heterogeneous profile
  and the communication model, with the row's protocol, weighting, H, outer optimizer and DyLU."""
  row = ROW_OF[cell.row]
  sync = row.protocol == "hardsync"
  base = reproduce.Cell(cell.learners, 0 if sync else cell.learners, "ssgd" if sync else row.policy, cell.seed,
                        DATASET)
  config = reproduce.cell_config(base, epochs, cell.train_examples)
  config.sim_profile = PROFILE
  config.sim_bandwidth, config.sim_latency = SIM_BANDWIDTH, SIM_LATENCY
  config.policy = row.policy
  config.policy_args = json.dumps({"a": POLYNOMIAL_A}) if row.policy == "polynomial" else "{}"
  config.local_steps, config.outer_optimizer, config.dynamic_local_steps = row.steps, row.outer, row.dynamic
  if data_dir:
    config.data_dir = data_dir
  return config


# ---- running a cell ---------------------------------------------------------------------------------------
def final_path(cell: LocalCell, epochs: float, root: str) -> str:
  return os.path.join(root, cell.name(epochs), "final.json")


def read_final(cell: LocalCell, epochs: float, root: str) -> Optional[dict]:
  """The cell's final record, None when it is not done."""
  path = final_path(cell, epochs, root)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def cell_head(cell: LocalCell, epochs: float) -> dict:
  """What a cell's record says about the cell, whatever its outcome."""
  return {"cell": {**dataclasses.asdict(cell), **dataclasses.asdict(ROW_OF[cell.row])}, "epochs": epochs}


def run_cell(cell: LocalCell, epochs: float, root: str, data_dir: str = "",
             timeout_s: Optional[float] = None) -> tuple[dict, bool]:
  """Trains one cell in a child process (``local_sgd.py --cell``) unless it is done; (final, trained)."""
  return grid_runner.run_script_cell(__file__, cell, epochs, root, data_dir, final_path(cell, epochs, root),
                                     cell_head(cell, epochs), timeout_s)


def train_cell(cell: LocalCell, epochs: float, root: str, data_dir: str = "") -> dict:
  """In the child: trains and writes the cell's final.json (a diverged run is recorded as such)."""
  return grid_runner.train_and_record(cell_config(cell, epochs, data_dir), final_path(cell, epochs, root),
                                      cell_head(cell, epochs))


# ---- command line -----------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  """The flags, checked; raises ValueError with one line naming the bad value and what is allowed."""
  p = grid_runner.OneLineParser(prog="local_sgd.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--root", default=os.path.join("runs", "local_sgd"), help="folder of the runs")
  p.add_argument("--out", default=os.path.join("docs", "local_sgd.md"), help="report; its PNG beside it")
  p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS), help="default: 0 1 2")
  p.add_argument("--learners", nargs="+", type=int, default=list(LEARNERS), help="λ values (default 4 16)")
  p.add_argument("--train-examples", type=int, default=TRAIN_EXAMPLES, help="use the first N training images "
                 f"(default {TRAIN_EXAMPLES:,}; 0: all)")
  p.add_argument("--epochs", type=float, default=None, help="default: the config's (12)")
  p.add_argument("--data-dir", default="", help="a folder with the Fashion-MNIST IDX files (default: where sajax "
                 "finds them, e.g. Debian's dataset-fashion-mnist)")
  p.add_argument("--report-only", action="store_true", help="write the report from the runs done so far (none: "
                 "the declaration alone), training nothing")
  grid_runner.add_cell_timeout(p)
  p.add_argument("--cell", default=None, help=argparse.SUPPRESS)   # internal: train one cell (see run_cell)
  args = p.parse_args(list(argv))
  args.seeds, args.learners = list(dict.fromkeys(args.seeds)), list(dict.fromkeys(args.learners))
  args.epochs = args.epochs if args.epochs is not None else float(reproduce.base_config(DATASET).epochs)
  for lam in args.learners:
    if not 2 <= lam <= reproduce.BATCH_TOTAL:
      raise ValueError(f"--learners {lam} is invalid; allowed: integers 2..{reproduce.BATCH_TOTAL} (μ = ⌈128/λ⌉)")
  reproduce.check_run_args(args)
  return args


def command_text(argv: Sequence[str]) -> str:
  """The command that runs this grid (without --report-only, which only chooses what one invocation does)."""
  return ("python launch/local_sgd.py " + shlex.join(a for a in argv if a != "--report-only")).strip()


def main(argv: Sequence[str]) -> int:
  try:
    args = parse_args(argv[1:])
    if args.cell is None:
      from sajax import data
      from launch.reproduce_report import kept_note
      classes = data.load_dataset(DATASET, data_dir=args.data_dir or None).num_classes   # missing: one line now
      note = kept_note(args.out)      # a note with numbers: one line now, not after the runs
  except ValueError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return grid_runner.EXIT_BAD_INPUT
  grid_runner.quiet_logging()
  if args.cell is not None:
    cell = LocalCell(**json.loads(args.cell))
    return grid_runner.child_main(lambda: train_cell(cell, args.epochs, args.root, args.data_dir))
  from launch import local_sgd_report as report
  from sajax import metrics

  grid = cells(args.seeds, args.learners, args.train_examples)
  ran: dict[str, dict] = {}      # this invocation's records (a timed-out run's is nowhere else)
  trained, start = 0, time.perf_counter()
  if not args.report_only:
    try:
      finals, trained = grid_runner.run_cells(
          grid, lambda c: run_cell(c, args.epochs, args.root, args.data_dir, args.cell_timeout_s),
          lambda c: c.name(args.epochs), desc="local-sgd")
    except grid_runner.GridStopped as e:
      return e.code
    ran = {c.name(args.epochs): f for c, f in zip(grid, finals)}
  wall = time.perf_counter() - start
  runs = []
  for c in grid:
    final = ran.get(c.name(args.epochs)) or read_final(c, args.epochs, args.root)
    runs.append((c, final, metrics.read_metrics(os.path.join(args.root, c.name(args.epochs))) if final else []))
  folder = os.path.splitext(args.out)[0]
  os.makedirs(folder, exist_ok=True)
  png = report.plot_curves(runs, os.path.join(folder, "test_error.png"), classes)
  text = report.render(runs, learners=args.learners, seeds=args.seeds, epochs=args.epochs,
                       train_examples=args.train_examples, command=command_text(argv[1:]), note=note,
                       classes=classes, trained=trained, wall_s=wall,
                       figure=os.path.relpath(png, os.path.dirname(os.path.abspath(args.out))))
  grid_runner.write_text(args.out, text)
  print(f"{sum(map(report.is_done, runs))} of {len(runs)} runs done; {trained} trained in {wall:.0f} s; "
        f"report: {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
