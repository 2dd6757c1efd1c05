"""Tokenizers: bytes, SentencePiece (trained with exact round trip), the factory."""
import inspect
import json.decoder
import json.encoder
import textwrap

import numpy as np
import pytest

from memorizing.data.tokenizers import (ByteTokenizer, SentencePieceTokenizer, get_tokenizer,
                                        train_sentencepiece)

CODE_SAMPLES = [
    inspect.getsource(json.encoder),
    "def f(x):\n\tif x:\r\n\t\treturn  x   # tabs, CRLF, runs of spaces   \n\n\n\n",
    "   leading spaces\n\n  trailing spaces   ",
    "digits 1234567890 and unicode: ünïcødé ✓ 中文 🙂\n",
    textwrap.dedent("""\
        class A:
            '''Docstring.'''

            def m(self):  # comment
                return {"k": [1, 2, 3]}
        """),
]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
  """A small SentencePiece model trained on stdlib code (about a second)."""
  path = str(tmp_path_factory.mktemp("spm") / "code.model")
  texts = [inspect.getsource(json.decoder), inspect.getsource(inspect)[:150_000]]
  return train_sentencepiece(texts, path, vocab_size=600, num_threads=2)


def test_byte_tokenizer_ids_are_bytes_and_specials_are_above():
  tok = ByteTokenizer()
  assert tok.vocab_size == 260 and tok.pad_id == 256 and tok.bos_id == 257 and tok.eos_id == 258
  ids = tok.encode("aé")
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids, [97, 0xC3, 0xA9])
  assert tok.decode(list(ids) + [tok.pad_id]) == "aé"


def test_byte_tokenizer_keeps_non_utf8_bytes_exactly():
  tok = ByteTokenizer()
  raw = b"ok \xff\xfe\x80 end"
  assert tok.decode_bytes(tok.encode(raw)) == raw
  assert "\ufffd" in tok.decode(tok.encode(raw))  # decode to str does not raise
  assert tok.bytes_per_token([raw]) == 1.0


@pytest.mark.parametrize("i", range(len(CODE_SAMPLES)))
def test_sentencepiece_round_trips_code_text_exactly(sp_model, i):
  text = CODE_SAMPLES[i]
  ids = sp_model.encode(text)
  assert ids.dtype == np.int32 and len(ids) > 0
  assert sp_model.decode(ids) == text


def test_sentencepiece_compresses_and_reports_bytes_per_token(sp_model):
  bpt = sp_model.bytes_per_token(CODE_SAMPLES[:1])
  n_bytes = len(CODE_SAMPLES[0].encode())
  assert bpt == pytest.approx(n_bytes / len(sp_model.encode(CODE_SAMPLES[0])))
  assert bpt > 1.5
  assert sp_model.pad_id == 0 and sp_model.vocab_size == 600


def test_sentencepiece_does_not_crash_on_non_utf8_bytes(sp_model):
  ids = sp_model.encode(b"abc \xff\xfe def")
  assert sp_model.decode(ids) == "abc \ufffd\ufffd def"


def test_get_tokenizer_builds_both_kinds(sp_model):
  assert isinstance(get_tokenizer("bytes"), ByteTokenizer)
  tok = get_tokenizer(sp_model.model_path)
  assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size == sp_model.vocab_size
  with pytest.raises(ValueError, match="bytes"):
    get_tokenizer("wordpiece")


def test_missing_sentencepiece_model_names_the_path_and_the_training_script(tmp_path):
  path = str(tmp_path / "nope.model")
  with pytest.raises(FileNotFoundError) as e:
    get_tokenizer(path)
  assert path in str(e.value) and "memorizing-tokenizer" in str(e.value)


def test_train_tokenizer_script_writes_a_round_tripping_model(tmp_path, capsys):
  from memorizing import cli
  for k, text in enumerate(CODE_SAMPLES):
    (tmp_path / f"f{k}.py").write_text(text * 3)
  out = tmp_path / "tok.model"
  assert cli.tokenizer_main(["--input", str(tmp_path / "*.py"), "--vocab_size", "400",
                            "--output", str(out)]) == 0
  assert "exact round trip: True" in capsys.readouterr().out
  assert SentencePieceTokenizer(str(out)).decode(SentencePieceTokenizer(str(out)).encode(
      CODE_SAMPLES[1])) == CODE_SAMPLES[1]
