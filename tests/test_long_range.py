"""The synthetic long-range task (`synthetic_recall`, docs/synthetic_recall.md):
the case of each letter of a passage written at a document's start must be
recalled 132-211 tokens later, beyond a 64-token segment plus its 64-token XL
cache but inside a 512-slot kNN memory (chance: 1/2).

Fast tests check the generator and its distances; the slow test trains a
memory model and an XL-only baseline of the same size for the same steps with
the real trainer and asserts the memory model recalls far better, and that it
is the memory that does it.
"""
import numpy as np
import pytest

from memorizing import knn
from memorizing.data import corpora, registry

SEGMENT = 64
MEMORY = 512


def model_config(memory: bool, **changes):
  from memorizing.model.config import ModelConfig
  cfg = ModelConfig(vocab_size=260, num_layers=2, d_model=64, num_heads=4, head_dim=16,
                    mlp_dim=256, segment_length=SEGMENT, use_xl_cache=True,
                    memory_layers=(-1,) if memory else (), memory_size=MEMORY,
                    num_neighbors=16, knn_backend="exact")
  return cfg.replace(**changes)


def train_config(data_dir, steps, **changes):
  from memorizing.model.config import TrainConfig
  cfg = TrainConfig(dataset="synthetic_recall", data_dir=str(data_dir), batch_size=16,
                    eval_batch_size=16, num_steps=steps, optimizer="adamw", schedule="cosine",
                    learning_rate=3e-3, warmup_steps=50, log_every=50, checkpoint_every=0,
                    final_eval=False, progress_bar=False, prefetch=0,
                    save_carried_state=False, seed=0)
  return cfg.replace(**changes)


def recall_accuracy(cfg, params, documents, batch: int = 16) -> float:
  """Greedy next-token accuracy on the recalled value bytes of `documents`,
  each streamed from its start, segment after segment, with memory and cache."""
  import jax
  import jax.numpy as jnp
  from memorizing.model.decoder import Decoder, init_carried_state
  apply = jax.jit(lambda p, c, t, s: Decoder(cfg, knn.make_backend(cfg)).apply({"params": p}, t, c, s))
  correct = total = 0
  for lo in range(0, len(documents), batch):
    texts = [documents[i] for i in range(lo, min(lo + batch, len(documents)))]
    rows = len(texts)
    texts += [texts[-1]] * (batch - rows)                   # pad the batch, not counted
    n = max(len(t) for t in texts)
    length = -(-n // SEGMENT) * SEGMENT
    tokens = np.full((batch, length + 1), 256, np.int32)    # 256: the pad id
    masks = np.zeros((batch, length + 1), bool)
    for r, t in enumerate(texts):
      tokens[r, :len(t)] = np.frombuffer(t, np.uint8)
      masks[r, :len(t)] = corpora.recall_mask(t)
    carried = init_carried_state(cfg, batch)
    for s in range(0, length, SEGMENT):
      start = jnp.full((batch,), s == 0)
      logits, carried = apply(params, carried, jnp.asarray(tokens[:, s:s + SEGMENT]), start)
      pred = np.asarray(jnp.argmax(logits, -1))
      target = tokens[:, s + 1:s + SEGMENT + 1]
      m = masks[:rows, s + 1:s + SEGMENT + 1]
      correct += int(np.sum((pred[:rows] == target[:rows]) & m))
      total += int(np.sum(m))
  return correct / total


# --- fast ------------------------------------------------------------------------------
def test_recall_documents_are_deterministic_and_well_formed():
  a = corpora.recall_documents(8, seed=3)
  assert a == corpora.recall_documents(8, seed=3)
  assert a != corpora.recall_documents(8, seed=4)
  for _, text in a:
    lines = text.split(b"\n")
    assert lines[-1] == b"" and len(lines) == 8
    passage, check, *filler, recall, _ = lines
    assert passage[:1] == b"=" and len(passage) == 17 and passage[1:].isalpha()
    case = {c.lower(): c for c in passage[1:].decode()}
    assert len(case) == 16                                   # distinct letters
    assert filler == [b"~" * 31] * 4
    for line in (check, recall):
      assert line[:1] == b"?" and len(line) == 33
      pairs = [line[i:i + 2].decode() for i in range(1, 33, 2)]
      assert sorted(p[0] for p in pairs) == sorted(case)      # every letter once
      assert all(p[0].islower() and p[1] == case[p[0]] for p in pairs)
    assert check != recall                                   # another order
    mask = corpora.recall_mask(text)
    assert mask.sum() == 16
    assert bytes(np.frombuffer(text, np.uint8)[mask]) == recall[2::2]
  cases = b"".join(t.split(b"\n")[0][1:] for _, t in corpora.recall_documents(64))
  assert 0.4 < sum(c < ord("a") for c in cases) / len(cases) < 0.6   # chance is 1/2


def test_recall_distance_is_beyond_segment_and_xl_cache_and_within_memory():
  rng = np.random.default_rng(0)
  for _ in range(50):
    text, mask = corpora.recall_document(rng)
    assert (mask == corpora.recall_mask(text)).all()
    distances = corpora.recall_distances(text)
    assert len(distances) == mask.sum() == 16
    # A query at position p sees locally its segment up to p and one segment of
    # XL cache before it: at most 2 * SEGMENT - 1 tokens back. The recalled byte
    # (target of p) is `distance` tokens after its nearest earlier value (the
    # lowercase name right before it shows no case), `distance - 1` before p.
    assert distances.min() - 1 > 2 * SEGMENT - 1
    assert len(text) <= MEMORY  # the whole document fits in the memory


def test_recall_corpus_builds_offline_and_a_memory_model_takes_a_step(tmp_path):
  docs = registry.load_documents("synthetic_recall", "validation", str(tmp_path))
  assert 20 <= len(docs) <= 100
  assert all(corpora.recall_mask(docs[i]).sum() == 16 for i in range(len(docs)))
  from memorizing.training.checkpoint import load_params
  from memorizing.training.train import train_and_evaluate
  cfg = model_config(memory=True)
  train_and_evaluate(cfg, train_config(tmp_path, 2, log_every=1), str(tmp_path / "run"))
  params, _ = load_params(str(tmp_path / "run"))
  acc = recall_accuracy(cfg, params, [docs[i] for i in range(4)], batch=4)
  assert 0.0 <= acc <= 1.0


# --- the Table-4 protocol's recipe on the recall task (default suite) ----------------
PROTOCOL_STEPS = 1000   # about 2 minutes on 2 CPU cores; measured: recall 0.636, memory disabled 0.524


def test_protocol_recipe_memory_model_recalls_and_without_memory_cannot(tmp_path):
  """Optimizer, schedule, learning-rate table, initialisation and gate come from
  the protocol's default config (configs/experiments/table4_protocol.gin); only
  sizes, the data set and the number of steps are overridden."""
  from memorizing.training.checkpoint import load_params
  from memorizing.tools.gin_config import parse_gin
  from memorizing.training.train import train_and_evaluate
  sizes = ["ModelConfig.vocab_size = 260", "ModelConfig.num_layers = 2",
           "ModelConfig.d_model = 64", "ModelConfig.num_heads = 4", "ModelConfig.head_dim = 16",
           "ModelConfig.mlp_dim = 256", f"ModelConfig.segment_length = {SEGMENT}",
           f"ModelConfig.memory_size = {MEMORY}", "ModelConfig.num_neighbors = 16",
           "ModelConfig.memory_layers = (-1,)", "ModelConfig.knn_backend = 'exact'",
           "ModelConfig.knn_options = ()", "ModelConfig.dtype = 'float32'",
           "TrainConfig.dataset = 'synthetic_recall'", f"TrainConfig.data_dir = '{tmp_path}'",
           "TrainConfig.batch_size = 16", f"TrainConfig.num_steps = {PROTOCOL_STEPS}",
           "TrainConfig.final_eval = False", "TrainConfig.prefetch = 0"]
  cfg, train_cfg = parse_gin(["experiments/table4_protocol.gin"], sizes)
  assert train_cfg.optimizer == "adamw" and cfg.memory_combine == "gate"   # the recipe's own
  train_and_evaluate(cfg, train_cfg, str(tmp_path / "run"))
  params, _ = load_params(str(tmp_path / "run"))
  docs = registry.load_documents("synthetic_recall", "validation", str(tmp_path))
  docs = [docs[i] for i in range(len(docs))]
  with_memory = recall_accuracy(cfg, params, docs)
  without = recall_accuracy(cfg.replace(memory_enabled=False), params, docs)
  print(f"recall accuracy: memory {with_memory:.3f}, memory disabled {without:.3f}")
  assert without < 0.5 + 0.1                   # chance: the passage is beyond the XL window
  assert with_memory > without + 0.05           # 704 recalled tokens: 2.6 standard errors


# --- slow: train both models ----------------------------------------------------------
STEPS = 3500   # 5-7 minutes of training per model on 2 CPU cores (docs/synthetic_recall.md)


@pytest.mark.slow
def test_memory_model_recalls_far_beyond_the_xl_baseline(tmp_path):
  from memorizing.training.checkpoint import load_params
  from memorizing.training.train import train_and_evaluate
  docs = registry.load_documents("synthetic_recall", "validation", str(tmp_path))
  docs = [docs[i] for i in range(len(docs))]
  accuracy = {}
  for name, memory in (("memory", True), ("xl", False)):
    cfg = model_config(memory)
    train_and_evaluate(cfg, train_config(tmp_path, STEPS), str(tmp_path / name))
    params, _ = load_params(str(tmp_path / name))
    accuracy[name] = recall_accuracy(cfg, params, docs)
    if memory:
      accuracy["memory_disabled"] = recall_accuracy(cfg.replace(memory_enabled=False), params, docs)
  print("recall accuracy:", accuracy)
  chance = 1 / 2                                     # the case of a known letter
  assert accuracy["xl"] < chance + 0.1               # the baseline cannot see the passage
  assert accuracy["memory_disabled"] < chance + 0.1  # and it is the memory that does it
  assert accuracy["memory"] > 0.85                   # the memory model recalls almost all
  assert accuracy["memory"] > accuracy["xl"] + 0.3
