"""A run's saved state read back: the restore target of its checkpoints, and θ of a workdir's newest checkpoint
without resuming the run (a probe of a finished or running grid cell)."""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np

from sajax import checkpoint, config as config_lib, data, models
from sajax.run_optimizer import make_optimizer, make_schedule

PyTree = Any


def state_target(params: PyTree, opt_state: PyTree) -> Callable[[dict], dict]:
  """The ``target`` of :meth:`Checkpointer.restore_latest` for a run's saved state: θ and the optimizer state
  shaped like ``params``/``opt_state``, plus the executor's arrays whose shapes the checkpoint's meta records."""
  def target(meta: dict) -> dict:
    state = {"params": params, "opt_state": opt_state}
    if meta.get("executor_arrays"):
      state["executor"] = {k: np.zeros(shape, dtype) for k, (shape, dtype) in meta["executor_arrays"].items()}
    return state
  return target


def newest_params(config: ml_collections.ConfigDict, workdir: str,
                  dataset: data.Dataset) -> Optional[tuple[int, PyTree]]:
  """(update, θ) of the newest readable checkpoint of the run ``config`` in ``workdir``, or None when it has none.
  Read-only, unlike resuming: the run's metrics, TensorBoard files and checkpoints stay as they are."""
  folder = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(folder) or not os.listdir(folder):
    return None
  model = models.create_model(config.model, dataset.num_classes)
  params = models.init_params(model, jax.random.PRNGKey(0), dataset.input_shape)
  opt_state = make_optimizer(config, make_schedule(config, 1.0), config_lib.policy_of(config)).init(params)
  checkpointer = checkpoint.Checkpointer(folder, keep=config.keep_checkpoints)
  try:
    restored = checkpointer.restore_latest(state_target(params, opt_state))
  finally:
    checkpointer.close()
  return None if restored is None else (restored[0], restored[1]["params"])
