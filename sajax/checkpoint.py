"""Orbax checkpoints of a run: a pytree of arrays (params, optimizer state, ...) plus JSON metadata
(sampler states, counters), written atomically, the last few kept, resumed from the newest readable one.

A latest checkpoint that cannot be read as a checkpoint (corrupt or partial files) is moved aside to
``corrupt-<step>`` with the reason in a warning, never deleted, and the previous one is used instead. A
checkpoint that reads fine but does not fit this run's state (a code, library or model change) is *not*
moved: :class:`CheckpointMismatch` says so, and nothing is touched.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Callable, Optional, Union

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger("sajax")


class CheckpointMismatch(ValueError):
  """A readable checkpoint whose state does not fit the run restoring it (one line, nothing moved)."""


class Checkpointer:
  """Saves and restores ``(state pytree, meta dict)`` pairs under ``directory`` by update step."""

  def __init__(self, directory: str, *, keep: int = 3) -> None:
    self.directory = os.path.abspath(directory)
    # Under jax.distributed (pmap over mpiexec processes) only process 0 checkpoints: its own, single-process
    # manager, with no cross-process barriers.
    only_me = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                                 active_processes={jax.process_index()})
    os.makedirs(self.directory, exist_ok=True)   # orbax cannot create it with active_processes set
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=False, enable_async_checkpointing=False,
                                           multiprocessing_options=only_me)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

  def steps(self) -> list[int]:
    """Steps with a finished checkpoint, oldest first."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Writes checkpoint ``step`` (atomically: orbax writes a temporary folder, then renames it)."""
    if step in self._manager.all_steps():
      return
    if jax.process_count() > 1:   # orbax saves device arrays collectively across processes: hand it host copies
      state = jax.tree.map(np.asarray, state)
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    self._manager.save(step, args=args, force=True)
    self._manager.wait_until_finished()

  def restore_latest(self, target: Union[Any, Callable[[dict], Any]]) -> Optional[tuple[int, Any, dict]]:
    """The newest readable checkpoint as ``(step, state, meta)``, or None when there is none.

    ``target`` is a pytree with the structure, shapes and dtypes of the saved state (e.g. a fresh init), or a
    function of the checkpoint's meta returning one (for state whose shapes the meta records). Leaves that
    are numpy arrays in the target come back as numpy arrays.
    """
    for step in reversed(self.steps()):
      try:
        meta = dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
      except Exception as e:  # noqa: BLE001 - unreadable metadata: the checkpoint is damaged
        self._set_aside(step, e)
        continue
      step_target = target(meta) if callable(target) else target
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, step_target)
      if jax.process_count() > 1:
        abstract = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), step_target)
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        _check_shapes(restored["state"], step_target)
        return step, restored["state"], meta
      except Exception as e:  # noqa: BLE001 - damaged, or not this run's state: told apart below
        if self._readable(step):
          raise CheckpointMismatch(
              f"checkpoint {os.path.join(self.directory, str(step))} does not fit this run's state "
              f"({type(e).__name__}: {_first_line(e)}); allowed: the code and config that wrote it, or a fresh "
              "--workdir (nothing was moved or deleted)") from None
        self._set_aside(step, e)
    return None

  def _readable(self, step: int) -> bool:
    """Whether checkpoint ``step``'s state reads as saved, without a target (i.e. its files are intact)."""
    try:
      self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
      return True
    except Exception:  # noqa: BLE001 - any failure to read it as saved means damaged files
      return False

  def _set_aside(self, step: int, error: BaseException) -> None:
    aside = self._move_aside(step)
    log.warning("checkpoint at step %d is unreadable (%s: %s); moved it to %s and falling back to the "
                "previous one", step, type(error).__name__, _first_line(error), aside)

  def _move_aside(self, step: int) -> str:
    src = os.path.join(self.directory, str(step))
    dst = os.path.join(os.path.dirname(self.directory), f"corrupt-{step}")
    k = 1
    while os.path.exists(dst):
      k += 1
      dst = os.path.join(os.path.dirname(self.directory), f"corrupt-{step}.{k}")
    shutil.move(src, dst)
    self._manager.reload()
    return dst

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _check_shapes(restored: Any, target: Any) -> None:
  """Raises ValueError naming the first leaf whose shape or dtype differs from the target's (orbax hands back a
  numpy leaf as saved, whatever the target says)."""
  for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(restored)[0], jax.tree.leaves(target)):
    got_type, want_type = _dtype(got), _dtype(want)
    if np.shape(got) != np.shape(want) or got_type != want_type:
      raise ValueError(f"leaf {jax.tree_util.keystr(path)} is {np.shape(got)} {got_type}, this run has "
                       f"{np.shape(want)} {want_type}")


def _dtype(x: Any) -> np.dtype:
  return np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype   # no copy of an array's data


def _first_line(error: BaseException) -> str:
  return str(error).splitlines()[0][:200] if str(error) else ""
