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

Which set is it? MNIST, Fashion-MNIST and Kuzushiji-MNIST use the same four file names, so a name says nothing.
:func:`identify` recognises a file of a published set by the SHA-256 of its bytes (the published ``.gz``) or
of its IDX content (gunzipped, so an unpacked or re-compressed copy, such as Debian's, is recognised too); see
:data:`PUBLISHED`. :func:`load_arrays` refuses a file recognised as another set than the one asked for. A file
that is no published file (a subset, a converted or a test set) is read as it is: only positive evidence of
the wrong set is refused.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib

import numpy as np

FILES: dict[str, str] = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
                         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
"""The four files of a set by role, without the optional ``.gz``."""

SYSTEM_FOLDERS: dict[str, str] = {"fashion_mnist": "/usr/share/datasets/fashion-mnist"}
"""Where a system package puts a set's IDX files (Debian's ``dataset-fashion-mnist``)."""

SYSTEM_PACKAGES: dict[str, str] = {"fashion_mnist": "dataset-fashion-mnist"}

TITLES: dict[str, str] = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "kmnist": "Kuzushiji-MNIST"}
"""The sets that share the four file names, as people write them."""

# The published .gz files: sha256 as listed in TFDS's url_checksums (mnist.txt, fashion_mnist.txt, kmnist.txt).
# Their IDX content (gunzipped): Fashion-MNIST's computed here from Debian's dataset-fashion-mnist (re-packed .gz
# files: their own sha256 differs, their content is the published one); MNIST's as recorded alike by several
# public projects that check their unpacked copies (no copy here to check); none known for Kuzushiji-MNIST.
_DIGESTS = {
    "mnist": {
        "train-images-idx3-ubyte": ("440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                                    "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
        "train-labels-idx1-ubyte": ("3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                                    "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
        "t10k-images-idx3-ubyte": ("8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                                   "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
        "t10k-labels-idx1-ubyte": ("f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
                                   "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte": ("3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                                    "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
        "train-labels-idx1-ubyte": ("a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                                    "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
        "t10k-images-idx3-ubyte": ("346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                                   "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
        "t10k-labels-idx1-ubyte": ("67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
                                   "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
    },
    "kmnist": {
        "train-images-idx3-ubyte": ("51467d22d8cc72929e2a028a0428f2086b092bb31cfb79c69cc0a90ce135fde4",),
        "train-labels-idx1-ubyte": ("e38f9ebcd0f3ebcdec7fc8eabdcdaef93bb0df8ea12bee65224341c8183d8e17",),
        "t10k-images-idx3-ubyte": ("edd7a857845ad6bb1d0ba43fe7e794d164fe2dce499a1694695a792adfac43c5",),
        "t10k-labels-idx1-ubyte": ("20bb9a0ef54c7db3efc55a92eef5582c109615df22683c380526788f98e42a1c",),
    },
}

PUBLISHED: dict[str, tuple[str, str]] = {
    digest: (name, base) for name, files in _DIGESTS.items() for base, digests in files.items() for digest in digests}
"""sha256 → (set, file without .gz) for every published file: its ``.gz`` and its IDX content (see above)."""

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
  return parse(_stored_and_content(path)[1], name=path, ndim=ndim)


def identify(path: str) -> tuple[str, str] | None:
  """(set, file) of :data:`PUBLISHED` that the file at ``path`` is, by its sha256 or its content's, else None."""
  found = _match(*_stored_and_content(path))
  return found and found[1]


def _stored_and_content(path: str) -> tuple[bytes, bytes]:
  """The file's bytes as stored and its IDX content (the same bytes unless gzipped)."""
  with open(path, "rb") as f:
    stored = f.read()
  if stored[:2] != _GZIP_MAGIC:
    return stored, stored
  try:
    return stored, gzip.decompress(stored)
  except (EOFError, OSError, zlib.error) as e:
    raise IdxError(f"{path} is a truncated or corrupt gzip file ({e}); allowed: a whole IDX file, gzipped "
                   "or not") from None


def _match(stored: bytes, content: bytes) -> tuple[str, tuple[str, str]] | None:
  """(sha256, (set, file)) of the first of the file's two digests (as stored, gunzipped) that is published."""
  digests = (hashlib.sha256(b).hexdigest() for b in ((stored,) if content is stored else (stored, content)))
  return next(((d, PUBLISHED[d]) for d in digests if d in PUBLISHED), None)


def _check_is_of(name: str, path: str, stored: bytes, content: bytes) -> None:
  """Raises IdxError when the file at ``path`` is recognised as a published file of a set other than ``name``."""
  found = _match(stored, content)
  if found is None or found[1][0] == name:
    return
  digest, (other, base) = found
  of_what = "" if digest == hashlib.sha256(stored).hexdigest() else " of its gunzipped content"
  asked = TITLES.get(name, name)
  raise IdxError(f"{path} is {TITLES.get(other, other)}'s {base} (sha256{of_what} {digest}), not {asked}'s; "
                 f"allowed: {asked}'s published files or IDX files of your own (not another published set's)")


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


def load_arrays(folder: str, *, image_shape: tuple[int, int] = (28, 28), num_classes: int = 10,
                name: str | None = None):
  """Reads the set in ``folder``: ((x_train, y_train), (x_test, y_test)), images uint8 (N, H, W, 1), labels
  int32 (N,). With ``name`` (a key of :data:`TITLES`), a file recognised as another published set is refused.

  Raises:
    IdxError: a missing or malformed file, a file of another set than ``name`` (see the module docstring),
      images not ``image_shape``, labels outside 0..num_classes−1, or image and label counts that differ.
  """
  paths = files_in(folder)
  if paths is None:
    raise IdxError(f"{folder} holds no IDX files; allowed: a folder with {', '.join(FILES.values())}")

  def load(role: str, ndim: int) -> np.ndarray:
    stored, content = _stored_and_content(paths[role])
    if name is not None:
      _check_is_of(name, paths[role], stored, content)
    return parse(content, name=paths[role], ndim=ndim)

  splits = []
  for split in ("train", "test"):
    images, labels = load(f"{split}_images", 3), load(f"{split}_labels", 1)
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
