"""sajax: staleness-aware asynchronous SGD (Zhang, Gupta, Lian & Liu, IJCAI 2016) in JAX.

The optax transform (:func:`staleness_aware`, :func:`staleness_scale`) imports on its own; the trainers
(:func:`train`) build on it.
"""

from sajax.optim import (StalenessAwareState, StalenessPolicy, available_policies, get_policy, policy_arg_names,
                         register_policy, staleness_aware, staleness_scale)
from sajax import policies  # noqa: E402,F401 - registers the built-in policies
from sajax.protocol import Protocol
from sajax.server import ParameterServer, PushResult, StalenessStats

__all__ = [
    "ParameterServer", "Protocol", "PushResult", "StalenessAwareState", "StalenessStats", "StalenessPolicy",
    "available_policies", "get_policy", "policies", "policy_arg_names", "register_policy", "staleness_aware",
    "staleness_scale", "train",
]
__version__ = "0.1.0"


def __getattr__(name):
  # The trainer pulls in data, models, orbax and TensorBoard: load it only when asked for.
  if name == "train":
    from sajax.trainer import train
    return train
  raise AttributeError(f"module 'sajax' has no attribute {name!r}")
