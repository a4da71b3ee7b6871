"""Imported at start-up by every Python child process of a test that puts this folder on PYTHONPATH
(tests/helpers.py's ``children_train_the_mlp``): in that process sajax's models are all the one-hidden-layer MLP,
so a grid test's cells (train.py children that build configs/fashion_mnist.py's small CNN) compile in milliseconds
instead of seconds. Such a test checks a grid's machinery (which cells run, resume, what the report says), never
what a model learns; the cells' config.json still names the model their config asked for."""
import importlib.abc
import importlib.util
import sys


class _EveryModelIsTheMLP(importlib.abc.MetaPathFinder):
  """When sajax.models is first imported (not before: importing it here would load jax before the child has set
  its XLA_FLAGS), every name in its registry is mapped to its MLP."""

  def find_spec(self, name, path, target=None):
    if name != "sajax.models":
      return None
    sys.meta_path.remove(self)
    spec = importlib.util.find_spec(name)
    load = spec.loader.exec_module

    def exec_module(module):
      load(module)
      for key in module._REGISTRY:
        module._REGISTRY[key] = module.MLP

    spec.loader.exec_module = exec_module
    return spec


sys.meta_path.insert(0, _EveryModelIsTheMLP())
