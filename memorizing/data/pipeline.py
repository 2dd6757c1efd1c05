"""Document streams: B rows, each streaming one document segment by segment.

A batch (a plain dict of numpy arrays, so it is a JAX pytree as it is):

  tokens             [B, L] int32    doc[o : o+L], padded with pad_id
  targets            [B, L] int32    doc[o+1 : o+L+1], the next tokens, padded with pad_id
  weights            [B, L] float32  1 where targets[b, j] is a real next token, else 0
  start_of_document  [B]    bool     True exactly on a document's first segment in row b

for the row's current document `doc` (token ids) and offset `o`, which grows
by L each step. Segments overlap by one token, so every token of a document
but its first is a target exactly once; a document has ceil((n - 1) / L)
segments and one of fewer than 2 tokens (no targets) is skipped. When a row's
document ends, the row takes the next document of the order at the next step.
Rows with no documents left (repeat=False) are all padding with weight 0; the
iterator stops when every row is out of documents.

Document order: documents are never cut or reordered internally; the order
of whole documents is 0..N-1, or a permutation per epoch from
(shuffle_seed, epoch). Multi-host: with P processes, process p takes the
documents at positions p, p+P, p+2P, ... of that order and serves
batch_size // P rows of its own; B above is that local row count.

Position (`get_state()`), as of the last batch returned by `next()`:
  {"doc_index": [B] document index per row (-1: takes the next document at
   the next step), "offset": [B] token offset of the row's next segment,
   "cursor": next position in this process's order, "epoch", "seed", plus the
   geometry it belongs to}. `set_state` of it yields exactly the batches that
   would have followed.
"""
from __future__ import annotations

import copy
import queue
import threading
from typing import Dict, List, Optional, Sequence

import numpy as np

from memorizing.data.tokenizers import Tokenizer
from memorizing.errors import ConfigError, DatasetError

Batch = Dict[str, np.ndarray]
BATCH_KEYS = ("tokens", "targets", "weights", "start_of_document")
STATE_VERSION = 1


class DocumentStream:
  """Iterator of Batch over `documents` (a sequence of str or bytes)."""

  def __init__(self, documents: Sequence, tokenizer: Tokenizer, batch_size: int,
               segment_length: int, *, shuffle_seed: Optional[int] = None,
               repeat: bool = False, process_index: int = 0, process_count: int = 1,
               min_length: int = 0, max_tokens: Optional[int] = None):
    """batch_size is global: this process serves batch_size // process_count rows.

    max_tokens: keep only each document's first `max_tokens` tokens (a prefix;
    for evaluation budgets). None keeps whole documents.
    """
    if segment_length <= 0:
      raise ValueError(f"segment_length must be > 0, got {segment_length}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
    if batch_size <= 0 or batch_size % process_count:
      raise ConfigError(f"batch_size={batch_size} must be a positive multiple of "
                       f"process_count={process_count}")
    self.documents = documents
    self.tokenizer = tokenizer
    self.batch_size = batch_size
    self.rows = batch_size // process_count
    self.segment_length = segment_length
    self.seed = shuffle_seed
    self.repeat = repeat
    self.process_index = process_index
    self.process_count = process_count
    self.min_length = max(2, int(min_length))
    self.max_tokens = int(max_tokens) if max_tokens else None
    self._num_documents = len(documents)
    self._order_epoch = None
    self._order_cache = None
    self._set_position([-1] * self.rows, [0] * self.rows, cursor=0, epoch=0)

  # --- order ----------------------------------------------------------------------
  def _order(self, epoch: int) -> np.ndarray:
    """This process's document order in `epoch`: [num_local_documents] int64."""
    if self._order_epoch != epoch:
      if self.seed is None:
        order = np.arange(self._num_documents)
      else:
        order = np.random.default_rng([self.seed, epoch]).permutation(self._num_documents)
      self._order_cache = order[self.process_index::self.process_count]
      self._order_epoch = epoch
    return self._order_cache

  def _take_document(self, row: int) -> bool:
    """Give `row` the next usable document of the order; False when none is left."""
    skipped = 0
    while True:
      order = self._order(self._epoch)
      if self._cursor >= len(order):
        if not self.repeat:
          return False
        if skipped >= len(order):  # a whole epoch without a usable document
          raise DatasetError(
              f"no document of process {self.process_index}'s share ({len(order)} documents) "
              f"has at least {self.min_length} tokens; cannot repeat")
        self._epoch += 1
        self._cursor = 0
        continue
      index = int(order[self._cursor])
      self._cursor += 1
      tokens = self._encode(index)
      if len(tokens) < self.min_length:
        skipped += 1
        continue
      self._doc[row], self._offset[row], self._tokens[row] = index, 0, tokens
      return True

  # --- iteration ------------------------------------------------------------------
  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    for b in range(self.rows):
      if self._doc[b] < 0:
        self._take_document(b)
    if all(d < 0 for d in self._doc):
      raise StopIteration
    L, pad = self.segment_length, self.tokenizer.pad_id
    tokens = np.full((self.rows, L), pad, np.int32)
    targets = np.full((self.rows, L), pad, np.int32)
    weights = np.zeros((self.rows, L), np.float32)
    start = np.zeros((self.rows,), bool)
    for b in range(self.rows):
      if self._doc[b] < 0:
        continue  # out of documents: padding, weight 0
      doc, o = self._tokens[b], self._offset[b]
      seg = doc[o:o + L]
      nxt = doc[o + 1:o + L + 1]
      tokens[b, :len(seg)] = seg
      targets[b, :len(nxt)] = nxt
      weights[b, :len(nxt)] = 1.0
      start[b] = o == 0
      self._offset[b] = o + L
      if o + L >= len(doc) - 1:  # no targets left: take the next document next step
        self._doc[b], self._offset[b], self._tokens[b] = -1, 0, None
    return {"tokens": tokens, "targets": targets, "weights": weights,
            "start_of_document": start}

  # --- position -------------------------------------------------------------------
  def _set_position(self, doc: List[int], offset: List[int], cursor: int, epoch: int):
    self._doc = [int(d) for d in doc]
    self._offset = [int(o) for o in offset]
    self._cursor = int(cursor)
    self._epoch = int(epoch)
    self._tokens: List[Optional[np.ndarray]] = [
        self._encode(d) if d >= 0 else None for d in self._doc]

  def _encode(self, index: int) -> np.ndarray:
    tokens = self.tokenizer.encode(self.documents[index])
    return tokens[:self.max_tokens] if self.max_tokens else tokens

  def get_state(self) -> dict:
    """The position after the last batch returned (JSON-serialisable)."""
    return {
        "version": STATE_VERSION,
        "doc_index": list(self._doc),
        "offset": list(self._offset),
        "cursor": self._cursor,
        "epoch": self._epoch,
        "seed": self.seed,
        "process_index": self.process_index,
        "process_count": self.process_count,
        "batch_size": self.batch_size,
        "segment_length": self.segment_length,
        "num_documents": self._num_documents,
    }

  def set_state(self, state: dict) -> None:
    """Continue from `state` (from get_state of a stream over the same documents,
    geometry and seed); the next batches are the ones that followed it."""
    state = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in state.items()}
    expected = self.get_state()
    for key in ("seed", "process_index", "process_count", "batch_size", "segment_length",
                "num_documents"):
      got = state.get(key)
      got = int(got) if key != "seed" and got is not None else got
      if got != expected[key]:
        raise ConfigError(f"data position was saved with {key}={state.get(key)!r}, but this "
                         f"stream has {key}={expected[key]!r}; they must match to resume")
    if len(state["doc_index"]) != self.rows or len(state["offset"]) != self.rows:
      raise ConfigError(f"data position has {len(state['doc_index'])} rows, stream has {self.rows}")
    self._set_position(state["doc_index"], state["offset"], state["cursor"], state["epoch"])


def restart_at_next_documents(state: dict) -> dict:
  """`state` with every row moved to the start of its next document.

  For resuming without the model's carried state (memory, XL cache): a row's
  current document would continue without its past, so it is skipped instead.
  """
  state = copy.deepcopy(state)
  state["doc_index"] = [-1] * len(state["doc_index"])
  state["offset"] = [0] * len(state["offset"])
  return state


class Prefetch:
  """Runs `iterator` (with get_state/set_state) `size` batches ahead in a thread.

  `get_state()` is the position as of the last batch this wrapper returned,
  not of the batches waiting in the queue. A deep queue (default 64 batches)
  hides the time a row spends tokenising its next document with SentencePiece
  (tens of ms for a long one); see scripts/benchmark_data.py.
  """

  def __init__(self, iterator, size: int = 64):
    if size < 1:
      raise ValueError(f"Prefetch size must be >= 1, got {size}")
    self._it = iterator
    self._size = size
    self._state = iterator.get_state()
    self._thread: Optional[threading.Thread] = None
    self._done = False

  def _start(self):
    self._queue: "queue.Queue" = queue.Queue(self._size)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._work, args=(self._queue, self._stop),
                                    name="Prefetch", daemon=True)
    self._thread.start()

  def _work(self, q: "queue.Queue", stop: threading.Event):
    while not stop.is_set():
      try:
        batch = next(self._it)
        item = ("batch", batch, self._it.get_state())
      except StopIteration:
        item = ("end", None, None)
      except BaseException as e:  # handed to the consumer, raised there
        item = ("error", e, None)
      while not stop.is_set():
        try:
          q.put(item, timeout=0.05)
          break
        except queue.Full:
          continue
      if item[0] != "batch":
        return

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    if self._done:
      raise StopIteration
    if self._thread is None:
      self._start()
    kind, batch, state = self._queue.get()
    if kind == "end":
      self._done = True
      self.close()
      raise StopIteration
    if kind == "error":
      self._done = True
      self.close()
      raise batch
    self._state = state
    return batch

  def get_state(self) -> dict:
    return copy.deepcopy(self._state)

  def set_state(self, state: dict) -> None:
    self._stop_thread()
    self._it.set_state(state)
    self._state = self._it.get_state()
    self._done = False

  def _stop_thread(self) -> bool:
    if self._thread is None:
      return False
    self._stop.set()
    self._thread.join()
    self._thread = None
    return True

  def close(self) -> None:
    """Stop the thread and rewind the wrapped iterator to the last batch
    returned, so that a later next() continues exactly from there."""
    if self._stop_thread():
      self._it.set_state(self._state)

  def __del__(self):
    try:
      self._stop_thread()
    except Exception:
      pass
