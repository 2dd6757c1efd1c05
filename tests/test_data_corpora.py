"""Corpora and the registry: TFDS builders (ArrayRecord), official-set fixtures
read through the same code path, the C4(4K+) filter, and error messages.

Nothing here downloads: the official data sets are replaced by tiny ArrayRecord
data sets with the same names, versions and feature names, written by fixture
builders into a temporary data_dir.
"""
import gzip
import json
import os
import re
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from memorizing.data import corpora, official, registry
from memorizing.data.pipeline import DocumentStream
from memorizing.data.registry import DatasetError, load_documents
from memorizing.data.tokenizers import ByteTokenizer


# --- offline fixtures of the official data sets ------------------------------------------
def _fixture_builder(name, version, features, rows_by_split, config=None):
  """A GeneratorBasedBuilder class writing `rows_by_split` under `name` (not registered,
  so it can share the name of TFDS's own builder)."""
  configs = [tfds.core.BuilderConfig(name=config)] if config else []

  class Fixture(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version(version)
    BUILDER_CONFIGS = configs

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features),
                                   disable_shuffling=True)

    def _split_generators(self, dl_manager):
      return {s: self._generate_examples(rows) for s, rows in rows_by_split.items()}

    def _generate_examples(self, rows):
      for i, row in enumerate(rows):
        yield i, row

  Fixture.name = name
  return Fixture


def write_fixture(data_dir, name, version, features, rows_by_split, config=None):
  with tfds.core.registered.skip_registration():
    cls = _fixture_builder(name, version, features, rows_by_split, config)
  builder = cls(data_dir=str(data_dir), file_format="array_record", config=config)
  builder.download_and_prepare()


def books(n):
  rng = np.random.default_rng(n)
  return [{"book_id": i, "book_link": f"http://x/{i}", "book_title": f"Book {i}",
           "publication_date": "1900",
           "book_text": " ".join(f"w{int(w)}" for w in rng.integers(0, 999, 200 + 50 * i))}
          for i in range(n)]


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory):
  """pg19 and scientific_papers/arxiv as tiny ArrayRecord fixtures, same versions and features."""
  d = tmp_path_factory.mktemp("official")
  text = tfds.features.Text()
  pg19_features = {"book_id": np.int32, "book_link": text, "book_text": text,
                   "book_title": text, "publication_date": text}
  write_fixture(d, "pg19", str(tfds.builder_cls("pg19").VERSION), pg19_features,
                {"train": books(4), "validation": books(3), "test": books(2)})
  papers = [{"article": f"article {i} " * (100 + i), "abstract": f"abstract {i}",
             "section_names": "intro\nmethod"} for i in range(3)]
  write_fixture(d, "scientific_papers", "1.1.1",
                {"article": text, "abstract": text, "section_names": text},
                {"train": papers, "validation": papers[:2], "test": papers[:1]}, config="arxiv")
  return str(d)


def test_pg19_is_read_from_arrayrecord_by_its_text_feature(official_dir):
  docs = load_documents("pg19", "validation", official_dir)
  assert len(docs) == 3
  assert docs[2] == books(3)[2]["book_text"].encode()
  assert "tensorflow" not in sys.modules  # read without TensorFlow


def test_arxiv_is_read_from_scientific_papers_article(official_dir):
  docs = load_documents("arxiv", "train", official_dir)
  assert [docs[i] for i in range(3)] == [f"article {i} ".encode() * (100 + i) for i in range(3)]
  batch = next(DocumentStream(docs, ByteTokenizer(), 2, 64))
  assert batch["start_of_document"].all() and batch["weights"].all()


def test_max_documents_keeps_the_first_documents(official_dir):
  docs = load_documents("pg19", "train", official_dir, max_documents=2)
  assert len(docs) == 2 and docs[1] == books(4)[1]["book_text"].encode()


# --- the C4(4K+) filter -----------------------------------------------------------------
class TwoBytesPerToken:
  """A stand-in tokenizer with exactly 2 bytes per token."""
  def encode(self, text):
    return np.zeros(len(text) // 2, np.int32)


def test_c4_length_filter_keeps_exactly_documents_of_min_tokens():
  texts = ["a" * n for n in (0, 100, 4095, 4096, 4097, 10_000)]
  kept = list(official.filter_by_length([{"text": t} for t in texts], ByteTokenizer(), 4096))
  assert [len(k["text"]) for k in kept] == [4096, 4097, 10_000]


def test_c4_length_filter_counts_tokens_not_bytes():
  texts = ["a" * n for n in (4096, 8190, 8192, 9000)]
  kept = list(official.filter_by_length([{"text": t} for t in texts], TwoBytesPerToken(), 4096))
  assert [len(k["text"]) for k in kept] == [8192, 9000]


def c4_rows(lengths):
  return [{"text": f"{i}:" + "x" * (n - len(f"{i}:")), "url": f"http://c4/{i}",
           "timestamp": "2019-04-25T00:00:00Z"} for i, n in enumerate(lengths)]


def test_c4_4k_builder_filters_a_prepared_c4_en_split(tmp_path):
  text = tfds.features.Text()
  lengths = {"train": [50, 5000, 4095, 4096, 12_000], "validation": [4100, 10, 7000]}
  write_fixture(tmp_path, "c4", "3.1.0", {"text": text, "url": text, "timestamp": text},
                {s: c4_rows(v) for s, v in lengths.items()}, config="en")
  summary = registry.prepare("c4_4k", str(tmp_path), tokenizer="bytes", min_tokens=4096)
  assert "kept 3 of 5" in summary and "kept 2 of 3" in summary
  train = load_documents("c4_4k", "train", str(tmp_path))
  assert [len(train[i]) for i in range(len(train))] == [5000, 4096, 12_000]
  assert [len(d) for d in load_documents("c4_4k", "validation", str(tmp_path))[:]] == [4100, 7000]


def test_c4_4k_builder_reads_c4_json_files(tmp_path):
  for split, lengths in {"train": [4096, 3], "validation": [9000, 4095]}.items():
    with gzip.open(tmp_path / f"c4-{split}.00000-of-00001.json.gz", "wt") as f:
      for row in c4_rows(lengths):
        f.write(json.dumps(row) + "\n")
  pattern = str(tmp_path / "c4-{split}.*.json.gz")
  registry.prepare("c4_4k", str(tmp_path / "data"), min_tokens=4096,
                   json_files={s: pattern.format(split=s) for s in ("train", "validation")})
  assert len(load_documents("c4_4k", "train", str(tmp_path / "data"))) == 1
  assert len(load_documents("c4_4k", "validation", str(tmp_path / "data"))[0]) == 9000


def test_c4_4k_without_a_source_says_how_to_get_one(tmp_path):
  with pytest.raises(official.SourceUnavailableError, match="(?s)c4/en is not prepared.*--c4_json"):
    registry.prepare("c4_4k", str(tmp_path))
  assert not os.path.exists(tmp_path / "c4_4k")  # checked before building


def test_unreachable_source_gives_a_clear_error():
  with pytest.raises(official.SourceUnavailableError, match="cannot be reached"):
    official.check_reachable("source.invalid", "pg19", timeout=2)


# --- registry errors ----------------------------------------------------------------------
def test_unknown_dataset_lists_the_known_ones(tmp_path):
  with pytest.raises(DatasetError) as e:
    load_documents("pg91", "train", str(tmp_path))
  assert isinstance(e.value, ValueError)
  for name in ("pg19", "c4_4k", "arxiv", "text_files", "python_stdlib"):
    assert name in str(e.value)


@pytest.mark.parametrize("name", ["pg19", "arxiv", "c4_4k", "text_files"])
def test_unprepared_data_dir_names_the_prepare_command(tmp_path, name):
  with pytest.raises(DatasetError) as e:
    load_documents(name, "train", str(tmp_path))
  assert f"memorizing-prepare {name} --data_dir {tmp_path}" in str(e.value)
  assert not os.listdir(tmp_path)  # nothing downloaded or created


def test_unknown_split_lists_the_splits(official_dir):
  with pytest.raises(DatasetError, match="validation"):
    load_documents("pg19", "dev", official_dir)


def test_prepare_script_reports_errors_in_one_line(tmp_path, capsys):
  from memorizing import cli
  assert cli.prepare_main(["pg91", "--data_dir", str(tmp_path)]) == 1
  assert "Unknown dataset 'pg91'" in capsys.readouterr().err
  assert cli.prepare_main(["text_files", "--data_dir", str(tmp_path)]) == 1
  assert "--source" in capsys.readouterr().err


# --- text_files -------------------------------------------------------------------------------
def test_split_by_hash_is_deterministic_and_validation_is_never_empty():
  paths = [f"dir/file{i}.txt" for i in range(10)]
  a = corpora.split_by_hash(paths, 0.3)
  assert a == corpora.split_by_hash(paths, 0.3)
  assert sorted(a["train"] + a["validation"]) == list(range(10))
  none = corpora.split_by_hash(paths, 0.0)
  assert len(none["validation"]) == 1 and len(none["train"]) == 9
  everything = corpora.split_by_hash(paths, 1.0)
  assert len(everything["train"]) == 9
  with pytest.raises(ValueError, match="at least 2"):
    corpora.split_by_hash(["only.txt"], 0.5)


@pytest.fixture
def text_dir(tmp_path):
  src = tmp_path / "src"
  (src / "sub").mkdir(parents=True)
  files = {"a.txt": b"alpha " * 50, "b.txt": b"\xff\xfe latin-1 \xe9t\xe9 " * 20,
           "sub/c.txt": "gamma ünï ".encode() * 40, "empty.txt": b"", "tiny.txt": b"hi",
           ".hidden": b"skip me"}
  for k in range(12):
    files[f"sub/n{k:02d}.txt"] = f"note {k} ".encode() * (30 + k)
  for name, data in files.items():
    (src / name).write_bytes(data)
  return src, files


def test_text_files_builds_one_document_per_file_with_a_hash_split(tmp_path, text_dir):
  src, files = text_dir
  data_dir = str(tmp_path / "data")
  registry.prepare("text_files", data_dir, source=str(src), min_bytes=10)
  train = load_documents("text_files", "train", data_dir)
  validation = load_documents("text_files", "validation", data_dir)
  assert len(validation) >= 1
  got = sorted(list(train[:]) + list(validation[:]))
  want = sorted(v for k, v in files.items() if len(v) >= 10 and not k.startswith("."))
  assert got == want  # raw bytes kept, non-UTF-8 included; empty, tiny, hidden dropped
  expected = corpora.split_by_hash(
      sorted(os.path.relpath(p, src) for p in corpora.list_text_files(str(src))[1]
             if len(open(p, "rb").read()) >= 10), 0.05)
  assert len(expected["validation"]) == len(validation)


def test_text_files_accepts_a_glob(tmp_path, text_dir):
  src, files = text_dir
  registry.prepare("text_files", str(tmp_path / "g"), source=str(src / "sub" / "*.txt"))
  docs = load_documents("text_files", "train", str(tmp_path / "g"))[:] + \
      load_documents("text_files", "validation", str(tmp_path / "g"))[:]
  assert sorted(docs) == sorted(v for k, v in files.items() if k.startswith("sub/"))


# --- the embedded default ------------------------------------------------------------------
@pytest.fixture(scope="module")
def stdlib_dir(tmp_path_factory):
  """python_stdlib built once, offline, on first use through load_documents."""
  d = str(tmp_path_factory.mktemp("stdlib"))
  import io
  import contextlib
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    docs = load_documents("python_stdlib", "train", d)
  return d, docs, out.getvalue()


def test_embedded_corpus_builds_offline_on_first_use_and_prints_its_size(stdlib_dir):
  data_dir, train, printed = stdlib_dir
  m = re.search(r"python_stdlib/train: ([\d,]+) documents, ([\d,]+) tokens", printed)
  assert m, printed
  assert int(m.group(1).replace(",", "")) == len(train) >= 50
  assert int(m.group(2).replace(",", "")) > 10_000_000  # a long-document corpus
  assert "histogram" in printed
  assert len(load_documents("python_stdlib", "validation", data_dir)) >= 1


def test_embedded_corpus_records_the_python_version_and_keeps_documents_long(stdlib_dir):
  data_dir, train, _ = stdlib_dir
  assert train.metadata["python_version"] == sys.version.split()[0]
  lengths = np.array([len(train[i]) for i in range(len(train))])
  assert np.median(lengths) > 32_768
  assert train[0].startswith(b"# ===== ")
  assert lengths.max() <= (1 << 20) + (200 << 10)  # directories cut at ~1 MiB


def test_stdlib_documents_rule_is_deterministic(tmp_path):
  pkg = tmp_path / "lib" / "pkg"
  pkg.mkdir(parents=True)
  (tmp_path / "lib" / "big.py").write_text("x = 1\n" * 20_000)
  (tmp_path / "lib" / "small.py").write_text("y = 2\n" * 300)
  (pkg / "b.py").write_text("b = 1\n" * 300)
  (pkg / "a.py").write_text("a = 1\n" * 300)
  docs = corpora.stdlib_documents(str(tmp_path / "lib"))
  assert docs == corpora.stdlib_documents(str(tmp_path / "lib"))
  names = [n for n, _ in docs]
  assert names == ["big.py", "./", "pkg/"]
  pkg_text = dict(docs)["pkg/"]
  assert pkg_text.index(b"# ===== pkg/a.py") < pkg_text.index(b"# ===== pkg/b.py")


def test_synthetic_corpus_builds_offline(tmp_path, capsys):
  docs = load_documents("synthetic", "validation", str(tmp_path))
  assert len(docs) >= 1 and b"assert v" in docs[0]
  assert "synthetic/train:" in capsys.readouterr().out


def test_text_files_from_another_source_is_an_error_unless_overwritten(tmp_path, text_dir):
  src, files = text_dir
  data_dir = str(tmp_path / "data")
  registry.prepare("text_files", data_dir, source=str(src / "sub" / "*.txt"))
  registry.prepare("text_files", data_dir, source=str(src / "sub" / "*.txt"))   # same: kept
  registry.prepare("text_files", data_dir)                                       # no source: kept
  with pytest.raises(DatasetError, match="already holds text_files prepared with source="):
    registry.prepare("text_files", data_dir, source=str(src))
  docs = load_documents("text_files", "train", data_dir)[:]
  assert all(d in [v for k, v in files.items() if k.startswith("sub/")] for d in docs)
  registry.prepare("text_files", data_dir, source=str(src), overwrite=True)
  docs = load_documents("text_files", "train", data_dir)[:] + \
      load_documents("text_files", "validation", data_dir)[:]
  assert files["a.txt"] in docs


def test_processes_starting_on_a_fresh_data_dir_build_an_embedded_corpus_once(tmp_path):
  """Two processes that load `synthetic` from an empty data dir at once: one
  builds it, the other waits for it (a lock file), and both read all of it."""
  import subprocess
  import sys
  code = ("from memorizing.data import registry; "
          f"print('docs', len(registry.load_documents('synthetic', 'train', {str(tmp_path)!r})))")
  procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for _ in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outs
  assert all(out.strip().endswith("docs 36") for out in outs), outs
  assert sum("Building the embedded corpus" in out for out in outs) == 1, outs
