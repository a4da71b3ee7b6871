#!/usr/bin/env python
"""Why the SSGD-tuned momentum 0.9 fails asynchronous learners on Fashion-MNIST, measured (issue #13).

``python launch/momentum_staleness.py [--learners 30] [--epochs 2] [--train-examples 20000] [--seeds 0]
[--root runs/momentum] [--out docs/momentum_staleness.md] [--data-dir DIR]``

In the reproduction grid (docs/reproduction_fashion.md), configs/fashion_mnist.py (α0 = 0.05 and momentum 0.9,
both chosen on SSGD alone) trains SSGD to about 10 % test error, but async (c = 1) sits at chance (90 %) under
both the inverse and the constant rule. Three explanations compete; each probe here tests one, with every other
setting of the grid's cell unchanged (the simulated executor, λ learners of μ = ⌈128/λ⌉, the dataset's α0 and
step schedule, the first ``--epochs`` epochs of the grid's run, evaluated every 0.1 epoch):

1. **The start**: all of the first λ pushes are gradients at θ_0 (σ = 0, 1, …, λ − 1). The inverse rule weighs
   them 1, 1, ½, …, 1/(λ − 1) (1 + H_{λ−1} ≈ 5.0 gradients' worth for λ = 30, constant: λ), and momentum m keeps
   applying them (a factor up to 1/(1 − m) = 10 at m = 0.9). Probe: the same run with α warmed up linearly over
   the first epoch (``lr_warmup_epochs=1``). If the start is the cause, it trains.
2. **Momentum compounding with staleness**: asynchrony alone acts like momentum 1 − 1/λ (Mitliagkas, Zhang,
   Hadjis & Ré 2016, "Asynchrony begets momentum"), so explicit 0.9 on top over-shoots at every step, not just at
   the start. Probes: momentum 0.7, 0.5 and 0 with α0 unchanged. If this is the cause, lower momentum trains
   and the warm-up alone does not.
3. **Dead units after one bad step**: a large step drives the ReLU pre-activations negative for every input, the
   units' gradients vanish and the network outputs a constant (train loss ln 10 = 2.3026). Measured on every
   probe: the fraction of ReLU units of each layer with no positive pre-activation on 1,000 test images, from
   its final checkpoint.

Plus the references: SSGD (hardsync) and constant (plain ASGD), both at momentum 0.9. Each probe trains in a child
process (launch/grid_runner.py: done once its ``final.json`` exists, resumable, a diverged run is a
result). The report has the table (final test error, train loss, its peak and when, dead fractions), the
train-loss and test-error curves and the command.
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
EVAL_EVERY = 0.1                   # epochs between evaluations: where in epoch 1 a run breaks
DEAD_IMAGES = 1000                 # test images the dead-unit fractions are measured on
CHANCE_LOSS = math.log(10)         # a constant output over 10 classes
LAYERS = ("conv1", "conv2", "fc1")  # the small CNN's ReLU layers
LOSS_TOP = 100.0                   # the loss plot's top: a blow-up (1e33 under constant) is marked there


@dataclasses.dataclass(frozen=True)
class Probe:
  """One run: ``n`` 0 is SSGD (hardsync), else async (c = 1) under ``policy``; momentum m; warm-up epochs."""

  learners: int
  n: int
  policy: str
  momentum: float
  warmup: float
  seed: int

  @property
  def label(self) -> str:
    what = "SSGD" if self.n == 0 else f"async {self.policy}"
    return f"{what}, m = {self.momentum:g}" + (f", warm-up {self.warmup:g} epoch" if self.warmup else "")

  def name(self, epochs: float, train_examples: int) -> str:
    proto = "ssgd" if self.n == 0 else f"async-{self.policy}"
    warm = f"-warm{self.warmup:g}" if self.warmup else ""
    return (f"{DATASET}-lambda{self.learners}-{proto}-m{self.momentum:g}{warm}-e{epochs:g}-t{train_examples}"
            f"-seed{self.seed}")


def probes(learners: int, seeds: Sequence[int]) -> list[Probe]:
  """SSGD and constant at m = 0.9 (references), then inverse at 0.9, 0.9 warmed up, 0.7, 0.5 and 0."""
  out = []
  for seed in seeds:
    out += [Probe(learners, 0, "ssgd", 0.9, 0.0, seed), Probe(learners, learners, "constant", 0.9, 0.0, seed),
            Probe(learners, learners, "inverse", 0.9, 0.0, seed), Probe(learners, learners, "inverse", 0.9, 1.0, seed)]
    out += [Probe(learners, learners, "inverse", m, 0.0, seed) for m in (0.7, 0.5, 0.0)]
  return out


def probe_config(probe: Probe, epochs: float, train_examples: int, data_dir: str = ""):
  """The grid's cell (launch/reproduce.py) with this probe's momentum and warm-up, evaluated every 0.1 epoch,
  and the dataset's step schedule as in the full run (its boundaries are not scaled to ``epochs``); the IDX
  files from ``data_dir`` when given."""
  cell = reproduce.Cell(probe.learners, probe.n, "ssgd" if probe.n == 0 else probe.policy, probe.seed, DATASET)
  config = reproduce.cell_config(cell, epochs, train_examples)
  config.lr_boundaries_epochs = tuple(reproduce.base_config(DATASET).lr_boundaries_epochs)
  config.momentum, config.lr_warmup_epochs = probe.momentum, probe.warmup
  config.eval_every_epochs, config.checkpoint_every_epochs = EVAL_EVERY, min(0.5, epochs)   # θ before a blow-up
  if data_dir:
    config.data_dir = data_dir
  return config


def final_path(probe: Probe, epochs: float, root: str, train_examples: int) -> str:
  return os.path.join(root, probe.name(epochs, train_examples), "final.json")


def run_probe(probe: Probe, epochs: float, root: str, train_examples: int, data_dir: str = "") -> tuple[dict, bool]:
  """Trains ``probe`` in a child process unless it is done; (final record, trained)."""
  command = [sys.executable, os.path.abspath(__file__), "--probe", json.dumps(dataclasses.asdict(probe)),
             "--epochs", repr(float(epochs)), "--root", root, "--train-examples", str(train_examples),
             "--data-dir", data_dir]
  return grid_runner.run_in_child(final_path(probe, epochs, root, train_examples), command,
                                  grid_runner.cell_environment(probe, root), probe.name(epochs, train_examples))


def train_probe(probe: Probe, epochs: float, root: str, train_examples: int, data_dir: str = "") -> dict:
  """In the child: trains and writes the final record with the dead-unit fractions of the newest checkpoint."""
  config = probe_config(probe, epochs, train_examples, data_dir)
  path = final_path(probe, epochs, root, train_examples)
  return grid_runner.train_and_record(config, path, {"probe": dataclasses.asdict(probe), "epochs": epochs},
                                      extra=lambda record: {"dead": dead_units_of_run(config, os.path.dirname(path))})


# ---- dead units --------------------------------------------------------------------------------------------
def dead_fractions(model, params, images) -> dict[str, float]:
  """Per ReLU layer of ``LAYERS``: the fraction of its units (channels of a convolution) whose pre-activation
  is ≤ 0 at every position of every image: they pass no gradient, whatever the input (pure; one compiled
  program, not one per layer operation)."""
  import jax
  fractions = jax.jit(_dead_fractions, static_argnums=0)(model, params, images)
  return {layer: float(f) for layer, f in fractions.items()}


def _dead_fractions(model, params, images):
  import jax.numpy as jnp
  _, state = model.apply({"params": params}, images, capture_intermediates=True, mutable=["intermediates"])
  out = {}
  for layer in LAYERS:
    pre = state["intermediates"][layer]["__call__"][0]
    alive = jnp.any(pre > 0, axis=tuple(range(pre.ndim - 1)))
    out[layer] = 1.0 - jnp.mean(alive)
  return out


def dead_units_of_run(config, workdir: str) -> Optional[dict[str, float]]:
  """:func:`dead_fractions` of the newest checkpoint in ``workdir`` (read-only) on the first DEAD_IMAGES test
  images, with ``update``: the checkpoint's; None when no checkpoint was saved."""
  import numpy as np
  from sajax import data, models, saved_state
  dataset = data.load_dataset(config.dataset, data_dir=config.get("data_dir"))
  newest = saved_state.newest_params(config, workdir, dataset)
  if newest is None:
    return None
  images = data.make_preprocess(dataset)(np.asarray(dataset.test.images[:DEAD_IMAGES]), None)
  model = models.create_model(config.model, dataset.num_classes)
  return {**dead_fractions(model, newest[1], images), "update": newest[0]}


# ---- the report (pure) -------------------------------------------------------------------------------------
def peak_loss(history: Sequence[dict]) -> Optional[tuple[float, float]]:
  """(epoch, train loss) of the evaluation interval with the highest mean train loss (NaN counts as highest);
  None without evaluations."""
  if not history:
    return None
  worst = max(history, key=lambda r: math.inf if math.isnan(r["train_loss"]) else r["train_loss"])
  return float(worst["epoch"]), float(worst["train_loss"])


def start_weight(learners: int, policy: str) -> float:
  """Σ s(σ) over the first λ pushes, all computed on θ_0 with σ = 0, 1, …, λ − 1: 1 + H_{λ−1} (inverse), λ."""
  if policy == "constant":
    return float(learners)
  return 1.0 + sum(1.0 / s for s in range(1, learners))


def render(rows: Sequence[tuple[Probe, dict, list]], *, command: str, epochs: float, train_examples: int,
           wall_s: float, figure: str, note: str = "") -> str:
  """The report: a hand-written ``note`` (what the runs show; kept between its markers when rewritten), the
  command, the table, the arithmetic of the start, the figure."""
  from launch.reproduce_report import NOTE_END, NOTE_START
  lam = rows[0][0].learners
  base = reproduce.base_config(DATASET)
  lines = [
      f"# Why momentum {base.momentum:g} fails asynchronous learners on Fashion-MNIST", "",
      NOTE_START, note, NOTE_END, "",
      "Written by `launch/momentum_staleness.py` (the three explanations it tests are in its docstring):", "",
      "```bash", command, "```", "",
      f"Every run is the reproduction grid's cell (configs/fashion_mnist.py: α0 = {base.learning_rate:g}, chosen "
      f"on SSGD; simulated executor, λ = {lam} learners of μ = {math.ceil(128 / lam)}, the first "
      f"{train_examples:,} training images, the 10,000 test images) for its first {epochs:g} epochs, with the "
      f"momentum m and warm-up in its row; evaluated every {EVAL_EVERY:g} epoch. Train loss: the mean over the "
      "mini-batches of the last interval between evaluations; peak: the interval with the highest. Dead: the "
      "fraction of ReLU units (channels for a convolution) with no "
      f"positive pre-activation on any of {DEAD_IMAGES:,} test images, in the final checkpoint. "
      f"ln 10 = {CHANCE_LOSS:.4f} is a constant output.", "",
      "| run | seed | test error % | train loss | peak train loss (epoch) | dead conv1 / conv2 / fc1 |",
      "|---|---|---|---|---|---|"]
  for probe, f, history in rows:
    error = grid_runner.unfinished(f) or f"{100 * f['test_error']:.2f}"
    loss = "–" if f.get("train_loss") is None else f"{f['train_loss']:.4f}"
    peak = peak_loss(history)
    dead = f.get("dead")
    dead_text = " / ".join(f"{100 * dead[k]:.0f} %" for k in LAYERS) if dead else "–"
    if dead and f.get("diverged"):
      dead_text += f" (update {dead['update']}, before it diverged)"
    peak_text = "–" if peak is None else f"{peak[1]:.3g} ({peak[0]:g})"
    lines.append(f"| {probe.label} | {probe.seed} | {error} | {loss} | {peak_text} | {dead_text} |")
  lines += ["", f"The first λ = {lam} pushes are all gradients at θ_0; their summed weight s(σ) is "
            f"{start_weight(lam, 'inverse'):.2f} gradients under the inverse rule (1 + H_{{λ−1}}) and {lam} under "
            f"constant; with momentum m each is applied again, up to 1/(1 − m) times in all (10 at m = 0.9, 2 at "
            f"m = 0.5). Asynchrony with λ learners acts like momentum 1 − 1/λ = {1 - 1 / lam:.3f} (Mitliagkas et al. "
            "2016) on top of the explicit m.", "",
            f"The {len(rows)} runs took {wall_s:.0f} s in this invocation (runs already done are not rerun).", "",
            f"![train loss against epochs]({figure})", ""]
  return "\n".join(lines)


def plot(rows: Sequence[tuple[Probe, dict, list]], path: str) -> str:
  """Train loss and test error against epochs, one line per run (first seed)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from launch.reproduce_report import save_figure
  fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
  seed = rows[0][0].seed
  for i, (probe, _, h) in enumerate(r for r in rows if r[0].seed == seed):
    if not h:
      continue
    epochs = [r["epoch"] for r in h]
    losses = [r["train_loss"] if r["train_loss"] <= LOSS_TOP else LOSS_TOP for r in h]   # NaN too: off the scale
    a.plot(epochs, losses, color=f"C{i}", label=probe.label)
    off = [e for e, r in zip(epochs, h) if not r["train_loss"] <= LOSS_TOP]
    a.plot(off, [LOSS_TOP] * len(off), linestyle="none", marker="^", color=f"C{i}")
    b.plot(epochs, [100 * r["test_error"] for r in h], color=f"C{i}", label=probe.label)
  a.axhline(CHANCE_LOSS, color="grey", linestyle=":", label="ln 10 (constant output)")
  a.set(yscale="log", xlabel="epoch", ylabel="train loss (mean since the previous evaluation)",
        ylim=(0.1, 1.5 * LOSS_TOP), title=f"▲: above {LOSS_TOP:g} (the table has the value)")
  b.set(xlabel="epoch", ylabel="test error (%)", ylim=(0, 100))
  for ax in (a, b):
    ax.grid(alpha=0.3)
  a.legend(fontsize=7)
  save_figure(fig, path)
  plt.close(fig)
  return path


# ---- command line ------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  p = grid_runner.OneLineParser(prog="momentum_staleness.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--learners", type=int, default=30, help="λ (default 30); μ = ⌈128/λ⌉")
  p.add_argument("--epochs", type=float, default=2.0)
  p.add_argument("--train-examples", type=int, default=20000)
  p.add_argument("--seeds", nargs="+", type=int, default=[0])
  p.add_argument("--root", default=os.path.join("runs", "momentum"))
  p.add_argument("--out", default=os.path.join("docs", "momentum_staleness.md"))
  p.add_argument("--data-dir", default="", help="a folder with the Fashion-MNIST IDX files (default: where "
                 "sajax finds them, e.g. Debian's dataset-fashion-mnist)")
  p.add_argument("--probe", default=None, help=argparse.SUPPRESS)   # internal: train one probe
  args = p.parse_args(list(argv))
  if not 2 <= args.learners <= reproduce.BATCH_TOTAL:
    raise ValueError(f"--learners {args.learners} is invalid; allowed: integers 2..{reproduce.BATCH_TOTAL}")
  args.seeds = list(dict.fromkeys(args.seeds))
  reproduce.check_run_args(args)
  return args


def main(argv: Sequence[str]) -> int:
  try:
    args = parse_args(argv[1:])
    if args.probe is None:
      from sajax import data
      data.load_dataset(DATASET, data_dir=args.data_dir or None)   # a missing dataset: one line now
      from launch.reproduce_report import kept_note
      note = kept_note(args.out)      # a note with numbers: one line now, not after the runs
  except ValueError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return grid_runner.EXIT_BAD_INPUT
  grid_runner.quiet_logging()
  if args.probe is not None:
    return grid_runner.child_main(lambda: train_probe(Probe(**json.loads(args.probe)), args.epochs, args.root,
                                                      args.train_examples, args.data_dir))
  from sajax import metrics
  runs = probes(args.learners, args.seeds)
  start = time.perf_counter()
  try:
    finals, _ = grid_runner.run_cells(runs, lambda p: run_probe(p, args.epochs, args.root, args.train_examples,
                                                                args.data_dir),
                                      lambda p: p.name(args.epochs, args.train_examples), desc="momentum")
  except grid_runner.GridStopped as e:
    return e.code
  wall = time.perf_counter() - start
  rows = [(p, f, metrics.read_metrics(os.path.join(args.root, p.name(args.epochs, args.train_examples))))
          for p, f in zip(runs, finals)]
  folder = os.path.splitext(args.out)[0]
  os.makedirs(folder, exist_ok=True)
  png = plot(rows, os.path.join(folder, "train_loss.png"))
  command = "python launch/momentum_staleness.py " + shlex.join(argv[1:])
  grid_runner.write_text(args.out, render(rows, command=command.strip(), epochs=args.epochs,
                                          train_examples=args.train_examples, wall_s=wall, note=note,
                                          figure=os.path.relpath(png, os.path.dirname(os.path.abspath(args.out)))))
  print(f"{len(rows)} runs; report: {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
