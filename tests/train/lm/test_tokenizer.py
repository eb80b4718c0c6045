"""Byte tokens and GPT-2's byte-level BPE on a hand-made vocabulary."""

import json

import numpy as np
import pytest

from train.errors import UsageError
from train.lm import tokenizer as tok


def _bpe(merges):
  """All 256 byte characters (ids 0..255 in byte order), then one id per merge."""
  pytest.importorskip("regex")
  chars = tok.bytes_to_unicode()
  encoder = {chars[b]: b for b in range(256)}
  for a, b in merges:
    encoder[a + b] = len(encoder)
  encoder["<|endoftext|>"] = len(encoder)
  return tok.BPETokenizer(encoder, merges)


MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "w"), ("e", "l")]


def test_bytes_round_trip():
  t = tok.ByteTokenizer()
  text = "héllo\n\x00 ∑ 🙂".encode()
  ids = t.encode(text)
  assert ids.dtype == np.uint16 and len(ids) == len(text) and t.vocab_size == 256
  assert t.decode(ids) == text


def test_byte_map_is_a_bijection_onto_printable_characters():
  chars = tok.bytes_to_unicode()
  assert len(set(chars.values())) == 256
  assert all(c.isprintable() and not c.isspace() for c in chars.values())
  assert chars[ord("a")] == "a" and chars[ord(" ")] == "Ġ"  # GPT-2's visible space


def test_bpe_merges_in_rank_order():
  t = _bpe(MERGES)
  ids = t.encode(b"hello world")
  # "hello" is one token; " world" starts with the merged "Ġw", the rest are bytes
  assert ids.tolist() == [t.encoder["hello"], t.encoder["Ġw"], *b"orld"]
  # rank decides: "he" (rank 0) before "el" (rank 5), so "hel" is he + l
  assert t.encode(b"hel").tolist() == [t.encoder["he"], ord("l")]
  assert t.encode(b"xel").tolist() == [ord("x"), t.encoder["el"]]
  assert t.vocab_size == 256 + len(MERGES) + 1 and t.eot == t.vocab_size - 1


def test_bpe_pieces_never_merge_across_words():
  t = _bpe([("o", "Ġ")])  # would join "o" and the next word's space
  assert t.encoder["oĠ"] not in t.encode(b"go west").tolist()


@pytest.mark.parametrize("text", ["", "plain ascii, with punctuation!", "  two  spaces\n\n",
                                  "naïve café ∑ 🙂 日本語", "it's we'll 123 4.5"])
def test_bpe_round_trip(text):
  t = _bpe(MERGES)
  assert t.decode(t.encode(text.encode())) == text.encode()


def test_bpe_from_files(tmp_path):
  t = _bpe(MERGES)
  (tmp_path / "encoder.json").write_text(json.dumps(t.encoder))
  (tmp_path / "vocab.bpe").write_text(
      "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES), encoding="utf-8")
  loaded = tok.load_tokenizer(str(tmp_path))
  assert loaded.encode(b"hello world").tolist() == t.encode(b"hello world").tolist()


def test_missing_bpe_files_are_a_usage_error(tmp_path):
  (tmp_path / "encoder.json").write_text("{}")
  with pytest.raises(UsageError, match="vocab.bpe"):
    tok.load_tokenizer(str(tmp_path))
  with pytest.raises(UsageError, match="does not exist"):
    tok.load_tokenizer(str(tmp_path / "absent"))
  assert isinstance(tok.load_tokenizer(None), tok.ByteTokenizer)


def test_bpe_vocabulary_must_fit_uint16():
  pytest.importorskip("regex")
  with pytest.raises(UsageError, match="uint16"):
    tok.BPETokenizer({"a": 70_000}, [])
