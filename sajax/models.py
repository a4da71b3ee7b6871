"""Networks for the staleness-aware async SGD experiments (Flax linen).

Zhang et al. (IJCAI 2016), "Staleness-aware Async-SGD for Distributed Deep Learning", train three kinds of
network; this module provides one of each:

* ``mlp`` — one hidden layer of 64 units: any input size, compiles in milliseconds (quick checks, the test
  suite's runs, a model whose gradient costs less than its communication).
* ``small_cnn`` — a small two-conv MNIST network (our fast CPU default; the paper's MNIST net is similar in
  spirit).
* ``cifar10_full`` — Caffe's ``examples/cifar10/cifar10_full_train_test.prototxt``, the paper's CIFAR10
  network, layer by layer (within-channel LRN, Caffe's ceil-mode pooling).
* ``alexnet`` — Caffe's ``models/bvlc_alexnet``, the paper's ImageNet network.

Every model maps NHWC float32 images to ``(batch, num_classes)`` float32 logits with
``model.apply({'params': params}, x, train=...)``. None holds mutable collections (no BatchNorm): the
parameter server owns the whole model state as one plain params pytree. Only ``alexnet`` uses randomness
(dropout, ``train=True`` only, from the ``'dropout'`` rng).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

MODELS: tuple[str, ...] = ("mlp", "small_cnn", "cifar10_full", "alexnet")

Initializer = Callable[..., jax.Array]


def local_response_norm(x: jax.Array, size: int, alpha: float, beta: float, k: float = 1.0,
                        within_channel: bool = True) -> jax.Array:
  """Caffe's local response normalisation (LRN layer) of an NHWC array.

  With ``s = size`` and the sum running over a zero-padded window centred on each element:

  * ``WITHIN_CHANNEL``: ``y = x / (k + α/s² · Σ_{s×s spatial window, same channel} x²)^β``;
  * ``ACROSS_CHANNELS``: ``y = x / (k + α/s · Σ_{s neighbouring channels, same pixel} x²)^β``.

  This is Caffe's definition (the window sum is divided by the window size, with padding counted), not
  TensorFlow's ``tf.nn.local_response_normalization``, which does not divide α.

  Args:
    x: array of shape ``(batch, height, width, channels)``.
    size: side of the window, odd (Caffe's ``local_size``).
    alpha: scale α.
    beta: exponent β.
    k: additive constant (Caffe's ``k``, 1 by default).
    within_channel: ``True`` for Caffe's ``WITHIN_CHANNEL`` region, ``False`` for ``ACROSS_CHANNELS``.

  Returns:
    The normalised array, same shape and dtype as ``x``.
  """
  if size < 1 or size % 2 != 1:
    raise ValueError(f"LRN size must be a positive odd integer, got {size}")
  half = (size - 1) // 2
  if within_channel:
    window, pad, count = (1, size, size, 1), ((0, 0), (half, half), (half, half), (0, 0)), size * size
  else:
    window, pad, count = (1, 1, 1, size), ((0, 0), (0, 0), (0, 0), (half, half)), size
  # A Python-scalar 0 init makes lax.reduce_window a differentiable window sum (a jnp array init does not).
  total = lax.reduce_window(jnp.square(x), 0.0, lax.add, window, (1, 1, 1, 1), pad)
  return x * (k + (alpha / count) * total) ** -beta


def caffe_pool(x: jax.Array, window: int, stride: int, mode: str) -> jax.Array:
  """Caffe's unpadded ``Pooling`` layer over the spatial axes of an NHWC array.

  Caffe rounds the output size up, ``out = ceil((in - window) / stride) + 1`` (so 32 → 16 → 8 → 4 with a
  3×3/2 window, where ``VALID`` pooling would give 15 → 7 → 3). The last window may run past the bottom/right
  edge; as in Caffe it only sees the in-image elements: ``"max"`` takes their maximum (padding is ``-inf``) and
  ``"avg"`` divides their sum by their number (Caffe's ``pool_size`` for ``pad = 0``), not by ``window²``.

  Args:
    x: array of shape ``(batch, height, width, channels)``.
    window: side of the square pooling window (``kernel_size``).
    stride: step between windows.
    mode: ``"max"`` or ``"avg"``.

  Returns:
    The pooled array of shape ``(batch, out_height, out_width, channels)``.
  """
  pads = []
  for size in x.shape[1:3]:
    out = -(-(size - window) // stride) + 1
    pads.append((0, max((out - 1) * stride + window - size, 0)))
  if mode == "max":
    return nn.max_pool(x, (window, window), (stride, stride), padding=pads)
  if mode == "avg":
    return nn.avg_pool(x, (window, window), (stride, stride), padding=pads, count_include_pad=False)
  raise ValueError(f"unknown pooling mode {mode!r}; allowed: max, avg")


def _gaussian(std: float, use: bool, default: Initializer = nn.initializers.lecun_normal()) -> Initializer:
  """Caffe's ``gaussian`` weight filler when ``use`` is set, else ``default``."""
  return nn.initializers.normal(std) if use else default


def _constant(value: float, use: bool) -> Initializer:
  """Caffe's ``constant`` bias filler when ``use`` is set, else zeros (Flax's default)."""
  return nn.initializers.constant(value) if use else nn.initializers.zeros


class MLP(nn.Module):
  """One hidden layer: flatten → dense 64 relu → dense ``num_classes`` (50,890 parameters on 28×28 MNIST).

  The cheapest model here that still learns MNIST: its XLA programs compile in milliseconds where a
  convolution's take about a second on CPU, which is what short runs (tests, a first try of a config) pay for
  most. No dropout and no normalisation.

  Attributes:
    num_classes: number of output logits.
    hidden: width of the hidden layer.
  """
  num_classes: int
  hidden: int = 64

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    del train  # Same function in training and evaluation.
    x = nn.relu(nn.Dense(self.hidden, name="fc1")(x.reshape((x.shape[0], -1))))
    return nn.Dense(self.num_classes, name="fc2")(x)


class SmallCNN(nn.Module):
  """A small convolutional network for 28×28×1 MNIST, cheap enough for a 2-core CPU.

  conv 32 3×3 relu → max pool 2 → conv 64 3×3 relu → max pool 2 → dense 128 relu → dense ``num_classes``
  (the Flax MNIST example's layout with max pooling; about 4 M multiply-adds per 28×28 image).
  Works on any input size; no dropout and no normalisation.

  Attributes:
    num_classes: number of output logits.
  """
  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    del train  # Same function in training and evaluation.
    x = nn.relu(nn.Conv(32, (3, 3), name="conv1")(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(64, (3, 3), name="conv2")(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(128, name="fc1")(x))
    return nn.Dense(self.num_classes, name="fc2")(x)


class Cifar10Full(nn.Module):
  """Caffe's ``cifar10_full`` network, the CIFAR10 model of Zhang et al. (2016).

  From BVLC Caffe ``examples/cifar10/cifar10_full_train_test.prototxt``, for 32×32×3 input:

  conv1 5×5 32 pad 2 → max pool 3/2 → relu → LRN → conv2 5×5 32 pad 2 → relu → avg pool 3/2 → LRN →
  conv3 5×5 64 pad 2 → relu → avg pool 3/2 → ip1 dense ``num_classes``.

  Both LRNs are ``WITHIN_CHANNEL`` with local size 3, α = 5e-5, β = 0.75 (see `local_response_norm`); pooling
  follows Caffe's ceil-mode sizes (see `caffe_pool`), so the maps are 32 → 16 → 8 → 4 and ip1 sees 4×4×64
  features (89,578 parameters for 10 classes). The prototxt's per-layer ``lr_mult``/``decay_mult`` (e.g. the
  ×250 weight decay on ip1) belong to the optimiser and are not modelled here.

  Attributes:
    num_classes: number of output logits.
    caffe_init: use the prototxt's fillers (Gaussian std 1e-4 for conv1, 0.01 elsewhere, zero biases), which
      assume Caffe's raw mean-subtracted 0–255 pixels. The default, Flax's LeCun-normal, is insensitive to
      the input scale.
  """
  num_classes: int
  caffe_init: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    del train  # No dropout in this network.
    c = self.caffe_init

    def conv(features: int, std: float, name: str) -> nn.Conv:
      return nn.Conv(features, (5, 5), padding=((2, 2), (2, 2)), kernel_init=_gaussian(std, c),
                     bias_init=_constant(0.0, c), name=name)

    def lrn(y: jax.Array) -> jax.Array:
      return local_response_norm(y, size=3, alpha=5e-5, beta=0.75, within_channel=True)

    x = conv(32, 1e-4, "conv1")(x)
    x = lrn(nn.relu(caffe_pool(x, 3, 2, "max")))
    x = nn.relu(conv(32, 0.01, "conv2")(x))
    x = lrn(caffe_pool(x, 3, 2, "avg"))
    x = nn.relu(conv(64, 0.01, "conv3")(x))
    x = caffe_pool(x, 3, 2, "avg")
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(self.num_classes, kernel_init=_gaussian(0.01, c), bias_init=_constant(0.0, c),
                    name="ip1")(x)


class AlexNet(nn.Module):
  """Caffe's BVLC AlexNet (Krizhevsky et al., 2012), the ImageNet model of Zhang et al. (2016).

  From BVLC Caffe ``models/bvlc_alexnet/train_val.prototxt``:

  conv1 11×11/4 96 relu LRN max pool 3/2 → conv2 5×5 256 pad 2 (2 groups) relu LRN max pool 3/2 →
  conv3 3×3 384 pad 1 relu → conv4 3×3 384 pad 1 (2 groups) relu → conv5 3×3 256 pad 1 (2 groups) relu
  → max pool 3/2 → fc6 dense 4096 relu dropout 0.5 → fc7 dense 4096 relu dropout 0.5 → fc8 dense
  ``num_classes``.

  The LRNs are ``ACROSS_CHANNELS`` with local size 5, α = 1e-4, β = 0.75. The grouped convolutions of the
  original two-GPU net are kept (``feature_group_count=2``), so the parameter count matches Caffe's
  (60,965,224 for 1000 classes). Pooling is Caffe's ceil mode (`caffe_pool`).

  Input is 224×224×3 ImageNet crops (Caffe crops 227; both give 6×6×256 features before fc6). Any input of
  at least 64×64 works: fc6's input size follows from the final feature map. Dropout is active only with
  ``train=True`` and then needs a ``'dropout'`` rng.

  Attributes:
    num_classes: number of output logits.
    hidden: width of fc6 and fc7.
    dropout_rate: dropout probability after fc6 and fc7.
    caffe_init: use the prototxt's fillers (Gaussian std 0.01 for convs and fc8, 0.005 for fc6/fc7; bias 0.1
      on conv2, conv4, conv5, fc6, fc7, else 0). Default: Flax's LeCun-normal weights and zero biases.
  """
  num_classes: int
  hidden: int = 4096
  dropout_rate: float = 0.5
  caffe_init: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    c = self.caffe_init

    def conv(features: int, kernel: int, name: str, *, stride: int = 1, pad: int = 0, groups: int = 1,
             bias: float = 0.0) -> nn.Conv:
      return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)),
                     feature_group_count=groups, kernel_init=_gaussian(0.01, c),
                     bias_init=_constant(bias, c), name=name)

    def lrn(y: jax.Array) -> jax.Array:
      return local_response_norm(y, size=5, alpha=1e-4, beta=0.75, within_channel=False)

    def dense(features: int, std: float, bias: float, name: str) -> nn.Dense:
      return nn.Dense(features, kernel_init=_gaussian(std, c), bias_init=_constant(bias, c), name=name)

    x = caffe_pool(lrn(nn.relu(conv(96, 11, "conv1", stride=4)(x))), 3, 2, "max")
    x = caffe_pool(lrn(nn.relu(conv(256, 5, "conv2", pad=2, groups=2, bias=0.1)(x))), 3, 2, "max")
    x = nn.relu(conv(384, 3, "conv3", pad=1)(x))
    x = nn.relu(conv(384, 3, "conv4", pad=1, groups=2, bias=0.1)(x))
    x = nn.relu(conv(256, 3, "conv5", pad=1, groups=2, bias=0.1)(x))
    x = caffe_pool(x, 3, 2, "max")
    x = x.reshape((x.shape[0], -1))
    for name in ("fc6", "fc7"):
      x = nn.relu(dense(self.hidden, 0.005, 0.1, name)(x))
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return dense(self.num_classes, 0.01, 0.0, "fc8")(x)


_REGISTRY: dict[str, type[nn.Module]] = {
    "mlp": MLP,
    "small_cnn": SmallCNN,
    "cifar10_full": Cifar10Full,
    "alexnet": AlexNet,
}


def create_model(name: str, num_classes: int) -> nn.Module:
  """Builds one of the `MODELS` by name.

  Args:
    name: ``"mlp"`` (any input, quick), ``"small_cnn"`` (MNIST), ``"cifar10_full"`` (CIFAR10) or ``"alexnet"``
      (ImageNet).
    num_classes: number of output logits, at least 1.

  Returns:
    The unbound Flax module; initialise it with `init_params`.

  Raises:
    ValueError: for an unknown name or ``num_classes < 1``.
  """
  if name not in _REGISTRY:
    raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODELS)}")
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")
  return _REGISTRY[name](num_classes=num_classes)


def init_params(model: nn.Module, rng: jax.Array, input_shape: tuple[int, int, int]) -> dict[str, Any]:
  """Initialises ``model`` for single images of shape ``input_shape``.

  Args:
    model: a module from `create_model`.
    rng: PRNG key for the initialisers.
    input_shape: ``(height, width, channels)`` of one NHWC example.

  Returns:
    The ``'params'`` collection as a plain nested dict (the models have no other collection).
  """
  return flax.core.unfreeze(_init(model, rng, tuple(input_shape)))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init(model: nn.Module, rng: jax.Array, input_shape: tuple[int, ...]) -> Any:
  # One compiled program (cached per model and shape) instead of eager op-by-op initialisation.
  return model.init(rng, jnp.zeros((1, *input_shape), jnp.float32), train=False)["params"]


def count_params(params: Any) -> int:
  """Total number of scalars in a params pytree (arrays or ``jax.ShapeDtypeStruct`` leaves)."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
