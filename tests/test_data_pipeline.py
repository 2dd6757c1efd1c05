"""DocumentStream and Prefetch: document order, targets, weights, position."""
import json

import numpy as np
import pytest

from memorizing.data.pipeline import BATCH_KEYS, DocumentStream, Prefetch, restart_at_next_documents
from memorizing.data.tokenizers import ByteTokenizer

L = 8
TOK = ByteTokenizer()


def make_documents():
  """Documents of every awkward length for L=8, some not UTF-8."""
  rng = np.random.default_rng(0)
  docs = [b"", b"x", b"ab", b"short", b"exactly8", b"nine char", b"\xff\xfe not utf-8 \x80 at all"]
  for n in (L * 3 + 1, L * 3 + 2, 50, 123, 7, 300):
    docs.append(bytes(rng.integers(32, 127, n, dtype=np.uint8)))
  docs.append("unicode: ünïcødé ✓ 中文 text that spans segments".encode())
  return docs


def usable(docs):
  return [i for i, d in enumerate(docs) if len(d) >= 2]


def run(stream, limit=10_000):
  batches = []
  for batch in stream:
    batches.append(batch)
    assert len(batches) < limit
  return batches


def reconstruct_rows(batches):
  """Per row, the documents it streamed, rebuilt from first tokens and weighted targets."""
  rows = [[] for _ in range(batches[0]["tokens"].shape[0])]
  for batch in batches:
    for b, row in enumerate(rows):
      w = batch["weights"][b] > 0
      if batch["start_of_document"][b]:
        row.append([int(batch["tokens"][b, 0])])
      if w.any():
        row[-1].extend(int(t) for t in batch["targets"][b][w])
  return [[TOK.decode_bytes(d) for d in row] for row in rows]


def test_batch_shapes_and_dtypes():
  batch = next(DocumentStream(make_documents(), TOK, 4, L))
  assert set(batch) == set(BATCH_KEYS)
  assert batch["tokens"].shape == batch["targets"].shape == batch["weights"].shape == (4, L)
  assert batch["tokens"].dtype == np.int32 and batch["targets"].dtype == np.int32
  assert batch["weights"].dtype == np.float32
  assert batch["start_of_document"].shape == (4,) and batch["start_of_document"].dtype == bool


def test_every_token_of_every_document_is_emitted_once_in_order():
  docs = make_documents()
  rows = reconstruct_rows(run(DocumentStream(docs, TOK, 3, L)))
  emitted = [d for row in rows for d in row]
  assert sorted(emitted) == sorted(docs[i] for i in usable(docs))  # exact bytes round trip


def test_targets_are_the_next_tokens_and_segments_overlap_by_one():
  docs = [bytes(range(40, 40 + 30))]
  batches = run(DocumentStream(docs, TOK, 1, L))
  assert len(batches) == int(np.ceil((30 - 1) / L))
  for k, batch in enumerate(batches):
    doc = np.frombuffer(docs[0], np.uint8)
    seg, nxt = doc[k * L:k * L + L], doc[k * L + 1:k * L + L + 1]
    np.testing.assert_array_equal(batch["tokens"][0, :len(seg)], seg)
    np.testing.assert_array_equal(batch["targets"][0, :len(nxt)], nxt)


@pytest.mark.parametrize("n", [2, L, L + 1, L + 2, 2 * L + 1, 3 * L])
def test_document_of_n_tokens_has_ceil_n_minus_1_over_l_segments_each_with_targets(n):
  batches = run(DocumentStream([bytes(range(65, 65 + n))], TOK, 1, L))
  assert len(batches) == -(-(n - 1) // L)
  assert all(b["weights"][0, 0] == 1 for b in batches)


def test_row_streams_consecutive_segments_of_one_document_until_it_ends():
  docs = make_documents()
  batches = run(DocumentStream(docs, TOK, 3, L))
  for b in range(3):
    for prev, cur in zip(batches, batches[1:]):
      if cur["weights"][b].any() and not cur["start_of_document"][b]:
        # same document continues: the previous segment was full and the new
        # one begins with the previous segment's last target
        assert prev["weights"][b].all()
        assert cur["tokens"][b, 0] == prev["targets"][b, -1]
  # rebuilt from its segments, each row holds whole documents only (a document
  # cut short or mixed with another would not be one of them)
  for row in reconstruct_rows(batches):
    assert row and all(d in docs for d in row)


def test_start_of_document_is_set_exactly_on_first_segments():
  docs = make_documents()
  batches = run(DocumentStream(docs, TOK, 2, L))
  starts = sum(int(b["start_of_document"].sum()) for b in batches)
  assert starts == len(usable(docs))
  rows = reconstruct_rows(batches)
  for b, row in enumerate(rows):
    first_tokens = [d[0] for d in row]
    flagged = [int(batch["tokens"][b, 0]) for batch in batches if batch["start_of_document"][b]]
    assert flagged == first_tokens


def test_padding_and_exhausted_rows_have_weight_zero():
  docs = make_documents()
  batches = run(DocumentStream(docs, TOK, 4, L))
  total = 0
  for batch in batches:
    pad = batch["weights"] == 0
    assert (batch["targets"][pad] == TOK.pad_id).all()
    # weights are a prefix of ones in every row
    w = batch["weights"]
    assert (np.diff(w, axis=1) <= 0).all()
    total += int(w.sum())
  assert total == sum(len(docs[i]) - 1 for i in usable(docs))


def test_rows_without_documents_emit_weight_zero_and_iteration_stops():
  docs = [b"a" * 40, b"b" * 10]
  batches = run(DocumentStream(docs, TOK, 4, L))
  assert len(batches) == int(np.ceil(39 / L))  # until the longest document ends
  for batch in batches:
    assert not batch["weights"][2:].any() and not batch["start_of_document"][2:].any()
  assert not batches[-1]["weights"][1].any()  # row 1 finished its short document first


def test_documents_with_fewer_than_two_tokens_are_skipped():
  batches = run(DocumentStream([b"", b"z", b"ok"], TOK, 1, L))
  assert len(batches) == 1
  assert bytes(batches[0]["tokens"][0, :2].astype(np.uint8)) == b"ok"
  assert batches[0]["weights"][0].sum() == 1


def test_document_shorter_than_a_segment_is_one_padded_segment():
  batches = run(DocumentStream([b"abc"], TOK, 1, L))
  assert len(batches) == 1
  np.testing.assert_array_equal(batches[0]["weights"][0], [1, 1, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(batches[0]["tokens"][0, 3:], [TOK.pad_id] * 5)


def test_min_length_drops_short_documents():
  docs = [b"a" * 5, b"b" * 20, b"c" * 9]
  rows = reconstruct_rows(run(DocumentStream(docs, TOK, 1, L, min_length=9)))
  assert rows[0] == [b"b" * 20, b"c" * 9]


def test_fixed_order_takes_documents_in_index_order():
  docs = [bytes([65 + i]) * 3 for i in range(6)]
  rows = reconstruct_rows(run(DocumentStream(docs, TOK, 2, L)))
  # equal lengths: rows alternate through the order 0, 1, 2, ...
  assert rows == [[docs[0], docs[2], docs[4]], [docs[1], docs[3], docs[5]]]


def test_shuffle_permutes_whole_documents_by_seed():
  docs = [bytes([65 + i]) * (5 + i) for i in range(20)]

  def order(seed):
    return [d for row in reconstruct_rows(run(DocumentStream(docs, TOK, 1, L, shuffle_seed=seed)))
            for d in row]
  a, b, c = order(1), order(1), order(2)
  assert a == b and a != c
  assert sorted(a) == sorted(docs) and a != docs


def test_repeat_starts_a_new_epoch_with_a_new_order():
  docs = [bytes([65 + i]) * 4 for i in range(5)]
  stream = DocumentStream(docs, TOK, 1, L, shuffle_seed=0, repeat=True)
  seen = [TOK.decode_bytes(next(stream)["tokens"][0, :4]) for _ in range(15)]
  assert sorted(seen[:5]) == sorted(docs) and sorted(seen[5:10]) == sorted(docs)
  assert seen[:5] != seen[5:10]
  assert stream.get_state()["epoch"] == 2


def test_processes_serve_their_own_rows_and_partition_the_documents():
  docs = make_documents()
  per_process = []
  for p in range(2):
    stream = DocumentStream(docs, TOK, 4, L, process_index=p, process_count=2, shuffle_seed=3)
    batches = run(stream)
    assert batches[0]["tokens"].shape == (2, L)
    per_process.append([d for row in reconstruct_rows(batches) for d in row])
    # deterministic
    again = [d for row in reconstruct_rows(run(DocumentStream(
        docs, TOK, 4, L, process_index=p, process_count=2, shuffle_seed=3))) for d in row]
    assert again == per_process[-1]
  assert sorted(per_process[0] + per_process[1]) == sorted(docs[i] for i in usable(docs))
  assert per_process[0] and per_process[1]


def assert_same_batches(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    for k in BATCH_KEYS:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("seed,repeat", [(None, False), (7, True)])
def test_save_and_restore_reproduces_the_next_batches_exactly(seed, repeat):
  docs = make_documents()
  for k in (0, 1, 5, 13):
    stream = DocumentStream(docs, TOK, 3, L, shuffle_seed=seed, repeat=repeat)
    for _ in range(k):
      next(stream)
    state = json.loads(json.dumps(stream.get_state()))  # survives JSON
    expected = [next(stream) for _ in range(25)] if repeat else run(stream)
    restored = DocumentStream(docs, TOK, 3, L, shuffle_seed=seed, repeat=repeat)
    restored.set_state(state)
    got = [next(restored) for _ in range(25)] if repeat else run(restored)
    assert_same_batches(expected, got)


def test_prefetch_yields_the_same_batches_and_state_of_the_consumed_batch():
  docs = make_documents()
  plain = DocumentStream(docs, TOK, 3, L, shuffle_seed=1, repeat=True)
  pre = Prefetch(DocumentStream(docs, TOK, 3, L, shuffle_seed=1, repeat=True), size=4)
  assert pre.get_state() == plain.get_state()
  for _ in range(6):
    assert_same_batches([next(plain)], [next(pre)])
  import time
  time.sleep(0.05)  # let the thread run ahead and fill its queue
  assert pre.get_state() == plain.get_state()
  pre.close()


def test_save_and_restore_across_prefetch_reproduces_the_next_batches():
  docs = make_documents()
  pre = Prefetch(DocumentStream(docs, TOK, 3, L, shuffle_seed=5, repeat=True), size=3)
  for _ in range(7):
    next(pre)
  state = pre.get_state()
  expected = [next(pre) for _ in range(20)]
  pre.close()
  restored = Prefetch(DocumentStream(docs, TOK, 3, L, shuffle_seed=5, repeat=True), size=3)
  next(restored)  # its thread is running when the state is restored
  restored.set_state(state)
  assert_same_batches(expected, [next(restored) for _ in range(20)])
  restored.close()


def test_prefetch_close_rewinds_to_the_consumed_batch():
  docs = make_documents()
  plain = DocumentStream(docs, TOK, 2, L)
  pre = Prefetch(DocumentStream(docs, TOK, 2, L), size=8)
  for _ in range(3):
    next(plain), next(pre)
  pre.close()
  assert_same_batches(run(plain), run(pre))


def test_prefetch_passes_on_the_end_and_errors():
  assert len(run(Prefetch(DocumentStream([b"abcdefghijkl"], TOK, 1, L), 2))) == 2

  class Broken(list):
    def __getitem__(self, i):
      raise RuntimeError("unreadable document")
  with pytest.raises(RuntimeError, match="unreadable"):
    next(Prefetch(DocumentStream(Broken([b"x"]), TOK, 1, L), 2))


def test_set_state_rejects_a_position_from_another_geometry():
  docs = make_documents()
  state = DocumentStream(docs, TOK, 2, L).get_state()
  with pytest.raises(ValueError, match="batch_size"):
    DocumentStream(docs, TOK, 4, L).set_state(state)
  with pytest.raises(ValueError, match="seed"):
    DocumentStream(docs, TOK, 2, L, shuffle_seed=1).set_state(state)


def test_restart_at_next_documents_starts_every_row_on_a_new_document():
  docs = make_documents()
  stream = DocumentStream(docs, TOK, 2, L)
  for _ in range(3):
    next(stream)
  stream.set_state(restart_at_next_documents(stream.get_state()))
  batch = next(stream)
  assert batch["start_of_document"].all()


def test_bad_geometry_is_refused():
  with pytest.raises(ValueError, match="multiple of process_count"):
    DocumentStream([b"ab"], TOK, 3, L, process_count=2)
  with pytest.raises(ValueError, match="segment_length"):
    DocumentStream([b"ab"], TOK, 2, 0)


def test_repeat_without_usable_documents_raises_instead_of_looping():
  with pytest.raises(ValueError, match="at least 2 tokens"):
    next(DocumentStream([b"", b"a"], TOK, 1, L, repeat=True))
