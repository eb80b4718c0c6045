"""Text corpora (stdlib split, TFDS via mock_data), deterministic windows, unigram baseline."""

import math

import numpy as np
import pytest

from train.errors import UsageError
from train.lm import config, data


@pytest.fixture(scope="module")
def stdlib():
  return data.load_corpus("stdlib")


def _tree(root, files):
  for rel, text in files.items():
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text)


def test_dataset_names_match_config():
  assert data.LM_DATASETS == config.LM_DATASETS


def test_stdlib_split_is_deterministic_and_disjoint(stdlib):
  again = data.load_corpus("stdlib")
  assert stdlib.manifest == again.manifest
  np.testing.assert_array_equal(stdlib.train[:1000], again.train[:1000])
  valid = set(stdlib.manifest["valid_file_names"])
  files = data.stdlib_files(data.stdlib_root())
  assert valid and valid < set(files)
  assert all(data.is_validation(f) == (f in valid) for f in files)
  assert stdlib.manifest["train_files"] + len(valid) == len(files)
  assert stdlib.train_bytes == len(stdlib.train) and stdlib.bytes_per_token == 1.0
  assert stdlib.train_bytes > 1_000_000 and stdlib.vocab_size == 256
  assert not any(part in ("test", "site-packages") for f in files for part in f.split("/"))


def test_validation_share_is_about_five_percent_and_depends_on_the_name_only():
  names = [f"pkg{i}/mod{i}.py" for i in range(4000)]
  share = np.mean([data.is_validation(n) for n in names])
  assert 0.04 < share < 0.06
  assert [data.is_validation(n) for n in names[:50]] == [data.is_validation(n)
                                                         for n in names[:50]]


def test_stdlib_corpus_from_a_directory(tmp_path):
  files = {f"m{i}.py": f"x{i} = {i}\n".encode() * 50 for i in range(60)}
  files["test/test_m.py"] = b"skipped\n"
  files["a/notes.txt"] = b"skipped\n"
  _tree(tmp_path, files)
  corpus = data.load_stdlib_corpus(str(tmp_path), min_bytes=1000)
  m = corpus.manifest
  assert m["train_files"] + m["valid_files"] == 60 and m["valid_files"] >= 1
  assert corpus.train_bytes + corpus.valid_bytes == sum(
      len(v) for k, v in files.items() if k.startswith("m"))


def test_too_little_text_is_a_usage_error(tmp_path):
  _tree(tmp_path, {"a.py": b"x = 1\n"})
  with pytest.raises(UsageError, match="too little"):
    data.load_corpus("stdlib", str(tmp_path))


def test_unknown_dataset_and_missing_dir_are_usage_errors(tmp_path):
  with pytest.raises(UsageError, match="unknown dataset"):
    data.load_corpus("wikitext2")
  with pytest.raises(UsageError, match="does not exist"):
    data.load_corpus("tiny_shakespeare", str(tmp_path / "absent"))


def test_batches_depend_only_on_seed_and_step():
  tokens = np.arange(10_000, dtype=np.uint16)
  a = data.train_batch(tokens, 7, 8, 16, seed=3)
  np.testing.assert_array_equal(a, data.train_batch(tokens, 7, 8, 16, seed=3))
  assert a.shape == (8, 17) and a.dtype == np.int32
  assert not np.array_equal(a, data.train_batch(tokens, 8, 8, 16, seed=3))
  assert not np.array_equal(a, data.train_batch(tokens, 7, 8, 16, seed=4))
  np.testing.assert_array_equal(np.diff(a, axis=1), 1)  # windows are contiguous text
  np.testing.assert_array_equal(data.train_batch(tokens, 7, 8, 16, 3, rows=slice(2, 6)), a[2:6])


def test_an_epoch_visits_disjoint_windows():
  tokens = np.arange(1000, dtype=np.uint16)
  spe = data.steps_per_epoch(len(tokens), 4, 10)
  assert spe == (1000 // 10 - 1) // 4
  starts = np.concatenate([data.train_batch(tokens, s, 4, 10, 0)[:, 0] for s in range(spe)])
  assert len(set(starts.tolist())) == len(starts)
  assert len(set((starts % 10).tolist())) == 1  # one shift per epoch
  assert starts.max() + 11 <= len(tokens)
  nxt = data.train_batch(tokens, spe, 4, 10, 0)[:, 0]  # the next epoch reshuffles
  assert not np.array_equal(nxt, starts[:4])


def test_batch_larger_than_the_split_is_a_usage_error():
  with pytest.raises(UsageError, match="shorter than one batch"):
    data.train_batch(np.zeros(100, np.uint16), 0, 8, 16, 0)


def test_eval_windows_are_fixed_and_spread():
  tokens = np.arange(1001, dtype=np.uint16)
  w = data.eval_windows(tokens, 10)
  assert w.shape == (100, 11) and w[0, 0] == 0 and w[-1, -1] == 1000
  np.testing.assert_array_equal(w[1:, 0], w[:-1, -1])  # consecutive, each target once
  few = data.eval_windows(tokens, 10, max_windows=5)
  assert few[:, 0].tolist() == [0, 250, 500, 740, 990]
  batches = list(data.eval_batches(few, 2))
  assert [b[1].tolist() for b in batches] == [[1, 1], [1, 1], [1, 0]]
  assert all(b[0].shape == (2, 11) for b in batches)


def test_unigram_baseline_on_a_toy_corpus():
  train = np.array([0, 0, 1, 1], np.uint16)  # two equally likely tokens: 1 bit
  valid = np.array([0, 1, 2], np.uint16)     # token 2 never seen in train
  base = data.unigram_baseline(train, valid, vocab_size=4, bytes_per_token=2.0)
  assert base["train_entropy_bits"] == pytest.approx(1.0)
  # add-one smoothing: p = (3, 3, 1, 1) / 8
  expected = -(2 * math.log2(3 / 8) + math.log2(1 / 8)) / 3
  assert base["valid_cross_entropy_bits"] == pytest.approx(expected)
  assert base["valid_cross_entropy_bits_per_byte"] == pytest.approx(expected / 2)


def test_stdlib_unigram_baseline(stdlib):
  base = data.unigram_baseline(stdlib.train, stdlib.valid, 256)
  assert 4.0 < base["train_entropy_bits"] < 5.5  # source code: far below 8 bits a byte


def test_documents_are_joined_with_end_of_text():
  class Eot:
    name, vocab_size, eot = "fake", 300, 299

    def encode(self, text):
      return np.frombuffer(text, np.uint8).astype(np.uint16)

  corpus = data.corpus_from_documents("x", [b"ab", b"c"], [b"d"], Eot())
  assert corpus.train.tolist() == [97, 98, 299, 99] and corpus.train_bytes == 3


@pytest.mark.parametrize("name", sorted(data.TFDS_SPLITS))
def test_tfds_text_through_mock_data(name, tmp_path):
  """The TFDS path without network or TensorFlow: mock_data behind `data_source`."""
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=5):
    corpus = data.load_corpus(name, str(tmp_path))
  assert corpus.manifest["train_examples"] == 5 and corpus.vocab_size == 256
  assert len(corpus.train) == corpus.train_bytes > 0 and len(corpus.valid) > 0
  assert corpus.train.max() < 256


def test_tfds_max_bytes_stops_reading(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=20):
    corpus = data.load_corpus("lm1b", str(tmp_path), max_bytes=1)
  assert corpus.manifest["train_examples"] == 1


def test_unprepared_tfds_dataset_is_one_usage_error(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(UsageError, match=r"tiny_shakespeare not available .* --data-dir"):
    data.load_corpus("tiny_shakespeare", str(tmp_path))
