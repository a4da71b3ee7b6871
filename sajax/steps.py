"""Pure per-batch functions every executor compiles: the loss, its gradient, and evaluation counts.

Images arrive as stored (uint8) and are preprocessed on the device inside the compiled function
(augmentation when an rng is given), so the host only gathers indices and bytes.

The loss and the evaluation are one object per (model, preprocess) in a process (a flax module compares by its
fields; :func:`sajax.data.make_preprocess` by its static values), and so are the programs built on them here and
in :mod:`sajax.executors.learners`: a second ``sajax.train`` of the same model in a process (a sweep, a notebook)
reuses their jitted functions as they are, instead of tracing, lowering and compiling (or loading) them again.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
LossFn = Callable[[PyTree, jax.Array, jax.Array, jax.Array], jax.Array]


def one_per_process(build: Callable) -> Callable:
  """``build`` memoized on its arguments (the 32 most recent), so that equal arguments give the same function
  object and JAX reuses the jitted programs traced from it; arguments that cannot be hashed (a module with a
  list field) build a new one each time, as without this."""
  cached = functools.lru_cache(maxsize=32)(build)

  @functools.wraps(build)
  def reused(*args, **kwargs):
    try:
      hash((args, tuple(kwargs.items())))
    except TypeError:
      return build(*args, **kwargs)
    return cached(*args, **kwargs)
  reused.cache_clear = cached.cache_clear
  return reused


# ``jax.jit`` of one function object, once per process: the jit of a memoized function (an unravel, an optimizer's
# init, a schedule) is then one object too, and its programs are traced, lowered and compiled once.
jit_once = one_per_process(jax.jit)


@one_per_process
def make_loss_fn(model: Any, preprocess: Callable[[jax.Array, Any], jax.Array]) -> LossFn:
  """Mean softmax cross-entropy of ``model`` on a training mini-batch of μ examples, with augmentation.

  The returned ``loss(params, images, labels, rng)`` is pure: ``rng`` drives both augmentation and dropout.
  """

  def loss_fn(params: PyTree, images: jax.Array, labels: jax.Array, rng: jax.Array) -> jax.Array:
    aug_rng, dropout_rng = jax.random.split(rng)
    x = preprocess(images, aug_rng)
    logits = model.apply({"params": params}, x, train=True, rngs={"dropout": dropout_rng})
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  return loss_fn


class EvalCounts(NamedTuple):
  """Sums over a test batch: correct top-1, correct top-5, cross-entropy, and examples counted."""

  top1: jax.Array
  top5: jax.Array
  loss: jax.Array
  count: jax.Array


@one_per_process
def make_eval_fn(model: Any, preprocess: Callable[[jax.Array, Any], jax.Array]
                 ) -> Callable[[PyTree, jax.Array, jax.Array, jax.Array], EvalCounts]:
  """``eval(params, images, labels, mask) -> EvalCounts`` (masked examples, e.g. padding, do not count)."""

  def eval_fn(params: PyTree, images: jax.Array, labels: jax.Array, mask: jax.Array) -> EvalCounts:
    logits = model.apply({"params": params}, preprocess(images, None), train=False)
    mask = mask.astype(jnp.float32)
    k = min(5, logits.shape[-1])
    topk = jax.lax.top_k(logits, k)[1]
    hit5 = jnp.any(topk == labels[:, None], axis=-1)
    hit1 = topk[:, 0] == labels
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return EvalCounts(top1=jnp.sum(hit1 * mask), top5=jnp.sum(hit5 * mask), loss=jnp.sum(loss * mask),
                      count=jnp.sum(mask))

  return eval_fn


class Evaluator:
  """Test error over a whole split, with the batch spread over ``devices`` by ``jax.pmap``."""

  def __init__(self, model: Any, preprocess: Callable, split: Any, *, batch_size: int,
               devices: list | None = None) -> None:
    self.devices = devices or jax.local_devices()
    d = len(self.devices)
    self.split = split
    self.batch_size = max(d, (batch_size // d) * d)
    self._step = _eval_step(model, preprocess, tuple(self.devices))

  def __call__(self, params: PyTree) -> dict[str, float]:
    """``{test_error, test_error_top5, test_loss}`` of ``params`` (one copy, on any device)."""
    d = len(self.devices)
    n = len(self.split)
    totals = np.zeros(4, np.float64)
    for start in range(0, n, self.batch_size):
      idx = np.arange(start, min(start + self.batch_size, n))
      images, labels = self.split.gather(idx)
      pad = self.batch_size - len(idx)
      mask = np.concatenate([np.ones(len(idx), np.float32), np.zeros(pad, np.float32)])
      if pad:
        images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
        labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
      shard = lambda a: a.reshape((d, -1) + a.shape[1:])  # noqa: E731
      counts = self._step(params, shard(images), shard(labels.astype(np.int32)), shard(mask))
      totals += np.array([np.asarray(c).sum(dtype=np.float64) for c in counts])
    top1, top5, loss, count = totals
    return {"test_error": 1.0 - top1 / count, "test_error_top5": 1.0 - top5 / count, "test_loss": loss / count}


@one_per_process
def _eval_step(model: Any, preprocess: Callable, devices: tuple) -> Callable:
  """:func:`make_eval_fn` pmapped over ``devices``, one per (model, preprocess, devices) in a process.

  No collective here: per-device counts are summed on the host. A second program with collectives could
  interleave with the training step's all-reduce on XLA CPU's shared thread pool and deadlock. The params are
  broadcast by pmap itself (in_axes=None): no per-evaluation stacking."""
  return jax.pmap(make_eval_fn(model, preprocess), in_axes=(None, 0, 0, 0), devices=list(devices))


def replicate(tree: PyTree, devices: list) -> PyTree:
  """One copy of ``tree`` per device, stacked on a leading axis, as ``jax.pmap`` expects.

  In one process the copies are laid out as ``jax.pmap`` lays out its own outputs (an identity pmap of the tree
  stacked on the host, one compilation for the whole tree): a pmapped step fed them compiles once. With flax's
  ``replicate`` its first call saw another layout than its later calls and compiled twice, and building the
  stack compiled two programs per leaf shape. Several processes (each feeds its own devices) keep flax's.
  """
  if jax.process_count() > 1:
    from flax import jax_utils
    return jax_utils.replicate(tree, devices)
  stacked = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (len(devices), *np.shape(x))), tree)
  return _identity_pmap(tuple(devices))(stacked)


@one_per_process
def _identity_pmap(devices: tuple) -> Callable[[PyTree], PyTree]:
  """The identity, pmapped over ``devices``: one object per device list, so each run's trees reuse its programs."""
  return jax.pmap(lambda t: t, devices=list(devices))


def unreplicate(tree: PyTree) -> PyTree:
  """The first device's copy of a replicated tree, as arrays on that one device.

  Read through the host: indexing the replicated arrays (``x[0]``) compiled a gather per leaf shape and gave
  arrays laid out over the pmap's devices, which orbax then saved by slicing, compiling one program per leaf
  shape and device at the first checkpoint."""
  def first(x: jax.Array) -> jax.Array:
    shard = x.addressable_shards[0]
    return jax.device_put(np.asarray(shard.data)[0], shard.device)
  return jax.tree.map(first, tree)
