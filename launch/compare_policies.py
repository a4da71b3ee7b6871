#!/usr/bin/env python
"""One comparison that ranks the staleness policies (issue #11): async λ = 30 under two speed profiles.

``python launch/compare_policies.py [--dataset fashion_mnist|mnist5k] [--epochs E] [--train-examples N]
[--seeds 0 1 2] [--profiles one_slow heterogeneous] [--policies inverse constant ... ssp] [--ssp-spread 2]
[--no-lr-over-lambda] [--report-only]``

Every cell is launch/reproduce.py's cell (the dataset's base config: α0 for a λμ ≈ 128 mini-batch, momentum and
step schedule unchanged, boundaries scaled with ``--epochs``; the simulated executor with the lognormal jitter
σ = 0.2) for λ = 30 learners of μ = ⌈128/30⌉ = 5, the hardest staleness of the paper, under a speed profile of
sajax/executors/speed.py (``one_slow``: learner 0 4× slower; ``heterogeneous``: the 0.58, 0.75, 1.51, 3.33 s
pattern cycled over the learners), with one of the rows:

* **SSGD**: hardsync (c = λ, σ = 0), the same profile and seeds: the baseline whose simulated time async is
  compared against (a round lasts as long as its slowest learner);
* each policy of ``sajax.optim.available_policies()`` on async (c = 1) with SSGD's α0 and the constants its paper
  recommends (the defaults of sajax/policies.py; ``drop``'s R, which has no default, is 2λ: see
  :data:`DROP_BOUND`);
* **SSP** (``protocol=ssp``, plain SGD, a fast learner at most ``--ssp-spread`` clocks ahead of the slowest), run
  only when ``"ssp" in sajax.protocol.PROTOCOLS``, otherwise reported as not run;
* each rule that leaves the step at α0 (:data:`STEP_AT_ALPHA0`: constant, delay_adaptive, drop, dc_asgd,
  dc_asgd_adaptive, SSP) a second time at **α0/λ** (row ``<rule>-lr_over_lambda``, labelled ``<rule> (α0/λ)``;
  ``--no-lr-over-lambda`` leaves these rows out): ``learning_rate`` divided by λ, the step schedule's boundaries
  and decay unchanged. Why: SSGD's update averages c = λ gradients of μ examples, a step of α0 per λμ examples;
  a rule whose scale s(σ) stays ≈ 1 at ⟨σ⟩ ≈ λ applies a whole step α0 to each gradient of μ examples under
  async (c = 1), λ times SSGD's step per example, and diverges by construction. At α0·μ/(λμ) = α0/λ it takes
  SSGD's step per example again: the linear-scaling rule (Goyal et al. 2017, "Accurate, Large Minibatch SGD"),
  read backwards for a mini-batch λ times smaller. The rows at α0 keep their names and folders.

Each cell trains in a child process of its own through launch/grid_runner.py (a cell is done once its
``final.json`` exists; reruns skip done cells and resume half-done ones; a run that diverges, whose learners
fail, or that runs past ``--cell-timeout-s`` seconds (killed; a rerun resumes it) is a result, recorded as
such). The report (``--out``, default docs/policies.md, PNG beside it) ranks the rows of each profile by final
test error (mean and 95 % Student-t interval over the seeds that trained; a seed that collapsed to chance or
diverged is counted apart, and its row is ranked last); one row is *decidedly* better than another only where
the paired t test of their differences (same seed) rejects at 5 % after Holm–Bonferroni's adjustment over every
pair the page compares (the α0/λ rows add pairs: the family grows with the rows). Per row also: the simulated
time to the SSGD target (SSGD's mean final error + 0.5 point; interpolated between evaluations, of which a run has
``launch.reproduce.EVALS``; the median over seeds, those that never reached it censored), ⟨σ⟩ and max σ, and the
fraction of gradients dropped (non-finite, or refused by the policy). A hand-written note kept in the report may
hold no number (one line, exit 2).

``--report-only`` trains nothing: it writes the report from the cells whose ``final.json`` exists under ``--root``
and shows every other row as waiting ("waiting (0 of 3 seeds)"), compared with none until its seeds are in.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from typing import Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from launch import grid_runner, reproduce  # noqa: E402
from launch.policies_report import (LR_OVER_LAMBDA, SSGD, SSP, plot_error_vs_time, render_markdown,  # noqa: E402
                                    summarize)
from launch.reproduce_report import kept_note  # noqa: E402

LEARNERS = 30                       # λ: the paper's largest, async at λ = 30 is its hardest staleness
PROFILES = ("one_slow", "heterogeneous")
DROP_BOUND = 2 * LEARNERS           # drop's R: see the README of docs/policies.md and the module docstring
SSP_SPREAD = 2
# The rules whose step stays ≈ α0 at ⟨σ⟩ ≈ λ (scale ≈ 1, or a compensation added to an unscaled step): each is
# also run at α0/λ, SSGD's step per example (the module docstring)
STEP_AT_ALPHA0 = ("constant", "delay_adaptive", "drop", "dc_asgd", "dc_asgd_adaptive", SSP)


@dataclasses.dataclass(frozen=True)
class Variant:
  """A row of the comparison: a protocol (``hardsync``, ``async`` or ``ssp``) with a policy and its arguments, at
  SSGD's α0 or (``alpha_over_lambda``) at α0/λ."""

  name: str
  protocol: str
  policy: str
  policy_args: str = "{}"     # JSON, as --config.policy_args takes it
  spread: int = 0             # SSP's bound on how far a learner may run ahead of the slowest
  alpha_over_lambda: bool = False   # learning_rate α0/λ instead of α0 (schedule boundaries and decay unchanged)


@dataclasses.dataclass(frozen=True)
class PolicyCell:
  """One run: a variant under a speed profile, with a seed, on a dataset, with λ learners, and a momentum
  replacing the base config's (None: the base config's)."""

  variant: Variant
  profile: str
  seed: int
  dataset: str = "mnist5k"
  learners: int = LEARNERS
  momentum: Optional[float] = None

  @property
  def batch(self) -> int:
    """μ = ⌈128/λ⌉, as in launch/reproduce.py."""
    return reproduce.Cell(self.learners, 0, SSGD, self.seed).batch

  def name(self, epochs: float, train_examples: int = 0) -> str:
    data = f"-t{train_examples}" if train_examples else ""
    mom = "" if self.momentum is None else f"-m{self.momentum:g}"
    return (f"{self.dataset}-{self.profile}-{self.variant.name}-lambda{self.learners}-mu{self.batch}-e{epochs:g}"
            f"{data}{mom}-seed{self.seed}")


def ssp_available() -> bool:
  """Whether this sajax has the SSP protocol (another branch adds it)."""
  from sajax import protocol
  return SSP in protocol.PROTOCOLS


def variants(policies: Sequence[str], learners: int = LEARNERS, spread: int = SSP_SPREAD,
             lr_over_lambda: bool = True) -> list[Variant]:
  """SSGD, then each of ``policies`` on async with its recommended constants (drop: R = 2λ), then SSP if
  ``policies`` names it; then, with ``lr_over_lambda``, each of those rows in :data:`STEP_AT_ALPHA0` again at
  α0/λ (named ``<row>-lr_over_lambda``)."""
  out = [Variant(SSGD, "hardsync", "constant")]
  for p in policies:
    if p == SSP:
      continue
    args = json.dumps({"bound": 2 * learners}) if p == "drop" else "{}"
    out.append(Variant(p, "async", p, args))
  if SSP in policies:
    out.append(Variant(SSP, SSP, "constant", spread=spread))
  if lr_over_lambda:
    out += [dataclasses.replace(v, name=v.name + LR_OVER_LAMBDA, alpha_over_lambda=True)
            for v in out if v.name in STEP_AT_ALPHA0]
  return out


def grid(variant_list: Sequence[Variant], profiles: Sequence[str], seeds: Sequence[int], dataset: str,
         runnable: bool = True, momentum: Optional[float] = None) -> list[PolicyCell]:
  """The cells in run order: per seed, per profile, every variant (a whole seed is done before the next starts),
  each with ``momentum`` (None: the base config's). SSP's cells are left out unless ``runnable``."""
  return [PolicyCell(v, profile, seed, dataset, momentum=momentum) for seed in seeds for profile in profiles
          for v in variant_list if runnable or v.protocol != SSP]


def cell_config(cell: PolicyCell, epochs: float, train_examples: int = 0):
  """launch/reproduce.py's cell config for λ, μ, seed and dataset (:data:`launch.reproduce.EVALS` evaluations per
  run), with this cell's protocol, policy, profile, and α0/λ as ``learning_rate`` for an α0/λ row."""
  v = cell.variant
  ssgd = v.protocol == "hardsync"
  base = reproduce.Cell(cell.learners, 0 if ssgd else cell.learners, SSGD if ssgd else v.policy, cell.seed,
                        cell.dataset, momentum=cell.momentum)
  config = reproduce.cell_config(base, epochs, train_examples)
  if not ssgd:
    config.protocol, config.n = v.protocol, cell.learners
  if v.protocol == SSP:
    config.ssp_spread = v.spread
  config.policy, config.policy_args = v.policy, v.policy_args
  config.sim_profile = cell.profile
  if v.alpha_over_lambda:
    config.learning_rate = config.learning_rate / cell.learners
  return config


def constants_text(variant: Variant, config) -> str:
  """The constants a row runs with: its policy's arguments as built (defaults, λ and α0 filled in)."""
  if variant.protocol == "hardsync":
    return f"c = λ = {config.learners}, σ = 0"
  if variant.protocol == SSP:
    return f"spread s = {variant.spread}, c = 1"
  from sajax import config as config_lib
  args = config_lib.policy_of(config).args
  return ", ".join(f"{k} = {v:g}" if isinstance(v, float) else f"{k} = {v}" for k, v in args) or "none"


def alpha_text(variant: Variant, config) -> str:
  """The step a row runs with (before the schedule's decays): 'α0 = 0.05' or 'α0/λ = 0.05/30 = 0.00167'."""
  if not variant.alpha_over_lambda:
    return f"α0 = {config.learning_rate:g}"
  return (f"α0/λ = {config.learning_rate * config.learners:g}/{config.learners} = "
          f"{config.learning_rate:.3g}")


# ---- running a cell -------------------------------------------------------------------------------------
def final_path(cell: PolicyCell, epochs: float, root: str, train_examples: int = 0) -> str:
  return os.path.join(root, cell.name(epochs, train_examples), "final.json")


def cell_from_json(text: str) -> PolicyCell:
  d = json.loads(text)
  return PolicyCell(**{**d, "variant": Variant(**d["variant"])})


def run_cell(cell: PolicyCell, epochs: float, root: str, train_examples: int = 0,
             timeout_s: Optional[float] = None) -> tuple[dict, bool]:
  """Trains one cell in a child process (``compare_policies.py --cell``) unless it is done; (final, trained).
  Past ``timeout_s`` seconds the child is killed and the cell recorded as timed out."""
  command = [sys.executable, os.path.abspath(__file__), "--cell", json.dumps(dataclasses.asdict(cell)),
             "--epochs", repr(float(epochs)), "--root", root, "--train-examples", str(train_examples)]
  return grid_runner.run_in_child(final_path(cell, epochs, root, train_examples), command,
                                  grid_runner.cell_environment(cell, root), cell.name(epochs, train_examples),
                                  head=cell_head(cell, epochs), timeout_s=timeout_s)


def cell_head(cell: PolicyCell, epochs: float) -> dict:
  """What a cell's record says about the cell, whatever its outcome."""
  return {"cell": dataclasses.asdict(cell), "epochs": epochs}


def train_cell(cell: PolicyCell, epochs: float, root: str, train_examples: int = 0) -> dict:
  """Trains one cell here and writes its final.json; a diverged run is recorded as such rather than failing
  the comparison (:func:`launch.grid_runner.train_and_record`)."""
  return grid_runner.train_and_record(cell_config(cell, epochs, train_examples),
                                      final_path(cell, epochs, root, train_examples), cell_head(cell, epochs))


# ---- command line -------------------------------------------------------------------------------------------
def default_dataset() -> str:
  """fashion_mnist when its IDX files are installed, else the embedded mnist5k."""
  from sajax import idx
  return "fashion_mnist" if idx.find_folder("fashion_mnist", None) else "mnist5k"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  """The flags, checked; raises ValueError with one line naming the bad value and what is allowed."""
  from sajax import optim
  policies = optim.available_policies()
  p = grid_runner.OneLineParser(prog="compare_policies.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--root", default=os.path.join("runs", "compare_policies"), help="folder of the runs")
  p.add_argument("--out", default=os.path.join("docs", "policies.md"), help="report; its PNG goes beside it")
  p.add_argument("--dataset", default=None, help="fashion_mnist (default when installed) or mnist5k")
  p.add_argument("--epochs", type=float, default=None, help="default: the base config's (12 for fashion_mnist)")
  p.add_argument("--train-examples", type=int, default=0, help="use the first N training examples (0: all)")
  p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  p.add_argument("--profiles", nargs="+", default=list(PROFILES), help=f"of {', '.join(PROFILES)}")
  p.add_argument("--policies", nargs="+", default=[*policies, SSP], help="policies (default: all) and 'ssp'")
  p.add_argument("--ssp-spread", type=int, default=SSP_SPREAD, help="SSP's spread s")
  p.add_argument("--momentum", type=float, default=None, help="this momentum in every row, SSGD included "
                 "(default: the base config's); its runs get their own folders")
  p.add_argument("--lr-over-lambda", action=argparse.BooleanOptionalAction, default=True,
                 help=f"also run {', '.join(STEP_AT_ALPHA0)} at α0/λ (default: yes; their own folders)")
  p.add_argument("--report-only", action="store_true", help="write the report from the runs done so far under "
                 "--root, the others shown as waiting; train nothing")
  grid_runner.add_cell_timeout(p)
  p.add_argument("--cell", default=None, help=argparse.SUPPRESS)   # internal: train one cell (see run_cell)
  args = p.parse_args(list(argv))
  args.dataset = args.dataset or default_dataset()
  args.seeds, args.profiles = list(dict.fromkeys(args.seeds)), list(dict.fromkeys(args.profiles))
  args.policies = list(dict.fromkeys(args.policies))
  if args.dataset not in reproduce.DATASETS:
    raise ValueError(f"--dataset {args.dataset!r} is invalid; allowed: {', '.join(reproduce.DATASETS)}")
  args.epochs = args.epochs if args.epochs is not None else float(reproduce.base_config(args.dataset).epochs)
  for name in args.profiles:
    if name not in PROFILES:
      raise ValueError(f"--profiles {name!r} is invalid; allowed: {', '.join(PROFILES)}")
  for name in args.policies:
    if name not in (*policies, SSP):
      raise ValueError(f"--policies {name!r} is invalid; allowed: {', '.join(policies)}, {SSP}")
  if args.ssp_spread < 0:
    raise ValueError(f"--ssp-spread {args.ssp_spread} is invalid; allowed: an integer >= 0")
  reproduce.check_run_args(args)
  return args


def setting_text(args: argparse.Namespace) -> str:
  """One paragraph: the dataset, epochs, seeds, λ, μ and the base config's hyperparameters every row shares (the
  α0/λ rows: all but α0)."""
  base = reproduce.base_config(args.dataset)
  subset = f", the first {args.train_examples:,} training examples" if args.train_examples else ""
  boundaries = ", ".join(f"{b:g}" for b in reproduce.scaled_boundaries(base, args.epochs)) or "(none)"
  scaled = (f" (α0/λ = {base.learning_rate / LEARNERS:.3g} in the rows marked α0/λ)" if args.lr_over_lambda
            and set(args.policies) & set(STEP_AT_ALPHA0) else "")
  return (f"Setting: {args.dataset}{subset}, {args.epochs:g} epoch{'' if args.epochs == 1 else 's'}, seeds "
          f"{', '.join(map(str, args.seeds))}; λ = {LEARNERS} learners of μ = "
          f"{reproduce.Cell(LEARNERS, 0, SSGD, 0).batch}, "
          f"simulated executor (lognormal jitter σ = {reproduce.SIM_JITTER}); "
          f"configs/{reproduce.BASE_CONFIGS[args.dataset]}.py's α0 = {base.learning_rate:g}{scaled}, momentum "
          f"{base.momentum if args.momentum is None else args.momentum:g}"
          f"{'' if args.momentum is None else f' (the base config has {base.momentum:g})'}, "
          f"α ÷{1 / base.lr_decay:g} at epochs {boundaries} in every row; profiles: "
          f"{', '.join(args.profiles)} (sim_slowdown {base.sim_slowdown:g} for one_slow).")


def main(argv: Sequence[str]) -> int:
  try:
    args = parse_args(argv[1:])
    if args.cell is None:
      from sajax import data
      classes = data.load_dataset(reproduce.base_config(args.dataset).dataset).num_classes   # missing: one line
      note = kept_note(args.out)      # a note with numbers: one line now, not after the grid
  except ValueError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return grid_runner.EXIT_BAD_INPUT
  grid_runner.quiet_logging()
  if args.cell is not None:
    return grid_runner.child_main(lambda: train_cell(cell_from_json(args.cell), args.epochs, args.root,
                                                     args.train_examples))
  from sajax import metrics
  runnable = ssp_available()
  rows = variants(args.policies, LEARNERS, args.ssp_spread, args.lr_over_lambda)
  cells = grid(rows, args.profiles, args.seeds, args.dataset, runnable, args.momentum)
  name = lambda c: c.name(args.epochs, args.train_examples)   # noqa: E731
  start = time.perf_counter()
  if args.report_only:      # the cells done so far, nothing trained; the others wait for the command without it
    done = [os.path.exists(final_path(c, args.epochs, args.root, args.train_examples)) for c in cells]
    waiting = [c for c, d in zip(cells, done) if not d]
    cells = [c for c, d in zip(cells, done) if d]
    finals, trained = [_read_json(final_path(c, args.epochs, args.root, args.train_examples)) for c in cells], 0
  else:
    try:
      finals, trained = grid_runner.run_cells(
          cells, lambda c: run_cell(c, args.epochs, args.root, args.train_examples, args.cell_timeout_s), name,
          desc="compare")
    except grid_runner.GridStopped as e:
      return e.code
    waiting = []
  wall = time.perf_counter() - start

  names = [name(c) for c in cells]
  runs = [(c, f, metrics.read_metrics(os.path.join(args.root, n))) for c, f, n in zip(cells, finals, names)]
  summary = summarize(runs, classes=classes, waiting=waiting)
  first = lambda v: cell_config(PolicyCell(v, args.profiles[0], 0, args.dataset, momentum=args.momentum),  # noqa: E731
                                args.epochs, args.train_examples)
  constants = {v.name: constants_text(v, first(v)) for v in rows}
  alphas = {v.name: alpha_text(v, first(v)) for v in rows}
  missing = [] if runnable else [v.name for v in rows if v.protocol == SSP]
  folder = os.path.splitext(args.out)[0]
  os.makedirs(folder, exist_ok=True)
  png = plot_error_vs_time(summary, args.profiles, os.path.join(folder, "test_error_vs_time.png"))
  command = ("python launch/compare_policies.py " + shlex.join(a for a in argv[1:] if a != "--report-only")).strip()
  text = render_markdown(summary, profiles=args.profiles, constants=constants, alphas=alphas, command=command,
                         note=note, setting=setting_text(args), seeds=args.seeds, wall_s=wall,
                         figure=os.path.relpath(png, os.path.dirname(os.path.abspath(args.out))),
                         runs=list(zip(names, finals)), missing=missing, trained=trained,
                         classes=classes, waiting=len(waiting))
  grid_runner.write_text(args.out, text)
  ends = "".join(f", {k} {word}" for word, k in grid_runner.outcome_counts(finals).items())
  if args.report_only:
    print(f"--report-only: {len(cells)} runs done{ends}, {len(waiting)} waiting (`{command}` trains them); "
          f"report: {args.out}")
  else:
    print(f"{len(cells)} runs ({trained} trained, {len(cells) - trained} already done{ends}) in {wall:.0f} s; "
          f"report: {args.out}")
  return 0


def _read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)

if __name__ == "__main__":
  sys.exit(main(sys.argv))
