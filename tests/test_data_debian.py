"""The Debian corpora (linux_c, coq_stdlib, perl_doc) on small fixture packages.

The fixtures mimic each package's layout in tmp_path; apt-get and dpkg are
replaced by fakes (or removed from PATH): nothing here uses the network.
"""
import gzip
import io
import os
import shutil
import subprocess
import tarfile

import pytest

from memorizing.data import corpora, debian, registry
from memorizing.data.official import SourceUnavailableError
from memorizing.data.registry import load_documents

COQ_DIRS = ["theories/Init", "theories/Arith", "theories/Lists", "theories/Logic",
            "theories/Reals", "theories/Reals/Abstract", "theories/ZArith", "theories/Sets",
            "theories/Bool", "user-contrib/Ltac2"]


def write(path, data):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)


@pytest.fixture
def coq_pkg(tmp_path):
  """libcoq-stdlib as dpkg -x leaves it: .v sources next to .vo and html."""
  root = tmp_path / "coq"
  lib = root / "usr/lib/ocaml/coq"
  for d in COQ_DIRS:
    for name in ("B.v", "A.v"):
      write(lib / d / name, f"(* {d}/{name} *)\nLemma x : True.\nProof. exact I. Qed.\n".encode()
            * 40)
    write(lib / d / "A.vo", b"\x00binary")
  write(root / "usr/share/doc/libcoq-stdlib/html/Coq.Init.Logic.html", b"<html></html>")
  return root


def all_documents(name, data_dir):
  return {s: load_documents(name, s, data_dir)[:] for s in ("train", "validation")}


def test_coq_stdlib_round_trips_one_document_per_directory(tmp_path, coq_pkg):
  data_dir = str(tmp_path / "data")
  summary = registry.prepare("coq_stdlib", data_dir, source=str(coq_pkg))
  assert "coq_stdlib/validation: 6 documents" in summary and "quartiles" in summary
  docs = all_documents("coq_stdlib", data_dir)
  assert len(docs["train"]) + len(docs["validation"]) == len(COQ_DIRS)
  text = b"".join(docs["train"] + docs["validation"])
  lib = coq_pkg / "usr/lib/ocaml/coq"
  for d in COQ_DIRS:
    for name in ("A.v", "B.v"):
      header = f"(* ===== {d}/{name} ===== *)\n".encode()
      assert text.count(header + (lib / d / name).read_bytes()) == 1
  assert b"binary" not in text and b"<html>" not in text
  init = next(t for t in docs["train"] + docs["validation"]
              if t.startswith(b"(* ===== theories/Init/"))
  assert init.index(b"theories/Init/A.v") < init.index(b"theories/Init/B.v")  # sorted
  assert b"Reals/Abstract/" not in next(t for t in docs["train"] + docs["validation"]
                                         if t.startswith(b"(* ===== theories/Reals/A.v"))
  meta = load_documents("coq_stdlib", "train", data_dir).metadata
  assert meta["package"] == "libcoq-stdlib" and meta["num_documents"]["validation"] == 6


def test_documents_are_deterministic_and_parts_of_a_directory_share_a_split(tmp_path, coq_pkg):
  kwargs = dict(source=str(coq_pkg), max_document_bytes=3000)
  a = debian.CoqStdlib(data_dir=str(tmp_path / "a"), **kwargs).documents()
  b = debian.CoqStdlib(data_dir=str(tmp_path / "b"), **kwargs).documents()
  assert a == b
  names = [n for n, _ in a]
  assert "theories/Init/ (part 1)" in names and "theories/Init/ (part 2)" in names
  assert all(len(t) <= 3000 for _, t in a)  # each file alone fits: cut at file boundaries
  assert all(t.startswith(b"(* ===== ") for _, t in a)
  splits = corpora.split_by_hash([debian.part_key(n) for n in names], 0.05, 6)
  side = {names[i]: s for s, idx in splits.items() for i in idx}
  for d in COQ_DIRS:
    assert side[f"{d}/ (part 1)"] == side[f"{d}/ (part 2)"]


def test_concatenate_cuts_at_file_boundaries_and_drops_short_documents():
  header = lambda p: f"# {p}\n".encode()
  files = [("d/b", b"b" * 50), ("d/a", b"a" * 50), ("d/c", b"c" * 200)]
  docs = debian.concatenate([("d/", files), ("e/", [("e/x", b"x")])], header,
                            max_document_bytes=120, min_document_bytes=10)
  assert docs == [("d/ (part 1)", b"# d/a\n" + b"a" * 50 + b"\n# d/b\n" + b"b" * 50 + b"\n"),
                  ("d/ (part 2)", b"# d/c\n" + b"c" * 200 + b"\n")]


def test_cap_keeps_the_first_documents_that_fit():
  docs = [(str(i), b"x" * 10) for i in range(5)]
  assert [n for n, _ in debian.cap_total(docs, 35)] == ["0", "1", "2"]
  assert debian.cap_total(docs, None) == docs


def test_split_by_hash_min_validation_takes_the_smallest_hashes():
  paths = [f"dir{i}/" for i in range(20)]
  split = corpora.split_by_hash(paths, 0.05, min_validation=6)
  assert split == corpora.split_by_hash(paths, 0.05, min_validation=6)
  assert len(split["validation"]) == 6 and len(split["train"]) == 14
  by_hash = sorted(range(20), key=lambda i: corpora.path_hash(paths[i]))
  assert sorted(split["validation"]) == sorted(by_hash[:6])
  assert corpora.split_by_hash(paths, 0.05) == corpora.split_by_hash(paths, 0.05, 1)
  assert len(corpora.split_by_hash(paths[:4], 0.05, 6)["train"]) == 1  # train never empty


# --- perl_doc ------------------------------------------------------------------------------
@pytest.fixture
def perl_pkg(tmp_path):
  root = tmp_path / "perl"
  pod = root / "usr/share/perl/5.36.0/pod"
  for k in range(7):
    write(pod / f"perlbig{k}.pod", f"=head1 NAME\n\nperlbig{k}\n\n".encode() + b"word " * 14_000)
  for k in range(30):
    write(pod / f"perlfaq{k:02d}.pod", f"=head1 perlfaq{k:02d}\n\n".encode() + b"faq " * 2500)
  write(root / "usr/share/doc/perl/pumpkin.pod.gz",
        gzip.compress(b"=head1 NAME\n\npumpkin - notes\n"))
  write(root / "usr/share/man/man1/perlbig0.1.gz", b"not pod")
  return root


def test_perl_doc_long_pages_alone_short_ones_packed_in_name_order(tmp_path, perl_pkg):
  data_dir = str(tmp_path / "data")
  registry.prepare("perl_doc", data_dir, source=str(perl_pkg))
  docs = all_documents("perl_doc", data_dir)
  every = docs["train"] + docs["validation"]
  assert len(docs["validation"]) == 6
  big = [t for t in every if t.startswith(b"=for comment ===== perl/5.36.0/pod/perlbig")]
  assert len(big) == 7 and all(t.count(b"=for comment") == 1 for t in big)
  text = b"".join(every)
  assert b"=for comment ===== doc/perl/pumpkin.pod =====\n\n=head1 NAME\n\npumpkin" in text
  assert b"not pod" not in text
  ordered = debian.PerlDoc(data_dir=data_dir, source=str(perl_pkg)).documents()
  assert sorted(t for _, t in ordered) == sorted(every)
  packed = [(n, t) for n, t in ordered if t not in big]
  assert [n for n, _ in packed] == ["doc/perl/pumpkin.pod..perlfaq13.pod",
                                    "perl/5.36.0/pod/perlfaq14.pod..perlfaq27.pod",
                                    "perl/5.36.0/pod/perlfaq28.pod..perlfaq29.pod"]
  assert all(len(t) >= 128 << 10 for _, t in packed[:-1])


# --- linux_c -------------------------------------------------------------------------------
LINUX_FILES = {
    "Makefile": b"all:\n", "Documentation/x.txt": b"doc\n", "drivers/net/e1000.c": b"driver\n",
    "kernel/fork.c": b"int fork;\n" * 300, "kernel/exit.c": b"int exit;\n" * 300,
    "kernel/sched/core.c": b"int sched;\n" * 300, "kernel/sched/sched.h": b"#define S\n" * 300,
    "init/main.c": b"int main;\n" * 300, "mm/mmap.c": b"int mmap;\n" * 300,
    "mm/page_alloc.c": b"int page;\n" * 300, "lib/sort.c": b"int sort;\n" * 300,
    "lib/string.c": b"int str;\n" * 300, "ipc/msg.c": b"int msg;\n" * 300,
    "block/bio.c": b"int bio;\n" * 300, "fs/namei.c": b"int namei;\n" * 300,
    "fs/ext4/inode.c": b"int inode;\n" * 300, "fs/ext4/README": b"no\n",
    "net/ipv4/tcp.c": b"int tcp;\n" * 300,
}


@pytest.fixture
def linux_pkg(tmp_path):
  """linux-source-X as dpkg -x leaves it: usr/src/linux-source-6.1.tar.xz."""
  root = tmp_path / "linux"
  (root / "usr/src").mkdir(parents=True)
  with tarfile.open(root / "usr/src/linux-source-6.1.tar.xz", "w:xz") as tar:
    for name, data in sorted(LINUX_FILES.items(), reverse=True):  # archive order != sorted
      info = tarfile.TarInfo(f"linux-source-6.1/{name}")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return root


def test_linux_c_streams_the_tarball_in_root_order(tmp_path, linux_pkg):
  data_dir = str(tmp_path / "data")
  registry.prepare("linux_c", data_dir, source=str(linux_pkg))
  docs = all_documents("linux_c", data_dir)
  text = b"".join(docs["train"] + docs["validation"])
  for name, data in LINUX_FILES.items():
    wanted = name.endswith((".c", ".h")) and not name.startswith("drivers/")
    assert (f"/* ===== {name} ===== */\n".encode() + data in text) == wanted, name
  names = [n for n, _ in debian.LinuxC(data_dir=data_dir, source=str(linux_pkg)).documents()]
  assert names == ["init/", "kernel/", "kernel/sched/", "mm/", "ipc/", "block/", "lib/",
                   "fs/", "fs/ext4/", "net/ipv4/"]
  meta = load_documents("linux_c", "train", data_dir).metadata
  assert meta["kernel_source"] == "linux-source-6.1.tar.xz"


def test_linux_c_cap_and_tree_source(tmp_path, linux_pkg):
  tree = tmp_path / "tree"
  for name, data in LINUX_FILES.items():
    write(tree / name, data)
  kwargs = dict(data_dir=str(tmp_path / "d"), max_total_bytes=20_000)
  from_tar = debian.LinuxC(source=str(linux_pkg / "usr/src/linux-source-6.1.tar.xz"),
                           **kwargs).documents()
  from_tree = debian.LinuxC(source=str(tree), **kwargs).documents()
  assert from_tar == from_tree
  assert [n for n, _ in from_tar] == ["init/", "kernel/", "kernel/sched/"]  # 3 + 6 + 6 KB
  assert sum(len(t) for _, t in from_tar) <= 20_000


# --- getting the package -------------------------------------------------------------------
def fake_tools(monkeypatch, tmp_path, extracted_from, calls):
  """subprocess.run for apt-cache / apt-get download / dpkg -x without network or dpkg."""
  real_run = subprocess.run

  def run(args, cwd=None, **kwargs):
    calls.append(list(args))
    if args[:2] == ["apt-cache", "depends"]:
      return subprocess.CompletedProcess(args, 0, f"{args[2]}\n  Depends: {args[2]}-6.1\n", "")
    if args[:2] == ["apt-get", "download"]:
      open(os.path.join(cwd, f"{args[2]}_1.0_all.deb"), "wb").close()
      return subprocess.CompletedProcess(args, 0, "", "")
    if args[:2] == ["dpkg", "-x"]:
      shutil.copytree(extracted_from, args[3], dirs_exist_ok=True)
      return subprocess.CompletedProcess(args, 0, "", "")
    return real_run(args, cwd=cwd, **kwargs)

  monkeypatch.setattr(debian.subprocess, "run", run)


def test_without_source_apt_get_downloads_and_dpkg_extracts(tmp_path, coq_pkg, monkeypatch):
  calls = []
  fake_tools(monkeypatch, tmp_path, coq_pkg, calls)
  data_dir = str(tmp_path / "data")
  registry.prepare("coq_stdlib", data_dir)
  dl = os.path.join(data_dir, "downloads", "debian")
  assert calls == [["apt-get", "download", "libcoq-stdlib"],
                   ["dpkg", "-x", os.path.join(dl, "libcoq-stdlib_1.0_all.deb"),
                    os.path.join(dl, "extracted", "libcoq-stdlib_1.0_all")]]
  assert len(load_documents("coq_stdlib", "validation", data_dir)) == 6
  calls.clear()
  debian.CoqStdlib(data_dir=data_dir).documents()  # the download and extraction are reused
  assert calls == []


def test_linux_c_resolves_the_metapackage(tmp_path, linux_pkg, monkeypatch):
  calls = []
  fake_tools(monkeypatch, tmp_path, linux_pkg, calls)
  builder = debian.LinuxC(data_dir=str(tmp_path / "data"))
  assert len(builder.documents()) == 10
  assert calls[0] == ["apt-cache", "depends", "linux-source"]
  assert calls[1] == ["apt-get", "download", "linux-source-6.1"]


@pytest.mark.parametrize("name,package", [("coq_stdlib", "libcoq-stdlib"),
                                          ("perl_doc", "perl-doc"), ("linux_c", "linux-source")])
def test_no_apt_get_gives_one_line_naming_the_package_and_source(tmp_path, monkeypatch,
                                                                 name, package):
  monkeypatch.setenv("PATH", str(tmp_path / "empty"))
  with pytest.raises(SourceUnavailableError) as e:
    registry.prepare(name, str(tmp_path / "data"))
  message = str(e.value)
  assert "\n" not in message and f"Debian package {package!r}" in message
  assert "is not available" in message and "--source PATH" in message
  assert not os.path.exists(tmp_path / "data" / name)  # checked before building


def test_failing_download_quotes_apt_get(tmp_path, monkeypatch, capsys):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  script = bin_dir / "apt-get"
  script.write_text("#!/bin/sh\necho 'W: some warning' >&2\n"
                    "echo 'E: Failed to fetch http://deb.debian.org/x  Temporary failure "
                    "resolving' >&2\nexit 100\n")
  script.chmod(0o755)
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  from memorizing import cli
  assert cli.prepare_main(["perl_doc", "--data_dir", str(tmp_path / "data")]) == 1
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and "perl-doc" in err and "exit 100" in err
  assert "E: Failed to fetch" in err and "--source PATH" in err


def test_missing_source_path_is_one_line(tmp_path):
  with pytest.raises(SourceUnavailableError, match="does not exist"):
    registry.prepare("perl_doc", str(tmp_path), source=str(tmp_path / "nope.deb"))


def test_debian_corpora_are_registered_with_their_prepare_command(tmp_path):
  for name in ("linux_c", "coq_stdlib", "perl_doc"):
    assert registry.DATASETS[name].splits == ("train", "validation")
    with pytest.raises(registry.DatasetError) as e:
      load_documents(name, "train", str(tmp_path))
    assert f"memorizing-prepare {name} --data_dir {tmp_path}" in str(e.value)
