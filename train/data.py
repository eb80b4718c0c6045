"""Datasets as in-memory numpy arrays, plus deterministic batching and augmentation.

Sources: Fashion-MNIST from the Debian package's IDX files (offline default) or a prepared
tensorflow-datasets directory, CIFAR-10/100 through tensorflow-datasets or from the
standard archive, and a synthetic source for tests. TensorFlow / TFDS are imported only
where a TFDS directory is read.

Batches depend only on (seed, step): the epoch's permutation comes from (seed, epoch) and
each batch's augmentation from (seed, step), so a resumed run sees exactly the batches
an uninterrupted run would have seen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import importlib.util
import logging
import os
import pickle
import tarfile
import threading
import socket
import zlib
from typing import Callable, Iterable

import numpy as np

from train.errors import UsageError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DATASETS = ("fashion_mnist", "cifar10", "cifar100", "synthetic")

_MEAN_STD = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "synthetic": ((0.5,), (0.25,)),
}


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Train and test splits as uint8 NHWC images and int32 labels."""
  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.train_images.shape[1:])


def load_dataset(name: str, data_dir: str | None = None, *, synthetic_size: int = 256,
                 synthetic_shape=(28, 28, 1)) -> Dataset:
  """Loads a dataset by name; raises UsageError with what to do when data is missing."""
  if name == "fashion_mnist":
    return _load_fashion_mnist(data_dir)
  if name in ("cifar10", "cifar100"):
    return _load_cifar(name, data_dir)
  if name == "synthetic":
    return synthetic_dataset(synthetic_size, synthetic_shape)
  raise UsageError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")


# --- synthetic (tests only) -----------------------------------------------------------

def synthetic_dataset(n: int, shape=(28, 28, 1), num_classes: int = 10, seed: int = 0) -> Dataset:
  """Class-dependent blobs: learnable, tiny, no files."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, size=2 * n).astype(np.int32)
  protos = rng.integers(0, 256, size=(num_classes,) + tuple(shape))
  noise = rng.integers(-40, 41, size=(2 * n,) + tuple(shape))
  images = np.clip(protos[labels] + noise, 0, 255).astype(np.uint8)
  return Dataset("synthetic", images[:n], labels[:n], images[n:], labels[n:], num_classes)


# --- Fashion-MNIST from IDX files -------------------------------------------------------

_FMNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _damaged(path: str, why: str) -> UsageError:
  return UsageError(f"{path} is damaged ({why}): reinstall it with 'apt-get install "
                    "--reinstall dataset-fashion-mnist' or pass --data-dir with intact IDX "
                    "files")


def _read_idx(path: str) -> np.ndarray:
  """An IDX file of unsigned bytes (magic 0 0 8 ndim, then ndim big-endian sizes)."""
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
    raise _damaged(path, f"{type(err).__name__}: {err}") from None
  if len(data) < 4 or data[:3] != b"\x00\x00\x08" or not 1 <= data[3] <= 4:
    raise _damaged(path, "no IDX header of unsigned bytes")
  ndim = data[3]
  header = 4 + 4 * ndim
  dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
  expected = header + int(np.prod(dims))
  if len(data) != expected:
    raise _damaged(path, f"{len(data)} bytes where its header promises {expected}")
  return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


# What to do without the Debian package.
_FMNIST_ELSE = ("pass --data-dir DIR holding train-images-idx3-ubyte.gz and the three other "
                "IDX files of https://github.com/zalandoresearch/fashion-mnist, or a "
                "tensorflow-datasets directory with fashion_mnist prepared")


def _find(directory: str, stem: str) -> str | None:
  for name in (stem + ".gz", stem):
    if os.path.exists(os.path.join(directory, name)):
      return os.path.join(directory, name)
  return None


def _load_fashion_mnist(data_dir: str | None) -> Dataset:
  """IDX files in --data-dir (default: the Debian package's directory), else a prepared
  TFDS directory (--data-dir, else TFDS's default) holding fashion_mnist/."""
  directory = data_dir or FASHION_MNIST_DIR
  paths = [_find(directory, s) for s in _FMNIST_FILES]
  if None in paths:
    if os.path.isdir(os.path.join(_tfds_dir(data_dir), "fashion_mnist")):
      return _load_tfds("fashion_mnist", data_dir, 10, _FMNIST_ELSE)
    tfds_dir = os.path.join(_tfds_dir(data_dir), "fashion_mnist")
    raise UsageError(
        f"Fashion-MNIST not found in {directory} nor {tfds_dir}: on Debian/Ubuntu "
        f"'apt-get install -y dataset-fashion-mnist' (what bash .ci/setup does), elsewhere "
        f"{_FMNIST_ELSE}")
  xtr, ytr, xte, yte = (_read_idx(p) for p in paths)
  for images, labels, path in ((xtr, ytr, paths[0]), (xte, yte, paths[2])):
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
      raise _damaged(path, f"{images.shape} images for {labels.shape} labels")
  return Dataset("fashion_mnist", xtr[..., None], ytr.astype(np.int32),
                 xte[..., None], yte.astype(np.int32), 10)


# --- CIFAR ------------------------------------------------------------------------------

_CIFAR_ARCHIVES = {
    "cifar10": ("cifar-10-binary.tar.gz", "cifar-10-python.tar.gz"),
    "cifar100": ("cifar-100-binary.tar.gz", "cifar-100-python.tar.gz"),
}
# What each archive extracts to (tar xzf).
_CIFAR_EXTRACTED = {
    "cifar10": ("cifar-10-batches-bin", "cifar-10-batches-py"),
    "cifar100": ("cifar-100-binary", "cifar-100-python"),
}
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"


def _tfds_dir(data_dir: str | None) -> str:
  """Where TFDS keeps prepared datasets: --data-dir, else its own default."""
  return data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser(
      os.path.join("~", "tensorflow_datasets"))


def _load_cifar(name: str, data_dir: str | None) -> Dataset:
  """--data-dir: the archive, the directory holding it, the extracted directory (or the
  directory holding that), or a prepared TFDS directory; without it, TFDS's default."""
  num_classes = 10 if name == "cifar10" else 100
  if data_dir is not None:
    if os.path.isfile(data_dir):
      return _read_cifar_archive(name, data_dir, num_classes)
    if not os.path.isdir(data_dir):
      raise UsageError(f"--data-dir {data_dir} does not exist")
    for archive in _CIFAR_ARCHIVES[name]:
      path = os.path.join(data_dir, archive)
      if os.path.exists(path):
        return _read_cifar_archive(name, path, num_classes)
    for path in (data_dir, *(os.path.join(data_dir, d) for d in _CIFAR_EXTRACTED[name])):
      if os.path.isdir(path) and any(_split_of(n) for n in os.listdir(path)):
        return _read_cifar_dir(name, path, num_classes)
  # Without a prepared TFDS directory only a TFDS download could help, and that needs
  # tensorflow: without it, say only what to do.
  if (not os.path.isdir(os.path.join(_tfds_dir(data_dir), name))
      and importlib.util.find_spec("tensorflow") is None):
    raise _missing_cifar(name, data_dir)
  return _load_tfds(name, data_dir, num_classes, _cifar_else(name))


def _split_of(base: str) -> str | None:
  if base.startswith("data_batch") or base in ("train.bin", "train"):
    return "train"
  if base.startswith("test_batch") or base in ("test.bin", "test"):
    return "test"
  return None


def _read_cifar_archive(name: str, path: str, num_classes: int) -> Dataset:
  """Reads the standard binary or python-pickle CIFAR archive without TensorFlow."""
  try:
    with tarfile.open(path, "r:gz") as tar:
      members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
      return _parse_cifar(name, path, num_classes,
                          [(os.path.basename(m.name),
                            lambda m=m: tar.extractfile(m).read()) for m in members])
  except (OSError, EOFError, zlib.error, tarfile.TarError) as err:
    raise UsageError(f"{path} is not a readable {name} archive ({type(err).__name__}: "
                     f"{err}); download it again from {_CIFAR_URL}") from None


def _read_cifar_dir(name: str, path: str, num_classes: int) -> Dataset:
  """Reads an extracted archive (e.g. cifar-10-batches-bin/)."""
  files = sorted(n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))

  def reader(n):
    def read():
      with open(os.path.join(path, n), "rb") as f:
        return f.read()
    return read

  return _parse_cifar(name, path, num_classes, [(n, reader(n)) for n in files])


def _parse_cifar(name: str, where: str, num_classes: int,
                 entries: Iterable[tuple[str, Callable[[], bytes]]]) -> Dataset:
  """Train and test splits from (file name, read) pairs of either CIFAR format."""
  splits = {"train": [], "test": []}
  for base, read in entries:
    split = _split_of(base)
    if split is None:
      continue
    raw = read()
    try:
      if base.endswith(".bin"):
        label_bytes = 1 if name == "cifar10" else 2
        rec = np.frombuffer(raw, np.uint8).reshape(-1, label_bytes + 3072)
        # CIFAR-100 binary: coarse label then fine label; we use the fine one.
        labels, pixels = rec[:, label_bytes - 1], rec[:, label_bytes:]
      else:
        d = pickle.loads(raw, encoding="bytes")
        labels = np.asarray(d[b"labels"] if b"labels" in d else d[b"fine_labels"])
        pixels = np.asarray(d[b"data"], np.uint8)
      images = pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    except (ValueError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as err:
      raise UsageError(f"{where}: {base} is not a {name} batch ({type(err).__name__}); "
                       f"download the archive again from {_CIFAR_URL}") from None
    splits[split].append((images, labels.astype(np.int32)))
  if not splits["train"] or not splits["test"]:
    raise UsageError(f"{where} is not a standard {name} archive (no train/test batches)")
  xtr, ytr = (np.concatenate(a) for a in zip(*splits["train"]))
  xte, yte = (np.concatenate(a) for a in zip(*splits["test"]))
  return Dataset(name, xtr, ytr, xte, yte, num_classes)


def _network_reachable(host: str = "storage.googleapis.com", timeout: float = 5.0) -> bool:
  """DNS + TCP probe in a thread: a blocked resolver otherwise hangs for minutes."""
  result = []

  def probe():
    try:
      socket.create_connection((host, 443), timeout=timeout).close()
      result.append(True)
    except OSError:
      pass

  t = threading.Thread(target=probe, daemon=True)
  t.start()
  t.join(timeout)
  return bool(result)


def _missing_cifar(name: str, data_dir: str | None) -> UsageError:
  where = f" in {data_dir}" if data_dir else ""
  return UsageError(
      f"{name} not found{where}: download {_CIFAR_ARCHIVES[name][0]} from {_CIFAR_URL} and "
      "pass --data-dir with the archive, the directory holding it, or the directory it "
      f"extracts to ({_CIFAR_EXTRACTED[name][0]}/)")


@contextlib.contextmanager
def _quiet_tfds():
  """TFDS logs absl warnings (folders it looked in, hints) before the error the caller
  turns into one line."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def _cifar_else(name: str) -> str:
  return f"pass --data-dir with the {_CIFAR_ARCHIVES[name][0]} archive from {_CIFAR_URL}"


def _load_tfds(name: str, data_dir: str | None, num_classes: int, otherwise: str) -> Dataset:
  """A prepared TFDS directory (`<dir>/<name>/` exists); `otherwise` says in an error
  what else the user can pass."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise UsageError(f"{_tfds_dir(data_dir)}/{name} is a tensorflow-datasets directory, and "
                     "reading it needs tensorflow-datasets: pip install 'hggjax[train]'") from None
  splits = {}
  try:
    # array_record data sources need no TensorFlow; `download=False` never touches the
    # network (TFDS otherwise blocks on DNS for minutes here).
    with _quiet_tfds():
      for split in ("train", "test"):
        splits[split] = _from_data_source(tfds.data_source(name, split=split,
                                                           data_dir=data_dir, download=False))
  except Exception as err:  # noqa: BLE001 - TFDS raises many kinds for "not prepared"
    splits = _tfds_load_with_tf(tfds, name, data_dir, err, otherwise)
  (xtr, ytr), (xte, yte) = splits["train"], splits["test"]
  return Dataset(name, xtr, ytr, xte, yte, num_classes)


def _from_data_source(source) -> tuple[np.ndarray, np.ndarray]:
  n = len(source)
  first = source[0] if n else {"image": np.zeros((0,), np.uint8)}
  images = np.empty((n, *np.shape(first["image"])), np.uint8)
  labels = np.empty((n,), np.int32)
  for i in range(n):
    ex = source[i]
    images[i], labels[i] = ex["image"], ex["label"]
  return images, labels


def _tfds_load_with_tf(tfds, name: str, data_dir: str | None, first_error: Exception,
                       otherwise: str):
  """tfrecord-prepared directories go through tf.data (needs tensorflow)."""
  where = f"{_tfds_dir(data_dir)}/{name}"
  try:
    import tensorflow  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    raise UsageError(f"{where} holds no array_record data ({type(first_error).__name__}); "
                     f"tfrecord data needs 'pip install tensorflow', or {otherwise}") from None
  download = _network_reachable()
  try:
    out = {}
    with _quiet_tfds():
      for split in ("train", "test"):
        ds = tfds.load(name, split=split, data_dir=data_dir, batch_size=-1, download=download)
        ex = tfds.as_numpy(ds)
        out[split] = (np.asarray(ex["image"], np.uint8), np.asarray(ex["label"], np.int32))
    return out
  except Exception as err:  # noqa: BLE001
    if not os.path.isdir(where):
      raise _missing_cifar(name, data_dir) from None
    raise UsageError(f"{where} could not be read by TFDS ({type(err).__name__}); "
                     f"{otherwise}") from None


# --- batching and augmentation -----------------------------------------------------------

def normalize(images_u8: np.ndarray, dataset: str) -> np.ndarray:
  mean, std = _MEAN_STD[dataset]
  x = images_u8.astype(np.float32) / 255.0
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def augment(images: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
  """Random crop with zero padding `pad` and horizontal flip (standard CIFAR augmentation)."""
  n, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  dy = rng.integers(0, 2 * pad + 1, size=n)
  dx = rng.integers(0, 2 * pad + 1, size=n)
  rows = dy[:, None] + np.arange(h)[None, :]
  cols = dx[:, None] + np.arange(w)[None, :]
  out = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
  flip = rng.random(n) < 0.5
  out[flip] = out[flip, :, ::-1]
  return out


def steps_per_epoch(ds: Dataset, batch_size: int) -> int:
  return len(ds.train_labels) // batch_size  # drop the ragged tail: every step is a full batch


def train_batch(ds: Dataset, step: int, batch_size: int, seed: int,
                do_augment: bool, rows: slice | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The global batch for `step`, normalised float32 NHWC and int32 labels.

  `rows` keeps only those rows of the global batch (a process's share in a multi-process
  run); the random draws stay those of the whole batch, so the rows are bit-identical to
  the same rows of a single-process batch.
  """
  spe = steps_per_epoch(ds, batch_size)
  epoch, i = divmod(step, spe)
  perm = np.random.default_rng([seed, epoch]).permutation(len(ds.train_labels))
  idx = np.sort(perm[i * batch_size:(i + 1) * batch_size])
  images = ds.train_images[idx]
  if do_augment:
    images = augment(images, np.random.default_rng([seed, epoch, i, 1]))
  labels = ds.train_labels[idx]
  if rows is not None:
    images, labels = images[rows], labels[rows]
  return normalize(images, ds.name), labels


def eval_batches(ds: Dataset, batch_size: int):
  """Test-set batches padded to `batch_size`; yields (images, labels, weights)."""
  n = len(ds.test_labels)
  for start in range(0, n, batch_size):
    images = normalize(ds.test_images[start:start + batch_size], ds.name)
    labels = ds.test_labels[start:start + batch_size]
    weights = np.ones(len(labels), np.float32)
    short = batch_size - len(labels)
    if short:
      images = np.concatenate([images, np.zeros((short,) + images.shape[1:], np.float32)])
      labels = np.concatenate([labels, np.zeros(short, np.int32)])
      weights = np.concatenate([weights, np.zeros(short, np.float32)])
    yield images, labels, weights
