"""sajax: staleness-aware asynchronous SGD (Zhang, Gupta, Lian & Liu, IJCAI 2016) in JAX.

The optax transform (:func:`staleness_aware`, :func:`staleness_scale`), the staleness-aware momentum rules
(:func:`momentum_rule`, :mod:`sajax.momentum`), the protocols and the parameter-server
core need only jax, optax and numpy (a plain ``pip install``); the trainers (:func:`train`) build on them and need
the ``train`` extra (``pip install 'sajax[train]'``).
"""

from sajax.momentum import (MOMENTUM_RULES, compensated_momentum, delayed_nesterov, lookahead_momentum,
                            momentum_rule)
from sajax.optim import (StalenessAwareState, StalenessPolicy, available_policies, get_policy, policy_arg_names,
                         register_policy, staleness_aware, staleness_scale)
from sajax import policies  # noqa: E402,F401 - registers the built-in policies
from sajax.protocol import Protocol
from sajax.server import ParameterServer, PushResult
from sajax.stats import StalenessStats

__all__ = [
    "MOMENTUM_RULES", "ParameterServer", "Protocol", "PushResult", "StalenessAwareState", "StalenessStats",
    "StalenessPolicy", "available_policies", "compensated_momentum", "delayed_nesterov", "get_policy",
    "lookahead_momentum", "momentum_rule", "policies", "policy_arg_names", "register_policy", "staleness_aware",
    "staleness_scale", "train",
]
__version__ = "0.1.0"


def __getattr__(name):
  # The trainer pulls in data, models, orbax and TensorBoard (the train extra): load it only when asked for.
  if name == "train":
    try:
      from sajax.trainer import train
    except ModuleNotFoundError as e:
      if (e.name or "").split(".")[0] == "sajax":
        raise
      raise ImportError(f"sajax.train needs the trainer's dependencies ({e.name} is not installed): "
                        "pip install 'sajax[train]'") from e
    return train
  raise AttributeError(f"module 'sajax' has no attribute {name!r}")
