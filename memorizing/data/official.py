"""The official corpora: PG-19, arXiv (scientific_papers/arxiv) and C4(4K+).

PG-19 and arXiv are TFDS's own builders, prepared as ArrayRecord; preparing
them needs the network and, for PG-19 (read from GCS), TensorFlow: install the
optional extra `pip install -e '.[prepare]'` in a preparation environment.
Training and evaluation read the prepared files without TensorFlow.

C4(4K+) is derived at preparation time: the documents of `c4/en` with at
least `min_tokens` (4096) tokens of the configured tokenizer, written by the
`C44k` builder below as dataset `c4_4k`. Its source is either `c4/en` already
prepared as ArrayRecord in a data_dir (TFDS's c4 builder needs Apache Beam), or
the C4 JSON-lines files (`allenai/c4`, `en/c4-{train,validation}.*.json.gz`).
"""
from __future__ import annotations

import glob
import gzip
import json
import os
import socket
from typing import Dict, Iterable, Iterator, Optional

import tensorflow_datasets as tfds

from memorizing.data.prepared import find_prepared
from memorizing.data.tokenizers import Tokenizer, as_bytes, get_tokenizer
from memorizing.errors import SourceUnavailableError


# --- the C4 length filter ----------------------------------------------------------
def has_min_tokens(text, tokenizer: Tokenizer, min_tokens: int) -> bool:
  """True when `text` has at least `min_tokens` tokens.

  Every token covers at least one byte (bytes, and SentencePiece with byte
  fallback), so a text of fewer than `min_tokens` bytes is rejected without
  tokenising it; that is what makes filtering C4 affordable.
  """
  if len(as_bytes(text)) < min_tokens:
    return False
  return len(tokenizer.encode(text)) >= min_tokens


def filter_by_length(examples: Iterable[dict], tokenizer: Tokenizer, min_tokens: int,
                     text_feature: str = "text") -> Iterator[dict]:
  """The examples whose `text_feature` has at least `min_tokens` tokens, in order."""
  for ex in examples:
    if has_min_tokens(ex[text_feature], tokenizer, min_tokens):
      yield ex


# --- C4 sources -----------------------------------------------------------------------
C4_FEATURES = ("text", "url", "timestamp")


def c4_json_examples(pattern: str) -> Iterator[dict]:
  """Examples {"text","url","timestamp"} of C4 JSON-lines files (.json or .json.gz)."""
  files = sorted(glob.glob(os.path.expanduser(pattern)))
  if not files:
    raise SourceUnavailableError(f"no C4 JSON files match {pattern!r}")
  for f in files:
    opener = gzip.open if f.endswith(".gz") else open
    with opener(f, "rt", encoding="utf-8") as fh:
      for line in fh:
        ex = json.loads(line)
        yield {k: ex.get(k, "") for k in C4_FEATURES}


def c4_tfds_source(source_data_dir: str, split: str):
  """Random-access examples of `c4/en` prepared as ArrayRecord under `source_data_dir`."""
  builder_dir = find_prepared(source_data_dir, "c4/en")
  if builder_dir is None:
    raise SourceUnavailableError(
        f"c4/en is not prepared in {source_data_dir}. Prepare it with TFDS (needs Apache "
        "Beam and the network: pip install -e '.[prepare]'), e.g.\n  "
        f"tfds build c4/en --data_dir {source_data_dir} --file_format array_record "
        "--beam_pipeline_options=...\nor point --c4_json at the C4 JSON-lines files "
        "(huggingface.co/datasets/allenai/c4, en/c4-validation.*.json.gz).")
  builder = tfds.builder_from_directory(builder_dir)
  if split not in builder.info.splits:
    raise SourceUnavailableError(f"c4/en in {builder_dir} has no split {split!r} "
                                 f"(it has: {', '.join(builder.info.splits)})")
  return builder.as_data_source(split=split)


class C44k(tfds.core.GeneratorBasedBuilder):
  """C4(4K+): the c4/en documents with at least `min_tokens` tokens of the
  configured tokenizer (the paper's long-document C4 subset), in source order."""
  name = "c4_4k"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}

  def __init__(self, *, tokenizer: str = "bytes", min_tokens: int = 4096,
               source_data_dir: Optional[str] = None,
               json_files: Optional[Dict[str, str]] = None,
               splits: Iterable[str] = ("train", "validation"), **kwargs):
    """`json_files`: split -> glob of C4 JSON-lines files; else c4/en prepared in
    `source_data_dir` (default: this builder's data_dir)."""
    self.tokenizer_name = tokenizer
    self.min_tokens = int(min_tokens)
    self.source_data_dir = source_data_dir
    self.json_files = dict(json_files or {})
    self.split_names = tuple(self.json_files) if self.json_files else tuple(splits)
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"{self.__doc__}\nmin_tokens={self.min_tokens}, tokenizer={self.tokenizer_name}.",
        features=tfds.features.FeaturesDict({k: tfds.features.Text() for k in C4_FEATURES}),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(tokenizer=self.tokenizer_name,
                                        min_tokens=self.min_tokens),
    )

  def check_source(self) -> None:
    """Raise SourceUnavailableError now, before building, when a source is missing."""
    for split in self.split_names:
      if self.json_files:
        if not glob.glob(os.path.expanduser(self.json_files[split])):
          raise SourceUnavailableError(f"no C4 JSON files match {self.json_files[split]!r}")
      else:
        c4_tfds_source(self._source_data_dir(), split)

  def _source_data_dir(self) -> str:
    return self.source_data_dir or os.fspath(self.data_dir_root)

  def source_examples(self, split: str) -> Iterator[dict]:
    if self.json_files:
      return c4_json_examples(self.json_files[split])
    source = c4_tfds_source(self._source_data_dir(), split)
    return (source[i] for i in range(len(source)))

  def _split_generators(self, dl_manager):
    del dl_manager
    tokenizer = get_tokenizer(self.tokenizer_name)
    self.kept = {}
    return {s: self._generate_examples(s, tokenizer) for s in self.split_names}

  def _generate_examples(self, split, tokenizer):
    seen = kept = 0
    for ex in self.source_examples(split):
      seen += 1
      if has_min_tokens(ex["text"], tokenizer, self.min_tokens):
        yield kept, {k: ex[k] for k in C4_FEATURES}
        kept += 1
    self.info.metadata[f"{split}_source_documents"] = seen
    self.info.metadata[f"{split}_kept_documents"] = kept
    self.kept[split] = (kept, seen)


# --- TFDS's own builders ----------------------------------------------------------------
# Where TFDS 4.9 downloads them from: checked first, so that an offline machine
# gets one clear message instead of minutes of retries.
SOURCE_HOSTS = {"pg19": "storage.googleapis.com",
                "scientific_papers/arxiv": "drive.google.com"}


def check_reachable(host: str, what: str, port: int = 443, timeout: float = 5.0) -> None:
  """Raise SourceUnavailableError when `host:port`, the source of `what`, cannot
  be connected to."""
  try:
    socket.create_connection((host, port), timeout=timeout).close()
  except OSError as e:
    raise SourceUnavailableError(
        f"cannot prepare {what}: its source {host}:{port} cannot be reached ({e}); it cannot be downloaded from this "
        "machine. Prepare the data where the network allows and copy the data_dir here.") from e


def prepare_tfds(tfds_name: str, data_dir: str) -> None:
  """download_and_prepare a TFDS catalogue dataset as ArrayRecord; raises
  SourceUnavailableError with what to do when it cannot."""
  if tfds_name in SOURCE_HOSTS:
    check_reachable(SOURCE_HOSTS[tfds_name], tfds_name)
  try:
    builder = tfds.builder(tfds_name, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
  except ModuleNotFoundError as e:
    raise SourceUnavailableError(
        f"preparing {tfds_name} needs {e.name!r}, which is not installed. Install the "
        "preparation extra in a preparation environment: pip install -e '.[prepare]' "
        "(TensorFlow 2.20, Apache Beam); training and evaluation do not need it.") from e
  except Exception as e:  # network, GCS, permissions: say what failed and why
    raise SourceUnavailableError(
        f"could not prepare {tfds_name} into {data_dir}: {type(e).__name__}: {e}\n"
        "The source could not be reached from this machine (it needs the network; "
        "PG-19 is read from GCS with TensorFlow). Prepare it where the network allows "
        "and copy the data_dir here.") from e
