"""The install footprint: `import sajax` (transform, protocols, parameter server) needs only jax, optax and numpy;
the trainer's packages come with the `train` extra; every third-party module imported under sajax/, launch/, configs/
and tests/ is named in pyproject.toml itself, so the README's `pip install -e ".[test]"` installs what the tests import."""

import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Top-level modules that only the `train` extra brings (absl is not here: optax itself depends on absl-py).
TRAINER_MODULES = ["flax", "orbax", "tensorflow_datasets", "grain", "matplotlib", "tensorboardX",
                   "ml_collections", "tqdm", "tensorflow"]

_CORE_USE = """
import json
import sys
import jax.numpy as jnp
import optax
import sajax
tx = sajax.staleness_aware(optax.sgd(0.1))
params = {"w": jnp.ones((2,))}
updates, _ = tx.update({"w": jnp.full((2,), 0.5)}, tx.init(params), params, staleness=4)
ps = sajax.ParameterServer(params, sajax.staleness_aware(optax.sgd(0.1)), protocol=sajax.Protocol.asynchronous(1))
version, _ = ps.pull()
result = ps.push(learner=0, version=version, grads={"w": jnp.full((2,), 0.5)})
report = {"update": updates["w"].tolist(), "applied": bool(result.applied_update), "w": ps.params["w"].tolist()}
"""


def _run(code):
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _check_core(report):
  assert report["update"] == pytest.approx([-0.0125, -0.0125])   # −α0 · g / σ = −0.1 · 0.5 / 4
  assert report["applied"] and report["w"] == pytest.approx([0.95, 0.95])   # σ = 0: 1 − 0.1 · 0.5


def test_import_sajax_loads_no_trainer_package():
  report = _run(_CORE_USE + f"""
report["loaded"] = sorted({{m.split(".")[0] for m in sys.modules}} & set({TRAINER_MODULES!r}))
print(json.dumps(report))
""")
  _check_core(report)
  assert report["loaded"] == []


def test_core_works_without_the_trainer_packages_and_train_says_what_to_install():
  blocker = f"""
import importlib.abc
import sys
class _Absent(importlib.abc.MetaPathFinder):   # as if the train extra were not installed
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in {TRAINER_MODULES!r}:
      raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, _Absent())
"""
  report = _run(blocker + _CORE_USE + """
try:
  sajax.train
  report["error"] = None
except ImportError as e:
  report["error"] = f"{type(e).__name__}: {e}"
print(json.dumps(report))
""")
  _check_core(report)
  assert report["error"] is not None and report["error"].startswith("ImportError: sajax.train needs the trainer's")
  assert "is not installed): pip install 'sajax[train]'" in report["error"]


def _normalized(name):
  return re.sub(r"[-_.]+", "-", name).lower()


def _closure(requirements, extras):
  """Distribution names that ``requirements`` install here, with their installed requirements, recursively;
  ``sajax[x]`` stands for extra x of our pyproject."""
  seen, todo = set(), list(requirements)
  while todo:
    req = Requirement(todo.pop())
    name = _normalized(req.name)
    if name == "sajax":
      todo.extend(r for extra in req.extras for r in extras[extra])
      continue
    if name in seen or (req.marker and not req.marker.evaluate({"extra": ""})):
      continue
    seen.add(name)
    try:
      todo.extend(importlib.metadata.requires(req.name) or [])
    except importlib.metadata.PackageNotFoundError:
      pass
  return seen


def test_pyproject_declares_every_package_that_sajax_launch_and_tests_import():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  extras = project["optional-dependencies"]
  core = _closure(project["dependencies"], extras)
  assert {_normalized(Requirement(r).name) for r in project["dependencies"]} == {"jax", "optax", "numpy"}
  trainer = _closure(project["dependencies"] + extras["train"] + extras["mpi"], extras)
  assert {"flax", "orbax-checkpoint", "tensorflow-datasets", "matplotlib"} <= trainer - core
  assert trainer <= _closure(extras["test"], extras) | core

  assert undeclared_imports(project) == {}


def _local_modules():
  """Top-level names that are this checkout's own: its packages and folders, and the modules tests/ and launch/
  put on sys.path."""
  names = {entry for entry in os.listdir(ROOT) if os.path.isdir(os.path.join(ROOT, entry))}
  for folder in ("tests", "launch"):
    names |= {f[:-3] for f in os.listdir(os.path.join(ROOT, folder)) if f.endswith(".py")}
  return names


def _imported_top_level(path):
  """The top-level module of every absolute import in the file at ``path`` (inside functions too)."""
  with open(path) as f:
    tree = ast.parse(f.read())
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (alias.name.split(".")[0] for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      yield node.module.split(".")[0]


def undeclared_imports(project):
  """{module: [files]} for third-party modules imported under sajax/, launch/, configs/ and tests/ whose
  distribution pyproject.toml does not name directly: in the core dependencies, the `train` or `test` extra
  (tests/ may use only those, since the README's test command installs `.[test]`), or, for sajax/ and launch/,
  another extra (`mpi`, `tf`). A package that only arrives as a dependency of a dependency does not count."""
  extras = project["optional-dependencies"]
  declared = lambda reqs: {_normalized(Requirement(r).name) for r in reqs} - {"sajax"}  # noqa: E731
  installed_by_test = declared(project["dependencies"] + extras["train"] + extras["test"])
  any_extra = installed_by_test.union(*(declared(reqs) for reqs in extras.values()))
  distributions = importlib.metadata.packages_distributions()
  ignored = set(sys.stdlib_module_names) | _local_modules()
  undeclared = {}
  for folder in ("sajax", "launch", "configs", "tests"):
    allowed = installed_by_test if folder == "tests" else any_extra
    for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
      for file in sorted(f for f in files if f.endswith(".py")):
        path = os.path.join(dirpath, file)
        for top in set(_imported_top_level(path)) - ignored:
          if not {_normalized(d) for d in distributions.get(top, [top])} & allowed:
            undeclared.setdefault(top, []).append(os.path.relpath(path, ROOT))
  return undeclared


def test_an_import_no_extra_declares_is_found():
  """The check itself: a test file importing a module pyproject does not name is reported, with its file."""
  project = {"dependencies": ["jax"], "optional-dependencies": {"train": [], "test": []}}
  found = undeclared_imports(project)
  assert "optax" in found and "sajax/optim.py" in found["optax"]
  assert "pytest" in found and all(f.startswith("tests/") for f in found["pytest"])
