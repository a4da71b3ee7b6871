"""launch/fault_matrix.py's results and report: one cell's outcome, results.json, docs/reliability.md.

Pure functions and file I/O only (no subprocesses): a cell's result (:class:`Cell`), the matrix's cells saved to
``<scratch>/results.json`` so a stopped matrix resumes, and the page rendered from them: the summary matrix
(✔/✘ and seconds per row × executor-protocol column), one table per row, and the command and output tail of
every ✘ cell. ``rows`` are fault_matrix's ``Row`` (key, fault, expected, command) and ``columns`` its
``Column`` (name, slug, executor).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
from typing import Optional, Sequence

RESULTS = "results.json"


@dataclasses.dataclass
class Cell:
  """One cell's result. ``ok`` None: the row does not apply here (``note`` says why) or it was not run."""

  ok: Optional[bool]
  code: str = ""
  seconds: str = ""
  reason: str = ""
  kept: str = ""
  note: str = ""
  failure: str = ""     # command and output tail of a ✘ cell


def mark(ok: Optional[bool]) -> str:
  return {True: "✔", False: "✘", None: "–"}[ok]


def summary_cell(cell: Optional[Cell]) -> str:
  """A cell of the summary matrix: '✔ 41', '✘ 300' (seconds), 'not run', or '–' where the row runs elsewhere."""
  if cell is None:
    return "not run"
  if cell.ok is None:
    return "–"
  return f"{mark(cell.ok)} {cell.seconds}"


def count(results: dict) -> tuple[int, int]:
  """(✔, ✘) over every cell that ran."""
  oks = [c.ok for cells in results.values() for c in cells.values() if c is not None and c.ok is not None]
  return sum(oks), len(oks) - sum(oks)


def load_results(scratch: str) -> tuple[dict, list]:
  """The cells and sessions saved in ``scratch``/results.json; ({}, []) when there are none."""
  path = os.path.join(scratch, RESULTS)
  if not os.path.exists(path):
    return {}, []
  with open(path) as f:
    saved = json.load(f)
  cells = {row: {slug: Cell(**cell) for slug, cell in by_slug.items()} for row, by_slug in saved["cells"].items()}
  return cells, saved["sessions"]


def save_results(scratch: str, results: dict, sessions: list) -> None:
  """Writes ``scratch``/results.json atomically."""
  path = os.path.join(scratch, RESULTS)
  cells = {row: {slug: dataclasses.asdict(cell) for slug, cell in by_slug.items()}
           for row, by_slug in results.items()}
  with open(path + ".tmp", "w") as f:
    json.dump({"cells": cells, "sessions": sessions}, f, indent=1, ensure_ascii=False)
  os.replace(path + ".tmp", path)


def results_from_report(text: str, rows: Sequence, columns: Sequence) -> tuple[dict, list]:
  """The cells and sessions a report (:func:`render`'s page) shows, for a matrix whose results.json is gone: each
  row section's table gives its ✔ and – cells in full. ✘ cells are left out (their output tails are not in the
  table), so they run again; sessions keep their lines as they are."""
  slugs = {(c.executor, c.name.split(" ", 1)[1]): c.slug for c in columns}
  keys = {row.key for row in rows}
  results: dict = {}
  row = None
  for line in text.splitlines():
    heading = re.match(r"## Row (\S+): ", line)
    if heading:
      row = heading.group(1) if heading.group(1) in keys else None
      continue
    fields = [f.strip().replace("\\|", "|") for f in re.split(r"(?<!\\)\|", line)[1:-1]]
    if row is None or len(fields) != 8 or (fields[0], fields[1]) not in slugs or fields[3] not in ("✔", "–"):
      continue
    executor, protocol, code, ok, seconds, why, kept, note = fields
    cell = Cell(ok=True, code=code, seconds=seconds, reason=why, kept=kept, note=note) if ok == "✔" else \
        Cell(ok=None, note=note)
    results.setdefault(row, {})[slugs[(executor, protocol)]] = cell
  listed = text.split("Sessions:", 1)[1].split("\n\n", 2)[1] if "Sessions:" in text else ""
  sessions = []
  for line in listed.splitlines():
    if line.startswith("* "):
      minutes = re.search(r", ([\d.]+) min, ", line)
      sessions.append({"text": line[2:], "minutes": float(minutes.group(1)) if minutes else 0.0})
  return results, sessions


# ---- the report ----------------------------------------------------------------------------------------------
def load_average() -> str:
  return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> dict:
  """nproc, load average and date at the start of a session, for the report."""
  return {"nproc": os.cpu_count(), "load": load_average(),
          "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")}


def describe_session(session: dict) -> str:
  """'2026-11-28 22:17 UTC, nproc 2, load average 9.73 11.49 10.83 → 13.10 ..., 48.2 min, 72 cells (cmd)'; a
  session read back from a report (:func:`results_from_report`) is its line as it was."""
  if "text" in session:
    return session["text"]
  load = session["load"] + (f" → {session['load_end']}" if session.get("load_end") else "")
  took = f"{session['minutes']:.1f} min" if "minutes" in session else "not finished"
  return (f"{session['date']}, `nproc` = {session['nproc']}, load average {load}, {took}, {session['cells']} cells "
          f"(`python launch/fault_matrix.py{session.get('args', '')}`)")


def render(results: dict, rows: Sequence, columns: Sequence, sessions: Sequence[dict], timeout: str, *,
           base: Sequence[str]) -> str:
  """docs/reliability.md: the summary matrix, one table per row, and the command and output of ✘ cells."""
  good, bad = count(results)
  not_run = sum(results.get(row.key, {}).get(c.slug) is None for row in rows for c in columns)
  minutes = sum(s.get("minutes", 0) for s in sessions)
  lines = [
      "# Reliability: the fault matrix",
      "",
      "The faults of README \"When things go wrong\", injected from the command line and run through the CLI as a",
      "user would, in every executor and protocol (rows 7 and 8: MPI only). Not in the matrix: a checkpoint that",
      "reads but does not fit the run (exit 2, tests/test_checkpoint.py), any other exception",
      "(tests/test_reliability.py; on an MPI rank, tests/test_mpi.py). A cell whose output holds a Python traceback",
      "is ✘ whatever else it did: every known failure ends with one line. Ray: every cell starts a local Ray, λ = 4",
      "in 2 learner actors (`--config.ray_learners_per_actor=2`); the PS lives in the driver, so row 4 kills the PS",
      "and also checks that no process of that Ray outlives it by 10 s. Killing half the learner actors and adding",
      "them back needs the Python API (`ray.kill(executor.actors[a])`, `executor.add_learner()`), so it is a test,",
      "not a row: tests/test_ray.py::test_half_the_actors_killed_and_added_back_is_a_leave_then_a_join_of_a_new_actor.",
      "Base command of every cell (λ = 4 learners, μ = 8; MPI: `mpiexec -n 2`, 2 learners per rank):",
      "",
      "```bash",
      f"[mpiexec -n 2] python launch/train.py {' '.join(base)} \\",
      "    --config.executor=X --config.protocol=Y --config.n=N <fault flags> --workdir <fresh folder>",
      "```",
      "",
      "Regenerate this page (every subprocess has a timeout, so it always ends; a timeout is a ✘). With",
      "`--scratch DIR` a stopped matrix resumes, finished cells kept; `--rows`, `--executors`, `--protocols`",
      "and `--rerun` run some cells again; `--seed-from docs/reliability.md` starts a fresh scratch from this",
      "page's cells (one column run again, the others kept as shown):",
      "",
      "```bash",
      "python launch/fault_matrix.py",
      "```",
      "",
      f"Verdict: {good} ✔, {bad} ✘" + (f", {not_run} not run" if not_run else "")
      + f"; {minutes:.1f} min in all, timeout {timeout} s per subprocess. Sessions:",
      "",
      *[f"* {describe_session(s)}" for s in sessions],
      "",
      "Each cell: ✔ (the documented outcome) or ✘, and the seconds from launch to exit (two runs: first + rerun);",
      "– where the row runs once per executor (its hardsync column). Details per row below the matrix.",
      "",
      "| row | fault | expected | " + " | ".join(c.name for c in columns) + " |",
      "|---|---|---|" + "---|" * len(columns),
  ]
  for row in rows:
    cells = results.get(row.key, {})
    lines.append(f"| {row.key} | {row.fault} | {row.expected} | "
                 + " | ".join(summary_cell(cells.get(c.slug)) for c in columns) + " |")
  for row in rows:
    lines += _row_section(row, results.get(row.key, {}), columns)
  failures = [(row, c, results[row.key][c.slug]) for row in rows for c in columns
              if results.get(row.key, {}).get(c.slug) is not None and results[row.key][c.slug].failure]
  if failures:
    lines += ["", "## Commands and output tails", ""]
    for row, column, cell in failures:
      lines += [f"Row {row.key}, {column.name} ({mark(cell.ok)}):", "", "```", cell.failure, "```", ""]
  return "\n".join(lines).rstrip() + "\n"


def _row_section(row, cells: dict, columns: Sequence) -> list[str]:
  lines = ["", f"## Row {row.key}: {row.fault}", "", f"Flags: {row.command}. Expected: {row.expected}.", "",
           "| executor | protocol | exit | ok | s | reason | kept | note |", "|---|---|---|---|---|---|---|---|"]
  for column in columns:
    cell = cells.get(column.slug)
    protocol = column.name.split(" ", 1)[1]
    if cell is None:
      lines.append(f"| {column.executor} | {protocol} | | not run | | | | |")
    elif cell.ok is None:
      lines.append(f"| {column.executor} | {protocol} | | – | | | | {cell.note} |")
    else:
      fields = [cell.code, mark(cell.ok), cell.seconds, cell.reason, cell.kept, cell.note]
      lines.append(f"| {column.executor} | {protocol} | " + " | ".join(_escape(f) for f in fields) + " |")
  return lines


def _escape(text: str) -> str:
  return text.replace("|", "\\|").replace("\n", " ")
