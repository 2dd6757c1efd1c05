"""Evaluation on a tiny trained memory model: deterministic, every target token
counted once, position buckets consistent with the total, memory disabled works,
and `memorizing-eval` writes both variants."""
import json
import math

import jax
import numpy as np
import pytest

from memorizing import cli
from memorizing.training import checkpoint, evaluate
from memorizing.data import pipeline, registry, tokenizers
from memorizing.training.train import evaluate_params
from tests.tiny_run import train_tiny

MAX_TOKENS = 2200   # crosses the 512 and 2048 bucket edges, stays fast


TINY = [
    "ModelConfig.num_layers = 2", "ModelConfig.d_model = 32", "ModelConfig.num_heads = 2",
    "ModelConfig.head_dim = 16", "ModelConfig.mlp_dim = 64", "ModelConfig.segment_length = 64",
    "ModelConfig.memory_layers = (-1,)", "ModelConfig.memory_size = 128",
    "ModelConfig.num_neighbors = 8", "TrainConfig.dataset = 'synthetic'",
    "TrainConfig.batch_size = 4", "TrainConfig.eval_batch_size = 4", "TrainConfig.num_steps = 3",
    "TrainConfig.log_every = 1", "TrainConfig.checkpoint_every = 0",
    "TrainConfig.final_eval = False", "TrainConfig.progress_bar = False", "TrainConfig.prefetch = 0",
    "TrainConfig.optimizer = 'adamw'", "TrainConfig.learning_rate = 0.01",
    "TrainConfig.warmup_steps = 1", "TrainConfig.shuffle_documents = False",
    f"TrainConfig.eval_max_document_tokens = {MAX_TOKENS}",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir, data_dir = train_tiny(tmp_path_factory, TINY)
  model, train = cli.parse_gin([], [], before=f"{workdir}/{cli.OPERATIVE_CONFIG}")
  assert model.memory_layers == (-1,) and train.data_dir == data_dir
  params, step = checkpoint.load_params(workdir)
  assert step == 3
  # numpy, as documented: not pinned to a device
  assert all(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(params))
  return model, train, params, workdir


def test_same_perplexity_twice(trained):
  model, train, params, _ = trained
  a = evaluate_params(model, train, params, max_documents=2)
  b = evaluate_params(model, train, params, max_documents=2)
  assert math.isfinite(a["perplexity"]) and a["perplexity"] > 1
  assert a["perplexity"] == b["perplexity"]
  same = lambda x, y: x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y))
  assert a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)


def test_counts_every_target_token_once_on_the_local_corpus(trained):
  model, train, params, _ = trained
  result = evaluate_params(model, train, params, max_documents=3)
  docs = registry.load_documents("synthetic", train.eval_split, train.data_dir, max_documents=3)
  tok = tokenizers.get_tokenizer(train.tokenizer)
  lengths = [len(tok.encode(d)[:MAX_TOKENS]) for d in docs]
  assert result["tokens"] == sum(n - 1 for n in lengths if n >= 2)
  assert result["documents"] == sum(1 for n in lengths if n >= 2) == 3
  assert sum(result[f"tokens_{b}"] for b in evaluate.bucket_names()) == result["tokens"]


def test_counts_whole_documents_of_any_length_once(trained):
  """Short, empty and one-token documents, more rows than documents (padding rows)."""
  model, _, params, _ = trained
  tok = tokenizers.ByteTokenizer()
  docs = [b"x" * 700, b"", b"a", b"ab", b"hello world " * 5, bytes(range(40, 120)) * 3]
  stream = pipeline.DocumentStream(docs, tok, batch_size=4, segment_length=model.segment_length)
  params = jax.device_put(params, jax.local_devices()[0])   # as evaluate_params
  result = evaluate.evaluate(model, params, stream, tok)
  assert result["tokens"] == sum(max(len(d) - 1, 0) for d in docs)
  assert result["documents"] == sum(1 for d in docs if len(d) >= 2) == 4
  assert result["tokens_0-512"] == sum(min(len(d) - 1, 511) for d in docs if len(d) >= 2)
  assert result["tokens_512-2048"] == 700 - 512


def test_buckets_agree_with_the_total(trained):
  model, train, params, _ = trained
  r = evaluate_params(model, train, params, max_documents=3)
  names = [b for b in evaluate.bucket_names() if r[f"tokens_{b}"]]
  assert {"0-512", "512-2048", "2048-8192"} <= set(names)
  weighted = sum(r[f"tokens_{b}"] * math.log(r[f"perplexity_{b}"]) for b in names) / r["tokens"]
  assert weighted == pytest.approx(r["loss"], rel=1e-6)
  assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
  assert r["bits_per_byte"] == pytest.approx(r["loss"] / math.log(2))   # bytes: 1 byte/token
  assert math.isnan(r["perplexity_8192+"]) and r["tokens_8192+"] == 0


def test_memory_disabled_evaluation_of_a_memory_model(trained):
  model, train, params, _ = trained
  on = evaluate_params(model, train, params, max_documents=2)
  off = evaluate_params(model.replace(memory_enabled=False), train, params, max_documents=2)
  assert on["memory_enabled"] and not off["memory_enabled"]
  assert math.isfinite(off["perplexity"]) and off["tokens"] == on["tokens"]
  # The gate starts at 0.5: retrieved memory changes the predictions past the first segment.
  assert off["perplexity"] != on["perplexity"]


def test_eval_command_writes_both_variants(trained, tmp_path, capsys):
  _, _, _, workdir = trained
  out = tmp_path / "results.json"
  rc = cli.eval_main(["--workdir", workdir, "--max_documents", "2", "--output", str(out),
                      "--max_document_tokens", "300"])
  assert rc == 0
  data = json.loads(out.read_text())
  assert data["checkpoint_step"] == 3 and data["split"] == "validation"
  res = data["results"]
  assert set(res) == {"with_memory", "memory_disabled"}
  assert res["with_memory"]["tokens"] == res["memory_disabled"]["tokens"] == 2 * 299
  assert "memory_disabled" in capsys.readouterr().out
  rc = cli.eval_main(["--workdir", workdir, "--max_documents", "1", "--output", str(out),
                      "--max_document_tokens", "100", "--memory", "off"])
  assert rc == 0 and set(json.loads(out.read_text())["results"]) == {"memory_disabled"}


def test_evaluation_shows_a_progress_bar_when_asked(trained, capsys, monkeypatch):
  model, train, params, _ = trained
  monkeypatch.setenv("MEMORIZING_FORCE_BAR", "1")       # as on a terminal
  capsys.readouterr()
  evaluate_params(model, train.replace(progress_bar=True), params, 2)
  assert "evaluating" in capsys.readouterr().err
  evaluate_params(model, train.replace(progress_bar=False), params, 2)
  assert "evaluating" not in capsys.readouterr().err
