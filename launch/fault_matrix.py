#!/usr/bin/env python
"""The fault matrix of docs/reliability.md in one command: every fault, run through the CLI as a user would.

``python launch/fault_matrix.py [--out docs/reliability.md] [--rows 1,2,...] [--executors threads,...]
[--protocols hardsync,...] [--timeout 300] [--scratch DIR] [--rerun] [--seed-from docs/reliability.md]``

Rows (README "When things go wrong"): a non-finite gradient; every gradient non-finite (divergence); a learner
that raises (and the same with ``fail_fast``); kill -9 mid-run then the same command again; a corrupt newest
checkpoint; a bad config; a damaged config.json in the workdir being resumed; MPI only: corrupt messages from
rank 0 (weights, a version) and from rank 1 (a push), and a rank that stops answering (kill -STOP). Columns:
executor {threads, simulated, mpi (``mpiexec -n 2``, λ = 4 over 2 ranks), ray (a local Ray per run, λ = 4 in 2
learner actors; row 4 kills the PS, which is the driver, and counts the Ray processes that outlive it)}
× protocol {hardsync, softsync n = 2, async}. Every cell is ``python launch/train.py --config
configs/smoke.py`` with λ = 4, μ = 8, momentum 0.5, in a workdir of its own under ``--scratch``; every
subprocess has a timeout (a timeout is a ✘ cell), so the matrix always ends, and a cell whose output holds a
Python traceback is ✘ whatever else it did (every known failure ends with one line). Each cell records the exit code,
whether the outcome is the documented one (✔/✘), the seconds from launch to exit, the one-line reason, and what
was kept (checkpoint steps, metrics.jsonl records, corrupt-* folders). The report is rewritten after every
cell, cells not yet run marked "not run", so an interrupted matrix still leaves its numbers; the cells are
saved in ``<scratch>/results.json``, so the same ``--scratch`` resumes a stopped matrix (``--rerun`` runs the
chosen cells again) and the report always covers the whole matrix; ``--seed-from`` starts a scratch without
results.json from the cells a report shows (to run one column again and keep the others). Whether a cell's outcome is its row's is
decided by the pure judges of launch/fault_judges.py; the report is launch/fault_report.py's; the columns, a cell's
command and its runner are launch/fault_cells.py's.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from launch import fault_report, timed_launch  # noqa: E402
from launch.fault_report import Cell, count, load_average, load_results, machine, save_results  # noqa: E402
from launch.fault_judges import (REJECTED_BY_RANK_1, RESUMED, code_text, describe_kept, judge_bad_config,  # noqa: E402
                                 judge_corrupt, judge_corrupt_push, judge_damaged_config, judge_diverged,
                                 judge_dropped, judge_fail_fast, judge_resent, judge_resumed, judge_silent_rank,
                                 judge_survived, read_kept, reason)
from launch.fault_cells import (BASE, COLUMNS, EXECUTORS, NAN_ALL, PROTOCOLS, RAY_LEFT_WAIT_S,  # noqa: E402
                                TIMEOUT_S, TRAIN, Column, Matrix, cell_result, failure, train_command)


# ---- the rows -----------------------------------------------------------------------------------------------
def row_nan(matrix: Matrix, column: Column) -> Cell:
  """Learner 2's gradient at its step 3 is NaN: dropped, counted once, the run finishes."""
  workdir = matrix.workdir("1", column)
  run = matrix.launch(train_command(column, workdir, "--config.nan_learners=(2,)", "--config.nan_at_step=3",
                                    "--config.epochs=1"), f"1-{column.slug}")
  kept = read_kept(workdir)
  return cell_result(judge_dropped(run, kept), [run], kept,
               note=f"gradients_dropped = {kept.final.get('gradients_dropped')}")


def row_diverged(matrix: Matrix, column: Column) -> Cell:
  """α0 = 1e9 (the issue's command); where that does not end as diverged, every gradient NaN instead."""
  workdir = matrix.workdir("2", column)
  run = matrix.launch(train_command(column, workdir, "--config.learning_rate=1e9"), f"2-{column.slug}")
  if judge_diverged(run):
    return cell_result(True, [run], read_kept(workdir), note="--config.learning_rate=1e9")
  first = f"--config.learning_rate=1e9 gave exit {code_text(run)}: {reason(run.output) or 'no reason'}"
  workdir = matrix.workdir("2", column, "-nan")
  fallback = matrix.launch(train_command(column, workdir, *NAN_ALL), f"2-{column.slug}-nan")
  cell = cell_result(judge_diverged(fallback), [fallback], read_kept(workdir),
               note=f"{first}; used {' '.join(NAN_ALL)}")
  cell.failure = failure(run, fallback) if not cell.ok else failure(run)
  return cell


def row_raises(matrix: Matrix, column: Column) -> Cell:
  """Learner 1 raises at its step 3: reported, the run goes on with λ − 1 learners."""
  workdir = matrix.workdir("3", column)
  run = matrix.launch(train_command(column, workdir, "--config.fault_learner=1", "--config.fault_at_step=3",
                                    "--config.epochs=1"), f"3-{column.slug}")
  kept = read_kept(workdir)
  return cell_result(judge_survived(run, kept), [run], kept,
                     note=f"learners_alive = {kept.final.get('learners_alive')}")


def row_fail_fast(matrix: Matrix, column: Column) -> Cell:
  """The same fault with fail_fast: the run stops with exit 4 and one line naming the reason."""
  if column.protocol != "hardsync":
    return Cell(ok=None, note="once per executor (hardsync)")
  workdir = matrix.workdir("3ff", column)
  run = matrix.launch(train_command(column, workdir, "--config.fault_learner=1", "--config.fault_at_step=3",
                                    "--config.fail_fast=True", "--config.epochs=1"), f"3ff-{column.slug}")
  return cell_result(judge_fail_fast(run), [run], read_kept(workdir))


def row_kill(matrix: Matrix, column: Column) -> Cell:
  """kill -9 once the first checkpoint exists (MPI: rank 1; ray: the driver, which is the PS), then the same
  command again. Under ray, no process of the killed run's local Ray may outlive it by RAY_LEFT_WAIT_S."""
  workdir = matrix.workdir("4", column)
  argv = train_command(column, workdir)
  killed_at: list[float] = []
  below: list[int] = []             # the killed process's descendants (its local Ray's processes)
  start = time.monotonic()

  def kill_after_first_checkpoint(process: subprocess.Popen) -> None:
    if killed_at or not read_kept(workdir).checkpoints:
      return
    pid = timed_launch.rank_pid(process.pid, 1, TRAIN) if column.executor == "mpi" else process.pid
    if pid is not None:
      below.extend(timed_launch.descendants(pid))
      os.kill(pid, signal.SIGKILL)
      killed_at.append(time.monotonic() - start)

  killed = matrix.launch(argv, f"4-{column.slug}-killed", during=kill_after_first_checkpoint)
  left = timed_launch.still_running(below, RAY_LEFT_WAIT_S) if column.executor == "ray" else []
  before = describe_kept(read_kept(workdir))
  rerun = matrix.launch(argv, f"4-{column.slug}-rerun")
  kept = read_kept(workdir)
  ok = bool(killed_at) and judge_resumed(killed, rerun, kept, epochs=(1.0, 2.0)) and not left
  when = f"killed at {killed_at[0]:.0f} s" if killed_at else "never killed"
  who = {"mpi": "rank 1", "ray": "the PS (driver)"}.get(column.executor, "the process")
  orphans = (f"; {len(left)} of its {len(below)} Ray processes alive {RAY_LEFT_WAIT_S} s later"
             if column.executor == "ray" else "")
  return cell_result(ok, [killed, rerun], kept, seconds=f"{killed.seconds:.0f} + {rerun.seconds:.0f}",
               note=f"{who} {when}{orphans}, kept {before}; rerun: "
                    + ("resumed" if RESUMED in rerun.output else "did not say it resumed"))


def corrupt(folder: str) -> int:
  """Overwrites every file under ``folder`` with garbage of its own length (at least 64 bytes); their count."""
  files = 0
  for parent, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(parent, name)
      size = max(os.path.getsize(path), 64)
      with open(path, "wb") as f:
        f.write((b"not a checkpoint \xff\x00" * (size // 19 + 1))[:size])
      files += 1
  return files


def row_corrupt(matrix: Matrix, column: Column) -> Cell:
  """A finished 1-epoch run (checkpoints every half epoch), its newest checkpoint's state overwritten with
  garbage, then rerun with --config.epochs=2: corrupt-<step>, a warning, resumed from the previous one."""
  workdir = matrix.workdir("5", column)
  every = "--config.checkpoint_every_epochs=0.5"
  first = matrix.launch(train_command(column, workdir, every, "--config.epochs=1"), f"5-{column.slug}-first")
  steps = read_kept(workdir).checkpoints
  if first.code != 0 or len(steps) < 2:
    return cell_result(False, [first], read_kept(workdir), note=f"the first run left checkpoints {steps}")
  newest, previous = steps[-1], steps[-2]
  files = corrupt(os.path.join(workdir, "checkpoints", str(newest), "state"))
  rerun = matrix.launch(train_command(column, workdir, every, "--config.epochs=2"), f"5-{column.slug}-rerun")
  kept = read_kept(workdir)
  return cell_result(judge_corrupt(rerun, kept, newest, previous), [first, rerun], kept,
               seconds=f"{first.seconds:.0f} + {rerun.seconds:.0f}",
               note=f"{files} files of checkpoints/{newest}/state garbled; expected resume from {previous}")


def row_damaged_config(matrix: Matrix, column: Column) -> Cell:
  """A finished 1-epoch run whose config.json is then truncated, rerun with the same command: one line naming
  the file, exit 2, nothing in the workdir changed."""
  if column.protocol != "hardsync":
    return Cell(ok=None, note="executor-independent: once per executor")
  workdir = matrix.workdir("6c", column)
  argv = train_command(column, workdir, "--config.epochs=1")
  first = matrix.launch(argv, f"6c-{column.slug}-first")
  path = os.path.join(workdir, "config.json")
  if first.code != 0 or not os.path.exists(path):
    return cell_result(False, [first], read_kept(workdir), note="the first run did not finish")
  with open(path, "rb") as f:
    damaged = f.read()[:40]           # cut mid-object, as a full disk or a crash while copying leaves it
  with open(path, "wb") as f:
    f.write(damaged)
  before = read_kept(workdir)
  rerun = matrix.launch(argv, f"6c-{column.slug}-rerun")
  with open(path, "rb") as f:
    kept_bytes = f.read() == damaged
  after = read_kept(workdir)
  return cell_result(judge_damaged_config(rerun, before, after, kept_bytes), [first, rerun], after,
               seconds=f"{first.seconds:.0f} + {rerun.seconds:.0f}",
               note="workdir unchanged" if after == before and kept_bytes else "workdir changed")


def bad_config_row(key: str, override: str) -> Callable[[Matrix, Column], Cell]:
  """Row 6: ``override`` is refused with exit 2 and one line, before the workdir is created."""

  def row(matrix: Matrix, column: Column) -> Cell:
    if column.protocol != "hardsync":
      return Cell(ok=None, note="executor-independent: once per executor")
    workdir = matrix.workdir(key, column)
    run = matrix.launch(train_command(column, workdir, override), f"{key}-{column.slug}")
    kept = read_kept(workdir)
    return cell_result(judge_bad_config(run, kept), [run], kept,
                 note="workdir not created" if not kept.exists else "workdir created")
  row.__doc__ = f"Bad config {override}: exit 2, one error: line, no workdir."
  return row


def row_mpi_messages(matrix: Matrix, column: Column) -> Cell:
  """MPI only: rank 0 corrupts the first weights message to rank 1 (bad magic) and the first one after the start
  (a version 2⁴⁰ ahead); rank 1 rejects each, asks again (RESEND) and the run finishes."""
  if column.executor != "mpi":
    return Cell(ok=None, note="MPI only")
  workdir = matrix.workdir("7", column)
  run = matrix.launch(train_command(column, workdir, "--config.fault_mpi_corrupt_weights=1",
                                    "--config.fault_mpi_corrupt_version=1", "--config.epochs=1"), f"7-{column.slug}")
  kept = read_kept(workdir)
  asked = sum(REJECTED_BY_RANK_1 in line and "asking again" in line for line in run.output.splitlines())
  return cell_result(judge_resent(run, kept), [run], kept, note=f"rank 1 asked again {asked} times")


def row_mpi_push(matrix: Matrix, column: Column) -> Cell:
  """MPI only: rank 1 corrupts its first gradient; rank 0 rejects it (it cannot tell whose it was)."""
  if column.executor != "mpi":
    return Cell(ok=None, note="MPI only")
  workdir = matrix.workdir("7p", column)
  run = matrix.launch(train_command(column, workdir, "--config.fault_mpi_corrupt_pushes=1", "--config.epochs=1"),
                      f"7p-{column.slug}")
  kept = read_kept(workdir)
  return cell_result(judge_corrupt_push(run, kept, column.protocol), [run], kept,
               note=f"messages_rejected = {kept.final.get('messages_rejected')}" if run.code == 0 else "")


SILENT_AFTER_S = 20   # row 8's --config.mpi_timeout_s


def silent_rank_row(key: str, rank: int) -> Callable[[Matrix, Column], Cell]:
  """MPI only: ``rank`` is stopped (SIGSTOP) once the first checkpoint exists; the other rank gives up on it after
  ``mpi_timeout_s`` and ends the job with one line naming it."""

  def row(matrix: Matrix, column: Column) -> Cell:
    if column.executor != "mpi":
      return Cell(ok=None, note="MPI only")
    workdir = matrix.workdir(key, column)
    stopped_at: list[float] = []
    start = time.monotonic()

    def stop_after_first_checkpoint(process: subprocess.Popen) -> None:
      if stopped_at or not read_kept(workdir).checkpoints:
        return
      pid = timed_launch.rank_pid(process.pid, rank, TRAIN)
      if pid is not None:
        os.kill(pid, signal.SIGSTOP)
        stopped_at.append(time.monotonic() - start)

    run = matrix.launch(train_command(column, workdir, f"--config.mpi_timeout_s={SILENT_AFTER_S}"),
                        f"{key}-{column.slug}", during=stop_after_first_checkpoint)
    when = f"rank {rank} stopped at {stopped_at[0]:.0f} s" if stopped_at else f"rank {rank} never stopped"
    return cell_result(bool(stopped_at) and judge_silent_rank(run, rank), [run], read_kept(workdir), note=when)
  row.__doc__ = silent_rank_row.__doc__.replace("``rank``", f"rank {rank}")
  return row


@dataclasses.dataclass(frozen=True)
class Row:
  key: str
  fault: str
  command: str
  expected: str
  run: Callable[[Matrix, Column], Cell]


ROWS = (
    Row("1", "non-finite gradient at learner 2, its step 3",
        "`--config.nan_learners='(2,)' --config.nan_at_step=3 --config.epochs=1`",
        "exit 0, gradients_dropped = 1", row_nan),
    Row("2", "every gradient non-finite (divergence)", "`--config.learning_rate=1e9`",
        "exit 3, one `error: diverged: ...` line", row_diverged),
    Row("3", "a learner raises (learner 1, its step 3)",
        "`--config.fault_learner=1 --config.fault_at_step=3 --config.epochs=1`",
        "exit 0, learners_alive = λ − 1 = 3", row_raises),
    Row("3ff", "the same with fail_fast", "row 3 + `--config.fail_fast=True`",
        "exit 4, one `error:` line naming fail_fast", row_fail_fast),
    Row("4", "kill -9 after the first checkpoint (MPI: rank 1; ray: the PS, which is the driver), rerun the same "
             "command", "base command (2 epochs), twice",
        "rerun exits 0, says it resumed, metrics.jsonl epochs 1, 2 in order; ray: none of the killed run's Ray "
        f"processes left {RAY_LEFT_WAIT_S} s later", row_kill),
    Row("5", "newest checkpoint corrupt",
        "`--config.checkpoint_every_epochs=0.5 --config.epochs=1`; garble `checkpoints/<newest>/state/*`; "
        "rerun with `--config.epochs=2`",
        "exit 0, `corrupt-<newest>`, a warning, resumed from the previous checkpoint", row_corrupt),
    Row("6a", "bad config: learner id out of range", "`--config.nan_learners='(9,)'`",
        "exit 2, one `error:` line, workdir not created", bad_config_row("6a", "--config.nan_learners=(9,)")),
    Row("6b", "bad config: divergence bound 0", "`--config.divergence_after=0`",
        "exit 2, one `error:` line, workdir not created", bad_config_row("6b", "--config.divergence_after=0")),
    Row("6c", "damaged config.json in the workdir being resumed",
        "`--config.epochs=1`; cut `config.json` to its first 40 bytes; rerun the same command",
        "exit 2, one `error:` line naming config.json, workdir unchanged", row_damaged_config),
    Row("7", "MPI: corrupt weights to rank 1 (bad magic, then a version 2⁴⁰ ahead)",
        "`--config.fault_mpi_corrupt_weights=1 --config.fault_mpi_corrupt_version=1 --config.epochs=1`",
        "exit 0, rank 1 rejects both and asks again (RESEND)", row_mpi_messages),
    Row("7p", "MPI: a corrupt push from rank 1", "`--config.fault_mpi_corrupt_pushes=1 --config.epochs=1`",
        "async, softsync: exit 0, messages_rejected = 1; hardsync: exit 5, one `rank 0: ... ending the job` line",
        row_mpi_push),
    Row("8", "MPI: rank 1 stops answering (kill -STOP after the first checkpoint)",
        f"base command + `--config.mpi_timeout_s={SILENT_AFTER_S}`",
        "exit 5, one `rank 0: ... ending the job` line naming rank 1", silent_rank_row("8", 1)),
    Row("8r0", "MPI: rank 0 (the PS) stops answering (kill -STOP after the first checkpoint)",
        f"base command + `--config.mpi_timeout_s={SILENT_AFTER_S}`",
        "exit 5, one `rank 1: ... ending the job` line naming rank 0", silent_rank_row("8r0", 0)),
)


# ---- the report (launch/fault_report.py) ----------------------------------------------------------------------
def render(results: dict, rows: Sequence[Row], columns: Sequence[Column], sessions: Sequence[dict],
           timeout: str) -> str:
  """docs/reliability.md for this matrix: :func:`fault_report.render` with the matrix's base command."""
  return fault_report.render(results, rows, columns, sessions, timeout, base=BASE)


# ---- the command --------------------------------------------------------------------------------------------
def _pick(text: Optional[str], allowed: Sequence[str], what: str) -> list[str]:
  if not text:
    return list(allowed)
  picked = [t.strip() for t in text.split(",") if t.strip()]
  for p in picked:
    if p not in allowed:
      raise ValueError(f"--{what} {p!r} is invalid; allowed: {', '.join(allowed)}")
  return picked


def _read(path: str) -> str:
  try:
    with open(path) as f:
      return f.read()
  except OSError as e:
    raise ValueError(f"--seed-from {path!r} cannot be read ({e.strerror}); allowed: a report this command "
                     "wrote") from None


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=os.path.join(ROOT, "docs", "reliability.md"))
  parser.add_argument("--rows", help="comma-separated row keys (default: all): "
                                     + ", ".join(r.key for r in ROWS))
  parser.add_argument("--executors", help="comma-separated (default: all): " + ", ".join(EXECUTORS))
  parser.add_argument("--protocols", help="comma-separated (default: all): " + ", ".join(p for p, _ in PROTOCOLS))
  parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per subprocess")
  parser.add_argument("--scratch", help="folder for the runs' workdirs, logs and results.json (default: a fresh "
                                        "temp folder); an existing one resumes, its finished cells kept")
  parser.add_argument("--rerun", action="store_true", help="run the chosen cells again even if finished")
  parser.add_argument("--seed-from", help="a report (docs/reliability.md) whose cells a scratch without "
                                          "results.json starts from, ✘ cells left to run again")
  return parser.parse_args(argv)


def main(argv: Sequence[str]) -> int:
  args = parse_args(argv)
  try:
    keys = _pick(args.rows, [r.key for r in ROWS], "rows")
    executors = _pick(args.executors, EXECUTORS, "executors")
    protocols = _pick(args.protocols, [p for p, _ in PROTOCOLS], "protocols")
    if not args.timeout > 0:
      raise ValueError(f"--timeout {args.timeout} is invalid; allowed: seconds > 0")
    seed = _read(args.seed_from) if args.seed_from else ""
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  scratch = args.scratch or tempfile.mkdtemp(prefix="sajax-fault-matrix-")
  results, sessions = load_results(scratch)
  if not results and seed:
    results, sessions = fault_report.results_from_report(seed, ROWS, COLUMNS)
  todo = [(row, column) for row in ROWS if row.key in keys for column in COLUMNS
          if column.executor in executors and column.protocol in protocols
          and (args.rerun or results.get(row.key, {}).get(column.slug) is None)]
  flags = "".join(f" --{k} {v}" for k, v in (("rows", args.rows), ("executors", args.executors),
                                              ("protocols", args.protocols)) if v)
  session = {**machine(), "args": flags + (" --rerun" if args.rerun else ""), "cells": 0}
  if todo:                     # a session that runs nothing only rewrites the report
    sessions.append(session)
  start = time.monotonic()

  def report(matrix: Matrix) -> None:
    session["minutes"] = (time.monotonic() - start) / 60
    save_results(scratch, matrix.results, sessions)
    with open(args.out, "w") as f:
      f.write(render(matrix.results, ROWS, COLUMNS, sessions, f"{args.timeout:g}"))

  matrix = Matrix(scratch, args.timeout, report, results)
  print(f"fault matrix: {len(todo)} cells into {scratch}, report {args.out}", file=sys.stderr, flush=True)
  for row, column in todo:
    print(f"row {row.key} {column.name}", file=sys.stderr, flush=True)
    for old in glob.glob(matrix.workdir(row.key, column) + "*"):   # a cell always starts from a fresh workdir
      shutil.rmtree(old, ignore_errors=True)
    cell = row.run(matrix, column)
    session["cells"] += 1
    matrix.record(row.key, column, cell)
  session["load_end"] = load_average()
  report(matrix)
  good, bad = count(matrix.results)
  print(f"fault matrix: {good} ✔, {bad} ✘ in {session['minutes']:.1f} min; {args.out}", file=sys.stderr)
  return 0 if bad == 0 else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
