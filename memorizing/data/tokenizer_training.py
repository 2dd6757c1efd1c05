"""Training a SentencePiece tokenizer on a prepared data set or on text files.

Shared by memorizing-tokenizer and memorizing-sweep, which resolves a
recipe's `TrainConfig.tokenizer = 'spm:N'` by training N pieces on the
data set's train split once per sweep (memorizing/tools/protocol.py).
"""
from __future__ import annotations

import glob
import os
from typing import List, Optional, Tuple

from memorizing.data import registry
from memorizing.data.tokenizers import SentencePieceTokenizer, train_sentencepiece
from memorizing.errors import ConfigError, DatasetError, MissingFileError

SPM_PREFIX = "spm:"


def spm_vocab_size(name: str) -> Optional[int]:
  """'spm:8192' -> 8192; any other tokenizer name -> None."""
  if not isinstance(name, str) or not name.startswith(SPM_PREFIX):
    return None
  try:
    size = int(name[len(SPM_PREFIX):])
  except ValueError:
    size = 0
  if size <= 260:
    raise ConfigError(f"tokenizer {name!r}: expected 'spm:N' with N > 260 pieces (256 byte "
                      "pieces, the specials and the newline come first), e.g. 'spm:8192'")
  return size


def dataset_texts(dataset: str, data_dir: Optional[str], split: str = "train"):
  """(an iterator over the split's documents, up to 4 validation documents held out)."""
  docs = registry.load_documents(dataset, split, data_dir)
  texts = (docs[i] for i in range(len(docs)))
  try:
    val = registry.load_documents(dataset, "validation", data_dir)
    heldout = [val[i] for i in range(min(4, len(val)))]
  except DatasetError:  # a data set without a validation split: hold out train's last
    heldout = [docs[len(docs) - 1]] if len(docs) else []
  return texts, heldout


def file_texts(pattern: str) -> Tuple[object, List[bytes]]:
  """(an iterator over the files matching `pattern`, the last file held out)."""
  files = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
  if not files:
    raise MissingFileError(f"no files match {pattern!r}")

  def read(path):
    with open(path, "rb") as f:
      return f.read()
  return (read(f) for f in files), [read(files[-1])]


def train_tokenizer(texts, heldout, output: str, vocab_size: int, *, model_type: str = "unigram",
                    max_bytes: Optional[int] = 200_000_000, max_sentences: int = 2_000_000,
                    num_threads: Optional[int] = None) -> Tuple[SentencePieceTokenizer, str]:
  """Trains and writes `output`; returns (tokenizer, a one-line report)."""
  try:
    tokenizer = train_sentencepiece(texts, output, vocab_size, model_type=model_type,
                                    max_sentences=max_sentences, max_bytes=max_bytes,
                                    num_threads=num_threads)
  except RuntimeError as e:
    if "Vocabulary size" not in str(e):
      raise
    raise ConfigError(f"SentencePiece cannot make {vocab_size} pieces of this text: "
                      f"{str(e).split('] ')[-1]}") from e
  exact = all(tokenizer.decode(tokenizer.encode(t)) == t.decode("utf-8", "replace")
              for t in heldout)
  bpt = tokenizer.bytes_per_token(heldout) if heldout else float("nan")
  return tokenizer, (f"wrote {output}: vocab {tokenizer.vocab_size}, {bpt:.3f} bytes/token on "
                     f"held-out text, exact round trip: {exact}")


def train_on_dataset(dataset: str, data_dir: Optional[str], output: str, vocab_size: int,
                     split: str = "train", **options) -> Tuple[SentencePieceTokenizer, str]:
  """A SentencePiece model of `vocab_size` pieces trained on a prepared split."""
  texts, heldout = dataset_texts(dataset, data_dir, split)
  return train_tokenizer(texts, heldout, output, vocab_size, **options)
