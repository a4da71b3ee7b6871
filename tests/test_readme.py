"""The README's snippet (sajax.staleness_aware in someone else's loop) and the module doctests run as shown."""

import contextlib
import doctest
import io
import os
import re

import sajax.optim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_blocks(path):
  with open(path) as f:
    return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


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
