"""Text corpora as token arrays, deterministic batches of windows, and a unigram baseline.

Sources:
  stdlib: the Python standard library's own `.py` files (offline, on every machine with
    Python; about 12 MB for CPython 3.11). Files are read in sorted order, and each goes
    to validation when a hash of its relative path falls in the lowest `VALID_SHARE`, so
    the split depends on the file names only, not on their order or on other files.
    Test directories and installed packages are left out.
  tiny_shakespeare, lm1b: tensorflow-datasets, read from a prepared directory (`data_dir`,
    default TFDS's own ~/tensorflow_datasets) through its array_record data source, which
    needs no TensorFlow. Without TensorFlow nothing is downloaded; with it, tfrecord
    directories are read and TFDS downloads when the network answers.
    The installed TFDS catalog offers neither WikiText nor Penn Treebank.

Training batches are windows of `seq_len + 1` tokens (inputs and the targets shifted by
one). Each epoch cuts the train split into non-overlapping windows from a random shift
and visits them in a random order; both come from (seed, epoch), so the batch of a step
depends only on (seed, step) and a resumed run sees what an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sysconfig
from collections.abc import Iterable, Iterator

import numpy as np

from train import data as data_lib
from train.errors import UsageError
from train.lm.tokenizer import ByteTokenizer

LM_DATASETS = ("stdlib", "tiny_shakespeare", "lm1b")
TFDS_SPLITS = {"tiny_shakespeare": ("train", "validation"),  # (train, held out)
               "lm1b": ("train", "test")}  # lm1b has no validation split
VALID_SHARE = 0.05
MIN_CORPUS_BYTES = 1 << 20
# Never part of the stdlib corpus: the test suites are absent from many installs
# (Debian's python3 ships them separately), and site-packages is not the standard library.
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                        "__pycache__"})


@dataclasses.dataclass(frozen=True)
class TextCorpus:
  """A tokenized train and validation split, and where they came from."""
  name: str
  train: np.ndarray          # uint16 token ids
  valid: np.ndarray          # uint16 token ids
  vocab_size: int
  tokenizer: str             # "bytes" or "gpt2-bpe"
  train_bytes: int           # UTF-8 bytes behind the train tokens
  valid_bytes: int
  manifest: dict             # sources, sizes and digests, for the run's log

  @property
  def bytes_per_token(self) -> float:
    """Bytes of text per validation token: 1 for bytes, about 4 for GPT-2's BPE."""
    return self.valid_bytes / max(1, len(self.valid))


def corpus_from_documents(name: str, train_docs: Iterable[bytes], valid_docs: Iterable[bytes],
                          tokenizer=None, manifest: dict | None = None) -> TextCorpus:
  """Tokenizes each document and concatenates them (with the tokenizer's end-of-text id
  between documents, if it has one)."""
  tokenizer = tokenizer or ByteTokenizer()

  def encode(docs) -> tuple[np.ndarray, int]:
    parts, n_bytes = [], 0
    sep = None if tokenizer.eot is None else np.asarray([tokenizer.eot], np.uint16)
    for doc in docs:
      if parts and sep is not None:
        parts.append(sep)
      parts.append(tokenizer.encode(doc))
      n_bytes += len(doc)
    return (np.concatenate(parts) if parts else np.zeros(0, np.uint16)), n_bytes

  train, train_bytes = encode(train_docs)
  valid, valid_bytes = encode(valid_docs)
  return TextCorpus(name, train, valid, tokenizer.vocab_size, tokenizer.name, train_bytes,
                    valid_bytes, manifest or {})


def load_corpus(name: str, data_dir: str | None = None, *, tokenizer=None,
                max_bytes: int | None = None) -> TextCorpus:
  """A corpus by name (`LM_DATASETS`); UsageError with what to do when data is missing.

  Args:
    name: "stdlib", "tiny_shakespeare" or "lm1b".
    data_dir: stdlib: a directory of .py files to use instead of this Python's library;
      TFDS datasets: the prepared tensorflow-datasets directory.
    tokenizer: `train.lm.tokenizer.ByteTokenizer` (default) or `BPETokenizer`.
    max_bytes: read at most about this many bytes per split (TFDS datasets; lm1b is
      4 GB of text).
  """
  if data_dir is not None and not os.path.isdir(data_dir):
    raise UsageError(f"--data-dir {data_dir} does not exist")
  if name == "stdlib":
    return load_stdlib_corpus(data_dir, tokenizer=tokenizer)
  if name in TFDS_SPLITS:
    return load_tfds_corpus(name, data_dir, tokenizer=tokenizer, max_bytes=max_bytes)
  raise UsageError(f"unknown dataset {name!r}; choose from {', '.join(LM_DATASETS)}")


# --- the standard library's source --------------------------------------------------------

def stdlib_root() -> str:
  return sysconfig.get_paths()["stdlib"]


def stdlib_files(root: str) -> list[str]:
  """Relative paths (POSIX separators) of the .py files under `root`, sorted."""
  found = []
  for directory, dirs, files in os.walk(root):
    dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
    for f in files:
      if f.endswith(".py"):
        found.append(os.path.relpath(os.path.join(directory, f), root).replace(os.sep, "/"))
  return sorted(found)


def is_validation(relpath: str, share: float = VALID_SHARE) -> bool:
  """Whether a file belongs to validation: the first 8 bytes of SHA-256 of its path,
  read as a fraction of 2**64, fall below `share`."""
  h = int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "big")
  return h < share * 2.0**64


def load_stdlib_corpus(root: str | None = None, *, tokenizer=None,
                       valid_share: float = VALID_SHARE,
                       min_bytes: int = MIN_CORPUS_BYTES) -> TextCorpus:
  """The .py files under `root` (default: this Python's standard library), split by file."""
  root = root or stdlib_root()
  files = stdlib_files(root)
  splits: dict[str, list[bytes]] = {"train": [], "valid": []}
  digests = {"train": hashlib.sha256(), "valid": hashlib.sha256()}
  names = {"train": [], "valid": []}
  for rel in files:
    with open(os.path.join(root, rel), "rb") as f:
      text = f.read()
    split = "valid" if is_validation(rel, valid_share) else "train"
    splits[split].append(text)
    names[split].append(rel)
    digests[split].update(rel.encode() + b"\0" + hashlib.sha256(text).digest())
  sizes = {k: sum(map(len, v)) for k, v in splits.items()}
  if sizes["train"] < min_bytes or not splits["valid"]:
    raise UsageError(f"{root} holds {sizes['train'] + sizes['valid']} bytes in {len(files)} "
                     f".py files, too little for the stdlib corpus (at least {min_bytes} "
                     "train bytes and one validation file); pass --data-dir with a larger "
                     "source tree")
  manifest = {"root": root, "valid_share": valid_share,
              **{f"{k}_files": len(v) for k, v in names.items()},
              **{f"{k}_bytes": sizes[k] for k in sizes},
              **{f"{k}_sha256": d.hexdigest() for k, d in digests.items()},
              "valid_file_names": names["valid"]}
  return corpus_from_documents("stdlib", splits["train"], splits["valid"], tokenizer, manifest)


# --- tensorflow-datasets ------------------------------------------------------------------

def _missing_tfds(name: str, why: str) -> UsageError:
  return UsageError(
      f"{name} not available ({why}): prepare it where there is network with "
      f"tensorflow-datasets (tfds build {name} --file_format=array_record "
      "--data_dir=DIR) and pass --data-dir DIR")


def _as_bytes(text) -> bytes:
  return text.encode("utf-8") if isinstance(text, str) else bytes(text)


def _tfds_load_with_tf(tfds, name: str, data_dir: str | None, first_error: Exception):
  """tfrecord-prepared directories and downloads go through tf.data (needs TensorFlow);
  the examples come back as a list, which `_read_split` reads like a data source."""
  where = data_dir or "tensorflow-datasets' default directory"
  try:
    import tensorflow  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    raise _missing_tfds(name, f"no array_record data in {where} "
                        f"({type(first_error).__name__}); reading tfrecord data or "
                        "downloading needs 'pip install tensorflow'") from None
  download = data_lib._network_reachable()  # pylint: disable=protected-access
  try:
    return {split: list(tfds.as_numpy(tfds.load(name, split=split, data_dir=data_dir,
                                                download=download)))
            for split in TFDS_SPLITS[name]}
  except Exception as err:  # noqa: BLE001
    why = f"not in {where} and no network to download it" if not download else repr(err)
    raise _missing_tfds(name, why) from None


def _read_split(source, max_bytes: int | None, newline: bool) -> list[bytes]:
  docs, total = [], 0
  for i in range(len(source)):
    doc = _as_bytes(source[i]["text"])
    if newline:
      doc += b"\n"
    docs.append(doc)
    total += len(doc)
    if max_bytes is not None and total >= max_bytes:
      break
  return docs


def load_tfds_corpus(name: str, data_dir: str | None, *, tokenizer=None,
                     max_bytes: int | None = None) -> TextCorpus:
  """A TFDS text dataset's "text" feature, from array_record data already prepared."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise _missing_tfds(name, "tensorflow-datasets is not installed: pip install "
                        "'hggjax[train]'") from None
  splits = TFDS_SPLITS[name]
  sources = {}
  try:
    # download=False never touches the network (TFDS otherwise blocks on DNS for minutes
    # where there is none); array_record sources read without TensorFlow.
    for split in splits:
      sources[split] = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as err:  # noqa: BLE001 - TFDS raises many kinds for "not prepared"
    sources = _tfds_load_with_tf(tfds, name, data_dir, err)
  newline = name == "lm1b"  # one sentence per example, stripped of its line break
  train, valid = (_read_split(sources[s], max_bytes, newline) for s in splits)
  manifest = {"tfds_name": name, "data_dir": data_dir, "splits": list(splits),
              "train_examples": len(train), "valid_examples": len(valid)}
  return corpus_from_documents(name, train, valid, tokenizer, manifest)


# --- batches --------------------------------------------------------------------------

def windows_per_epoch(n_tokens: int, seq_len: int) -> int:
  """Non-overlapping windows of seq_len + 1 tokens that fit after any shift < seq_len."""
  return max(0, n_tokens // seq_len - 1)


def steps_per_epoch(n_tokens: int, batch_size: int, seq_len: int) -> int:
  return windows_per_epoch(n_tokens, seq_len) // batch_size  # every step is a full batch


def train_batch(tokens: np.ndarray, step: int, batch_size: int, seq_len: int, seed: int,
                rows: slice | None = None) -> np.ndarray:
  """The global batch of `step`: int32 (batch_size, seq_len + 1), or its `rows` only.

  Epoch e shifts every window start by a random amount below seq_len and permutes the
  windows, both drawn from (seed, e); `rows` (a process's share) selects rows after the
  draws, so they equal the same rows of the whole batch.
  """
  spe = steps_per_epoch(len(tokens), batch_size, seq_len)
  if spe < 1:
    raise UsageError(f"the train split ({len(tokens)} tokens) is shorter than one batch of "
                     f"{batch_size} windows of {seq_len + 1} tokens")
  epoch, i = divmod(step, spe)
  rng = np.random.default_rng([seed, epoch])
  shift = int(rng.integers(seq_len))
  order = rng.permutation(windows_per_epoch(len(tokens), seq_len))
  starts = shift + seq_len * order[i * batch_size:(i + 1) * batch_size]
  if rows is not None:
    starts = starts[rows]
  return tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)


def eval_windows(tokens: np.ndarray, seq_len: int, max_windows: int | None = None) -> np.ndarray:
  """Fixed validation windows, int32 (n, seq_len + 1): consecutive, non-overlapping, so
  every token past the first is predicted once; `max_windows` keeps that many spread
  evenly over the split."""
  n = (len(tokens) - 1) // seq_len
  if n < 1:
    raise UsageError(f"the validation split ({len(tokens)} tokens) is shorter than one "
                     f"window of {seq_len + 1} tokens")
  index = np.arange(n)
  if max_windows is not None and max_windows < n:
    index = np.linspace(0, n - 1, max_windows).round().astype(np.int64)
  starts = index * seq_len
  return tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)


def eval_batches(windows: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Batches of windows padded to `batch_size`; yields (tokens, weights), weight 0 on
  padding rows."""
  for start in range(0, len(windows), batch_size):
    tokens = windows[start:start + batch_size]
    weights = np.ones(len(tokens), np.float32)
    short = batch_size - len(tokens)
    if short:
      tokens = np.concatenate([tokens, np.zeros((short, tokens.shape[1]), np.int32)])
      weights = np.concatenate([weights, np.zeros(short, np.float32)])
    yield tokens, weights


# --- unigram baseline -----------------------------------------------------------------

def unigram_baseline(train: np.ndarray, valid: np.ndarray, vocab_size: int,
                     bytes_per_token: float = 1.0) -> dict[str, float]:
  """What a model ignoring all context achieves: the train split's token frequencies.

  Returns bits per token: `train_entropy` (entropy of the train distribution) and
  `valid_cross_entropy` (validation tokens coded with the train frequencies, add-one
  smoothed so unseen tokens cost finite bits: the loss a context-free model would get),
  and both per byte.
  """
  counts = np.bincount(train, minlength=vocab_size).astype(np.float64)
  p = counts[counts > 0] / counts.sum()
  entropy = float(-(p * np.log2(p)).sum())
  smoothed = (counts + 1.0) / (counts.sum() + vocab_size)
  valid_counts = np.bincount(valid, minlength=vocab_size).astype(np.float64)
  cross = float(-(valid_counts * np.log2(smoothed)).sum() / max(1.0, valid_counts.sum()))
  return {"train_entropy_bits": entropy, "valid_cross_entropy_bits": cross,
          "train_entropy_bits_per_byte": entropy / bytes_per_token,
          "valid_cross_entropy_bits_per_byte": cross / bytes_per_token}
