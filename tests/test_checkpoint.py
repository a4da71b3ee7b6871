"""Checkpoints are moved aside only when they are unreadable as checkpoints; metrics are never emptied."""

import json
import logging
import os

import numpy as np
import pytest

from sajax import metrics as metrics_lib
from sajax.checkpoint import Checkpointer, CheckpointMismatch


def _save(directory, steps, size=3):
  ckpt = Checkpointer(str(directory))
  for step in steps:
    ckpt.save(step, {"params": {"w": np.full(size, float(step), np.float32)}}, {"updates": step})
  ckpt.close()


def test_a_checkpoint_that_does_not_fit_the_run_is_left_alone_with_one_line(tmp_path):
  _save(tmp_path / "checkpoints", [1, 2])
  ckpt = Checkpointer(str(tmp_path / "checkpoints"))
  with pytest.raises(CheckpointMismatch, match=r"checkpoints/2 does not fit this run's state .*nothing was moved"):
    ckpt.restore_latest({"params": {"w": np.zeros(4, np.float32)}})   # another model: 4 weights, not 3
  assert ckpt.steps() == [1, 2] and not [p for p in os.listdir(tmp_path) if p.startswith("corrupt")]
  ckpt.close()


def test_a_damaged_checkpoint_is_moved_aside_with_the_reason_and_the_previous_one_used(tmp_path, caplog):
  _save(tmp_path / "checkpoints", [1, 2])
  for root, _, files in os.walk(tmp_path / "checkpoints" / "2" / "state"):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\x00garbage")
  ckpt = Checkpointer(str(tmp_path / "checkpoints"))
  with caplog.at_level(logging.WARNING, logger="sajax"):
    step, state, meta = ckpt.restore_latest({"params": {"w": np.zeros(3, np.float32)}})
  ckpt.close()
  assert step == 1 and meta == {"updates": 1}
  np.testing.assert_array_equal(state["params"]["w"], np.ones(3))
  assert os.path.isdir(tmp_path / "corrupt-2")
  warning = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
  assert warning and "step 2" in warning[0] and "corrupt-2" in warning[0]


def test_a_fresh_start_keeps_the_earlier_metrics_instead_of_emptying_them(tmp_path):
  (tmp_path / "metrics.jsonl").write_text(json.dumps({"updates": 5, "test_error": 0.1}) + "\n")
  aside = metrics_lib.set_aside_orphaned_metrics(str(tmp_path))
  assert aside.endswith("metrics.orphaned-1.jsonl") and not (tmp_path / "metrics.jsonl").exists()
  assert json.loads(open(aside).read())["updates"] == 5
  assert metrics_lib.set_aside_orphaned_metrics(str(tmp_path)) is None     # nothing left to keep
