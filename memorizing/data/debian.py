"""Long-document corpora built offline from files that ship in Debian packages.

Stand-ins for the paper's data sets (Wu et al. 2022, section 4.1):

- `linux_c`:    C source of the Linux kernel (Debian's `linux-source`), for
                the paper's GitHub corpus;
- `coq_stdlib`: the Coq standard library's `.v` sources (`libcoq-stdlib`),
                formal mathematics for the paper's Isabelle corpus;
- `perl_doc`:   Perl's manual in POD (`perl-doc`), English technical prose
                for the paper's arXiv / PG-19.

A document is a directory's (or a topic's) files concatenated in sorted order,
each after a one-line header that names the file, cut at file boundaries into
parts of at most `max_document_bytes` (1 MiB), so that the median document is
longer than 64 KiB; the corpus keeps its first documents in generation order
whose total is at most `max_total_bytes` (30 MB). train/validation by a hash
of the document's name (all parts of a directory in one split), 5%, and at
least 6 validation documents.

The package comes from `source` (a directory it was extracted into, its
`.deb`, or for `linux_c` also the kernel tarball or an unpacked tree), else
from `apt-get download PKG` into `download_dir` and `dpkg -x`. When that cannot
be done (no apt-get, no network) `SourceUnavailableError` says, in one line,
which package could not be fetched and how to provide it by hand.
"""
from __future__ import annotations

import glob
import gzip
import os
import re
import subprocess
import tarfile
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

from memorizing.data.corpora import Document, _LocalCorpus
from memorizing.errors import DatasetError, SourceUnavailableError

MAX_DOCUMENT_BYTES = 1 << 20
MAX_TOTAL_BYTES = 30_000_000
MIN_DOCUMENT_BYTES = 1024
File = Tuple[str, bytes]  # (path relative to the corpus root, text)


# --- getting a package ----------------------------------------------------------------
def _by_hand(package: str, name: str) -> str:
  return (f"download it where the network allows (apt-get download {package}) and pass "
          f"--source PATH (the .deb, or a directory it was extracted into with dpkg -x): "
          f"memorizing-prepare {name} --data_dir DIR --source PATH")


def _run(args: Sequence[str], package: str, name: str, cwd: Optional[str] = None) -> str:
  """Run a package tool; any failure becomes one line of SourceUnavailableError."""
  try:
    done = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True)
  except OSError as e:  # tool not installed
    raise SourceUnavailableError(
        f"{name}: cannot fetch the Debian package {package!r}: {args[0]} is not available "
        f"({e.strerror}); {_by_hand(package, name)}") from None
  if done.returncode != 0:
    lines = [l.strip() for l in (done.stderr or done.stdout or "").splitlines() if l.strip()]
    reason = next((l for l in lines if l.startswith("E:")), lines[-1] if lines else "")
    raise SourceUnavailableError(
        f"{name}: cannot fetch the Debian package {package!r}: `{' '.join(args)}` failed "
        f"(exit {done.returncode}{': ' + reason if reason else ''}); {_by_hand(package, name)}")
  return done.stdout


def extract_deb(deb: str, download_dir: str, package: str, name: str) -> str:
  """`dpkg -x deb` into download_dir/extracted/<deb name> (once); returns that directory."""
  target = os.path.join(download_dir, "extracted", os.path.basename(deb)[:-len(".deb")])
  if os.path.exists(os.path.join(target, ".complete")):
    return target
  os.makedirs(target, exist_ok=True)
  _run(["dpkg", "-x", deb, target], package, name)
  open(os.path.join(target, ".complete"), "w").close()
  return target


def debian_package(package: str, name: str, *, source: Optional[str] = None,
                   download_dir: str) -> str:
  """A path holding the files of Debian package `package`.

  `source`: a directory (returned as is), a `.deb` (extracted with dpkg -x) or
  another file (returned as is, e.g. a tarball). Without one: the newest
  `package_*.deb` in `download_dir`, else `apt-get download package` there,
  then `dpkg -x`. Failures raise SourceUnavailableError in one line.
  """
  if source:
    source = os.path.abspath(os.path.expanduser(source))
    if os.path.isdir(source):
      return source
    if not os.path.isfile(source):
      raise SourceUnavailableError(f"{name}: --source {source} does not exist; pass the "
                                   f"{package} .deb or a directory it was extracted into")
    if source.endswith(".deb"):
      return extract_deb(source, os.path.abspath(os.path.expanduser(download_dir)), package, name)
    return source
  download_dir = os.path.abspath(os.path.expanduser(download_dir))
  os.makedirs(download_dir, exist_ok=True)
  pattern = os.path.join(download_dir, f"{package}_*.deb")
  if not glob.glob(pattern):
    _run(["apt-get", "download", package], package, name, cwd=download_dir)
  debs = sorted(glob.glob(pattern))
  if not debs:
    raise SourceUnavailableError(f"{name}: apt-get download {package} left no {package}_*.deb "
                                 f"in {download_dir}; {_by_hand(package, name)}")
  return extract_deb(debs[-1], download_dir, package, name)


def resolve_metapackage(package: str, prefix: str, name: str) -> str:
  """The first dependency of `package` whose name starts with `prefix`, by apt-cache
  (e.g. linux-source -> linux-source-6.1); `package` itself when it has none."""
  out = _run(["apt-cache", "depends", package], package, name)
  deps = re.findall(r"Depends:\s*(\S+)", out)
  return next((d for d in deps if d.startswith(prefix)), package)


# --- documents from files --------------------------------------------------------------
def files_under(root: str, suffixes: Tuple[str, ...]) -> List[File]:
  """(path, text) of the files under `root` whose names end in `suffixes`, in sorted
  path order, paths relative to the deepest directory holding all of them; `.gz`
  files (e.g. `x.pod.gz`) are read decompressed and named without `.gz`."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    for f in filenames:
      if f.endswith(suffixes) or (f.endswith(".gz") and f[:-3].endswith(suffixes)):
        found.append(os.path.join(dirpath, f))
  if not found:
    return []
  base = os.path.commonpath([os.path.dirname(f) for f in found])
  out = []
  for f in found:
    opener = gzip.open if f.endswith(".gz") else open
    with opener(f, "rb") as fh:
      text = fh.read()
    rel = os.path.relpath(f, base).replace(os.sep, "/")
    out.append((rel[:-3] if f.endswith(".gz") else rel, text))
  return sorted(out)


def concatenate(groups: Iterable[Tuple[str, Sequence[File]]], header: Callable[[str], bytes], *,
                max_document_bytes: int = MAX_DOCUMENT_BYTES,
                min_document_bytes: int = MIN_DOCUMENT_BYTES) -> List[Document]:
  """One document per (name, files) group, in the given order: its files in sorted
  order, each after `header(path)` and ending in a newline, cut at file boundaries
  into parts "name (part k)" of at most `max_document_bytes` (a single longer file
  is a part of its own); documents under `min_document_bytes` are dropped."""
  docs: List[Document] = []
  for name, files in groups:
    parts: List[List[bytes]] = [[]]
    size = 0
    for path, text in sorted(files):
      if text and not text.endswith(b"\n"):
        text += b"\n"
      piece = header(path) + text
      if size and size + len(piece) > max_document_bytes:
        parts.append([])
        size = 0
      parts[-1].append(piece)
      size += len(piece)
    for k, pieces in enumerate(parts):
      docs.append((name if len(parts) == 1 else f"{name} (part {k + 1})", b"".join(pieces)))
  return [(n, t) for n, t in docs if len(t) >= min_document_bytes]


def by_directory(files: Sequence[File]) -> List[Tuple[str, List[File]]]:
  """Files grouped by their directory ("dir/"), groups in order of first appearance."""
  groups: dict = {}
  for path, text in files:
    d = path.rsplit("/", 1)[0] + "/" if "/" in path else "./"
    groups.setdefault(d, []).append((path, text))
  return list(groups.items())


def cap_total(docs: Sequence[Document], max_total_bytes: Optional[int]) -> List[Document]:
  """The first documents whose total length is at most `max_total_bytes` (None: all)."""
  if max_total_bytes is None:
    return list(docs)
  out, total = [], 0
  for name, text in docs:
    if total + len(text) > max_total_bytes:
      break
    out.append((name, text))
    total += len(text)
  return out


def part_key(name: str) -> str:
  """A document's split key: its name without " (part k)"."""
  return name.split(" (part ")[0]


# --- the builders ------------------------------------------------------------------------
class _DebianCorpus(_LocalCorpus):
  """Shared plumbing: the package, the caps and the split rule."""
  package = ""
  validation_fraction = 0.05
  min_validation = 6

  def __init__(self, *, source: Optional[str] = None, download_dir: Optional[str] = None,
               max_document_bytes: int = MAX_DOCUMENT_BYTES,
               max_total_bytes: Optional[int] = MAX_TOTAL_BYTES, **kwargs):
    self.source = source
    data_dir = kwargs.get("data_dir") or "."
    self.download_dir = download_dir or os.path.join(data_dir, "downloads", "debian")
    self.max_document_bytes = int(max_document_bytes)
    self.max_total_bytes = None if max_total_bytes is None else int(max_total_bytes)
    self._root: Optional[str] = None
    super().__init__(**kwargs)

  def _metadata(self):
    return {"package": self.package, "source": self.source or "apt-get download",
            "max_document_bytes": self.max_document_bytes,
            "max_total_bytes": self.max_total_bytes,
            "validation_fraction": self.validation_fraction,
            "min_validation": self.min_validation}

  def check_source(self) -> None:
    """Fetch (or find) the package now, before building; one-line error if it cannot."""
    self.root()

  def root(self) -> str:
    if self._root is None:
      self._root = debian_package(self.package, self.name, source=self.source,
                                  download_dir=self.download_dir)
      self.info.metadata["package"] = self.package
      self.info.metadata["package_path"] = self._root
    return self._root

  def split_key(self, path: str) -> str:
    return part_key(path)

  def files(self) -> List[File]:
    raise NotImplementedError

  def groups(self, files: List[File]) -> List[Tuple[str, List[File]]]:
    return by_directory(files)

  def header(self, path: str) -> bytes:
    raise NotImplementedError

  def documents(self) -> List[Document]:
    files = self.files()
    if not files:
      raise SourceUnavailableError(f"{self.name}: no source files found in {self.root()}; "
                                   f"{_by_hand(self.package, self.name)}")
    docs = concatenate(self.groups(files), self.header,
                       max_document_bytes=self.max_document_bytes)
    docs = cap_total(docs, self.max_total_bytes)
    if len({part_key(n) for n, _ in docs}) < 2:
      raise DatasetError(f"{self.name}: {self.root()} gives {len(docs)} documents; need at least "
                       "2 (of 2 directories) for train and validation")
    return docs


class CoqStdlib(_DebianCorpus):
  """Formal mathematics: the Coq standard library's .v sources (Debian package
  libcoq-stdlib: theories/ and user-contrib/), one document per directory, its
  .v files concatenated in sorted order, each after a `(* ===== path ===== *)`
  line, directories over 1 MiB cut at file boundaries."""
  package = "libcoq-stdlib"

  def header(self, path):
    return f"(* ===== {path} ===== *)\n".encode("utf-8")

  def files(self):
    return files_under(self.root(), (".v",))


class PerlDoc(_DebianCorpus):
  """English technical prose: Perl's manual in POD (Debian package perl-doc:
  perl*.pod, and pumpkin.pod.gz decompressed). Every file of at least 64 KiB
  (perlfunc, perlop, perlre, ...) is a document of its own; the others are
  concatenated in sorted name order (perlfaq1..9, perlre*, perluni*, ... stay
  together) into documents of at least 128 KiB; each file after a
  `=for comment ===== path =====` line (a POD comment)."""
  package = "perl-doc"
  large_file_bytes = 64 << 10
  pack_bytes = 128 << 10

  def header(self, path):
    return f"=for comment ===== {path} =====\n\n".encode("utf-8")

  def files(self):
    return files_under(self.root(), (".pod",))

  def groups(self, files):
    out: List[Tuple[str, List[File]]] = []
    pack: List[File] = []

    def close():
      if pack:
        first, last = pack[0][0], pack[-1][0].rsplit("/", 1)[-1]
        out.append((first if len(pack) == 1 else f"{first}..{last}", list(pack)))
        pack.clear()

    for path, text in files:
      if len(text) >= self.large_file_bytes:
        out.append((path, [(path, text)]))
        continue
      pack.append((path, text))
      if sum(len(t) for _, t in pack) >= self.pack_bytes:
        close()
    close()
    return out


LINUX_ROOTS = ("init", "kernel", "mm", "ipc", "block", "io_uring", "lib", "fs", "net")


class LinuxC(_DebianCorpus):
  """C source: the Linux kernel's .c and .h files (Debian package
  linux-source-X, through the linux-source metapackage) under init, kernel,
  mm, ipc, block, io_uring, lib, fs, net, in that order, one document per
  directory (its files directly in it concatenated in sorted order, each after
  a `/* ===== path ===== */` line, cut at 1 MiB), until 30 MB: the core
  subsystems whole, then fs/ in sorted directory order. Read from the tarball
  as a stream (no extraction)."""
  package = "linux-source"
  roots = LINUX_ROOTS

  def header(self, path):
    return f"/* ===== {path} ===== */\n".encode("utf-8")

  def root(self) -> str:
    if self._root is None and not self.source:
      # linux-source is a metapackage; the tarball is in linux-source-X.Y.
      self.package = resolve_metapackage("linux-source", "linux-source-", self.name)
    return super().root()

  def _metadata(self):
    return {**super()._metadata(), "roots": list(self.roots)}

  def _wanted(self, rel: str) -> bool:
    return rel.endswith((".c", ".h")) and rel.split("/", 1)[0] in self.roots

  def _tree_files(self, root: str) -> Iterator[File]:
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
      for f in filenames:
        rel = os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/")
        if self._wanted(rel):
          with open(os.path.join(dirpath, f), "rb") as fh:
            yield rel, fh.read()

  def _tar_files(self, tarball: str) -> Iterator[File]:
    with tarfile.open(tarball, mode="r|*") as tar:  # a stream: members in archive order
      for m in tar:
        name = m.name[2:] if m.name.startswith("./") else m.name
        rel = name.split("/", 1)[1] if "/" in name else ""  # without linux-source-X.Y/
        if m.isfile() and self._wanted(rel):
          yield rel, tar.extractfile(m).read()

  def kernel_source(self) -> str:
    """The kernel tarball or unpacked tree inside the package path."""
    root = self.root()
    if os.path.isfile(root):
      return root
    if os.path.isdir(os.path.join(root, "kernel")) and os.path.isdir(os.path.join(root, "mm")):
      return root  # an unpacked kernel tree
    tarballs = sorted(glob.glob(os.path.join(root, "**", "linux-source-*.tar.*"), recursive=True))
    if not tarballs:
      raise SourceUnavailableError(
          f"{self.name}: no linux-source-*.tar.* (nor a kernel tree) in {root}; pass --source "
          f"PATH to the linux-source-X .deb, the directory it was extracted into, its "
          f"tarball or an unpacked kernel tree")
    return tarballs[-1]

  def files(self):
    src = self.kernel_source()
    self.info.metadata["kernel_source"] = os.path.basename(src)
    found = self._tree_files(src) if os.path.isdir(src) else self._tar_files(src)
    order = {r: i for i, r in enumerate(self.roots)}
    # Roots in the listed order; in each, directories in sorted order, then files.
    return sorted(found, key=lambda f: (order[f[0].split("/", 1)[0]], f[0].rsplit("/", 1)[0],
                                        f[0]))
