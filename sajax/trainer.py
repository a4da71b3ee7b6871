"""Whole training runs: ``sajax.train(config)`` builds the run, hands it to an executor, and writes outputs.

:class:`Run` holds what every executor shares and nothing executor-specific: the dataset and the per-learner
samplers, the model, the staleness-aware optimizer, the epoch → update arithmetic, evaluation, checkpoints
and the run outputs. An executor (``sync.run_ssgd`` for pmap) only moves gradients and calls
:meth:`Run.after_update`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import jax
import ml_collections
import numpy as np

from sajax import checkpoint, config as config_lib, data, elastic, local_steps, metrics, models, steps, streams
from sajax.workdir import check_workdir_writable, default_workdir, prepare_workdir  # noqa: F401 - public here too
from sajax.executors.common import Executor
from sajax.run_optimizer import make_optimizer, make_schedule
from sajax.saved_state import state_target
from sajax.server import DivergenceError, all_finite_jit

log = logging.getLogger("sajax")
PyTree = Any
Callback = Callable[["Run"], None]


@dataclasses.dataclass
class TrainResult:
  """What :func:`train` returns: the final metrics, every evaluation record, and the workdir."""

  metrics: dict
  history: list
  workdir: str


class Run:
  """The shared state of one training run (see the module docstring)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, dataset: data.Dataset,
               callbacks: Sequence[Callback] = (), outputs: bool = True) -> None:
    # The Ctrl-C handler goes in first: under Python's default handler a Ctrl-C during the compilations below
    # raises inside JAX, which can swallow it (the run then trained on to its end); this one only sets a flag.
    self._stop_requested = False
    self._on_stop: list[Callable[[], None]] = []
    self._previous_sigint = None
    self._bar = self.writer = self.checkpointer = None     # what close() closes, once _build has made it
    if threading.current_thread() is threading.main_thread():
      self._previous_sigint = signal.signal(signal.SIGINT, self._request_stop)
    try:
      self._build(config, workdir, dataset, callbacks, outputs)
    except BaseException:
      self.close()
      raise
    # Ctrl-C while building: nothing trained, nothing to save. Under MPI the flag stays for after_update, where
    # rank 0's stop is coordinated with the other ranks (a rank stopping alone here would leave them waiting).
    if self._stop_requested and config.executor != "mpi":
      self.close()
      raise KeyboardInterrupt

  def _build(self, config: ml_collections.ConfigDict, workdir: str, dataset: data.Dataset,
             callbacks: Sequence[Callback], outputs: bool) -> None:
    self.config = config
    self.outputs = outputs           # False on MPI ranks > 0: they never read or write the workdir
    self.workdir = workdir
    self.dataset = dataset
    self.callbacks = list(callbacks)
    self.protocol = config_lib.protocol_of(config)
    self.num_train = len(dataset.train)
    if config.get("train_examples", 0):
      self.num_train = min(self.num_train, config.train_examples)
    # A push carries H·μ examples (H = local_steps: H mini-batches of μ behind one pseudo-gradient; 1 otherwise;
    # with DyLU its learner's H_k, and the schedule counts their mean, local_steps.mean_round).
    self.local_steps = local_steps.local_steps_of(config)
    self.examples_per_push = round(config.batch_per_learner * local_steps.mean_round(config))
    self.per_epoch = config_lib.updates_per_epoch(self.num_train, self.protocol, config.batch_per_learner,
                                                  local_steps.mean_round(config))
    # The clock is samples applied (c·H·μ per update; c may shrink when learners die). Eval, checkpoint and
    # stop points are the sample counts of whole updates at those epochs with the protocol's c.
    self.samples_per_update = self.protocol.gradients_per_update * self.examples_per_push
    self.total_updates = config_lib.epoch_to_update(config.epochs, self.per_epoch)
    self.total_samples = self.total_updates * self.samples_per_update
    self.eval_at = [u * self.samples_per_update for u in
                    _schedule(config.eval_every_epochs, config.epochs, self.per_epoch, self.total_updates)]
    self.checkpoint_at = [u * self.samples_per_update for u in
                          _schedule(config.checkpoint_every_epochs, config.epochs, self.per_epoch,
                                    self.total_updates)]

    self.key = jax.random.PRNGKey(config.seed)
    self.model = models.create_model(config.model, dataset.num_classes)
    preprocess = data.make_preprocess(dataset)
    self.loss_fn = steps.make_loss_fn(self.model, preprocess)
    self.evaluator = steps.Evaluator(self.model, preprocess, dataset.test, batch_size=config.eval_batch_size)
    self.schedule = make_schedule(config, self.per_epoch)
    self._learning_rate = steps.jit_once(self.schedule)   # α at an update, for the records: one program
    self.policy = config_lib.policy_of(config)   # built once: the optimizer and the PS share it
    self.tx = make_optimizer(config, self.schedule, self.policy)
    self.local = local_steps.from_config(config, self.total_updates)   # None for H = 1: plain gradients
    self.params = models.init_params(self.model, jax.random.fold_in(self.key, 0), dataset.input_shape)
    self.opt_state = steps.jit_once(self.tx.init)(self.params)
    # One stream per learner id a run may have (λ, or elastic_max_learners): learner k's depends on (seed, k) only.
    self.streams = streams.learner_streams(
        data.learner_samplers(self.num_train, config.batch_per_learner, elastic.max_learners(config), config.seed))
    self.key = jax.random.fold_in(self.key, 1)  # the key executors fold the update count into

    self.updates = 0
    self.samples = 0
    self.history: list[dict] = []
    self._loss_sum, self._loss_count, self._pending_losses = 0.0, 0, []
    self._wall_before = 0.0          # wall time of earlier sessions of this run (resumed runs)
    self._t0 = time.perf_counter()
    self._session_start_samples = 0
    self._busy_s = 0.0               # time spent evaluating and checkpointing in this session
    self._last_saved = -1
    # The executor attaches itself (``attach``): telemetry for each metrics record, its checkpoint state.
    self.executor: Executor = Executor()
    self.restored_meta: dict = {}
    self.restored_arrays: dict = {}
    self.checkpointer = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                                keep=config.keep_checkpoints) if outputs else None
    if outputs:
      self._restore()                # on failure __init__ closes the checkpointer
    self.writer = metrics.RunWriter(workdir, purge_step=self.updates + 1 if self.updates else None) \
        if outputs else None
    self._bar = _progress(config, self) if outputs else None

  def _request_stop(self, signum, frame) -> None:
    """First Ctrl-C: :meth:`request_stop`."""
    del signum, frame
    self.request_stop()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts at once

  def request_stop(self) -> None:
    """Asks the run to stop cleanly at the executor's next safe point (checkpoint, then KeyboardInterrupt): after
    the current update, or, in an executor that checks between pushes, after the current push, with gradients
    buffered toward the next update (the checkpoint holds them: see ``ParameterServer.pending_arrays``)."""
    self._stop_requested = True
    for wake in self._on_stop:
      wake()

  def on_stop_request(self, wake: Callable[[], None]) -> None:
    """``wake()`` is called by :meth:`request_stop` (from the Ctrl-C handler: it must not block or take locks the
    main thread may hold), e.g. to wake an executor that waits for gradients."""
    self._on_stop.append(wake)

  def stop_if_requested(self) -> None:
    """Raises KeyboardInterrupt once a stop was requested: called after every update, between two events of the
    simulated executor, and by the threads executor while it waits for gradients (so one Ctrl-C also stops a run
    whose learners have stalled)."""
    if self._stop_requested:
      raise KeyboardInterrupt

  def attach(self, executor: Executor) -> None:
    """The executor this run reports and checkpoints through (see :class:`~sajax.executors.common.Executor`)."""
    self.executor = executor

  # ---- data --------------------------------------------------------------------------------------
  def next_batch(self, learner: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Learner k's next mini-batch of μ (images, labels) and its step s (which seeds its key); thread-safe."""
    indices, step = self.streams[learner].next()
    images, labels = self.dataset.train.gather(indices)
    return images, labels, step

  def next_batches(self, learners: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
    """The next mini-batch of μ from each of ``learners``' streams, concatenated in that order."""
    idx = np.concatenate([self.streams[k].next()[0] for k in learners])
    return self.dataset.train.gather(idx)

  # ---- loop bookkeeping ---------------------------------------------------------------------------
  @property
  def done(self) -> bool:
    """Whether epochs × N samples have been applied."""
    return self.samples >= self.total_samples

  def after_update(self, loss: jax.Array | list, *, gradients: int,
                   current_state: Callable[[], tuple[PyTree, PyTree]], batches: Optional[int] = None) -> None:
    """Called by the executor after each PS update of ``gradients`` (c) pushes of H·μ examples each (H mini-batches
    of μ; H = 1 but with ``local_steps``); evaluates, checkpoints and reports on schedule. ``loss``: the update's
    training loss, or the losses of its c pushes (device scalars, fetched lazily). ``batches``: the mini-batches of
    μ the c pushes carried when rounds differ in length (DyLU's H_k); None: c·H."""
    self.updates += 1
    added = gradients * self.examples_per_push if batches is None else batches * self.config.batch_per_learner
    before, self.samples = self.samples, self.samples + added
    losses = list(loss) if isinstance(loss, (list, tuple)) else [loss]
    self._pending_losses.extend(losses)
    if len(self._pending_losses) >= 256:
      self._flush_losses()
    if self._bar is not None:
      self._bar.update(added)
      if self.updates % 10 == 0:
        self._bar.set_postfix_str(self._postfix(float(losses[-1])), refresh=False)
    final = self.done and before < self.total_samples
    if self.outputs and (any(before < p <= self.samples for p in self.eval_at) or final):
      self._evaluate(current_state()[0])
    if self.outputs and (any(before < p <= self.samples for p in self.checkpoint_at) or final):
      self.save(*current_state())
    for callback in self.callbacks:
      callback(self)
    self.stop_if_requested()

  def interrupted(self, current_state: Callable[[], tuple[PyTree, PyTree]]) -> None:
    """Ctrl-C: save a checkpoint of the current update so that rerunning resumes from here."""
    self.save(*current_state())
    log.warning("interrupted at update %d; checkpoint saved in %s", self.updates, self.workdir)
    self.close()

  def _flush_losses(self) -> None:
    if self._pending_losses:
      for v in self._pending_losses:   # in order, in float64: a resumed run sums exactly the same way
        self._loss_sum += float(v)
      self._loss_count += len(self._pending_losses)
      self._pending_losses = []

  def _evaluate(self, params: PyTree) -> dict:
    t = time.perf_counter()
    self._flush_losses()
    result = self.evaluator(params)
    train_loss = self._loss_sum / max(self._loss_count, 1)
    self._loss_sum, self._loss_count = 0.0, 0
    self._busy_s += time.perf_counter() - t
    session_samples = self.samples - self._session_start_samples
    train_time = max(time.perf_counter() - self._t0 - self._busy_s, 1e-9)
    record = {
        "epoch": round(self.samples / self.num_train, 4),
        "updates": self.updates,
        "samples": self.samples,
        "wall_s": round(self._wall_before + time.perf_counter() - self._t0, 3),
        "train_loss": train_loss,
        "test_error": result["test_error"],
        "test_loss": result["test_loss"],
        **self.executor.telemetry(),
        "samples_per_s": session_samples / train_time,
        "learning_rate": float(self._learning_rate(self.updates)),
    }
    if self.dataset.num_classes > 10:
      record["test_error_top5"] = result["test_error_top5"]
    self.history.append(record)
    self.writer.write(record)
    if self._bar is not None:
      self._bar.set_postfix_str(self._postfix(train_loss), refresh=True)
    return record

  def _postfix(self, loss: float) -> str:
    last = f"{100 * self.history[-1]['test_error']:.2f}%" if self.history else "-"
    return f"loss {loss:.4f}  test error {last}"

  # ---- checkpoints -------------------------------------------------------------------------------
  def save(self, params: PyTree, opt_state: PyTree) -> None:
    """Checkpoints the run at the current update (params, optimizer state, streams, counters).

    A non-finite θ is never saved, so the newest checkpoint always holds the last finite state."""
    if self.updates == self._last_saved:
      return
    if not bool(all_finite_jit(params)):
      log.warning("update %d: θ holds NaN/Inf; not checkpointed (the newest checkpoint keeps the last finite "
                  "state)", self.updates)
      return
    t = time.perf_counter()
    arrays = {k: np.asarray(v) for k, v in self.executor.checkpoint_arrays().items()}
    self._flush_losses()
    meta = {
        "updates": self.updates,
        "samples": self.samples,
        "executor": self.executor.checkpoint_meta(),
        "executor_arrays": {k: [list(v.shape), v.dtype.name] for k, v in arrays.items()},
        "samplers": [s.get_state() for s in self.streams],
        "loss_sum": self._loss_sum, "loss_count": self._loss_count,
        "wall_s": self._wall_before + time.perf_counter() - self._t0,
    }
    state = {"params": params, "opt_state": opt_state}
    if arrays:
      state["executor"] = arrays
    self.checkpointer.save(self.updates, state, meta)
    self._last_saved = self.updates
    self._busy_s += time.perf_counter() - t

  def _restore(self) -> None:
    restored = self.checkpointer.restore_latest(state_target(self.params, self.opt_state))
    if restored is None:
      metrics.set_aside_orphaned_metrics(self.workdir)   # a fresh start: earlier records are kept, not emptied
      return
    step, state, meta = restored
    self.params, self.opt_state = state["params"], state["opt_state"]
    for stream, s in zip(self.streams, meta["samplers"]):
      stream.set_state(s)
    self.updates = self._last_saved = int(meta["updates"])
    self.samples = self._session_start_samples = int(meta["samples"])
    self.restored_meta = dict(meta.get("executor") or {})
    self.restored_arrays = dict(state.get("executor") or {})
    self._loss_sum, self._loss_count = float(meta["loss_sum"]), int(meta["loss_count"])
    self._wall_before = float(meta["wall_s"])
    self.history = metrics.truncate_metrics(self.workdir, self.updates)
    log.info("resuming from the checkpoint at update %d (epoch %.2f)", step, step / self.per_epoch)

  # ---- end ---------------------------------------------------------------------------------------
  def finish(self, params: PyTree, opt_state: PyTree) -> dict:
    """Final evaluation and checkpoint (unless just done), curves.png and staleness.png unless ``config.plots`` is
    off; returns the final metrics."""
    if not self.history or self.history[-1]["updates"] != self.updates:
      self._evaluate(params)
    self.save(params, opt_state)
    self.close()
    if self.config.get("plots", True):
      self._plot()
    return {"epochs": self.config.epochs, "protocol": self.protocol.name,
            "gradients_per_update": self.protocol.gradients_per_update, **self.history[-1]}

  def _plot(self) -> None:
    title = f"{self.config.dataset} / {self.config.model} / {self.config.executor}"
    metrics.plot_curves(self.history, os.path.join(self.workdir, "curves.png"), title=title)
    if "staleness_histogram" in self.history[-1]:
      metrics.plot_staleness(self.history[-1]["staleness_histogram"], os.path.join(self.workdir, "staleness.png"),
                             n=self.protocol.n if self.protocol.name != "hardsync" else 0,
                             learners=self.config.learners, title=f"{title} / {self.protocol.name}")

  def log(self, message: str) -> None:
    if self._bar is not None:
      self._bar.write(message, file=sys.stderr)   # above the progress bar, not inside it
    else:
      log.info(message)

  def close(self) -> None:
    """Restores the SIGINT handler and closes the progress bar, writers and checkpointer; safe to repeat."""
    if self._previous_sigint is not None:
      signal.signal(signal.SIGINT, self._previous_sigint)
      self._previous_sigint = None
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    if self.writer is not None:
      self.writer.close()
      self.writer = None
    if self.checkpointer is not None:
      self.checkpointer.close()
      self.checkpointer = None

  def newest_checkpoint(self) -> Optional[str]:
    """The folder of the newest checkpoint of this run, or None."""
    if self.checkpointer is None or not self.checkpointer.steps():
      return None
    return os.path.join(self.checkpointer.directory, str(self.checkpointer.steps()[-1]))


def _schedule(every_epochs: float, epochs: float, per_epoch: float, total: int) -> set[int]:
  """Update counts at the end of every ``every_epochs`` epochs, and the last update."""
  points = {total}
  k = 1
  while k * every_epochs < epochs - 1e-9:
    points.add(config_lib.epoch_to_update(k * every_epochs, per_epoch))
    k += 1
  return {p for p in points if 0 < p <= total}


def _progress(config: ml_collections.ConfigDict, run: Run):
  if not config.get("progress", True):
    return None
  from tqdm import tqdm
  return tqdm(total=run.total_samples, initial=run.samples, unit=" samples", unit_scale=True,
              dynamic_ncols=True, desc=f"{config.executor}", mininterval=0.5 if sys.stderr.isatty() else 10.0)




def train(config: ml_collections.ConfigDict, workdir: Optional[str] = None,
          callbacks: Sequence[Callback] = ()) -> TrainResult:
  """Trains ``config`` (see configs/default.py) into ``workdir``, resuming a run already there.

  Bad input (an unknown key or value, an unwritable workdir, a dataset that is not prepared) raises a
  ``ValueError`` before anything is written. ``callbacks`` are called with the :class:`Run` after every
  parameter-server update (progress hooks, early stops: raising ``KeyboardInterrupt`` from one saves a
  checkpoint and stops, exactly like Ctrl-C).
  """
  config_lib.validate(config)
  workdir = workdir or config.get("workdir") or default_workdir()
  check_workdir_writable(workdir)
  if config.executor != "ray":
    return _train(config, workdir, callbacks)
  from sajax.executors import ray_engine
  started = ray_engine.connect(config)   # before anything is written: a bad ray_address leaves no workdir behind
  try:
    return _train(config, workdir, callbacks)
  finally:
    if started:
      ray_engine.disconnect()


def _train(config: ml_collections.ConfigDict, workdir: str, callbacks: Sequence[Callback]) -> TrainResult:
  """:func:`train` once the config is valid, the workdir writable and (executor ray) Ray joined."""
  from sajax.executors import mpi, mpi_comm
  primary = mpi_comm.prepare_processes(config)   # under mpiexec: False on ranks > 0, which write nothing
  dataset = data.load_dataset(config.dataset, data_dir=config.get("data_dir") or None,
                              download=config.get("download", False))
  refused = None
  if primary:
    try:
      prepare_workdir(config, workdir)
    except config_lib.ConfigError as e:
      refused = e
  refused = mpi_comm.rank0_outcome(config, refused)   # every process stops together, none waits for rank 0
  if refused is not None:
    raise refused
  if primary:
    log.info("sajax: training into %s", os.path.abspath(workdir))
  run, refused = None, None
  try:
    run = Run(config, workdir, dataset, callbacks, outputs=primary)
  except checkpoint.CheckpointMismatch as e:   # found by rank 0 alone, which restores: every process must stop
    refused = e
  refused = mpi_comm.rank0_outcome(config, refused)
  if refused is not None:
    if run is not None:
      run.close()
    raise refused
  from sajax import sync
  from sajax.executors import ray_engine, simulated, threads   # ray_engine imports ray only once it runs
  executors = {"pmap": sync.run_ssgd, "threads": threads.run_threads, "simulated": simulated.run_simulated,
               "mpi": mpi.run_mpi, "ray": ray_engine.run_ray}
  try:
    try:
      params, opt_state = executors[config.executor](run)
    except DivergenceError as e:
      error = DivergenceError(e.update, e.count, run.newest_checkpoint())
      log.error("%s", error)
      raise error from None
    if not primary:
      return TrainResult(metrics=mpi_comm.rank_metrics(run), history=[], workdir=workdir)
    final = run.finish(params, opt_state)
    return TrainResult(metrics=final, history=run.history, workdir=workdir)
  finally:
    run.close()   # whatever happened: SIGINT handler restored, progress bar, writers and checkpointer closed
