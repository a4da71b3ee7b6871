"""`python launch/train.py`: bad input exits 2 with one line and writes nothing; runs, Ctrl-C and resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "launch", "train.py")
SMOKE = os.path.join(ROOT, "configs", "smoke.py")


def _env():
  return child_env()  # the launcher sets the device count itself


def _launch(*args, cwd=None, timeout=300):
  return subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, cwd=cwd, env=_env(),
                        timeout=timeout)


BAD_INPUT = [
    (["--config.learners=0"], "learners=0"),
    (["--config.batch_per_learner=0"], "batch_per_learner=0"),
    (["--config.dataset=nosuchdata"], "nosuchdata"),
    (["--config.model=resnet9000"], "resnet9000"),
    (["--config.executor=carrier_pigeon"], "carrier_pigeon"),
    (["--config.policy=nopolicy"], "nopolicy"),
    (["--config.policy=hinge", '--config.policy_args={"c": 1}'], "'c'"),
    (["--config.policy=dc_asgd", "--config.executor=pmap"], "dc_asgd"),
    (["--config.protocol=gossip"], "gossip"),
    (["--config.learning_rate=0"], "learning_rate=0"),
    (["--config.learning_rate=-0.1"], "learning_rate=-0.1"),
    (["--config.epochs=0"], "epochs=0"),
    (["--config.epochs=-3"], "epochs=-3"),
    (["--config.not_a_key=1"], "not_a_key"),
    (["--config.learners=many"], "many"),
    (["--config=configs/does_not_exist.py"], "does_not_exist.py"),
    (["--config.protocol=softsync", "--config.n=9"], "n=9"),
    (["--config.protocol=ssp", "--config.ssp_spread=-1"], "ssp_spread=-1"),
]


def _assert_one_line_error(code, stderr, named, workdir, folder):
  assert code == 2, stderr
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert len(lines) == 1, stderr
  assert lines[0].startswith("error: ") and named in lines[0] and "allowed" in lines[0]
  assert "Traceback" not in stderr
  assert not workdir.exists()
  assert sorted(os.listdir(folder)) == []


@pytest.mark.parametrize("args, named", BAD_INPUT, ids=[a[0][-1] for a in BAD_INPUT])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(args, named, tmp_path, monkeypatch, capsys):
  """In-process: ``main(argv)`` is what `python launch/train.py` runs (``sys.exit(main(sys.argv))``); the
  test below checks the same in a real process for two of these."""
  from launch import train as launcher
  monkeypatch.chdir(tmp_path)
  workdir = tmp_path / "run"
  code = launcher.main(["train.py", *args, "--workdir", str(workdir)])
  _assert_one_line_error(code, capsys.readouterr().err, named, workdir, tmp_path)


@pytest.mark.parametrize("args, named", [BAD_INPUT[2], BAD_INPUT[14]], ids=["dataset", "type"])
def test_bad_input_in_a_real_process_prints_only_its_one_line(args, named, tmp_path):
  """A process of its own: nothing else on stderr either (no warning from importing jax or a dataset
  library), for a value refused while parsing the flags and one refused by sajax.train."""
  workdir = tmp_path / "run"
  result = _launch(*args, "--workdir", str(workdir), cwd=str(tmp_path))
  _assert_one_line_error(result.returncode, result.stderr, named, workdir, tmp_path)


def test_main_parses_the_argv_it_is_given_each_time(tmp_path):
  """Two calls in one process read their own ``--config.*`` overrides (absl's global flags kept the first
  call's override flags and refused the second: "defined twice")."""
  from launch import train as launcher
  first = launcher.parse_config(["train.py", "--config.learners=3", "--config.protocol=softsync"])
  second = launcher.parse_config(["train.py", "--config.learners=5"])
  third = launcher.parse_config(["train.py"])
  default = launcher._load_config_file(launcher.DEFAULT_CONFIG)
  assert (first.learners, first.protocol) == (3, "softsync")
  assert (second.learners, second.protocol) == (5, default.protocol)
  assert third.learners == default.learners


def test_unwritable_workdir_exits_2(tmp_path, capsys):
  from launch import train as launcher
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  code = launcher.main(["train.py", "--config", SMOKE, "--workdir", str(blocker / "run")])
  lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert code == 2
  assert len(lines) == 1 and "not writable" in lines[0] and str(blocker) in lines[0]
  assert sorted(os.listdir(tmp_path)) == ["a_file"]


def test_unprepared_tfds_dataset_exits_2_fast_and_writes_nothing(tmp_path, capsys):
  from launch import train as launcher
  start = time.time()
  code = launcher.main(["train.py", "--config.dataset=cifar10", f"--config.data_dir={tmp_path / 'tfds'}",
                        "--workdir", str(tmp_path / "run")])
  assert code == 2
  assert "tfds build cifar10" in capsys.readouterr().err.splitlines()[-1]
  assert time.time() - start < 60
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_no_flags_runs_the_default_config_into_a_fresh_workdir_and_says_where(tmp_path):
  """The default run itself is long; a flag-free start is checked by stopping it (Ctrl-C) once it has written its
  config.json into a fresh runs/ folder. That a Ctrl-C leaves a checkpoint to resume from is the next test's."""
  proc = subprocess.Popen([sys.executable, TRAIN], cwd=str(tmp_path), env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 240
    saved = None
    while time.time() < deadline and saved is None:
      runs = tmp_path / "runs"
      if runs.exists():
        saved = next((d / "config.json" for d in runs.iterdir() if (d / "config.json").exists()), None)
      time.sleep(0.1)
    assert saved is not None, "the default run wrote no config.json in time"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=600)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 130, err
  workdir = saved.parent
  assert f"training into {workdir}" in err and f"rerun with --workdir {os.path.join('runs', workdir.name)}" in err
  config = json.loads(saved.read_text())
  assert config["dataset"] == "mnist5k" and config["learners"] == 8 and config["executor"] == "threads"


@pytest.mark.slow
def test_a_run_prints_its_summary_and_ctrl_c_then_rerun_resumes_to_the_uninterrupted_result(tmp_path):
  args = ["--config", SMOKE, "--config.epochs=4", "--config.train_examples=1024"]
  reference = _launch(*args, "--workdir", str(tmp_path / "reference"))
  assert reference.returncode == 0, reference.stderr
  assert "test error" in reference.stdout and str(tmp_path / "reference") in reference.stdout   # the summary
  assert len((tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()) == 4

  workdir = tmp_path / "run"
  proc = subprocess.Popen([sys.executable, TRAIN, *args, "--workdir", str(workdir)], env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 240
    while time.time() < deadline:
      path = workdir / "metrics.jsonl"
      if path.exists() and len(path.read_text().splitlines()) >= 2:
        break
      time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=600)
  finally:
    if proc.poll() is None:
      proc.kill()
  if proc.returncode == 0:
    pytest.fail("the run finished before it could be interrupted; make it longer")
  assert proc.returncode == 130, err
  assert "resume" in err
  resumed = _launch(*args, "--workdir", str(workdir))
  assert resumed.returncode == 0, resumed.stderr

  def reproducible(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("wall_s", "samples_per_s")} for r in rows]

  assert reproducible(workdir / "metrics.jsonl") == reproducible(tmp_path / "reference" / "metrics.jsonl")


@pytest.mark.slow
@pytest.mark.parametrize("executor, protocol", [("threads", "hardsync")])
def test_a_diverged_run_exits_3_with_one_line_naming_the_update_and_checkpoint(executor, protocol, tmp_path):
  """`--config.learning_rate=1e9` (ran on, silent, before divergence was detected): ends in seconds, exit 3. The
  other executors and protocols end with DivergenceError in-process (tests/test_reliability.py), which the CLI turns
  into this line and exit 3 whatever the executor (docs/reliability.md row 2 runs it through the CLI in each)."""
  workdir = tmp_path / "run"
  start = time.time()
  result = _launch("--config", SMOKE, f"--config.executor={executor}", f"--config.protocol={protocol}",
                   "--config.learning_rate=1e9", "--config.epochs=3", "--workdir", str(workdir))
  assert result.returncode == 3, result.stderr[-2000:]
  lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1, result.stderr[-2000:]
  assert "diverged: 100 consecutive non-finite gradients at update" in lines[0]
  assert "no checkpoint was saved" in lines[0] or str(workdir / "checkpoints") in lines[0]
  assert time.time() - start < 240


@pytest.mark.parametrize("saved, problem", [("{\"learners\": 4, ", "is not readable JSON (JSONDecodeError: "),
                                            ("[1, 2]", "holds an array, not an object")], ids=["damaged", "list"])
def test_a_damaged_config_json_in_the_workdir_exits_2_with_one_line_and_keeps_every_file(saved, problem, tmp_path,
                                                                                         capsys):
  """Resuming a workdir whose config.json is not a JSON object: one line naming the file, exit 2, and the
  workdir's files (the saved config, checkpoints, metrics) left exactly as they were. In-process: main() is
  what `python launch/train.py` runs."""
  from launch import train as launcher
  workdir = tmp_path / "run"
  (workdir / "checkpoints" / "32").mkdir(parents=True)
  (workdir / "config.json").write_text(saved)
  (workdir / "metrics.jsonl").write_text('{"epoch": 1.0}\n')
  before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  code = launcher.main(["train.py", f"--config={SMOKE}", "--workdir", str(workdir)])
  err = capsys.readouterr().err
  assert code == 2, err
  assert "Traceback" not in err
  [line] = [line for line in err.splitlines() if line.startswith("error:")]
  assert f"saved run config {str(workdir / 'config.json')!r} {problem}" in line and "allowed" in line
  assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before
  assert sorted(p.name for p in workdir.rglob("*")) == ["32", "checkpoints", "config.json", "metrics.jsonl"]
