"""Imported at start-up by every Python child process of the test session (tests/conftest.py puts this folder on
PYTHONPATH): launch/train.py runs, mpiexec ranks, Ray actors, grids' cells. Nothing is imported here (jax must not
load before a child has set its XLA_FLAGS); two hooks act when the module they change is first imported:

- ``jax._src.cache_key``: the persistent compilation cache keyed without the device assignment, as in the test
  process (one_cache_entry.py), so that a child loads what the test process or another child compiled for another
  device instead of compiling it again;
- ``sajax.models``, only with SAJAX_TESTS_EVERY_MODEL_IS_THE_MLP=1 (tests/helpers.py's ``every_model_is_the_mlp``):
  every name in its registry is mapped to its MLP, so a grid test's cells (train.py children that build
  configs/fashion_mnist.py's small CNN) compile in milliseconds instead of seconds. Such a test checks a grid's
  machinery (which cells run, resume, what the report says), never what a model learns; the cells' config.json
  still names the model their config asked for."""
import importlib.abc
import importlib.util
import os
import sys


def _every_model_is_the_mlp(models):
  for key in models._REGISTRY:
    models._REGISTRY[key] = models.MLP


def _one_cache_entry(cache_key):
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from one_cache_entry import key_without_device_assignment
  key_without_device_assignment(cache_key)


class _AfterImport(importlib.abc.MetaPathFinder):
  """Calls ``change(module)`` once ``name`` has been imported (its first import)."""

  def __init__(self, name, change):
    self.name, self.change = name, change

  def find_spec(self, name, path, target=None):
    if name != self.name:
      return None
    sys.meta_path.remove(self)
    spec = importlib.util.find_spec(name)
    load = spec.loader.exec_module

    def exec_module(module):
      load(module)
      self.change(module)

    spec.loader.exec_module = exec_module
    return spec


sys.meta_path.insert(0, _AfterImport("jax._src.cache_key", _one_cache_entry))
if os.environ.get("SAJAX_TESTS_EVERY_MODEL_IS_THE_MLP") == "1":
  sys.meta_path.insert(0, _AfterImport("sajax.models", _every_model_is_the_mlp))
