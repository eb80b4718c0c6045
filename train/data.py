"""Datasets as in-memory numpy arrays, plus deterministic batching and augmentation.

Sources: Fashion-MNIST from the Debian package's IDX files (offline default), CIFAR-10/100
through tensorflow-datasets or from the standard archive, and a synthetic source for
tests. TensorFlow / TFDS are imported only on the CIFAR path.

Batches depend only on (seed, step): the epoch's permutation comes from (seed, epoch) and
each batch's augmentation from (seed, step), so a resumed run sees exactly the batches
an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import tarfile
import threading
import socket

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
    return _load_fashion_mnist(data_dir or FASHION_MNIST_DIR)
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


def _read_idx(path: str) -> np.ndarray:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  ndim = data[3]
  dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find(directory: str, stem: str) -> str | None:
  for name in (stem + ".gz", stem):
    if os.path.exists(os.path.join(directory, name)):
      return os.path.join(directory, name)
  return None


def _load_fashion_mnist(directory: str) -> Dataset:
  paths = [_find(directory, s) for s in _FMNIST_FILES]
  if None in paths:
    raise UsageError(
        f"Fashion-MNIST not found in {directory}: install it with "
        "'apt-get install -y dataset-fashion-mnist' (files under "
        f"{FASHION_MNIST_DIR}) or pass --data-dir DIR holding "
        "train-images-idx3-ubyte.gz and the three other IDX files")
  xtr, ytr, xte, yte = (_read_idx(p) for p in paths)
  return Dataset("fashion_mnist", xtr[..., None], ytr.astype(np.int32),
                 xte[..., None], yte.astype(np.int32), 10)


# --- CIFAR ------------------------------------------------------------------------------

_CIFAR_ARCHIVES = {
    "cifar10": ("cifar-10-binary.tar.gz", "cifar-10-python.tar.gz"),
    "cifar100": ("cifar-100-binary.tar.gz", "cifar-100-python.tar.gz"),
}
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"


def _load_cifar(name: str, data_dir: str | None) -> Dataset:
  num_classes = 10 if name == "cifar10" else 100
  if data_dir is not None:
    if not os.path.isdir(data_dir):
      raise UsageError(f"--data-dir {data_dir} does not exist")
    for archive in _CIFAR_ARCHIVES[name]:
      path = os.path.join(data_dir, archive)
      if os.path.exists(path):
        return _read_cifar_archive(name, path, num_classes)
  return _load_cifar_tfds(name, data_dir, num_classes)


def _read_cifar_archive(name: str, path: str, num_classes: int) -> Dataset:
  """Reads the standard binary or python-pickle CIFAR archive without TensorFlow."""
  splits = {"train": [], "test": []}
  with tarfile.open(path, "r:gz") as tar:
    for member in sorted(tar.getmembers(), key=lambda m: m.name):
      base = os.path.basename(member.name)
      if not member.isfile():
        continue
      split = None
      if base.startswith("data_batch") or base in ("train.bin", "train"):
        split = "train"
      elif base.startswith("test_batch") or base in ("test.bin", "test"):
        split = "test"
      if split is None:
        continue
      raw = tar.extractfile(member).read()
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
      splits[split].append((images, labels.astype(np.int32)))
  if not splits["train"] or not splits["test"]:
    raise UsageError(f"{path} is not a standard {name} archive (no train/test batches)")
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


def _missing_cifar(name: str, why: str) -> UsageError:
  return UsageError(
      f"{name} not available ({why}): download {_CIFAR_ARCHIVES[name][0]} from "
      f"{_CIFAR_URL} into a directory and pass --data-dir DIR, or pass --data-dir with a "
      "prepared tensorflow-datasets directory")


def _load_cifar_tfds(name: str, data_dir: str | None, num_classes: int) -> Dataset:
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise _missing_cifar(name, "tensorflow-datasets is not installed: pip install "
                         "'hggjax[train]'") from None
  splits = {}
  try:
    # array_record data sources need no TensorFlow; `download=False` never touches the
    # network (TFDS otherwise blocks on DNS for minutes here).
    for split in ("train", "test"):
      splits[split] = _from_data_source(tfds.data_source(name, split=split, data_dir=data_dir,
                                                         download=False))
  except Exception as err:  # noqa: BLE001 - TFDS raises many kinds for "not prepared"
    splits = _tfds_load_with_tf(tfds, name, data_dir, err)
  (xtr, ytr), (xte, yte) = splits["train"], splits["test"]
  return Dataset(name, xtr, ytr, xte, yte, num_classes)


def _from_data_source(source) -> tuple[np.ndarray, np.ndarray]:
  n = len(source)
  images = np.empty((n, 32, 32, 3), np.uint8)
  labels = np.empty((n,), np.int32)
  for i in range(n):
    ex = source[i]
    images[i], labels[i] = ex["image"], ex["label"]
  return images, labels


def _tfds_load_with_tf(tfds, name: str, data_dir: str | None, first_error: Exception):
  """tfrecord-prepared directories and downloads go through tf.data (needs tensorflow)."""
  try:
    import tensorflow  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    raise _missing_cifar(name, f"no array_record TFDS data found ({type(first_error).__name__});"
                         " reading tfrecord data or downloading through TFDS needs "
                         "'pip install tensorflow'") from None
  download = _network_reachable()
  try:
    out = {}
    for split in ("train", "test"):
      ds = tfds.load(name, split=split, data_dir=data_dir, batch_size=-1, download=download)
      ex = tfds.as_numpy(ds)
      out[split] = (np.asarray(ex["image"], np.uint8), np.asarray(ex["label"], np.int32))
    return out
  except Exception as err:  # noqa: BLE001
    why = "no network for the TFDS download" if not download else type(err).__name__
    raise _missing_cifar(name, why) from None


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
