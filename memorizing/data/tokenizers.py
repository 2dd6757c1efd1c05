"""Tokenizers: bytes (vocab 256 + specials) and SentencePiece.

Both map `str | bytes` to a 1-D int32 array and back, and report the mean
number of UTF-8 bytes per token on sample text, so that losses can be
converted to bits per byte: bits_per_byte = nats_per_token / ln(2) / bytes_per_token.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from memorizing.errors import DatasetError, MissingFileError

Text = Union[str, bytes]

TRAIN_TOKENIZER_COMMAND = (
    "memorizing-tokenizer --dataset python_stdlib --vocab_size 32000 "
    "--output {path}")


def as_bytes(text: Text) -> bytes:
  """UTF-8 bytes of `text` (bytes pass through unchanged, valid or not)."""
  if isinstance(text, (bytes, bytearray, memoryview)):
    return bytes(text)
  return text.encode("utf-8", errors="surrogatepass")


def as_str(text: Text) -> str:
  """`text` as str; undecodable bytes become U+FFFD instead of raising."""
  if isinstance(text, (bytes, bytearray, memoryview)):
    return bytes(text).decode("utf-8", errors="replace")
  return text


class Tokenizer:
  """Interface: vocab_size, pad_id, encode, decode, bytes_per_token."""
  name: str = "tokenizer"
  vocab_size: int
  pad_id: int

  def encode(self, text: Text) -> np.ndarray:
    """Token ids of `text`: [num_tokens] int32."""
    raise NotImplementedError

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`; pad and other special ids are dropped."""
    raise NotImplementedError

  def bytes_per_token(self, texts: Iterable[Text]) -> float:
    """Mean UTF-8 bytes per token over `texts` (total bytes / total tokens)."""
    num_bytes = num_tokens = 0
    for text in texts:
      num_bytes += len(as_bytes(text))
      num_tokens += len(self.encode(text))
    if num_tokens == 0:
      raise ValueError("bytes_per_token needs sample text with at least one token")
    return num_bytes / num_tokens


class ByteTokenizer(Tokenizer):
  """Ids 0..255 are the bytes; 256 pad, 257 bos, 258 eos; vocab_size 260.

  Encoding never fails: non-UTF-8 input bytes are kept as they are.
  """
  name = "bytes"
  vocab_size = 260
  pad_id = 256
  bos_id = 257
  eos_id = 258

  def encode(self, text: Text) -> np.ndarray:
    return np.frombuffer(as_bytes(text), dtype=np.uint8).astype(np.int32)

  def decode_bytes(self, ids: Sequence[int]) -> bytes:
    """The raw bytes of `ids` (special ids dropped)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    return ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes()

  def decode(self, ids: Sequence[int]) -> str:
    return self.decode_bytes(ids).decode("utf-8", errors="replace")

  def bytes_per_token(self, texts: Iterable[Text] = ()) -> float:
    del texts  # exactly one byte per token by construction
    return 1.0

  def __repr__(self):
    return "ByteTokenizer()"


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model loaded from `model_path`.

  Models trained by memorizing-tokenizer round-trip text exactly
  (identity normalisation, byte fallback, no dummy prefix). Bytes that are
  not valid UTF-8 are replaced by U+FFFD before encoding.
  """
  name = "sentencepiece"

  def __init__(self, model_path: str):
    import sentencepiece as spm  # local import: the byte tokenizer needs nothing
    model_path = os.fspath(model_path)
    if not os.path.exists(model_path):
      raise MissingFileError(
          f"SentencePiece model not found: {model_path}. Train one with:\n  "
          + TRAIN_TOKENIZER_COMMAND.format(path=model_path))
    self.model_path = model_path
    try:
      self._sp = spm.SentencePieceProcessor(model_file=model_path)
    except (OSError, RuntimeError) as e:   # a directory, no permission, not a model
      raise DatasetError(f"SentencePiece model {model_path} is unreadable "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                         "train it again with memorizing-tokenizer") from e
    self.vocab_size = int(self._sp.get_piece_size())
    # A model without a pad piece still needs an in-vocabulary id for padding
    # (it always carries weight 0); use 0.
    self.pad_id = int(self._sp.pad_id()) if self._sp.pad_id() >= 0 else 0
    self.eos_id = int(self._sp.eos_id())
    self.bos_id = int(self._sp.bos_id())

  def encode(self, text: Text) -> np.ndarray:
    return np.asarray(self._sp.encode(as_str(text)), dtype=np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    special = {self.pad_id, self.eos_id, self.bos_id}
    return self._sp.decode([i for i in ids if i not in special and 0 <= i < self.vocab_size])

  def __repr__(self):
    return f"SentencePieceTokenizer({self.model_path!r})"


def get_tokenizer(name_or_path: str) -> Tokenizer:
  """"bytes" -> ByteTokenizer; a path to a .model file -> SentencePieceTokenizer."""
  if isinstance(name_or_path, Tokenizer):
    return name_or_path
  if name_or_path in ("bytes", "byte"):
    return ByteTokenizer()
  if str(name_or_path).startswith("spm:"):
    raise DatasetError(
        f"tokenizer {name_or_path!r} is a recipe, not a model: memorizing-sweep trains it on the "
        "data set's train split and binds its path; for a single run train one with "
        "memorizing-tokenizer and set TrainConfig.tokenizer to the .model path")
  if str(name_or_path).endswith(".model") or os.path.sep in str(name_or_path):
    return SentencePieceTokenizer(os.path.expanduser(str(name_or_path)))
  raise DatasetError(
      f"Unknown tokenizer {name_or_path!r}: use 'bytes' or the path of a SentencePiece "
      ".model file (train one with memorizing-tokenizer)")


def _lines(texts: Iterable[Text], max_bytes: Optional[int]) -> Iterable[str]:
  """Training sentences: the lines of `texts` (newlines are a symbol of their own)."""
  total = 0
  for text in texts:
    for line in as_str(text).split("\n"):
      if line:
        yield line
        total += len(line)
    if max_bytes is not None and total >= max_bytes:
      return


def train_sentencepiece(texts: Iterable[Text], output_path: str, vocab_size: int = 32000, *,
                        model_type: str = "unigram", max_sentences: int = 2_000_000,
                        max_bytes: Optional[int] = None, num_threads: Optional[int] = None,
                        ) -> SentencePieceTokenizer:
  """Train a SentencePiece model on `texts` that round-trips text exactly.

  Exactness comes from: identity normalisation, no removal of extra
  whitespace, no dummy prefix, byte fallback (any byte is a piece, no <unk>),
  whitespace-only pieces (indentation), and "\\n" as a user-defined symbol
  (training sentences are lines, so it never appears inside one). Digits are
  split. Ids: pad 0, eos 1, unk 2, no bos. Writes `output_path` (ending in
  .model) and its .vocab, and returns the loaded tokenizer.
  """
  import sentencepiece as spm  # only SentencePiece tokenizers need it
  if not str(output_path).endswith(".model"):
    raise DatasetError(f"output_path must end in .model, got {output_path!r}")
  os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(_lines(texts, max_bytes)),
      model_prefix=str(output_path)[:-len(".model")],
      vocab_size=vocab_size,
      model_type=model_type,
      character_coverage=0.9995,
      byte_fallback=True,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      split_digits=True,
      allow_whitespace_only_pieces=True,
      user_defined_symbols=["\n"],
      max_sentence_length=1 << 16,
      input_sentence_size=max_sentences,
      shuffle_input_sentence=True,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      num_threads=num_threads or os.cpu_count() or 1,
      minloglevel=2,
  )
  return SentencePieceTokenizer(output_path)
