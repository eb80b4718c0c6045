"""Tokenizers: raw bytes (vocabulary 256, the default) and GPT-2's byte-level BPE.

GPT-2's BPE (Radford et al. 2019) is read from its two files, `encoder.json` (token ->
id) and `vocab.bpe` (the merges, in priority order), given locally; nothing is
downloaded. Tokens are stored as uint16 (both vocabularies fit).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np

from train.errors import UsageError

BPE_FILES = ("encoder.json", "vocab.bpe")
# GPT-2's pre-tokenizer: contractions, letter runs, digit runs, other symbols, spaces
# (a space joins the word after it). Merges never cross these pieces.
_GPT2_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"""
                 r"""|\s+(?!\S)|\s+""")


class ByteTokenizer:
  """One token per byte: no vocabulary file, and bits per token are bits per byte."""
  name = "bytes"
  vocab_size = 256
  eot = None

  def encode(self, text: bytes) -> np.ndarray:
    return np.frombuffer(text, np.uint8).astype(np.uint16)

  def decode(self, ids: Sequence[int]) -> bytes:
    return bytes(np.asarray(ids, np.uint8).tolist())


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible map of the 256 bytes to printable characters: printable Latin-1
  bytes map to themselves, the rest to code points from 256 on."""
  keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
  chars, extra = {}, 0
  for b in range(256):
    if b in keep:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + extra)
      extra += 1
  return chars


class BPETokenizer:
  """Byte-level BPE: text -> UTF-8 bytes -> printable characters -> pieces -> merges.

  Each piece starts as its characters; the adjacent pair with the lowest merge rank is
  joined, everywhere in the piece, until no ranked pair is left.
  """
  name = "gpt2-bpe"

  def __init__(self, encoder: dict[str, int], merges: Iterable[tuple[str, str]]):
    try:
      import regex  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise UsageError("GPT-2 BPE needs the 'regex' package (for \\p{L} classes): "
                       "pip install regex") from None
    self.encoder = dict(encoder)
    self.decoder = {i: t for t, i in self.encoder.items()}
    self.ranks = {tuple(m): r for r, m in enumerate(merges)}
    self.byte_encoder = bytes_to_unicode()
    self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
    self.vocab_size = max(self.encoder.values()) + 1
    if self.vocab_size > 1 << 16:
      raise UsageError(f"a BPE vocabulary of {self.vocab_size} ids does not fit the uint16 "
                       "tokens (at most 65536)")
    self.eot = self.encoder.get("<|endoftext|>")
    self._pattern = regex.compile(_GPT2_PATTERN)
    self._cache: dict[str, tuple[int, ...]] = {}

  @classmethod
  def from_dir(cls, directory: str) -> BPETokenizer:
    """Reads `encoder.json` and `vocab.bpe` from `directory` (GPT-2's release layout)."""
    paths = [os.path.join(directory, f) for f in BPE_FILES]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
      raise UsageError(f"--bpe-dir {directory}: missing {', '.join(missing)} (GPT-2's "
                       "encoder.json and vocab.bpe, copied there beforehand)")
    with open(paths[0], encoding="utf-8") as f:
      encoder = json.load(f)
    with open(paths[1], encoding="utf-8") as f:
      lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines
              if line and not line.startswith("#version")]
    return cls(encoder, merges)

  def _bpe(self, piece: str) -> tuple[int, ...]:
    if piece in self._cache:
      return self._cache[piece]
    word = tuple(piece)
    while len(word) > 1:
      best = min(zip(word, word[1:]), key=lambda p: self.ranks.get(p, float("inf")))
      if best not in self.ranks:
        break
      merged, i = [], 0
      while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == best:
          merged.append(word[i] + word[i + 1])
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = tuple(merged)
    try:
      ids = tuple(self.encoder[t] for t in word)
    except KeyError as err:
      raise ValueError(f"BPE piece {err.args[0]!r} has no id in encoder.json: the "
                       "vocabulary does not cover every byte") from None
    self._cache[piece] = ids
    return ids

  def encode(self, text: bytes) -> np.ndarray:
    """Token ids of UTF-8 `text` (invalid UTF-8 is replaced by U+FFFD first)."""
    ids: list[int] = []
    for piece in self._pattern.findall(text.decode("utf-8", errors="replace")):
      ids.extend(self._bpe("".join(self.byte_encoder[b] for b in piece.encode("utf-8"))))
    return np.asarray(ids, np.uint16)

  def decode(self, ids: Sequence[int]) -> bytes:
    chars = "".join(self.decoder[int(i)] for i in ids)
    return bytes(self.byte_decoder[c] for c in chars)


def load_tokenizer(bpe_dir: str | None):
  """Bytes when `bpe_dir` is None, else GPT-2's BPE from the files in `bpe_dir`."""
  if bpe_dir is None:
    return ByteTokenizer()
  if not os.path.isdir(bpe_dir):
    raise UsageError(f"--bpe-dir {bpe_dir} does not exist")
  return BPETokenizer.from_dir(bpe_dir)
