"""Orbax checkpoints of a run: a pytree of arrays (params, optimizer state, ...) plus JSON metadata
(sampler states, counters), written atomically, the last few kept, resumed from the newest readable one.

A latest checkpoint that cannot be read (corrupt or partial) is moved aside to ``corrupt-<step>`` with a
warning, never deleted, and the previous one is used instead.
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
        if callable(target):
          meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
          step_target = target(dict(meta))
        else:
          step_target = target
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, step_target)
        if jax.process_count() > 1:
          abstract = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), step_target)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return step, restored["state"], dict(restored["meta"])
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back to an older one
        aside = self._move_aside(step)
        log.warning("checkpoint at step %d is unreadable (%s: %s); moved it to %s and falling back to the "
                    "previous one", step, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "",
                    aside)
    return None

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
