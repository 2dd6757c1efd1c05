"""TFDS builders of the local corpora, written as ArrayRecord, in a fixed order.

- `text_files`:    any directory or glob of text files, one document per file.
- `python_stdlib`: the embedded default: a long-document code corpus made
                   from the running interpreter's standard library sources.
- `synthetic`:     a tiny corpus of generated documents that quote their own
                   far past, for smoke tests of the memory.

Every builder writes features {"text": Text, "path": Text}, keeps generation
order (integer keys, `disable_shuffling=True`), and splits documents into
train/validation deterministically by a hash of their path; the validation
split is never empty (the document with the smallest hash goes there when the
fraction selects none). Text is stored as raw bytes, valid UTF-8 or not.

Build one with `builder = PythonStdlib(data_dir=...); builder.download_and_prepare()`
(see `memorizing.data.registry.prepare`); nothing here downloads anything.
"""
from __future__ import annotations

import glob
import hashlib
import os
import sys
import sysconfig
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow_datasets as tfds

from memorizing.data import stats
from memorizing.errors import DatasetError

Document = Tuple[str, bytes]  # (path or name, text bytes)

_FEATURES = lambda: tfds.features.FeaturesDict({
    "text": tfds.features.Text(),
    "path": tfds.features.Text(),
})


# --- deterministic split ------------------------------------------------------
def path_hash(path: str) -> float:
  """A stable number in [0, 1) from a path (sha1; independent of PYTHONHASHSEED)."""
  digest = hashlib.sha1(path.encode("utf-8", errors="surrogateescape")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def split_by_hash(paths: Sequence[str], validation_fraction: float,
                  min_validation: int = 1) -> Dict[str, List[int]]:
  """Indices of `paths` per split: {"train": [...], "validation": [...]}.

  A path goes to validation when path_hash(path) < validation_fraction. When
  that selects none (or all), the path with the smallest hash goes to
  validation, so both splits exist. When validation then holds fewer than
  `min_validation` entries, the paths of the next smallest hashes join it
  until it does (while train keeps at least one path). Equal paths share a
  split; needs at least 2 distinct paths. Indices keep the input order.
  """
  hashes = [path_hash(p) for p in paths]
  validation = {i for i, h in enumerate(hashes) if h < validation_fraction}
  if not validation or len(validation) == len(paths):
    # The fraction selects none (or all): the smallest hash goes to validation.
    validation = {i for i, h in enumerate(hashes) if h == min(hashes)}
  for h in sorted(set(hashes)):
    if len(validation) >= min_validation:
      break
    more = validation | {i for i, x in enumerate(hashes) if x == h}
    if len(more) == len(paths):
      break
    validation = more
  if len(validation) == len(paths):
    raise DatasetError(f"need at least 2 distinct documents to make train and validation "
                     f"splits, got {len(paths)}")
  return {"train": [i for i in range(len(paths)) if i not in validation],
          "validation": sorted(validation)}


class _LocalCorpus(tfds.core.GeneratorBasedBuilder):
  """Shared plumbing: subclasses implement `documents()` and `_describe()`."""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  validation_fraction = 0.05
  min_validation = 1  # documents; see split_by_hash

  def documents(self) -> List[Document]:
    raise NotImplementedError

  def _metadata(self) -> dict:
    return {}

  def split_key(self, path: str) -> str:
    """What the train/validation hash is taken of (default: the path)."""
    return path

  def _description(self) -> str:
    return self.__doc__ or ""

  def _info(self) -> tfds.core.DatasetInfo:
    # disable_shuffling must go through DatasetInfo: the class attribute alone is ignored.
    return tfds.core.DatasetInfo(
        builder=self,
        description=self._description(),
        features=_FEATURES(),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(self._metadata()),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # local data only
    docs = self.documents()
    splits = split_by_hash([self.split_key(p) for p, _ in docs], self.validation_fraction,
                           self.min_validation)
    lengths = {s: [len(docs[i][1]) for i in idx] for s, idx in splits.items()}
    # Recorded in metadata.json next to the data (lengths in bytes = byte tokens).
    self.info.metadata["num_documents"] = {s: len(v) for s, v in lengths.items()}
    self.info.metadata["num_bytes"] = {s: int(sum(v)) for s, v in lengths.items()}
    self.info.metadata["length_histogram_bytes"] = stats.length_histogram(
        [n for v in lengths.values() for n in v])
    self.summary = stats.corpus_summary(self.name, lengths, "bytes")
    return {s: self._generate_examples([docs[i] for i in idx]) for s, idx in splits.items()}

  def _generate_examples(self, docs: List[Document]):
    for key, (path, text) in enumerate(docs):
      yield key, {"text": text, "path": path}


# --- text_files -----------------------------------------------------------------
def _glob_root(pattern: str) -> str:
  """The leading directories of a glob pattern that hold no wildcard."""
  parts = pattern.split(os.sep)
  fixed = []
  for part in parts:
    if glob.has_magic(part):
      break
    fixed.append(part)
  root = os.sep.join(fixed)
  return root if os.path.isdir(root) else (os.path.dirname(root) or ".")


def list_text_files(source: str) -> Tuple[str, List[str]]:
  """(root, sorted file paths) of a directory (recursive, hidden files
  skipped) or a glob pattern (`**` allowed)."""
  source = os.path.expanduser(source)
  if os.path.isdir(source):
    root = source
    files = []
    for dirpath, dirnames, filenames in os.walk(source):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
      files.extend(os.path.join(dirpath, f) for f in filenames if not f.startswith("."))
  else:
    root = _glob_root(source)
    files = [f for f in glob.glob(source, recursive=True) if os.path.isfile(f)]
  return root, sorted(files)


class TextFiles(_LocalCorpus):
  """Local text files, one document per file, in sorted path order.

  train/validation by a hash of the path relative to the source root.
  Files shorter than `min_bytes` are dropped; bytes are stored unchanged.
  """

  def __init__(self, *, source: Optional[str] = None, min_bytes: int = 0,
               validation_fraction: float = 0.05, **kwargs):
    self.source = source
    self.min_bytes = int(min_bytes)
    self.validation_fraction = float(validation_fraction)
    super().__init__(**kwargs)

  def _metadata(self):
    return {"source": self.source, "min_bytes": self.min_bytes,
            "validation_fraction": self.validation_fraction}

  def check_source(self) -> None:
    """Raise ValueError now, before building, when the source holds no files."""
    if not self.source:
      raise DatasetError("text_files needs a source: a directory or a glob of text files "
                       "(memorizing-prepare text_files --source PATH_OR_GLOB)")
    if len(list_text_files(self.source)[1]) < 2:
      raise DatasetError(f"text_files: {self.source!r} matches fewer than 2 files")

  def documents(self) -> List[Document]:
    if not self.source:
      raise DatasetError("text_files needs a source: a directory or a glob of text files "
                       "(memorizing-prepare text_files --source PATH_OR_GLOB)")
    root, files = list_text_files(self.source)
    docs = []
    for f in files:
      with open(f, "rb") as fh:
        text = fh.read()
      if len(text) >= self.min_bytes:
        docs.append((os.path.relpath(f, root), text))
    if len(docs) < 2:
      raise DatasetError(f"text_files: {self.source!r} has {len(files)} files, {len(docs)} of at "
                       f"least {self.min_bytes} bytes; need at least 2")
    return docs


# --- python_stdlib ------------------------------------------------------------------
def stdlib_dir() -> str:
  """Directory of the running interpreter's pure-Python standard library."""
  return sysconfig.get_paths()["stdlib"]


def _header(path: str) -> bytes:
  return f"# ===== {path} =====\n".encode("utf-8")


def stdlib_documents(root: Optional[str] = None, *, max_document_bytes: int = 1 << 20,
                     large_module_bytes: int = 64 << 10, min_document_bytes: int = 1024,
                     ) -> List[Document]:
  """Long code documents from the .py files under `root` (default: the stdlib).

  The rule, in order (deterministic for a given set of files):
  - walk the directories in sorted order, skipping site-packages and __pycache__;
  - at the top level, every module of at least `large_module_bytes` is a
    document of its own (named by its file name);
  - in every directory, the remaining .py files directly in it are
    concatenated in sorted order, each after a `# ===== path =====` header
    line, into one document named "dir/"; a directory longer than
    `max_document_bytes` is cut at file boundaries into parts "dir/ (part k)";
  - documents shorter than `min_document_bytes` are dropped.
  Returns [(name, text bytes)].
  """
  root = root or stdlib_dir()
  docs: List[Document] = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__")
                         and not d.startswith("."))
    rel_dir = os.path.relpath(dirpath, root)
    parts: List[List[bytes]] = [[]]
    sizes = [0]
    for name in sorted(f for f in filenames if f.endswith(".py")):
      rel = name if rel_dir == "." else f"{rel_dir}/{name}"
      with open(os.path.join(dirpath, name), "rb") as fh:
        text = fh.read()
      if text and not text.endswith(b"\n"):
        text += b"\n"
      if rel_dir == "." and len(text) >= large_module_bytes:
        docs.append((rel, _header(rel) + text))
        continue
      piece = _header(rel) + text
      if sizes[-1] and sizes[-1] + len(piece) > max_document_bytes:
        parts.append([])
        sizes.append(0)
      parts[-1].append(piece)
      sizes[-1] += len(piece)
    dir_name = "./" if rel_dir == "." else rel_dir + "/"
    for k, pieces in enumerate(parts):
      name = dir_name if len(parts) == 1 else f"{dir_name} (part {k + 1})"
      docs.append((name, b"".join(pieces)))
  return [(n, t) for n, t in docs if len(t) >= min_document_bytes]


class PythonStdlib(_LocalCorpus):
  """Long-document code corpus from the Python standard library sources of the
  interpreter that built it: one document per package directory (its .py files
  concatenated in sorted order, each after a path header; directories over
  1 MiB cut at file boundaries) plus the large (>= 64 KiB) top-level modules.
  The contents depend on the Python version, recorded in the metadata."""
  validation_fraction = 0.1

  def __init__(self, *, stdlib_root: Optional[str] = None,
               max_documents: Optional[int] = None, **kwargs):
    self.stdlib_root = stdlib_root or stdlib_dir()
    self.max_documents = max_documents  # a size-limited variant for tests
    super().__init__(**kwargs)

  def _description(self):
    return (f"{self.__doc__}\nBuilt from {self.stdlib_root} with Python "
            f"{sys.version.split()[0]}.")

  def _metadata(self):
    return {"python_version": sys.version.split()[0], "stdlib_dir": self.stdlib_root,
            "max_documents": self.max_documents}

  def split_key(self, path: str) -> str:
    return path.split(" (part ")[0]  # all parts of a directory in one split

  def documents(self) -> List[Document]:
    docs = stdlib_documents(self.stdlib_root)
    if self.max_documents is not None:
      docs = docs[:self.max_documents]
    return docs


# --- synthetic ------------------------------------------------------------------
def synthetic_documents(num_documents: int = 48, seed: int = 0,
                        min_bytes: int = 2_000, max_bytes: int = 40_000) -> List[Document]:
  """Generated code-like documents whose later lines quote values defined far
  earlier in the same document (only a long memory predicts them)."""
  rng = np.random.default_rng(seed)
  docs = []
  for d in range(num_documents):
    target = int(rng.integers(min_bytes, max_bytes))
    names = [f"v{rng.integers(10**5):05d}" for _ in range(64)]
    values = {n: int(rng.integers(10**6)) for n in names}
    lines = [f"# synthetic document {d}"]
    lines += [f"{n} = {values[n]}" for n in names]
    size = sum(len(x) + 1 for x in lines)
    while size < target:
      n = names[int(rng.integers(len(names)))]
      line = f"assert {n} == {values[n]}"
      lines.append(line)
      size += len(line) + 1
    docs.append((f"synthetic/{d:04d}", ("\n".join(lines) + "\n").encode()))
  return docs


class Synthetic(_LocalCorpus):
  """Tiny generated corpus for smoke tests: 48 documents of 2-40 KB whose
  assertions quote values defined at the document's start."""
  validation_fraction = 0.15

  def documents(self) -> List[Document]:
    return synthetic_documents()


# --- synthetic_recall -------------------------------------------------------------
RECALL_LETTERS = b"abcdefghijklmnopqrstuvwxyz"
RECALL_FILLER_LINE = b"~" * 31 + b"\n"


def recall_document(rng: np.random.Generator, *, num_letters: int = 16,
                    filler_lines: int = 4) -> Tuple[bytes, np.ndarray]:
  """One long-range recall document and its recall mask.

  Lines (bytes = byte tokens):
    `=` passage   `num_letters` distinct random letters, each in a random case:
                  the token sequence to remember (one bit per letter: its case);
    `?` check     every passage letter once, in a random order, as a pair: the
                  letter in lowercase (the name), then as written in the passage
                  (the value), e.g. `dD` or `kk`; a short-range copy that teaches
                  the lookup (attend to the same letter in either case, copy it),
                  which the memory layer shares with its local attention;
    filler        `filler_lines` lines of `~` (nothing to recall);
    `?` recall    the pairs again, in another random order: the values are the
                  recalled tokens.
  A value's case is predictable only from the passage and the check line, at
  least `filler_lines` x 32 + 4 tokens back (see `recall_distances`): beyond a
  window of segment + XL cache when that is more than 2 x segment, within a
  memory that holds the whole document. Without them the letter is known (it is
  the name) and the case is a coin flip: chance is 1/2.

  Returns (text, mask): mask[i] is True where byte i is a recalled value.
  Target j of a segment predicts byte offset + j + 1.
  """
  if not 1 <= num_letters <= len(RECALL_LETTERS):
    raise ValueError(f"num_letters must be in [1, {len(RECALL_LETTERS)}], got {num_letters}")
  if filler_lines < 0:
    raise ValueError(f"filler_lines must be >= 0, got {filler_lines}")
  letters = rng.choice(len(RECALL_LETTERS), num_letters, replace=False)
  upper = rng.integers(2, size=num_letters).astype(bool)
  value = lambda i: bytes([RECALL_LETTERS[letters[i]] - 32 * int(upper[i])])
  pairs = lambda: b"".join(bytes([RECALL_LETTERS[letters[i]]]) + value(i)
                           for i in rng.permutation(num_letters))
  head = (b"=" + b"".join(value(i) for i in range(num_letters)) + b"\n"
          + b"?" + pairs() + b"\n" + RECALL_FILLER_LINE * filler_lines + b"?")
  text = head + pairs() + b"\n"
  mask = np.zeros(len(text), bool)
  mask[len(head) + 1:len(text) - 1:2] = True
  return text, mask


def recall_documents(num_documents: int = 1024, seed: int = 0, **kwargs) -> List[Document]:
  """`num_documents` recall documents (see `recall_document`), deterministic in `seed`."""
  rng = np.random.default_rng([seed, 7919])
  return [(f"synthetic_recall/{d:05d}", recall_document(rng, **kwargs)[0])
          for d in range(num_documents)]


def recall_mask(text: bytes) -> np.ndarray:
  """The recall mask of a document made by `recall_document` (read back from its
  text: every second byte of its last line, the values of the recall pairs)."""
  mask = np.zeros(len(text), bool)
  start = text.rfind(b"\n", 0, len(text) - 1) + 1
  if text[start:start + 1] == b"?" and text.endswith(b"\n"):
    mask[start + 2:len(text) - 1:2] = True
  return mask


def recall_distances(text: bytes) -> np.ndarray:
  """For each recalled byte (recall_mask order): how many tokens back the nearest
  earlier value of its letter is (in the passage or the check line; names, the
  lowercase first byte of each pair, show no case and do not count)."""
  is_value = np.zeros(len(text), bool)
  start = 0
  for line in text.split(b"\n")[:-1]:
    if line[:1] == b"=":
      is_value[start + 1:start + len(line)] = True
    elif line[:1] == b"?":
      is_value[start + 2:start + len(line):2] = True
    start += len(line) + 1
  out = []
  for pos in np.flatnonzero(recall_mask(text)):
    letter = text[pos:pos + 1].lower()
    source = max(q for q in range(pos) if is_value[q] and text[q:q + 1].lower() == letter)
    assert text[source] == text[pos]
    out.append(pos - source)
  return np.asarray(out)


class SyntheticRecall(_LocalCorpus):
  """Long-range recall: 1024 generated documents of 214 bytes. A passage of 16
  distinct letters in random cases (`=ehGaZoqujbydlrSN`), then each letter as a
  pair of its lowercase name and its value as written (`?sSgGll...`), then 4
  filler lines, then the pairs again in another order: each value's case must
  be recalled from 132-211 tokens back: more than a 64-token segment plus its
  64-token XL cache, less than a 512-slot memory. Chance is 1/2 per value.
  Deterministic (seed 0); train/validation by path hash. docs/synthetic_recall.md."""
  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {"1.0.0": "Names and two-letter values (not learnable by the tiny model).",
                   "2.0.0": "Case recall: a letter's case, 132-211 tokens back."}
  validation_fraction = 0.05

  def _metadata(self):
    return {"format": "case recall", "num_letters": 16, "filler_lines": 4, "seed": 0}

  def documents(self) -> List[Document]:
    return recall_documents()
