"""The README's snippets (sajax.staleness_aware in someone else's loop, the parameter server) and the module
doctests run as shown; its Quick start commands install what they run, and CI runs its test command."""

import contextlib
import doctest
import io
import os
import re
import tomllib

import sajax.optim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_blocks(path):
  with open(path) as f:
    return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def _quick_start_commands():
  """The Quick start's two commands: (run the main job, run the tests)."""
  with open(os.path.join(ROOT, "README.md")) as f:
    section = f.read().split("## Quick start", 1)[1].split("\n## ", 1)[0]
  main, test = [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]
  return main, test


def _installed_requirements(command):
  """The requirement names that ``pip install -e ".[a,b]" && ...`` installs directly, through our pyproject."""
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  install = re.match(r"""pip install -e "?\.(?:\[([\w,]+)\])?"? && """, command)
  assert install, command
  names, todo = set(), list(project["dependencies"]) + [f"sajax[{install.group(1) or ''}]"]
  while todo:
    name, extras = re.match(r"([\w.-]+)(?:\[([\w,]*)\])?", todo.pop()).groups()
    if name == "sajax":
      for extra in filter(None, (extras or "").split(",")):
        todo.extend(project["optional-dependencies"][extra])
    else:
      names.add(name.lower())
  return names


def test_ci_runs_the_readme_test_command_in_a_fresh_venv():
  """.ci/run makes a venv in a temporary folder, activates it, then runs the README's test command verbatim."""
  with open(os.path.join(ROOT, ".ci", "run")) as f:
    commands = [line.strip() for line in f if line.strip() and not line.startswith(("#", "set ", "cd "))]
  assert commands[-1] == _quick_start_commands()[1]
  assert commands[:-1] == ['scratch="$(mktemp -d)"', """trap 'rm -rf "$scratch"' EXIT""",
                           'python3 -m venv "$scratch/venv"', 'source "$scratch/venv/bin/activate"']


def test_readme_commands_install_the_trainer_and_the_tests():
  main, test = _quick_start_commands()
  assert main.endswith("python launch/train.py") and test.endswith("python -m pytest -q")
  trainer = {"flax", "orbax-checkpoint", "tensorflow-datasets", "grain", "ml-collections", "matplotlib"}
  assert trainer <= _installed_requirements(main)
  assert trainer | {"pytest"} <= _installed_requirements(test)


def test_readme_snippet_runs_and_trains():
  blocks = [b for b in _python_blocks(os.path.join(ROOT, "README.md")) if "opt_state = tx.init(params)" in b]
  assert len(blocks) == 1
  namespace = {}
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102 - our own README
  # The loop with stale gradients still fits the linear model.
  assert float(namespace["loss"](namespace["params"], namespace["x"], namespace["y"])) < 1e-2
  assert "scale at σ=4: 0.25" in out.getvalue()


def test_doctests():
  result = doctest.testmod(sajax.optim)
  assert result.attempted >= 1 and result.failed == 0


def test_readme_parameter_server_snippet_runs():
  import jax.numpy as jnp
  import optax

  import sajax

  blocks = [b for b in _python_blocks(os.path.join(ROOT, "README.md")) if "sajax.ParameterServer(" in b]
  assert len(blocks) == 1
  params = {"w": jnp.ones((3,))}
  namespace = {"sajax": sajax, "optax": optax, "params": params, "grads": {"w": jnp.full((3,), 0.5)}}
  exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102 - our own README
  ps, result = namespace["ps"], namespace["result"]
  assert result == sajax.PushResult(applied_update=False, staleness=0, dropped=False)  # c = 4: buffered
  assert ps.version == 0 and ps.stats.count == 1 and ps.stats.histogram == {0: 1}
