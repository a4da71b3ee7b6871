"""IDX datasets (sajax.idx and its hook in sajax.data): tiny IDX sets written here, priority, one-line errors."""

import gzip
import hashlib
import os

import jax
import numpy as np
import pytest

from sajax import data, idx
from tests.tfds_mock import mock_tfds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _arrays(n_train=12, n_test=5, side=28, offset=0):
  """Image i of a split is the constant (offset + i) % 251, its label (offset + i) % 10: easy to recognise."""
  out = {}
  for split, n in (("train", n_train), ("test", n_test)):
    values = (offset + np.arange(n)) % 251
    out[f"{split}_images"] = np.broadcast_to(values[:, None, None], (n, side, side)).astype(np.uint8)
    out[f"{split}_labels"] = (values % 10).astype(np.uint8)
  return out


def _write_set(folder, arrays=None, gz=("train_images", "test_labels")):
  """The four files in ``folder``, the roles in ``gz`` gzipped, the others plain."""
  os.makedirs(folder, exist_ok=True)
  for role, array in (arrays or _arrays()).items():
    idx.write(os.path.join(folder, idx.FILES[role] + (".gz" if role in gz else "")), array)
  return str(folder)


@pytest.fixture(autouse=True)
def no_system_folder(monkeypatch, tmp_path):
  """Tests never see a system-wide install (CI has none; this machine may have Debian's)."""
  monkeypatch.setitem(idx.SYSTEM_FOLDERS, "fashion_mnist", str(tmp_path / "no_system_install"))


def _check_split(split, n, offset=0):
  values = (offset + np.arange(n)) % 251
  assert split.images.shape == (n, 28, 28, 1) and split.images.dtype == np.uint8
  assert split.labels.shape == (n,) and split.labels.dtype == np.int32
  np.testing.assert_array_equal(split.images[:, 3, 4, 0], values)
  assert (split.images == split.images[:, :1, :1, :]).all()
  np.testing.assert_array_equal(split.labels, values % 10)


def test_idx_set_from_data_dir_gzipped_or_not_round_trips():
  raw = _arrays()["train_images"]
  assert idx.parse(gzip.decompress(gzip.compress(bytes([0, 0, 8, 3, 0, 0, 0, 12, 0, 0, 0, 28, 0, 0, 0, 28])
                                                  + raw.tobytes()))).shape == (12, 28, 28)


@pytest.mark.parametrize("name, augmentation, mean", [("fashion_mnist", "shift_flip", 0.2860), ("mnist", "shift", 0.1307)])
def test_load_dataset_reads_idx_files_from_data_dir(tmp_path, name, augmentation, mean):
  folder = _write_set(tmp_path / "idx")
  ds = data.load_dataset(name, data_dir=folder)
  assert (ds.name, ds.num_classes, ds.input_shape, ds.augmentation) == (name, 10, (28, 28, 1), augmentation)
  assert ds.mean == (mean,)
  _check_split(ds.train, 12)
  _check_split(ds.test, 5)
  x, y = ds.train.gather(np.array([7, 2]))
  np.testing.assert_array_equal(x[:, 0, 0, 0], [7, 2]) and np.testing.assert_array_equal(y, [7, 2])


def test_gzip_is_recognised_by_content_and_the_dotted_spelling_is_accepted(tmp_path):
  folder = tmp_path / "idx"
  _write_set(folder, gz=())
  plain = folder / idx.FILES["train_images"]
  plain.write_bytes(gzip.compress(plain.read_bytes()))            # gzipped, no .gz in the name
  os.rename(folder / idx.FILES["test_labels"], folder / "t10k-labels.idx1-ubyte")
  ds = data.load_dataset("fashion_mnist", data_dir=str(folder))
  _check_split(ds.train, 12)
  _check_split(ds.test, 5)


def test_idx_files_take_priority_over_tfds_and_tfds_is_the_fallback(tmp_path):
  with mock_tfds(24):
    from_tfds = data.load_dataset("mnist", data_dir=str(tmp_path / "empty"))
    assert len(from_tfds.train) == 24                                       # no IDX files: TFDS
    _write_set(tmp_path / "root" / "mnist")                                 # data_dir/<name> is looked in too
    from_idx = data.load_dataset("mnist", data_dir=str(tmp_path / "root"))
  _check_split(from_idx.train, 12)


def test_the_system_folder_is_read_only_when_no_data_dir_is_given(tmp_path, monkeypatch):
  system = _write_set(tmp_path / "debian", _arrays(offset=100))
  monkeypatch.setitem(idx.SYSTEM_FOLDERS, "fashion_mnist", system)
  _check_split(data.load_dataset("fashion_mnist").train, 12, offset=100)
  mine = _write_set(tmp_path / "mine", _arrays(offset=50))
  _check_split(data.load_dataset("fashion_mnist", data_dir=mine).train, 12, offset=50)
  elsewhere = str(tmp_path / "nonexistent" / "idx")
  with pytest.raises(data.DatasetError) as error:                           # never the system copy instead
    data.load_dataset("fashion_mnist", data_dir=elsewhere)
  message = str(error.value)
  assert "\n" not in message and f"'fashion_mnist' not found in --config.data_dir={elsewhere} " in message
  assert f"leave out --config.data_dir to read the system copy in {system}" in message
  assert idx.search_folders("mnist", None) == []                            # no system package for MNIST


def test_not_found_is_one_line_with_every_way_to_get_it(tmp_path):
  empty = tmp_path / "empty"
  with pytest.raises(data.DatasetError) as error:
    data.load_dataset("fashion_mnist", data_dir=str(empty))
  message = str(error.value)
  assert "\n" not in message and "'fashion_mnist' not found" in message
  assert "apt-get install -y dataset-fashion-mnist" in message                       # the Debian package
  assert "--config.data_dir=FOLDER" in message and "train-images-idx3-ubyte" in message   # a folder of IDX files
  assert f"tfds build fashion_mnist --data_dir {empty}" in message                   # TFDS
  assert str(empty) in message and str(empty / "fashion_mnist") in message          # where it looked
  with pytest.raises(data.DatasetError, match="not found") as error:
    data.load_dataset("mnist", data_dir=str(empty))
  assert "apt-get" not in str(error.value)                                          # no package for MNIST


def _corrupt(tmp_path, role, content: bytes, gz=False):
  folder = _write_set(tmp_path / "idx", gz=())
  path = os.path.join(folder, idx.FILES[role])
  with open(path, "wb") as f:
    f.write(gzip.compress(content) if gz else content)
  return folder, path


def _good_bytes(role):
  array = _arrays()[role]
  return bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, ">u4").tobytes() + array.tobytes()


MALFORMED = [
    ("train_images", lambda b: b"\x08\x03" + b[2:], "magic number 0803"),
    ("train_images", lambda b: b[:2], "magic number 0000; allowed"),
    ("train_labels", lambda b: b[:2] + b"\x0d" + b[3:], "IDX type 0x0d; allowed: 0x08"),
    ("train_labels", lambda b: b[:3] + b"\x03" + b[4:], "has 3 dimensions; allowed: 1"),
    ("test_images", lambda b: b[:-1], "truncated: 3935 bytes for shape (5, 28, 28); allowed: exactly 3936 bytes"),
    ("test_images", lambda b: b[:10], "truncated: 10 bytes, shorter than its 16-byte header"),
    ("test_labels", lambda b: b + b"\0", "longer than its header says"),
    ("test_labels", lambda b: b[:-1] + b"\x0c", "has label 12; allowed: 0..9"),
    ("test_labels", lambda b: b[:7] + b"\x04" + b[8:-1], "has 5 images but"),
]


@pytest.mark.parametrize("role, mangle, expected", MALFORMED)
def test_malformed_files_are_one_line_errors_naming_the_file(tmp_path, role, mangle, expected):
  folder, path = _corrupt(tmp_path, role, mangle(_good_bytes(role)))
  with pytest.raises(data.DatasetError) as error:
    data.load_dataset("fashion_mnist", data_dir=folder)
  message = str(error.value)
  assert "\n" not in message and expected in message and os.path.basename(path) in message
  assert "allowed" in message


def test_truncated_gzip_wrong_image_size_and_partial_set_are_errors(tmp_path):
  folder, path = _corrupt(tmp_path / "a", "train_images", gzip.compress(_good_bytes("train_images"))[:-30])
  with pytest.raises(data.DatasetError, match=r"train-images-idx3-ubyte is a truncated or corrupt gzip file"):
    data.load_dataset("fashion_mnist", data_dir=folder)
  small = _write_set(tmp_path / "b", _arrays(side=14))
  with pytest.raises(data.DatasetError, match=r"has 14×14 images; allowed: 28×28"):
    data.load_dataset("fashion_mnist", data_dir=small)
  partial = _write_set(tmp_path / "c")
  os.remove(os.path.join(partial, idx.FILES["test_labels"] + ".gz"))
  with pytest.raises(data.DatasetError, match=r"only part of an IDX set: t10k-labels-idx1-ubyte\[\.gz\] missing"):
    data.load_dataset("fashion_mnist", data_dir=partial)


def test_write_refuses_other_dtypes(tmp_path):
  with pytest.raises(ValueError, match=r"dtype float32 is invalid; allowed: uint8"):
    idx.write(str(tmp_path / "x"), np.zeros(3, np.float32))


def test_shift_flip_shifts_by_at_most_2_pixels_and_mirrors_about_half(tmp_path):
  """One bright pixel at (10, 5): after augmentation it sits at (10 ± 2, 5 ± 2) or mirrored at (10 ± 2, 22 ± 2)."""
  ds = data.load_dataset("fashion_mnist", data_dir=_write_set(tmp_path / "idx"))
  image = np.zeros((64, 28, 28, 1), np.uint8)
  image[:, 10, 5, 0] = 255
  out = np.asarray(data.make_preprocess(ds)(image, jax.random.key(0)))
  peaks = [np.unravel_index(np.argmax(o[..., 0]), (28, 28)) for o in out]
  rows, cols = np.array([p[0] for p in peaks]), np.array([p[1] for p in peaks])
  assert (abs(rows - 10) <= 2).all() and len(set(rows)) > 1
  mirrored = cols >= 14
  assert (abs(cols[~mirrored] - 5) <= 2).all() and (abs(cols[mirrored] - 22) <= 2).all()
  assert 16 <= mirrored.sum() <= 48
  plain = np.asarray(data.make_preprocess(ds)(image[:1], None))
  assert plain[0, 10, 5, 0] == pytest.approx((1 - 0.2860) / 0.3530, rel=1e-5)      # evaluation: no augmentation


def test_a_bad_data_dir_through_the_cli_exits_2_with_one_line_and_no_workdir(tmp_path, monkeypatch, capsys):
  """``main(argv)`` of launch/train.py, in-process (what the script runs), with a system copy of Fashion-MNIST
  that must not stand in for the data_dir given."""
  from launch import train as launcher
  folder, _ = _corrupt(tmp_path, "train_labels", _good_bytes("train_labels")[:-3])
  monkeypatch.setitem(idx.SYSTEM_FOLDERS, "fashion_mnist", _write_set(tmp_path / "debian"))
  missing = str(tmp_path / "nonexistent" / "idx")
  runs = ((["--config.dataset=mnist", f"--config.data_dir={folder}"], "truncated"),
          (["--config", os.path.join(ROOT, "configs", "fashion_mnist.py"), f"--config.data_dir={missing}"],
           f"'fashion_mnist' not found in --config.data_dir={missing} "))
  for i, (args, expected) in enumerate(runs):
    workdir = tmp_path / f"run{i}"
    code = launcher.main(["train.py", *args, "--workdir", str(workdir)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and expected in lines[0], err[-2000:]
    assert "Traceback" not in err and not workdir.exists()


def _register(monkeypatch, digest, name, base="train-images-idx3-ubyte"):
  """Makes ``digest`` a published file of ``name`` (the tests' files are no published set's)."""
  monkeypatch.setitem(idx.PUBLISHED, digest, (name, base))


def test_a_file_of_another_published_set_is_refused_naming_both(tmp_path, monkeypatch):
  folder = _write_set(tmp_path / "idx")                                     # train-images is gzipped
  path = os.path.join(folder, idx.FILES["train_images"] + ".gz")
  digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
  _check_split(data.load_dataset("fashion_mnist", data_dir=folder).train, 12)   # no published set's: read
  _register(monkeypatch, digest, "mnist")
  with pytest.raises(data.DatasetError) as error:
    data.load_dataset("fashion_mnist", data_dir=folder)
  message = str(error.value)
  assert "\n" not in message and message.startswith(f"{path} is MNIST's train-images-idx3-ubyte (sha256 {digest}), "
                                                     "not Fashion-MNIST's; allowed: Fashion-MNIST's published files")
  _check_split(data.load_dataset("mnist", data_dir=folder).train, 12)       # the set it is: read


def test_an_unpacked_or_recompressed_copy_is_recognised_by_its_content(tmp_path, monkeypatch):
  folder = _write_set(tmp_path / "idx", gz=())
  path = os.path.join(folder, idx.FILES["test_labels"])
  content = open(path, "rb").read()
  _register(monkeypatch, hashlib.sha256(content).hexdigest(), "kmnist", idx.FILES["test_labels"])
  with pytest.raises(data.DatasetError, match=r"t10k-labels-idx1-ubyte is Kuzushiji-MNIST's t10k-labels-idx1-ubyte "
                     r"\(sha256 [0-9a-f]{64}\), not MNIST's"):
    data.load_dataset("mnist", data_dir=folder)
  with open(path, "wb") as f:
    f.write(gzip.compress(content, mtime=1))                                # another gzip of the same content
  with pytest.raises(data.DatasetError, match=r"\(sha256 of its gunzipped content [0-9a-f]{64}\), not MNIST's"):
    data.load_dataset("mnist", data_dir=folder)


_DEBIAN = "/usr/share/datasets/fashion-mnist"


@pytest.mark.skipif(not os.path.isdir(_DEBIAN), reason="Debian's dataset-fashion-mnist is not installed")
def test_the_real_fashion_mnist_from_debian(monkeypatch):
  monkeypatch.setitem(idx.SYSTEM_FOLDERS, "fashion_mnist", _DEBIAN)
  ds = data.load_dataset("fashion_mnist")
  assert (len(ds.train), len(ds.test)) == (60000, 10000)
  np.testing.assert_array_equal(np.bincount(ds.test.labels), [1000] * 10)
  assert abs(ds.train.images.mean() / 255 - ds.mean[0]) < 1e-3 and abs(ds.train.images.std() / 255 - ds.std[0]) < 1e-3
  paths = idx.files_in(_DEBIAN)
  assert {role: idx.identify(path) for role, path in paths.items()} == \
      {role: ("fashion_mnist", base) for role, base in idx.FILES.items()}
  with pytest.raises(data.DatasetError, match=r"is Fashion-MNIST's train-images-idx3-ubyte .*, not MNIST's"):
    data.load_dataset("mnist", data_dir=_DEBIAN)
