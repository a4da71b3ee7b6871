"""MNIST-format IDX files: finding, reading and checking the four files of MNIST or Fashion-MNIST.

An IDX file (LeCun et al.'s MNIST format, also Fashion-MNIST's) is a 4-byte magic number — two zero bytes,
a type code (0x08: unsigned bytes, the only type these sets use) and the number of dimensions d — then d
big-endian uint32 sizes, then the values in row-major order. A set is four files, gzipped or not:
``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
``t10k-labels-idx1-ubyte`` (``.gz`` added when gzipped; the ``train-images.idx3-ubyte`` spelling of some
unpacked copies is accepted too).

:func:`find_folder` says where a set's files are: ``--config.data_dir`` and ``data_dir/<name>`` when a
``data_dir`` is given (only those: a folder the user names must hold the set), else the system folder of a
Debian package. :func:`load_arrays` reads them as the λ learners' uint8 images. Every problem is an
:class:`IdxError` (a ``ValueError``) with one line naming the file and what is wrong.
"""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

FILES: dict[str, str] = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
                         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
"""The four files of a set by role, without the optional ``.gz``."""

SYSTEM_FOLDERS: dict[str, str] = {"fashion_mnist": "/usr/share/datasets/fashion-mnist"}
"""Where a system package puts a set's IDX files (Debian's ``dataset-fashion-mnist``)."""

SYSTEM_PACKAGES: dict[str, str] = {"fashion_mnist": "dataset-fashion-mnist"}

_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"


class IdxError(ValueError):
  """A missing, incomplete or malformed IDX set; the message is one line naming the file."""


def parse(raw: bytes, *, name: str = "IDX data", ndim: int | None = None) -> np.ndarray:
  """The uint8 array stored in the bytes of one IDX file (already gunzipped).

  Args:
    raw: the file's bytes.
    name: the file, for messages.
    ndim: the number of dimensions the file must have (1 for labels, 3 for images), or None for any.

  Returns:
    A read-only uint8 array of the stored shape.

  Raises:
    IdxError: a bad magic number, a type other than unsigned bytes, the wrong number of dimensions, or a size
      that does not match the header (truncated or with trailing bytes).
  """
  if len(raw) < 4 or raw[:2] != b"\0\0":
    raise IdxError(f"{name} is not an IDX file: magic number {raw[:4].hex() or 'missing'}; allowed: 0000 08 0d "
                   "(two zero bytes, type 0x08, d dimensions)")
  kind, dims = raw[2], raw[3]
  if kind != _UBYTE:
    raise IdxError(f"{name} holds IDX type 0x{kind:02x}; allowed: 0x08 (unsigned bytes)")
  if ndim is not None and dims != ndim:
    raise IdxError(f"{name} has {dims} dimensions; allowed: {ndim}")
  header = 4 + 4 * dims
  if len(raw) < header:
    raise IdxError(f"{name} is truncated: {len(raw)} bytes, shorter than its {header}-byte header; allowed: a "
                   "whole IDX file")
  shape = tuple(int(s) for s in np.frombuffer(raw, ">u4", dims, 4))
  expected = header + int(np.prod(shape, dtype=np.int64))
  if len(raw) != expected:
    state = "truncated" if len(raw) < expected else "longer than its header says"
    raise IdxError(f"{name} is {state}: {len(raw)} bytes for shape {shape}; allowed: exactly {expected} bytes")
  return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def read(path: str, *, ndim: int | None = None) -> np.ndarray:
  """The array in the IDX file at ``path``, gunzipped first when it starts with the gzip magic (any name)."""
  with open(path, "rb") as f:
    raw = f.read()
  if raw[:2] == _GZIP_MAGIC:
    try:
      raw = gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:
      raise IdxError(f"{path} is a truncated or corrupt gzip file ({e}); allowed: a whole IDX file, gzipped "
                     "or not") from None
  return parse(raw, name=path, ndim=ndim)


def files_in(folder: str) -> dict[str, str] | None:
  """The paths of the four files in ``folder`` by role (see :data:`FILES`), or None when it holds none.

  Raises:
    IdxError: the folder holds some of the four files but not all.
  """
  found, missing = {}, []
  for role, base in FILES.items():
    dotted = base.replace("-idx", ".idx")
    names = (base, base + ".gz", dotted, dotted + ".gz")
    path = next((os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))), None)
    if path:
      found[role] = path
    else:
      missing.append(base + "[.gz]")
  if not found:
    return None
  if missing:
    raise IdxError(f"{folder} holds only part of an IDX set: {', '.join(missing)} missing; allowed: a folder with "
                   f"all four of {', '.join(FILES.values())} (each gzipped or not)")
  return found


def search_folders(name: str, data_dir: str | None) -> list[str]:
  """Where ``name``'s IDX files are looked for, in order: ``data_dir`` and ``data_dir/<name>`` when a
  ``data_dir`` is given, else the system folder (never a copy the user did not name instead of theirs)."""
  if data_dir:
    return [data_dir, os.path.join(data_dir, name)]
  return [SYSTEM_FOLDERS[name]] if name in SYSTEM_FOLDERS else []


def find_folder(name: str, data_dir: str | None) -> str | None:
  """The first of :func:`search_folders` that holds ``name``'s four IDX files, or None."""
  return next((f for f in search_folders(name, data_dir) if os.path.isdir(f) and files_in(f)), None)


def load_arrays(folder: str, *, image_shape: tuple[int, int] = (28, 28), num_classes: int = 10):
  """Reads the set in ``folder``: ((x_train, y_train), (x_test, y_test)), images uint8 (N, H, W, 1), labels
  int32 (N,).

  Raises:
    IdxError: a missing or malformed file, images not ``image_shape``, labels outside 0..num_classes−1, or
      image and label counts that differ.
  """
  paths = files_in(folder)
  if paths is None:
    raise IdxError(f"{folder} holds no IDX files; allowed: a folder with {', '.join(FILES.values())}")
  splits = []
  for split in ("train", "test"):
    images, labels = read(paths[f"{split}_images"], ndim=3), read(paths[f"{split}_labels"], ndim=1)
    if images.shape[1:] != image_shape:
      raise IdxError(f"{paths[f'{split}_images']} has {images.shape[1]}×{images.shape[2]} images; allowed: "
                     f"{image_shape[0]}×{image_shape[1]}")
    if len(images) != len(labels):
      raise IdxError(f"{paths[f'{split}_images']} has {len(images)} images but {paths[f'{split}_labels']} has "
                     f"{len(labels)} labels; allowed: equal counts")
    if len(labels) and labels.max() >= num_classes:
      raise IdxError(f"{paths[f'{split}_labels']} has label {labels.max()}; allowed: 0..{num_classes - 1}")
    splits.append((images[..., None], labels.astype(np.int32)))
  return tuple(splits)


def write(path: str, array: np.ndarray) -> None:
  """Writes uint8 ``array`` as an IDX file (gzipped when ``path`` ends in .gz): for tests and converters."""
  array = np.asarray(array)
  if array.dtype != np.uint8:
    raise ValueError(f"array dtype {array.dtype} is invalid; allowed: uint8")
  raw = bytes([0, 0, _UBYTE, array.ndim]) + np.asarray(array.shape, ">u4").tobytes() + array.tobytes()
  with open(path, "wb") as f:
    f.write(gzip.compress(raw) if path.endswith(".gz") else raw)


def not_found_message(name: str, data_dir: str | None, tfds_build: str) -> str:
  """One line with every way to get ``name``: the system package, a folder of IDX files, a TFDS build.

  With a ``data_dir`` it says that the folder named does not hold the set, and that a system copy (when there
  is one) is read only without ``--config.data_dir``.
  """
  system = SYSTEM_FOLDERS.get(name)
  ways = []
  if data_dir and system and os.path.isdir(system) and files_in(system):
    ways.append(f"leave out --config.data_dir to read the system copy in {system}")
  elif name in SYSTEM_PACKAGES:
    ways.append(f"sudo apt-get install -y {SYSTEM_PACKAGES[name]} (Debian: puts them in {system}"
                + (", read when no --config.data_dir is given)" if data_dir else ")"))
  ways.append(f"put the four IDX files ({', '.join(FILES.values())}, gzipped or not) in a folder and pass "
              "--config.data_dir=FOLDER")
  ways.append(tfds_build)
  looked = ", ".join(search_folders(name, data_dir)) or "no folder (no --config.data_dir)"
  where = f" in --config.data_dir={data_dir}" if data_dir else ""
  return f"dataset {name!r} not found{where} (IDX files looked for in: {looked}; not prepared in TFDS); get it: " + \
      "; or ".join(ways)
