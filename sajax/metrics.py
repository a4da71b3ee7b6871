"""Run outputs: ``metrics.jsonl``, TensorBoard events (tensorboardX, no TensorFlow), ``curves.png`` and the
one-screen summary. The training loop hands each evaluation record to :class:`RunWriter`; nothing here
computes a metric.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterable, Mapping, Optional

METRICS_FILE = "metrics.jsonl"
TIMING_KEYS = frozenset({"wall_s", "samples_per_s"})
"""Fields that depend on the machine's speed; every other field of a record is reproducible."""


def read_metrics(workdir: str) -> list[dict]:
  """The evaluation records of a run, oldest first ([] when there are none)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(workdir: str, max_updates: int) -> list[dict]:
  """Keeps only the records up to ``max_updates`` (the resumed checkpoint); returns them.

  Records past the checkpoint were made by the part of a run that is about to be recomputed; the file is
  rewritten atomically so a crash here loses nothing.
  """
  records = [r for r in read_metrics(workdir) if r["updates"] <= max_updates]
  path = os.path.join(workdir, METRICS_FILE)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  os.replace(tmp, path)
  return records


def set_aside_orphaned_metrics(workdir: str) -> Optional[str]:
  """A run that starts afresh in a workdir whose checkpoints are all gone keeps the earlier records: an
  existing non-empty ``metrics.jsonl`` is renamed ``metrics.orphaned-<k>.jsonl`` (never emptied); returns
  the new name, or None when there was nothing to keep."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path) or os.path.getsize(path) == 0:
    return None
  k = 1
  while os.path.exists(os.path.join(workdir, f"metrics.orphaned-{k}.jsonl")):
    k += 1
  aside = os.path.join(workdir, f"metrics.orphaned-{k}.jsonl")
  os.replace(path, aside)
  logging.getLogger("sajax").warning("no readable checkpoint in %s: starting afresh; the earlier metrics are "
                                     "kept in %s", workdir, aside)
  return aside


class RunWriter:
  """Appends records to ``metrics.jsonl`` and TensorBoard; draws ``curves.png`` on close.

  ``purge_step``: a resumed run's first update. TensorBoard then discards the events at or after it that the
  interrupted session wrote past its last checkpoint (tensorboardX's ``purge_step``), as
  :func:`truncate_metrics` does for ``metrics.jsonl``.
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True, purge_step: Optional[int] = None) -> None:
    self.workdir = workdir
    self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a")
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge_step)

  def write(self, record: Mapping[str, Any]) -> None:
    self._jsonl.write(json.dumps(dict(record)) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      step = int(record["updates"])
      for key, value in record.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "updates":
          self._tb.add_scalar(key, value, global_step=step)
      hist = record.get("staleness_histogram")
      if hist:
        _add_count_histogram(self._tb, "staleness", {int(k): v for k, v in hist.items()}, step)
      self._tb.flush()

  def close(self) -> None:
    self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def _add_count_histogram(tb, tag: str, counts: Mapping[int, int], step: int) -> None:
  """A histogram of integer values given as {value: count}, one bucket per integer."""
  values = sorted(counts)
  total = sum(counts.values())
  tb.add_histogram_raw(
      tag, min=values[0], max=values[-1], num=total, sum=sum(v * c for v, c in counts.items()),
      sum_squares=sum(v * v * c for v, c in counts.items()),
      bucket_limits=[v + 0.5 for v in values], bucket_counts=[counts[v] for v in values], global_step=step)


def plot_staleness(histogram: Mapping[str, int], path: str, *, n: int, learners: int, title: str = "") -> str:
  """The staleness distribution of accepted gradients, with n (and the expected n(λ−1)/λ) marked."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  counts = {int(k): v for k, v in histogram.items()}
  total = sum(counts.values()) or 1
  mean = sum(k * v for k, v in counts.items()) / total
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.bar(list(counts), [v / total for v in counts.values()], color="C0", alpha=0.8, label="accepted gradients")
  ax.axvline(mean, color="C3", label=f"⟨σ⟩ = {mean:.2f}")
  if n:
    ax.axvline(n, color="k", linestyle="--", label=f"n = {n}")
    ax.axvline(n * (learners - 1) / learners, color="grey", linestyle=":", label=f"n(λ−1)/λ = {n * (learners - 1) / learners:.2f}")
  # Show the bulk: up to the 99.5th percentile (a few stragglers can reach σ ≫ n); say where the tail ends.
  cumulative, upper = 0, max(counts)
  for value in sorted(counts):
    cumulative += counts[value]
    if cumulative >= 0.995 * total:
      upper = value
      break
  upper = max(upper, 2 * n)
  ax.set_xlim(-0.6, upper + 0.6)
  tail = f" (a tail of < 0.5 % up to σ = {max(counts)} not shown)" if max(counts) > upper else ""
  ax.set_xlabel("staleness σ = i − j" + tail)
  ax.set_ylabel("fraction of gradients")
  ax.legend()
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def plot_curves(records: Iterable[Mapping[str, Any]], path: str, title: str = "") -> Optional[str]:
  """Test error and training loss against epochs, written to ``path`` (PNG)."""
  records = list(records)
  if not records:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  epochs = [r["epoch"] for r in records]
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
  ax1.plot(epochs, [100 * r["test_error"] for r in records], marker="o", label="top-1")
  if "test_error_top5" in records[0]:
    ax1.plot(epochs, [100 * r["test_error_top5"] for r in records], marker="o", label="top-5")
  ax1.set_xlabel("epoch")
  ax1.set_ylabel("test error (%)")
  ax1.grid(alpha=0.3)
  ax1.legend()
  ax2.plot(epochs, [r["train_loss"] for r in records], marker="o", color="C3")
  ax2.set_xlabel("epoch")
  ax2.set_ylabel("training loss")
  ax2.set_yscale("log")
  ax2.grid(alpha=0.3)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def summary(config: Mapping[str, Any], final: Mapping[str, Any], workdir: str) -> str:
  """The one-screen summary printed at the end of a run."""
  c = config
  n_text = f"n = {c['n']}" if final.get("protocol") == "softsync" else "n = -"
  lines = [
      "=" * 64,
      f" sajax run: {c['dataset']} / {c['model']} / executor={c['executor']}",
      f" λ = {c['learners']} learners × μ = {c['batch_per_learner']}   protocol = {final.get('protocol', '')}"
      f"   {n_text}   policy = {c['policy']}",
      f" α0 = {c['learning_rate']}   momentum = {c['momentum']}   epochs = {final['epoch']:g}",
      *([f" local SGD       H = {c['local_steps']} {c.get('inner_optimizer', 'sgd')} steps per push (Δ), "
         f"outer {c.get('outer_optimizer', 'sgd')}"] if c.get("local_steps", 1) > 1 else []),
      "-" * 64,
      f" test error      {100 * final['test_error']:.2f} %"
      + (f"   (top-5 {100 * final['test_error_top5']:.2f} %)" if "test_error_top5" in final else ""),
      f" train loss      {final['train_loss']:.4f}",
      f" updates         {final['updates']}   samples {final['samples']}",
      f" staleness σ     ⟨σ⟩ = {final['staleness_mean']:.2f}   ({n_text}, c = {final.get('gradients_per_update', '-')})"
      f"   max {final['staleness_max']}   dropped {final.get('gradients_dropped', 0)}",
      *([f" learners        {final['learners_alive']} of {c['learners']} alive"
         + "".join(f"; learner {k} died: {v}" for k, v in final.get("learners_dead", {}).items())]
        if "learners_alive" in final else []),
      *([f" simulated       time {final['sim_time']:g} s   moved {_bytes(final.get('bytes_moved', 0))} (pushed "
         f"{_bytes(final.get('bytes_pushed', 0))}, pulled {_bytes(final.get('bytes_pulled', 0))})"]
        if "sim_time" in final else []),
      f" throughput      {final['samples_per_s']:.0f} samples/s   wall {final['wall_s']:.1f} s",
      "-" * 64,
      f" outputs in {workdir}: config.json metrics.jsonl curves.png"
      + (" staleness.png" if "staleness_histogram" in final else "") + " tensorboard/ checkpoints/",
      "=" * 64,
  ]
  return "\n".join(lines)


def _bytes(n: float) -> str:
  """A byte count for people: 812 B, 3.2 MB, 1.07 GB (powers of 1000)."""
  if abs(n) < 1000:
    return f"{n:.0f} B"
  for unit in ("kB", "MB", "GB", "TB"):
    n /= 1000
    if abs(n) < 999.5:
      return f"{n:.3g} {unit}"
  return f"{n:,.0f} TB"
