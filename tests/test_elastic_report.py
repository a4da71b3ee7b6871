"""launch/elastic_report.py: the elastic benchmark's table from metrics records (no training here; the benchmark
itself is `python launch/bench.py elastic`, docs/benchmarks.md)."""

from launch import elastic_report as er


def _records(times, errors, per_epoch=10):
  return [{"updates": per_epoch * (i + 1), "sim_time": t, "test_error": e, "staleness_mean": 1.5}
          for i, (t, e) in enumerate(zip(times, errors))]


def test_the_time_of_an_update_is_interpolated_between_evaluations():
  records = _records([4.0, 6.0, 12.0], [0.5, 0.3, 0.2])
  assert er.time_at_update(records, 5) == 2.0          # between the start (0, 0) and the first record
  assert er.time_at_update(records, 25) == 9.0
  assert er.time_at_update(records, 99) == 12.0        # past the last record: its time


def test_the_error_at_a_time_is_the_last_evaluation_made_by_then():
  records = _records([4.0, 6.0, 12.0], [0.5, 0.3, 0.2])
  assert er.error_at_time(records, 6.0) == 0.3 and er.error_at_time(records, 11.9) == 0.3
  assert er.error_at_time(records, 1.0) == 0.5


def test_summary_compares_every_run_at_the_first_runs_median_end_time():
  fixed = [_records([3.0, 6.0], [0.2, 0.1]), _records([3.0, 8.0], [0.3, 0.12])]
  elastic = [_records([3.0, 7.0, 9.0], [0.4, 0.25, 0.08]), _records([3.0, 7.0, 9.5], [0.4, 0.2, 0.1])]
  rows = er.summary([("fixed", fixed), ("elastic", elastic)])
  assert rows[0]["budget"] == 7.0 and rows[0]["sim_time"] == 7.0 and rows[0]["sim_time_range"] == (6.0, 8.0)
  assert rows[0]["test_error"] == 0.11 and rows[0]["error_at_budget"] == (0.1 + 0.3) / 2
  assert rows[1]["error_at_budget"] == (0.25 + 0.2) / 2 and rows[1]["updates"] == 30
  text = er.table(rows)
  assert "test error at t = 7 s" in text and "| elastic | 2 | 9.00 % (8.00–10.00) | 9 s (9–10) |" in text
