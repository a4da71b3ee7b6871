"""The networks: shapes, plain params, Caffe's LRN and pooling against naive loops, dropout, trainability."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sajax import models


def _naive_lrn(x, size, alpha, beta, k, within_channel):
  """Caffe's LRN written as loops over an NHWC numpy array (float64)."""
  x = np.asarray(x, np.float64)
  n, h, w, c = x.shape
  half = (size - 1) // 2
  out = np.empty_like(x)
  for b in range(n):
    for i in range(h):
      for j in range(w):
        for ch in range(c):
          total = 0.0
          if within_channel:
            for di in range(-half, half + 1):
              for dj in range(-half, half + 1):
                if 0 <= i + di < h and 0 <= j + dj < w:
                  total += x[b, i + di, j + dj, ch] ** 2
            scale = k + alpha / size**2 * total
          else:
            for dc in range(-half, half + 1):
              if 0 <= ch + dc < c:
                total += x[b, i, j, ch + dc] ** 2
            scale = k + alpha / size * total
          out[b, i, j, ch] = x[b, i, j, ch] / scale**beta
  return out


def _naive_caffe_pool(x, window, stride, mode):
  """Caffe's PoolingLayer::Forward_cpu for pad = 0, as loops over an NHWC numpy array."""
  x = np.asarray(x, np.float64)
  n, h, w, c = x.shape
  out_h = int(math.ceil((h - window) / stride)) + 1
  out_w = int(math.ceil((w - window) / stride)) + 1
  out = np.empty((n, out_h, out_w, c))
  for i in range(out_h):
    for j in range(out_w):
      h0, w0 = i * stride, j * stride
      h1, w1 = min(h0 + window, h), min(w0 + window, w)
      patch = x[:, h0:h1, w0:w1, :]
      if mode == "max":
        out[:, i, j, :] = patch.max(axis=(1, 2))
      else:
        out[:, i, j, :] = patch.sum(axis=(1, 2)) / ((h1 - h0) * (w1 - w0))
  return out


_SHAPES = {"mlp": (28, 28, 1), "small_cnn": (28, 28, 1), "cifar10_full": (32, 32, 3), "alexnet": (64, 64, 3)}


# The tests using ``built`` go to one pytest-xdist worker, which builds the models once (session scope: a
# module-scoped fixture is built again whenever the worker ran another module's test in between).
pytestmark = pytest.mark.xdist_group("models-built")


@pytest.fixture(scope="session")
def built():
  """Every model (5 classes; alexnet at 64×64×3, the smallest size its docstring promises) and its params."""
  out = {}
  for name, shape in _SHAPES.items():
    model = models.create_model(name, 5)
    out[name] = model, models.init_params(model, jax.random.key(0), shape)
  return out


@pytest.mark.parametrize("within_channel", [True, False])
@pytest.mark.parametrize("size", [3, 5])
def test_lrn_matches_naive_caffe_loops(within_channel, size):
  x = np.random.default_rng(size).normal(size=(2, 5, 6, 7)).astype(np.float32) * 3.0
  # Large α and k ≠ 1 so that every term of the formula matters at float32 precision.
  got = jax.jit(models.local_response_norm, static_argnums=(1, 2, 3, 4, 5))(
      x, size, 0.7, 0.75, 2.0, within_channel)
  want = _naive_lrn(x, size, 0.7, 0.75, 2.0, within_channel)
  assert got.shape == x.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert not np.allclose(want, x / 2.0**0.75, rtol=1e-3)  # The neighbourhood really contributes.


def test_lrn_rejects_even_size():
  with pytest.raises(ValueError, match="4"):
    models.local_response_norm(jnp.ones((1, 4, 4, 3)), 4, 1e-4, 0.75)


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("size", [7, 8, 32])
def test_caffe_pool_matches_naive_caffe_loops(mode, size):
  x = np.random.default_rng(size).normal(size=(2, size, size, 3)).astype(np.float32)
  got = models.caffe_pool(jnp.asarray(x), 3, 2, mode)
  want = _naive_caffe_pool(x, 3, 2, mode)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_caffe_pool_uses_ceil_mode_sizes():
  x = jnp.ones((1, 32, 32, 1))
  sizes = []
  for _ in range(3):
    x = models.caffe_pool(x, 3, 2, "avg")
    sizes.append(x.shape[1])
  assert sizes == [16, 8, 4]
  np.testing.assert_allclose(x, 1.0)  # Edge windows average only in-image elements.
  with pytest.raises(ValueError, match="'min'"):
    models.caffe_pool(x, 3, 2, "min")


@pytest.mark.parametrize("name", ["mlp", "small_cnn", "cifar10_full"])
def test_output_shapes_and_plain_params(built, name):
  model, params = built[name]
  x = jax.random.normal(jax.random.key(1), (3, *_SHAPES[name]), jnp.float32)
  variables = jax.eval_shape(lambda rng: model.init(rng, x, train=False), jax.random.key(0))
  assert set(variables) == {"params"}  # No batch stats or any other mutable collection.
  assert type(params) is dict and all(type(v) is dict for v in params.values())
  apply = jax.jit(lambda p, x, train: model.apply({"params": p}, x, train=train), static_argnums=2)
  logits = apply(params, x, False)
  assert logits.shape == (3, 5) and logits.dtype == jnp.float32
  # No dropout in these nets: train=True needs no rng and gives the same function.
  np.testing.assert_allclose(apply(params, x, True), logits, rtol=1e-5, atol=1e-6)


def test_cifar10_full_parameter_count_matches_caffe_net():
  model = models.create_model("cifar10_full", 10)
  params = jax.eval_shape(lambda rng: models.init_params(model, rng, (32, 32, 3)), jax.random.key(0))
  expected = (5 * 5 * 3 * 32 + 32) + (5 * 5 * 32 * 32 + 32) + (5 * 5 * 32 * 64 + 64) + (4 * 4 * 64 * 10 + 10)
  assert models.count_params(params) == expected == 89578
  assert params["ip1"]["kernel"].shape == (4 * 4 * 64, 10)  # 32 → 16 → 8 → 4 ceil-mode pooling.


def test_caffe_fillers(built):
  params = models.init_params(models.Cifar10Full(5, caffe_init=True), jax.random.key(0), (32, 32, 3))
  np.testing.assert_allclose(np.std(params["conv1"]["kernel"]), 1e-4, rtol=0.1)
  np.testing.assert_allclose(np.std(params["conv3"]["kernel"]), 1e-2, rtol=0.1)
  assert all(not np.any(layer["bias"]) for layer in params.values())
  default = built["cifar10_full"][1]
  assert np.std(default["conv1"]["kernel"]) > 0.05  # LeCun-normal: 1/sqrt(75) ≈ 0.115.


def test_alexnet_small_input_shape(built):
  model, params = built["alexnet"]
  assert type(params) is dict
  assert params["fc6"]["kernel"].shape == (1 * 1 * 256, 4096)
  assert params["conv2"]["kernel"].shape == (5, 5, 48, 256)  # Two groups, as in Caffe.
  x = jax.random.normal(jax.random.key(1), (2, 67, 67, 3))  # 67 → 15 → 7 → 3 → 1 after pool5.
  logits = model.apply({"params": params}, x)
  assert logits.shape == (2, 5) and logits.dtype == jnp.float32


def test_alexnet_imagenet_shapes():
  model = models.create_model("alexnet", 1000)
  params = jax.eval_shape(lambda rng: models.init_params(model, rng, (224, 224, 3)), jax.random.key(0))
  assert params["fc6"]["kernel"].shape == (6 * 6 * 256, 4096)
  assert models.count_params(params) == 60_965_224  # BVLC AlexNet's count.
  logits = jax.eval_shape(lambda p, x: model.apply({"params": p}, x), params,
                          jax.ShapeDtypeStruct((4, 224, 224, 3), jnp.float32))
  assert logits.shape == (4, 1000) and logits.dtype == jnp.float32


def test_alexnet_dropout_only_in_training(built):
  model, params = built["alexnet"]
  x = jax.random.normal(jax.random.key(2), (2, 64, 64, 3))
  apply = jax.jit(lambda p, x, rng: model.apply({"params": p}, x, train=True, rngs={"dropout": rng}))
  a = apply(params, x, jax.random.key(10))
  b = apply(params, x, jax.random.key(11))
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(a, apply(params, x, jax.random.key(10)))
  evaluate = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))
  e1 = evaluate(params, x)
  np.testing.assert_array_equal(e1, evaluate(params, x))
  assert not np.allclose(a, e1)
  with pytest.raises(Exception):  # Training without a dropout rng is an error, not silent.
    model.apply({"params": params}, x, train=True)


def test_unknown_model_and_bad_num_classes():
  with pytest.raises(ValueError, match=r"'nope'.*mlp, small_cnn, cifar10_full, alexnet"):
    models.create_model("nope", 10)
  with pytest.raises(ValueError, match="0"):
    models.create_model("small_cnn", 0)
  assert models.MODELS == ("mlp", "small_cnn", "cifar10_full", "alexnet")
  for name in models.MODELS:
    assert isinstance(models.create_model(name, 3), models.nn.Module)


def test_mlp_is_784_64_classes_on_any_input_size():
  """fc1 sees the flattened image (28·28·1 = 784 or 32·32·3 = 3,072 inputs), 64 hidden units, fc2 the classes."""
  for shape, inputs in [((28, 28, 1), 784), ((32, 32, 3), 3072)]:
    params = models.init_params(models.create_model("mlp", 10), jax.random.key(0), shape)
    assert jax.tree.map(jnp.shape, params) == {"fc1": {"kernel": (inputs, 64), "bias": (64,)},
                                                "fc2": {"kernel": (64, 10), "bias": (10,)}}
    assert models.count_params(params) == inputs * 64 + 64 + 64 * 10 + 10


@pytest.mark.parametrize("name", ["mlp", "small_cnn"])
def test_sgd_steps_reduce_loss(built, name):
  model, params = built[name]
  x = jax.random.uniform(jax.random.key(1), (32, 28, 28, 1))
  y = jax.random.randint(jax.random.key(2), (32,), 0, 5)

  def loss_fn(p):
    logits = model.apply({"params": p}, x, train=True)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

  grad_fn = jax.jit(jax.value_and_grad(loss_fn))
  first, grads = grad_fn(params)
  leaves = [np.asarray(g) for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(g).all() for g in leaves)
  assert any(np.abs(g).max() > 0 for g in leaves)
  step = jax.jit(lambda p, g: jax.tree.map(lambda p, g: p - 0.05 * g, p, g))
  loss = first
  for _ in range(5):
    params = step(params, grads)
    loss, grads = grad_fn(params)
  assert float(loss) < 0.9 * float(first)


@pytest.mark.parametrize("name, shape", [("cifar10_full", (32, 32, 3)), ("alexnet", (67, 67, 3))])
def test_paper_networks_are_differentiable(name, shape):
  """LRN and Caffe pooling must have gradients: the trainer differentiates through them."""
  model = models.create_model(name, 10)
  params = models.init_params(model, jax.random.PRNGKey(0), shape)
  x = jax.random.normal(jax.random.PRNGKey(1), (2,) + shape)
  # One jitted program (eagerly, every primitive of the forward and backward pass compiled on its own: 142 of them
  # for alexnet), and the checks on the host.
  grads = jax.jit(jax.grad(lambda p: model.apply({"params": p}, x, train=True,
                                                 rngs={"dropout": jax.random.PRNGKey(2)}).sum()))(params)
  leaves = [np.asarray(g) for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(g).all() for g in leaves)
  assert any(np.abs(g).sum() > 0 for g in leaves)
