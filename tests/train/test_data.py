"""Data sources (IDX, CIFAR archives, TFDS via mock_data) and deterministic batches."""

import gzip
import io
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest

from train import data
from train.errors import UsageError


def _write_idx(path, array):
  header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(
      struct.pack(">I", d) for d in array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_reader(tmp_path):
  rng = np.random.default_rng(0)
  xtr, xte = rng.integers(0, 256, (6, 28, 28)), rng.integers(0, 256, (4, 28, 28))
  ytr, yte = np.arange(6) % 10, np.arange(4) % 10
  for stem, arr in zip(data._FMNIST_FILES, (xtr, ytr, xte, yte)):  # pylint: disable=protected-access
    _write_idx(tmp_path / (stem + ".gz"), arr)
  ds = data.load_dataset("fashion_mnist", str(tmp_path))
  assert ds.image_shape == (28, 28, 1) and ds.num_classes == 10
  np.testing.assert_array_equal(ds.train_images[..., 0], xtr)
  np.testing.assert_array_equal(ds.test_labels, yte)


def _fashion_mnist_files(directory):
  rng = np.random.default_rng(0)
  arrays = (rng.integers(0, 256, (6, 28, 28)), np.arange(6) % 10,
            rng.integers(0, 256, (4, 28, 28)), np.arange(4) % 10)
  for stem, arr in zip(data._FMNIST_FILES, arrays):  # pylint: disable=protected-access
    _write_idx(directory / (stem + ".gz"), arr)
  return directory / "train-images-idx3-ubyte.gz"


def _truncate_gzip(path):
  raw = path.read_bytes()
  path.write_bytes(raw[:len(raw) // 2])


def _garbage(path):
  path.write_bytes(b"not a gzip file at all")


def _short_payload(path):
  with gzip.open(path, "rb") as f:
    raw = f.read()
  with gzip.open(path, "wb") as f:
    f.write(raw[:-100])


@pytest.mark.parametrize("damage, why", [(_truncate_gzip, "EOFError"),
                                         (_garbage, "BadGzipFile"),
                                         (_short_payload, "where its header promises")])
def test_damaged_fashion_mnist_is_one_line(tmp_path, damage, why):
  path = _fashion_mnist_files(tmp_path)
  damage(path)
  with pytest.raises(UsageError, match=f"{path} is damaged .*{why}.*apt-get install "
                     "--reinstall dataset-fashion-mnist"):
    data.load_dataset("fashion_mnist", str(tmp_path))


def test_damaged_data_from_the_cli(tmp_path, capsys):
  from train import cli  # pylint: disable=import-outside-toplevel
  _truncate_gzip(_fashion_mnist_files(tmp_path))
  run = tmp_path / "run"
  assert cli.main(["--data-dir", str(tmp_path), "--devices", "4", "--log-dir", str(run)]) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and "is damaged (EOFError" in lines[0], lines
  assert not run.exists()  # the run never started: no directory left


def test_missing_fashion_mnist(tmp_path):
  with pytest.raises(UsageError, match="apt-get install -y dataset-fashion-mnist"):
    data.load_dataset("fashion_mnist", str(tmp_path))


@pytest.mark.skipif(not os.path.exists(os.path.join(data.FASHION_MNIST_DIR,
                                                    "t10k-labels-idx1-ubyte.gz")),
                    reason="dataset-fashion-mnist (Debian package) not installed")
def test_installed_fashion_mnist():
  ds = data.load_dataset("fashion_mnist")
  assert ds.train_images.shape == (60000, 28, 28, 1) and ds.test_images.shape == (10000, 28, 28, 1)
  assert set(np.unique(ds.train_labels)) == set(range(10))


def _add(tar, name, payload):
  info = tarfile.TarInfo(name)
  info.size = len(payload)
  tar.addfile(info, io.BytesIO(payload))


@pytest.mark.parametrize("kind", ["binary", "python"])
def test_cifar10_archive(tmp_path, kind):
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)  # CHW, as the archive stores
  labels = np.array([3, 1, 4, 1, 5], np.uint8)
  path = tmp_path / f"cifar-10-{kind}.tar.gz"
  with tarfile.open(path, "w:gz") as tar:
    for split, name in (("train", "data_batch_1"), ("test", "test_batch")):
      if kind == "binary":
        rec = np.concatenate([labels[:, None], images.reshape(5, -1)], axis=1)
        _add(tar, f"cifar-10-batches-bin/{name}.bin", rec.tobytes())
      else:
        d = {b"labels": labels.tolist(), b"data": images.reshape(5, -1)}
        _add(tar, f"cifar-10-batches-py/{name}", pickle.dumps(d))
      del split
  ds = data.load_dataset("cifar10", str(tmp_path))
  assert ds.image_shape == (32, 32, 3)
  np.testing.assert_array_equal(ds.train_images, images.transpose(0, 2, 3, 1))
  np.testing.assert_array_equal(ds.test_labels, labels)


def _cifar10_files(directory, kind):
  """The files cifar-10-{kind}.tar.gz extracts to, in `directory`; returns (images, labels)."""
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
  labels = np.array([0, 9, 2, 7, 3], np.uint8)
  directory.mkdir(parents=True)
  for name in ("data_batch_1", "test_batch"):
    if kind == "binary":
      rec = np.concatenate([labels[:, None], images.reshape(5, -1)], axis=1)
      (directory / f"{name}.bin").write_bytes(rec.tobytes())
    else:
      (directory / name).write_bytes(pickle.dumps({b"labels": labels.tolist(),
                                                   b"data": images.reshape(5, -1)}))
  return images.transpose(0, 2, 3, 1), labels


@pytest.mark.parametrize("kind, folder", [("binary", "cifar-10-batches-bin"),
                                          ("python", "cifar-10-batches-py")])
@pytest.mark.parametrize("given", ["extracted", "parent"])
def test_cifar10_extracted_directory(tmp_path, kind, folder, given):
  images, labels = _cifar10_files(tmp_path / folder, kind)
  ds = data.load_dataset("cifar10", str(tmp_path / folder if given == "extracted" else tmp_path))
  np.testing.assert_array_equal(ds.train_images, images)
  np.testing.assert_array_equal(ds.test_labels, labels)


def test_cifar10_archive_given_as_the_file(tmp_path):
  images, labels = _cifar10_files(tmp_path / "x" / "cifar-10-batches-bin", "binary")
  archive = tmp_path / "cifar-10-binary.tar.gz"
  with tarfile.open(archive, "w:gz") as tar:
    tar.add(tmp_path / "x" / "cifar-10-batches-bin", arcname="cifar-10-batches-bin")
  ds = data.load_dataset("cifar10", str(archive))
  np.testing.assert_array_equal(ds.train_images, images)
  np.testing.assert_array_equal(ds.train_labels, labels)


@pytest.mark.parametrize("data_dir", [None, "empty"])
def test_missing_cifar_says_only_what_to_do(tmp_path, monkeypatch, caplog, data_dir):
  """No TFDS folder warnings, no TensorFlow hint: where to get the data and how to pass it."""
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  (tmp_path / "empty").mkdir()
  given = None if data_dir is None else str(tmp_path / data_dir)
  with pytest.raises(UsageError) as err:
    data.load_dataset("cifar10", given)
  message = str(err.value)
  assert message.startswith("cifar10 not found" + (f" in {given}" if given else "") +
                            ": download cifar-10-binary.tar.gz from "
                            "https://www.cs.toronto.edu/~kriz/ and pass --data-dir"), message
  assert "cifar-10-batches-bin/" in message and "tensorflow" not in message.lower()
  assert not caplog.records


def test_missing_fashion_mnist_says_what_to_do_in_one_line(tmp_path, monkeypatch, capsys):
  """Without the Debian package (another distribution, macOS) and no TFDS copy."""
  from train import cli  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(data, "FASHION_MNIST_DIR", str(tmp_path / "absent"))
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  assert cli.main(["--steps", "1", "--devices", "1", "--log-dir", str(tmp_path / "run")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: Fashion-MNIST not found in "), err
  assert "apt-get install -y dataset-fashion-mnist" in err and "--data-dir DIR" in err
  assert "fashion_mnist prepared" in err
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("given", [False, True])
def test_fashion_mnist_through_tfds_mock_data(tmp_path, monkeypatch, given):
  """A prepared TFDS fashion_mnist is read where the IDX files are missing: in --data-dir,
  or in TFDS's default directory."""
  tfds = pytest.importorskip("tensorflow_datasets")
  monkeypatch.setattr(data, "FASHION_MNIST_DIR", str(tmp_path / "absent"))
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  (tmp_path / "fashion_mnist").mkdir()  # what a prepared TFDS directory holds
  with tfds.testing.mock_data(num_examples=12):
    ds = data.load_dataset("fashion_mnist", str(tmp_path) if given else None)
  assert ds.name == "fashion_mnist" and ds.num_classes == 10
  assert ds.train_images.shape == (12, 28, 28, 1) and ds.train_images.dtype == np.uint8
  assert ds.test_labels.shape == (12,) and 0 <= ds.train_labels.min() <= ds.train_labels.max() < 10


def test_cifar_through_tfds_mock_data(tmp_path):
  """The TFDS path without network: tfds.testing.mock_data behind `data_source`."""
  tfds = pytest.importorskip("tensorflow_datasets")
  (tmp_path / "cifar100").mkdir()  # what a prepared TFDS directory holds
  with tfds.testing.mock_data(num_examples=12):
    ds = data.load_dataset("cifar100", str(tmp_path))
  assert ds.train_images.shape == (12, 32, 32, 3) and ds.train_images.dtype == np.uint8
  assert ds.test_labels.shape == (12,) and ds.num_classes == 100
  assert ds.train_labels.min() >= 0 and ds.train_labels.max() < 100


def test_batches_depend_only_on_seed_and_step():
  ds = data.synthetic_dataset(64, (8, 8, 3))
  a = data.train_batch(ds, 5, 16, seed=3, do_augment=True)
  b = data.train_batch(ds, 5, 16, seed=3, do_augment=True)
  c = data.train_batch(ds, 6, 16, seed=3, do_augment=True)
  np.testing.assert_array_equal(a[0], b[0])
  assert not np.array_equal(a[0], c[0])
  assert a[0].dtype == np.float32 and a[0].shape == (16, 8, 8, 3)
  # one epoch covers every example once
  seen = np.concatenate([data.train_batch(ds, s, 16, 0, False)[1] for s in range(4)])
  assert sorted(seen.tolist()) == sorted(ds.train_labels.tolist())


def test_augment_is_crop_and_flip():
  x = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4, 1)
  out = data.augment(x, np.random.default_rng(0), pad=0)
  for i in range(2):  # no padding: only a flip is possible
    assert np.array_equal(out[i], x[i]) or np.array_equal(out[i], x[i, :, ::-1])
  out = data.augment(x, np.random.default_rng(0), pad=2)
  assert out.shape == x.shape


def test_eval_batches_pad_with_zero_weight():
  ds = data.synthetic_dataset(10, (8, 8, 1))
  batches = list(data.eval_batches(ds, 4))
  assert len(batches) == 3
  assert [b[2].sum() for b in batches] == [4, 4, 2]
  assert all(b[0].shape == (4, 8, 8, 1) for b in batches)
