"""launch/fault_matrix.py and its judges (launch/fault_judges.py): reading a run's output and workdir, judging a
cell, the report.

No training here: the matrix itself is `python launch/fault_matrix.py` (docs/reliability.md).
"""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "launch"))

import fault_matrix as fm  # noqa: E402
from launch import fault_cells, fault_judges as fj  # noqa: E402

DIVERGED = ("sajax: training into runs/x\ndiverged: 100 consecutive non-finite gradients at update 3; no checkpoint "
            "was saved\nerror: diverged: 100 consecutive non-finite gradients at update 3; no checkpoint was saved\n")
FAIL_FAST = ("learner 1 died: RuntimeError: injected fault\nTraceback (most recent call last):\n  File \"x.py\"\n"
             "RuntimeError: learner 1 failed (RuntimeError: injected fault) and fail_fast is set\n")


def _launch(code, output=""):
  return fj.Launch(command="python launch/train.py", code=code, seconds=12.3, output=output)


def _workdir(tmp_path, epochs=(1.0, 2.0), steps=(32, 64), aside=(), **final):
  for step in steps:
    (tmp_path / "checkpoints" / str(step)).mkdir(parents=True)
  for name in aside:
    (tmp_path / name).mkdir()
  records = [{"epoch": e, **final} for e in epochs]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(tmp_path)


def test_reason_is_the_error_line_else_the_last_line_of_a_traceback():
  assert fj.reason(DIVERGED) == "error: diverged: 100 consecutive non-finite gradients at update 3; no checkpoint " \
                                "was saved"
  assert fj.reason(FAIL_FAST).endswith("and fail_fast is set")
  assert fj.reason("all fine\n") == ""
  assert fj.reason(FAIL_FAST + "=" * 64 + "\n") == fj.reason(FAIL_FAST)   # not a separator printed after it


def test_read_kept_finds_checkpoints_records_and_corrupt_folders(tmp_path):
  kept = fj.read_kept(_workdir(tmp_path, steps=(16, 48, 64), aside=("corrupt-32",), gradients_dropped=1))
  assert kept.exists and kept.checkpoints == (16, 48, 64) and kept.corrupt == ("corrupt-32",)
  assert kept.epochs == (1.0, 2.0) and kept.final["gradients_dropped"] == 1
  assert fj.describe_kept(kept) == "ckpt 16, 48, 64 · 2 records (epochs 1, 2) · corrupt-32"
  assert fj.describe_kept(fj.read_kept(str(tmp_path / "absent"))) == "no workdir"


def test_judges_accept_the_documented_outcome_and_nothing_else(tmp_path):
  kept = fj.read_kept(_workdir(tmp_path, gradients_dropped=1, learners_alive=3))
  assert fj.judge_dropped(_launch(0), kept) and not fj.judge_dropped(_launch(1), kept)
  assert fj.judge_diverged(_launch(3, DIVERGED))
  assert not fj.judge_diverged(_launch(3, DIVERGED + "error: again\n"))      # one line, not two
  assert not fj.judge_diverged(_launch(0, DIVERGED))
  assert fj.judge_survived(_launch(0), kept) and not fj.judge_survived(_launch(0), kept, learners=8)
  one_line = "learner 1 died: RuntimeError: injected fault\nerror: learner 1 failed (RuntimeError: injected " \
             "fault) and fail_fast is set\n"
  assert fj.judge_fail_fast(_launch(4, one_line))
  assert not fj.judge_fail_fast(_launch(1, FAIL_FAST))                      # a traceback is not one line
  assert not fj.judge_fail_fast(_launch(None, one_line))                    # a timeout is never the outcome
  assert not fj.judge_fail_fast(_launch(0, one_line))


def test_mpi_message_rows_need_the_resends_or_one_ending_line(tmp_path):
  """Row 7: rank 1 rejects the bad magic, then the bad version, asking again each time; row 7p: a corrupt push is
  rejected (async/softsync go on) or, under hardsync, ends the job with one ``rank 0:`` line and exit 5."""
  kept = fj.read_kept(_workdir(tmp_path, messages_rejected=0))
  asked = ("[rank 1] rank 1: rejected a malformed message from rank 0 (80 bytes): bad magic 0x0; asking again\n"
           "[rank 1] rank 1: rejected a malformed message from rank 0 (80 bytes): weights version 1099511627777 "
           "is past the run's last update 129; allowed: 1..129; asking again\n")
  assert fj.judge_resent(_launch(0, asked), kept)
  assert not fj.judge_resent(_launch(0, asked.split("\n")[0]), kept)          # the bad version was taken
  ending = ("rank 0: rejected a malformed message from rank 1 (40 bytes): bad magic 0x0\nrank 0: a malformed "
            "message from rank 1 may have been a gradient that protocol hardsync waits for; ending the job (rerun "
            "the same command to resume from the last checkpoint)\n")
  assert fj.judge_corrupt_push(_launch(5, ending), kept, "hardsync")
  assert fj.reason(ending).startswith("rank 0: a malformed message from rank 1 may have been")
  assert not fj.judge_corrupt_push(_launch(5, ending + "Traceback (most recent call last):\n"), kept, "hardsync")
  assert not fj.judge_corrupt_push(_launch(0, ""), kept, "async")              # nothing was rejected
  one = fj.read_kept(_workdir(tmp_path / "one", messages_rejected=1))
  assert fj.judge_corrupt_push(_launch(0, ""), one, "async") and not fj.judge_corrupt_push(_launch(0), one, "hardsync")


def test_a_silent_rank_needs_exit_5_and_one_line_naming_it():
  line = ("rank 0: no update for 20 s and rank(s) [1], whose gradients the PS waits for, sent nothing for as long "
          "(config.mpi_timeout_s): stopped answering; ending the job (rerun the same command to resume from the "
          "last checkpoint)\n")
  assert fj.judge_silent_rank(_launch(5, line))
  assert not fj.judge_silent_rank(_launch(5, line + line))                   # one line, not two
  assert not fj.judge_silent_rank(_launch(5, line.replace("[1]", "[2]")))    # names the stopped rank
  assert not fj.judge_silent_rank(_launch(None, line))                       # a timeout is never the outcome
  other = ("rank 1: RankTimeout: rank 0 sent nothing for 20 s (config.mpi_timeout_s), not even that it is alive: "
           "it stopped answering; ending the job (rerun the same command to resume from the last checkpoint)\n")
  assert fj.judge_silent_rank(_launch(5, other), rank=0) and not fj.judge_silent_rank(_launch(5, other), rank=1)


def test_resume_needs_a_killed_run_a_resumed_rerun_and_one_record_per_epoch_in_order(tmp_path):
  resumed = _launch(0, f"{fj.RESUMED} 32 (epoch 1.00)\n")
  kept = fj.read_kept(_workdir(tmp_path))
  assert fj.judge_resumed(_launch(-9), resumed, kept, epochs=(1.0, 2.0))
  assert not fj.judge_resumed(_launch(0), resumed, kept, epochs=(1.0, 2.0))     # finished before the kill
  assert not fj.judge_resumed(_launch(-9), _launch(0, "fresh start\n"), kept, epochs=(1.0, 2.0))
  assert not fj.judge_resumed(_launch(-9), resumed, kept, epochs=(1.0, 1.0, 2.0))


def test_a_corrupt_checkpoint_must_be_moved_aside_with_a_warning_and_the_previous_one_used(tmp_path):
  output = (f"checkpoint at step 32 {fj.UNREADABLE} (ValueError: x); moved it to w/corrupt-32\n"
            f"{fj.RESUMED} 16 (epoch 0.50)\n")
  kept = fj.read_kept(_workdir(tmp_path, steps=(16, 32, 64), aside=("corrupt-32",)))
  assert fj.judge_corrupt(_launch(0, output), kept, corrupt_step=32, previous_step=16)
  assert not fj.judge_corrupt(_launch(0, output), kept, corrupt_step=64, previous_step=32)
  assert not fj.judge_corrupt(_launch(2, output), kept, corrupt_step=32, previous_step=16)


def test_bad_config_needs_exit_2_one_line_and_no_workdir(tmp_path):
  line = "error: config.divergence_after=0 is invalid; allowed: an integer >= 1\n"
  absent = fj.read_kept(str(tmp_path / "run"))
  assert fj.judge_bad_config(_launch(2, line), absent)
  assert not fj.judge_bad_config(_launch(2, line), fj.read_kept(str(tmp_path)))
  assert not fj.judge_bad_config(_launch(2, line + "Traceback (most recent call last):\n"), absent)
  assert not fj.judge_bad_config(_launch(1, line), absent)


def test_a_cell_whose_output_holds_a_traceback_fails_whatever_its_row_judged(tmp_path):
  """Every known failure ends with one line: a traceback anywhere in a cell's runs (here the learner's own log
  before the one error line, or the first of two runs) makes it ✘, with a note."""
  kept = fj.read_kept(_workdir(tmp_path, learners_alive=3))
  one_line = "learner 1 died (RuntimeError: injected fault)\nerror: learner 1 failed and fail_fast is set\n"
  traced = "learner 1 died: RuntimeError: injected fault\nTraceback (most recent call last):\n  File \"x.py\"\n" \
           + one_line
  assert fm.cell_result(True, [_launch(4, one_line)], kept).ok
  assert not fj.judge_fail_fast(_launch(4, traced))
  cell = fm.cell_result(True, [_launch(0, traced)], kept, note="learners_alive = 3")
  assert cell.ok is False and cell.note == "learners_alive = 3; a traceback in the output" and cell.failure
  assert fm.cell_result(True, [_launch(-9, traced), _launch(0, "resumed")], kept).ok is False


def test_a_damaged_config_must_be_one_line_naming_it_with_the_workdir_unchanged(tmp_path):
  line = "error: saved run config 'w/config.json' is not readable JSON (...); allowed: ...\n"
  before = fj.read_kept(_workdir(tmp_path / "run"))
  (tmp_path / "w").mkdir()
  assert fj.judge_damaged_config(_launch(2, line), before, before, config_kept=True)
  assert not fj.judge_damaged_config(_launch(2, line), before, before, config_kept=False)   # overwritten
  assert not fj.judge_damaged_config(_launch(2, line), before, fj.read_kept(_workdir(tmp_path / "w", steps=(32,))),
                                     config_kept=True)                                    # checkpoints lost
  assert not fj.judge_damaged_config(_launch(1, line), before, before, config_kept=True)
  assert not fj.judge_damaged_config(_launch(2, "Traceback (most recent call last):\n" + line), before, before,
                                     config_kept=True)
  assert not fj.judge_damaged_config(_launch(2, "error: learners=0 is invalid\n"), before, before, config_kept=True)


def test_corrupt_overwrites_every_file_with_garbage_of_its_length(tmp_path):
  (tmp_path / "d").mkdir()
  (tmp_path / "d" / "a").write_bytes(b"x" * 200)
  (tmp_path / "b").write_bytes(b"")
  assert fm.corrupt(str(tmp_path)) == 2
  assert len((tmp_path / "d" / "a").read_bytes()) == 200 and b"x" not in (tmp_path / "d" / "a").read_bytes()
  assert len((tmp_path / "b").read_bytes()) == 64


def test_mpi_commands_wrap_the_train_command_in_mpiexec_and_ray_ones_put_2_learners_per_actor():
  threads = fm.COLUMNS[0]
  mpi, ray = (next(c for c in fm.COLUMNS if c.executor == e) for e in ("mpi", "ray"))
  assert fm.train_command(ray, "w")[:2] == ["python", fm.TRAIN]
  assert "--config.executor=ray" in fm.train_command(ray, "w") and "--config.ray_learners_per_actor=2" in \
      fm.train_command(ray, "w") and "--config.ray_learners_per_actor=2" not in fm.train_command(threads, "w")
  assert fm.train_command(threads, "w")[:2] == ["python", fm.TRAIN]
  assert fm.train_command(mpi, "w", "--config.epochs=1")[:5] == ["mpiexec", "-n", "2", "python", fm.TRAIN]
  assert fm.train_command(mpi, "w", "--config.epochs=1")[-3:] == ["--config.epochs=1", "--workdir", "w"]
  assert fault_cells.executable(fm.train_command(mpi, "w"))[3] == sys.executable


def test_report_counts_cells_and_marks_the_missing_ones_not_run():
  rows, columns = fm.ROWS[:2], fm.COLUMNS[:2]
  results = {"1": {columns[0].slug: fm.Cell(ok=True, code="0", seconds="41", kept="ckpt 32"),
                   columns[1].slug: fm.Cell(ok=False, code="timeout", seconds="300", failure="$ cmd\nlast line")}}
  sessions = [{"nproc": 2, "load": "1.00 1.00 1.00", "date": "today", "cells": 2, "minutes": 1.5}]
  text = fm.render(results, rows, columns, sessions, "300")
  assert fm.count(results) == (1, 1)
  assert "1 ✔, 1 ✘, 2 not run; 1.5 min in all" in text
  assert "| ✔ 41 | ✘ 300 |" in text and "| not run | not run |" in text
  assert "$ cmd\nlast line" in text


def test_a_report_gives_back_its_passed_and_not_applicable_cells_and_its_sessions():
  """--seed-from: the cells a rendered page shows come back as they were (a reason with a | in it too); a ✘ cell
  is left out (its output tail is not in the tables), so it runs again."""
  rows, columns = fm.ROWS[:5], fm.COLUMNS
  mpi = next(c for c in columns if c.executor == "mpi")
  results = {"1": {columns[0].slug: fm.Cell(ok=True, code="0", seconds="41", kept="ckpt 32 · 1 records (epochs 1)",
                                            note="gradients_dropped = 1")},
             "2": {columns[1].slug: fm.Cell(ok=True, code="3", seconds="12", reason="error: a | b", note="x")},
             "3ff": {columns[1].slug: fm.Cell(ok=None, note="once per executor (hardsync)"),
                     mpi.slug: fm.Cell(ok=False, code="1", seconds="9", failure="$ cmd\nlast")}}
  sessions = [{"nproc": 2, "load": "1.00 1.00 1.00", "date": "today", "cells": 3, "minutes": 1.5, "args": " --rows 1"}]
  text = fm.render(results, rows, columns, sessions, "300")
  back, read_sessions = fm.fault_report.results_from_report(text, rows, columns)
  assert back == {"1": results["1"], "2": results["2"], "3ff": {columns[1].slug: results["3ff"][columns[1].slug]}}
  assert read_sessions == [{"text": fm.fault_report.describe_session(sessions[0]), "minutes": 1.5}]
  assert fm.render(back, rows, columns, read_sessions, "300").count("today, `nproc` = 2") == 1


@pytest.mark.parametrize("argv", [["--rows", "9"], ["--executors", "pmap"], ["--timeout", "0"],
                                  ["--seed-from", "/nonexistent/report.md"]])
def test_bad_arguments_exit_2_with_one_line(argv, capsys, tmp_path):
  assert fm.main([*argv, "--out", str(tmp_path / "r.md")]) == 2
  assert capsys.readouterr().err.startswith("error: ")
  assert not (tmp_path / "r.md").exists()


def test_results_survive_a_stopped_matrix(tmp_path):
  results = {"4": {"mpi-async": fm.Cell(ok=False, code="1 → 0", seconds="31 + 33", note="rank 1 killed")}}
  sessions = [{"nproc": 2, "load": "1.00 1.00 1.00", "date": "today", "cells": 1}]
  fm.save_results(str(tmp_path), results, sessions)
  assert fm.load_results(str(tmp_path)) == (results, sessions)
  assert fm.load_results(str(tmp_path / "fresh")) == ({}, [])
