"""Named datasets: where their documents live and how to read them.

`load_documents(name, split, data_dir)` returns a random-access sequence of
documents (bytes) read from ArrayRecord through TFDS's data source API, which
needs no TensorFlow and never downloads. A data set that is not prepared
raises `DatasetError` with the command that prepares it, except the embedded
corpora (`python_stdlib`, `synthetic`, `synthetic_recall`), which are built on first
use, offline.
"""
from __future__ import annotations

import dataclasses
import fcntl
import os
import shutil
from typing import Dict, Optional, Sequence, Tuple

import tensorflow_datasets as tfds

from memorizing.data import corpora, debian, official
from memorizing.data.prepared import default_data_dir, file_format, find_prepared
from memorizing.errors import DatasetError

__all__ = ["DATASETS", "DatasetError", "DatasetSpec", "Documents", "default_data_dir",
           "describe_prepared", "find_prepared", "get_spec", "load_documents", "prepare",
           "prepare_command"]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """A named data set.

  tfds_name:    TFDS name (with config), also its directory under data_dir
  text_feature: the feature holding a document's text
  splits:       split names
  builder:      local builder class (None for TFDS catalogue data sets)
  embedded:     built automatically, offline, on first use
  prepare_args: extra arguments memorizing-prepare needs (shown in messages)
  """
  name: str
  tfds_name: str
  text_feature: str
  splits: Tuple[str, ...]
  description: str
  builder: Optional[type] = None
  embedded: bool = False
  prepare_args: str = ""


DATASETS: Dict[str, DatasetSpec] = {s.name: s for s in [
    DatasetSpec("pg19", "pg19", "book_text", ("train", "validation", "test"),
                "PG-19 books (TFDS pg19; preparing reads GCS and needs TensorFlow)"),
    DatasetSpec("arxiv", "scientific_papers/arxiv", "article", ("train", "validation", "test"),
                "arXiv article text (TFDS scientific_papers/arxiv)"),
    DatasetSpec("c4_4k", "c4_4k", "text", ("train", "validation"),
                "C4 en documents of >= 4096 tokens, filtered at preparation time",
                builder=official.C44k, prepare_args=" --c4_json 'PATH/c4-{split}.*.json.gz'"),
    DatasetSpec("text_files", "text_files", "text", ("train", "validation"),
                "local text files, one document per file",
                builder=corpora.TextFiles, prepare_args=" --source PATH_OR_GLOB"),
    DatasetSpec("linux_c", "linux_c", "text", ("train", "validation"),
                "C source of the Linux kernel (Debian linux-source): a directory's .c/.h "
                "files a document, 30 MB (stands in for the paper's GitHub)",
                builder=debian.LinuxC),
    DatasetSpec("coq_stdlib", "coq_stdlib", "text", ("train", "validation"),
                "formal mathematics: the Coq standard library (Debian libcoq-stdlib), a "
                "directory's .v files a document (stands in for the paper's Isabelle)",
                builder=debian.CoqStdlib),
    DatasetSpec("perl_doc", "perl_doc", "text", ("train", "validation"),
                "English technical prose: Perl's manual in POD (Debian perl-doc), a long "
                "page or a run of short ones a document (stands in for arXiv / PG-19)",
                builder=debian.PerlDoc),
    DatasetSpec("python_stdlib", "python_stdlib", "text", ("train", "validation"),
                "embedded default: long code documents from the Python standard library",
                builder=corpora.PythonStdlib, embedded=True),
    DatasetSpec("synthetic", "synthetic", "text", ("train", "validation"),
                "tiny generated documents that quote their own far past",
                builder=corpora.Synthetic, embedded=True),
    DatasetSpec("synthetic_recall", "synthetic_recall", "text", ("train", "validation"),
                "generated documents whose values must be recalled 165-355 tokens later",
                builder=corpora.SyntheticRecall, embedded=True),
]}


def get_spec(name: str) -> DatasetSpec:
  if name not in DATASETS:
    raise DatasetError(f"Unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
  return DATASETS[name]


def prepare_command(name: str, data_dir: str) -> str:
  """The shell command that prepares `name` into `data_dir`."""
  return f"memorizing-prepare {name} --data_dir {data_dir}{get_spec(name).prepare_args}"


def prepare(name: str, data_dir: Optional[str] = None, **options) -> str:
  """Prepare `name` into `data_dir` as ArrayRecord; returns a size summary.

  options go to the local builder (e.g. source=, min_bytes= for text_files;
  tokenizer=, min_tokens=, json_files=, source_data_dir= for c4_4k; source=,
  download_dir= for the Debian corpora linux_c, coq_stdlib, perl_doc).
  Raises official.SourceUnavailableError when the source cannot be reached.
  """
  spec = get_spec(name)
  data_dir = os.path.expanduser(data_dir or default_data_dir())
  if spec.builder is None:
    official.prepare_tfds(spec.tfds_name, data_dir)
    return f"{name}: prepared {spec.tfds_name} in {data_dir}"
  overwrite = bool(options.pop("overwrite", False))
  builder = spec.builder(data_dir=data_dir, file_format="array_record", **options)
  prepared = find_prepared(data_dir, spec.tfds_name)
  if prepared is not None and getattr(builder, "source", None) is not None:
    changed = _changed_options(builder._metadata(), prepared)
    if changed and not overwrite:
      raise DatasetError(
          f"{data_dir} already holds {name} prepared with {changed}; prepare it with "
          f"--overwrite to replace it, or choose another --data_dir")
    if changed:
      shutil.rmtree(prepared)
      builder = spec.builder(data_dir=data_dir, file_format="array_record", **options)
      prepared = None
  if hasattr(builder, "check_source") and prepared is None:
    builder.check_source()
  builder.download_and_prepare()
  if hasattr(builder, "summary"):  # local corpora built just now
    return builder.summary
  if hasattr(builder, "kept"):  # c4_4k built just now
    return "\n".join(f"{name}/{s}: kept {k:,} of {n:,} source documents"
                     f" (>= {builder.min_tokens} tokens, {builder.tokenizer_name})"
                     for s, (k, n) in builder.kept.items())
  return describe_prepared(name, data_dir)


def _changed_options(wanted: dict, builder_dir: str) -> str:
  """The build options (source, sizes) given now that differ from those the
  prepared copy in `builder_dir` was built with, as "key=OLD (now NEW)". Only
  checked when a source is given: without one the prepared copy is used."""
  saved = dict(tfds.builder_from_directory(builder_dir).info.metadata or {})
  diffs = [f"{k}={saved.get(k)!r} (now {v!r})" for k, v in wanted.items()
           if v is not None and k in saved and saved[k] != v]
  return ", ".join(diffs)


def describe_prepared(name: str, data_dir: str) -> str:
  """Documents per split (and bytes, where recorded) of a prepared data set."""
  spec = get_spec(name)
  builder_dir = find_prepared(data_dir, spec.tfds_name)
  if builder_dir is None:
    return f"{name}: not prepared in {data_dir}"
  info = tfds.builder_from_directory(builder_dir).info
  num_bytes = (info.metadata or {}).get("num_bytes", {})
  lines = []
  for s, split_info in info.splits.items():
    extra = f", {num_bytes[s]:,} tokens (bytes)" if s in num_bytes else ""
    lines.append(f"{name}/{s}: {split_info.num_examples:,} documents{extra} in {builder_dir}")
  return "\n".join(lines)


class Documents(Sequence):
  """Random-access documents of one split: `docs[i]` is the text as bytes."""

  def __init__(self, source, text_feature: str, name: str, split: str, metadata: dict,
               max_documents: Optional[int] = None):
    self._source = source
    self._feature = text_feature
    self.name, self.split, self.metadata = name, split, metadata
    self._len = len(source) if max_documents is None else min(len(source), max_documents)

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i: int) -> bytes:
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(self._len))]
    if not -self._len <= i < self._len:
      raise IndexError(f"document {i} out of range [0, {self._len})")
    text = self._source[i % self._len][self._feature]
    return text if isinstance(text, bytes) else str(text).encode("utf-8")

  def __repr__(self):
    return f"Documents({self.name}/{self.split}, {self._len} documents)"


def load_documents(name: str, split: str = "train", data_dir: Optional[str] = None, *,
                   max_documents: Optional[int] = None, auto_prepare: bool = True) -> Documents:
  """Documents of `name`/`split` prepared under `data_dir`, as a sequence of bytes.

  Unknown `name` or `split`, or data not prepared: DatasetError with the fix.
  `python_stdlib` and `synthetic` are built on first use when `auto_prepare`
  (offline, seconds), printing their size. `max_documents` keeps the first ones.
  """
  spec = get_spec(name)
  data_dir = os.path.expanduser(data_dir or default_data_dir())
  base_split = split.split("[")[0]
  if base_split not in spec.splits:
    raise DatasetError(f"Dataset {name!r} has no split {split!r}; its splits: "
                       f"{', '.join(spec.splits)}")
  builder_dir = find_prepared(data_dir, spec.tfds_name)
  if builder_dir is None and spec.embedded and auto_prepare:
    # Several processes may start on a fresh data dir at once (parallel tests, the
    # jobs of a sweep): one builds, the others wait for it and read its result.
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, f".{spec.tfds_name}.prepare.lock"), "a") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      builder_dir = find_prepared(data_dir, spec.tfds_name)
      if builder_dir is None:
        print(f"Building the embedded corpus {name!r} into {data_dir} (offline, once)...",
              flush=True)
        print(prepare(name, data_dir), flush=True)
        builder_dir = find_prepared(data_dir, spec.tfds_name)
  if builder_dir is None:
    raise DatasetError(
        f"Dataset {name!r} is not prepared in {data_dir} (no {spec.tfds_name}/VERSION/"
        f"dataset_info.json there). Prepare it with:\n  {prepare_command(name, data_dir)}")
  if file_format(builder_dir) != "array_record":
    raise DatasetError(
        f"Dataset {name!r} in {builder_dir} is stored as {file_format(builder_dir)}, not "
        f"ArrayRecord, and cannot be read without TensorFlow. Prepare it again with:\n  "
        f"{prepare_command(name, data_dir)}")
  builder = tfds.builder_from_directory(builder_dir)
  if base_split not in builder.info.splits:
    raise DatasetError(f"Dataset {name!r} in {builder_dir} has no prepared split {split!r} "
                       f"(prepared: {', '.join(builder.info.splits)}). Prepare it with:\n  "
                       f"{prepare_command(name, data_dir)}")
  source = builder.as_data_source(split=split)
  return Documents(source, spec.text_feature, name, split, dict(builder.info.metadata or {}),
                   max_documents)
