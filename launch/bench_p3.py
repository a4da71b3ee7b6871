"""Benchmark P3: time to accuracy with one straggler, staleness-aware async ÷ hardsync SSGD, in simulated time.

The simulated executor on the default config (mnist5k, small CNN, α0, momentum, epoch schedule), λ = 8
learners of μ = 16, learner 0 four times slower than the others (``sim_speeds``). Hardsync SSGD runs its
configured epochs: its rounds last as long as the straggler. The target is its final test error + 0.5 point,
and its time to the target is the simulated time of its first evaluation at or below it. Each asynchronous
side (``inverse`` policy) runs with the same hyperparameters (one side without momentum, see SIDES) and epoch
schedule until its first evaluation at or below the target, for at most ``--max-epochs-factor`` times the
configured epochs (it never waits for the straggler, so it gets through many more epochs per unit of simulated
time). P3 = its time ÷ SSGD's time, for async (c = 1) with momentum 0 (the value), beside async with the
config's momentum and 2-softsync.
Simulated time does not depend on the machine's load: P3 is exact for a given seed.
"""

from __future__ import annotations

import sys
import tempfile
import time

SIDES = {
    "hardsync SSGD": {"protocol": "hardsync"},
    "async, inverse": {"protocol": "async"},
    # Asynchrony acts like momentum (Mitliagkas et al. 2016, "Asynchrony begets momentum"): with c = 1 every
    # gradient is σ ≈ λ − 1 updates old, so the explicit momentum is dropped for this side. SSGD keeps the
    # config's 0.5, which is its better setting (momentum 0 ended SSGD at 2.50 % instead of 2.00 %).
    "async, inverse, momentum 0": {"protocol": "async", "momentum": 0.0},
    "2-softsync, inverse": {"protocol": "softsync", "n": 2},
}
HEADLINE = "async, inverse, momentum 0"


DEFAULTS = ["--config.executor=simulated", "--config.learners=8", "--config.batch_per_learner=16",
            "--config.sim_speeds=(4.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0)", "--config.eval_every_epochs=0.5",
            "--config.checkpoint_every_epochs=1000", "--config.progress=False"]


def _config(base, overrides: dict):
  config = base.copy_and_resolve_references()
  for key, value in overrides.items():
    config[key] = value
  return config


def time_to_error(records: list[dict], target: float) -> float | None:
  """Simulated time of the first evaluation with test error ≤ ``target`` (None if never reached)."""
  return next((r["sim_time"] for r in records if r["test_error"] <= target), None)


def _train(config, stop_below: float | None = None) -> tuple[list[dict], float]:
  import sajax

  def stop(run) -> None:
    if stop_below is not None and run.history and run.history[-1]["test_error"] <= stop_below:
      raise KeyboardInterrupt

  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as workdir:
    try:
      history = sajax.train(config, workdir=workdir, callbacks=[stop]).history
    except KeyboardInterrupt:
      from sajax import metrics
      history = metrics.read_metrics(workdir)
  return history, time.perf_counter() - start


def run(args, extra: list[str] = ()) -> dict:
  from launch.train import parse_config
  argv = ["bench.py p3", *DEFAULTS, *extra]   # extra --config.key=value flags win
  sys.argv = argv                            # ml_collections reads the overrides from sys.argv
  base = parse_config(argv)
  ssgd_config = _config(base, SIDES["hardsync SSGD"])
  ssgd, wall = _train(ssgd_config)
  target = ssgd[-1]["test_error"] + 0.005
  t_ssgd = time_to_error(ssgd, target)
  print(f"hardsync SSGD: final test error {100 * ssgd[-1]['test_error']:.2f} %, target {100 * target:.2f} % "
        f"first reached at sim_time {t_ssgd:.0f} (epoch {next(r['epoch'] for r in ssgd if r['sim_time'] == t_ssgd)}), "
        f"wall {wall:.0f} s", flush=True)
  out = {"figure": "p3", "target_test_error": round(target, 4), "sim_time_ssgd": t_ssgd,
         "ssgd_final_test_error": ssgd[-1]["test_error"], "sides": {}}
  for name, overrides in SIDES.items():
    if name == "hardsync SSGD":
      continue
    config = _config(base, {**overrides, "epochs": ssgd_config.epochs * args.max_epochs_factor})
    records, wall = _train(config, stop_below=target)
    t = time_to_error(records, target)
    at_budget = [r for r in records if r["epoch"] <= ssgd_config.epochs + 1e-6]
    side = {"sim_time": t, "ratio": None if t is None else round(t / t_ssgd, 3),
            "epoch": next((r["epoch"] for r in records if r["sim_time"] == t), None),
            "test_error_at_ssgd_epochs": at_budget[-1]["test_error"] if at_budget else None,
            "staleness_mean": records[-1]["staleness_mean"], "wall_s": round(wall, 1)}
    out["sides"][name] = side
    print(f"{name}: target reached at sim_time {t} (epoch {side['epoch']}), P3 ratio {side['ratio']}; "
          f"test error after {ssgd_config.epochs:g} epochs {side['test_error_at_ssgd_epochs']}, "
          f"⟨σ⟩ {side['staleness_mean']:.2f}, wall {wall:.0f} s", flush=True)
  out["value"] = out["sides"][HEADLINE]["ratio"]
  return out
