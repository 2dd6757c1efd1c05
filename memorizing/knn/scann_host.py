"""ScaNN searchers on the host, as a cache of the device ring buffer.

One searcher per (layer, mode train/eval, row, head). The device ring buffer
(memorizing.memory.MemoryState) stays the truth and the only checkpointed
state; the host keeps, per (layer, mode), a float32 mirror of the keys
[B, H, N, D] and the searchers, and per row the (pointer, count) it has seen.
A searcher's datapoint index IS the ring-buffer slot: slots are filled from 0
after a reset (appended in order) and later overwritten in place with
`upsert`, so search returns slots directly.

Per layer and step, `search` makes ONE host call (jax.pure_callback) that
  1. empties the rows with count 0 (the memory passed in is post-reset),
  2. searches every (row, head) with count > 0, in parallel threads
     (ScaNN releases the GIL),
  3. writes the segment's new keys at `append_slots(pointer, L, N)`,
so reset -> search -> insert is ordered by construction. The insert is part of
the call whose output the layer uses, so XLA cannot drop it.

Searcher policy per (row, head), with c = keys in the row:
  c < tree_min_size:  one brute-force (exact) searcher, index == slot, grown
                      and overwritten in place by `upsert`;
  c >= tree_min_size: a k-means tree of ~sqrt(c) leaves over the keys at its
                      build, exact float32 scoring of the points in the
                      `leaf_fraction` best leaves, PLUS an exact brute-force
                      "tail" over every key written since the build. Tree hits
                      on slots overwritten since the build are dropped; tree
                      and tail results are merged by score. The tree is rebuilt
                      from the mirror when the tail exceeds `tail_fraction` * c.
  Why a tail instead of upserting into the tree: a document's new keys come
  from new topics; upserted into stale centroids they scatter over leaves and
  recall falls from ~0.94 to ~0.6 within one turnover (measured on the
  synthetic streams, docs/knn.md); the newest keys are also the likeliest
  neighbours, and the tail finds them exactly.

Consistency. jax.pure_callback may run more than once with the same inputs
(e.g. rematerialisation). The host remembers a fingerprint of the inputs of its
last call (pointer, count, reset, checksums of queries and new keys) and
answers a repeat from the stored result without inserting again. Each call
also checks that the host's (pointer, count) of every non-empty row equals the
device's; if not (a restore, an elided call, another process's rows), it fails
with a message that says to call `sync(layer, train, memory)`.
"""
from __future__ import annotations

import concurrent.futures
import functools
import math
import os
import threading
import time
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from memorizing import knn
from memorizing.memory import MemoryState


class ScannBackendError(RuntimeError):
  """A failure of the ScaNN host backend; the message names the cause and fix."""


def _import_scann():
  try:
    from scann.scann_ops.py import scann_ops_pybind  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "the 'scann' kNN backend needs the ScaNN package (pip install 'scann>=1.3'; "
        "or `pip install -e .[scann]`), which could not be imported: " + str(e)) from e
  return scann_ops_pybind


class _Searcher:
  """One (row, head): a tree over the keys at its last build plus an exact tail.

  tree:  ScaNN raw searcher over slots [0, built_size) as they were at the
         build (index i = slot i), or None while the row is small;
  stale: [N] bool, slots overwritten since the build (tree hits there are dropped);
  tail:  brute-force ScaNN searcher over the keys written since the build,
         tail_slots[i] = the slot of its i-th point.
  """

  def __init__(self):
    self.tree = None
    self.leaves_to_search = -1
    self.built_size = 0
    self.stale = None
    self.num_stale = 0
    self.tail = None
    self.tail_slots = np.zeros((0,), np.int64)


class _LayerState:
  """Host cache of one (layer, mode): mirror, searchers, and per-row position."""

  def __init__(self, batch: int, heads: int, size: int, dim: int):
    self.shape = (batch, heads, size, dim)
    self.mirror = np.zeros((batch, heads, size, dim), np.float32)
    self.searchers = [[_Searcher() for _ in range(heads)] for _ in range(batch)]
    self.pointer = np.zeros((batch,), np.int64)
    self.count = np.zeros((batch,), np.int64)
    self.known = np.zeros((batch,), bool)     # host state of the row is trustworthy
    self.fingerprint = None
    self.last_output = None


class ScannBackend(knn.KNNBackend):
  """Host ScaNN kNN, one ordered host call per layer and step.

  Options (ModelConfig.knn_options):
    tree_min_size: 4096; rows holding fewer keys use exact brute force only.
    leaf_fraction: 0.2; fraction of tree leaves searched (tuned for recall 0.9,
                   docs/knn.md says how).
    min_leaves_to_search: 8.
    leaves_per_sqrt: 1.0; num_leaves = round(leaves_per_sqrt * sqrt(c)).
    tail_fraction: 0.25; rebuild the tree when the exact tail holds more than
                   this fraction of the row's keys (at most 0.5).
    training_iterations: 10 (k-means iterations per build).
    num_threads: None (os.cpu_count()); threads that run the searchers.
  Timings of the last host call are in `self.last_timing` (seconds).
  """
  name = "scann"

  def __init__(self, tree_min_size: int = 4096, leaf_fraction: float = 0.2,
               min_leaves_to_search: int = 8, leaves_per_sqrt: float = 1.0,
               tail_fraction: float = 0.25, training_iterations: int = 10,
               num_threads: Optional[int] = None):
    self._scann = _import_scann()
    if tree_min_size < 64:
      raise ValueError(f"ScannBackend tree_min_size must be >= 64, got {tree_min_size}")
    if not 0.0 < leaf_fraction <= 1.0:
      raise ValueError(f"ScannBackend leaf_fraction must be in (0, 1], got {leaf_fraction}")
    self.tree_min_size = tree_min_size
    self.leaf_fraction = leaf_fraction
    self.min_leaves_to_search = min_leaves_to_search
    self.leaves_per_sqrt = leaves_per_sqrt
    if not 0.0 < tail_fraction <= 0.5:
      raise ValueError(f"ScannBackend tail_fraction must be in (0, 0.5], got {tail_fraction}")
    self.tail_fraction = tail_fraction
    self.training_iterations = training_iterations
    self.num_threads = num_threads or os.cpu_count() or 1
    self._pool = concurrent.futures.ThreadPoolExecutor(
        self.num_threads, thread_name_prefix="scann-knn")
    self._layers: Dict[Tuple[int, bool], _LayerState] = {}
    self._lock = threading.Lock()
    self.last_timing: Dict[str, float] = {}
    self.stats = {"host_calls": 0, "repeated_calls": 0, "tree_builds": 0}

  # ------------------------------------------------------------------ searchers

  def _empty_tail(self, dim: int, k: int):
    return self._scann.builder(np.zeros((0, dim), np.float32), k,
                               "dot_product").score_brute_force().build().searcher

  def _build(self, s: _Searcher, keys: np.ndarray, size: int, k: int) -> None:
    """(Re)builds `s` over keys [c, D] of slots [0, c) of a memory of `size` slots."""
    c, d = keys.shape
    keys = np.ascontiguousarray(keys, np.float32)
    s.stale = np.zeros((size,), bool)
    s.num_stale = 0
    if c < self.tree_min_size:                  # small: everything in the exact tail
      s.tree, s.built_size, s.leaves_to_search = None, 0, -1
      builder = self._scann.builder(keys, k, "dot_product").score_brute_force()
      builder.set_n_training_threads(1)
      s.tail = builder.build().searcher
      s.tail_slots = np.arange(c, dtype=np.int64)
      return
    leaves = max(8, int(round(self.leaves_per_sqrt * math.sqrt(c))))
    search = min(leaves, max(self.min_leaves_to_search,
                             int(math.ceil(self.leaf_fraction * leaves))))
    builder = (self._scann.builder(keys, k, "dot_product")
               .tree(leaves, search, training_sample_size=c,
                     training_iterations=self.training_iterations)
               .score_brute_force())
    builder.set_n_training_threads(1)
    s.tree, s.built_size, s.leaves_to_search = builder.build().searcher, c, search
    s.tail = self._empty_tail(d, k)
    s.tail_slots = np.zeros((0,), np.int64)
    self.stats["tree_builds"] += 1

  def _search_one(self, s: _Searcher, queries: np.ndarray, k: int, count: int):
    """queries [Q, D] -> (slots int32 [Q, k], valid bool [Q, k])."""
    q = queries.shape[0]
    parts_i, parts_s = [], []
    if s.tree is not None:
      want = k if s.num_stale == 0 else 2 * k
      idx, dist = s.tree.search_batched(queries, want, -1, s.leaves_to_search, False, 0)
      idx = np.asarray(idx, np.int64)
      dist = np.asarray(dist, np.float32)
      ok = ~np.isnan(dist) & (idx < s.built_size)
      ok &= ~s.stale[np.where(ok, idx, 0)]
      parts_i.append(np.where(ok, idx, 0))
      parts_s.append(np.where(ok, dist, -np.inf))
    if len(s.tail_slots):
      idx, dist = s.tail.search_batched(queries, k, -1, -1, False, 0)
      idx = np.asarray(idx, np.int64)
      dist = np.asarray(dist, np.float32)
      ok = ~np.isnan(dist) & (idx < len(s.tail_slots))
      parts_i.append(np.where(ok, s.tail_slots[np.where(ok, idx, 0)], 0))
      parts_s.append(np.where(ok, dist, -np.inf))
    out_i = np.zeros((q, k), np.int32)
    out_v = np.zeros((q, k), bool)
    if not parts_i:
      return out_i, out_v
    idx = np.concatenate(parts_i, axis=1)
    score = np.concatenate(parts_s, axis=1)
    if idx.shape[1] < k:
      pad = k - idx.shape[1]
      idx = np.pad(idx, ((0, 0), (0, pad)))
      score = np.pad(score, ((0, 0), (0, pad)), constant_values=-np.inf)
    order = np.argsort(-score, axis=1, kind="stable")[:, :k]
    idx = np.take_along_axis(idx, order, axis=1)
    score = np.take_along_axis(score, order, axis=1)
    valid = np.isfinite(score) & (idx >= 0) & (idx < count)
    out_i[:] = np.where(valid, idx, 0)
    out_v[:] = valid
    return out_i, out_v

  def _insert_one(self, st: _LayerState, b: int, h: int, slots: np.ndarray,
                  new: np.ndarray, new_count: int, k: int) -> None:
    """Writes new [m, D] at `slots` [m] of (b, h): mirror, then tail or rebuild."""
    n = st.shape[2]
    st.mirror[b, h, slots] = new
    s = st.searchers[b][h]
    tail_after = len(s.tail_slots) + len(slots) if s.tail is not None else None
    if (s.tail is None                                                   # empty row
        or (s.tree is None and new_count >= self.tree_min_size)          # grew big enough
        or (s.tree is not None and tail_after > self.tail_fraction * new_count)):
      self._build(s, st.mirror[b, h, :new_count], n, k)
      return
    if s.tree is None:
      # Brute-force phase: tail index == slot; overwrite in place, append in order.
      size = len(s.tail_slots)
      ids = [int(x) if x < size else None for x in slots]
      order = ([i for i, x in enumerate(ids) if x is not None]
               + sorted((i for i, x in enumerate(ids) if x is None), key=lambda i: slots[i]))
      appended = sorted(int(x) for x in slots if x >= size)
      if appended != list(range(size, size + len(appended))):
        raise ScannBackendError(f"ScannBackend: slots {appended[:4]}... do not follow "
                                f"the {size} filled ones of row {b}")
      s.tail.upsert([ids[i] for i in order], np.ascontiguousarray(new[order], np.float32),
                    len(order))
      s.tail_slots = np.arange(size + len(appended), dtype=np.int64)
      return
    s.tail.upsert([None] * len(slots), np.ascontiguousarray(new, np.float32), len(slots))
    s.tail_slots = np.concatenate([s.tail_slots, slots.astype(np.int64)])
    if True:
      hit = slots[slots < s.built_size]
      s.num_stale += int((~s.stale[hit]).sum())
      s.stale[hit] = True

  # ------------------------------------------------------------------ host call

  def _host_step(self, layer: int, train: bool, k: int, shape, queries, reset, new_keys,
                 pointer, count):
    """The host side of `search`: reset, search, insert. Returns (idx, valid)."""
    try:
      with self._lock:
        return self._host_step_locked(layer, train, k, shape, np.asarray(queries), np.asarray(reset),
                                      np.asarray(new_keys), np.asarray(pointer),
                                      np.asarray(count))
    except ScannBackendError:
      raise
    except Exception as e:  # surface a clear error, never a hang
      raise ScannBackendError(
          f"ScannBackend host call failed (layer {layer}, "
          f"{'train' if train else 'eval'}): {type(e).__name__}: {e}") from e

  def _host_step_locked(self, layer, train, k, shape, queries, reset, new_keys, pointer, count):
    b, h, q, d = queries.shape
    seg = new_keys.shape[2]
    st = self._layers.get((layer, train))
    if st is None or st.shape != tuple(shape):
      st = self._layers[(layer, train)] = _LayerState(*shape)
    n = st.shape[2]
    fingerprint = (k, queries.shape, new_keys.shape, pointer.tobytes(), count.tobytes(),
                   reset.tobytes(), float(queries.reshape(-1)[::61].sum(dtype=np.float64)),
                   float(new_keys.reshape(-1)[::61].sum(dtype=np.float64)))
    self.stats["host_calls"] += 1
    if st is not None and st.fingerprint == fingerprint:
      self.stats["repeated_calls"] += 1
      return st.last_output
    t0 = time.perf_counter()

    # 1. reset: rows with count 0 are empty, whatever the host held.
    for row in range(b):
      if count[row] == 0:
        st.searchers[row] = [_Searcher() for _ in range(h)]
        st.pointer[row], st.count[row], st.known[row] = 0, 0, True
      elif not st.known[row] or st.pointer[row] != pointer[row] or st.count[row] != count[row]:
        raise ScannBackendError(
            f"ScannBackend: host index of layer {layer} "
            f"({'train' if train else 'eval'}) row {row} holds pointer/count "
            f"{int(st.pointer[row])}/{int(st.count[row])}"
            f"{'' if st.known[row] else ' (never synced)'}, but the device memory has "
            f"{int(pointer[row])}/{int(count[row])}. After restoring a checkpoint or "
            f"changing the memory outside the model, call "
            f"backend.sync(layer={layer}, train={train}, memory=...).")

    # 2. search every non-empty (row, head) in parallel.
    idx = np.zeros((b, h, q, k), np.int32)
    valid = np.zeros((b, h, q, k), bool)
    jobs = {}
    for row in range(b):
      if count[row] > 0:
        for head in range(h):
          jobs[(row, head)] = self._pool.submit(
              self._search_one, st.searchers[row][head],
              np.ascontiguousarray(queries[row, head], np.float32), k, int(count[row]))
    for (row, head), fut in jobs.items():
      idx[row, head], valid[row, head] = fut.result()
    t1 = time.perf_counter()

    # 3. insert the segment's keys at the ring-buffer slots.
    m = min(seg, n)
    new_pointer = (pointer.astype(np.int64) + m) % n
    new_count = np.minimum(count.astype(np.int64) + m, n)
    jobs = []
    for row in range(b):
      slots = (int(pointer[row]) + np.arange(m)) % n
      for head in range(h):
        jobs.append(self._pool.submit(
            self._insert_one, st, row, head, slots,
            np.ascontiguousarray(new_keys[row, head, seg - m:], np.float32),
            int(new_count[row]), k))
    for fut in jobs:
      fut.result()
    st.pointer[:], st.count[:] = new_pointer, new_count
    st.known[:] = True
    t2 = time.perf_counter()

    st.fingerprint = fingerprint
    st.last_output = (idx, valid)
    self.last_timing = {"search_s": t1 - t0, "insert_s": t2 - t1, "total_s": t2 - t0}
    return idx, valid

  # ------------------------------------------------------------------ interface

  def _layer_state(self, layer: int, train: bool, shape) -> _LayerState:
    key = (layer, bool(train))
    with self._lock:
      st = self._layers.get(key)
      if st is None or st.shape != tuple(shape):
        st = _LayerState(*shape)
        self._layers[key] = st
    return st

  def search(self, queries, memory: MemoryState, k: int, context: knn.SearchContext):
    """queries [B,H,Q,D] -> (indices int32 [B,H,Q,k], valid bool [B,H,Q,k]).

    Also inserts context.new_keys [B,H,L,D] at append_slots(memory.pointer, L, N)
    on the host, after the search (memory is post-reset, pre-append).
    """
    if context is None:
      raise ScannBackendError("ScannBackend.search needs a SearchContext (layer, train, reset, new_keys)")
    b, h, q, d = queries.shape
    out_shapes = (jax.ShapeDtypeStruct((b, h, q, k), jnp.int32),
                  jax.ShapeDtypeStruct((b, h, q, k), jnp.bool_))
    host = functools.partial(self._host_step, int(context.layer), bool(context.train), int(k),
                             tuple(memory.keys.shape))
    sg = jax.lax.stop_gradient
    idx, valid = jax.pure_callback(
        host, out_shapes,
        sg(queries).astype(jnp.float32), sg(context.reset).astype(bool),
        sg(context.new_keys).astype(jnp.float32),
        sg(memory.pointer).astype(jnp.int32), sg(memory.count).astype(jnp.int32),
        vmap_method="sequential")
    return idx, valid

  def sync(self, layer: int, train: bool, memory: MemoryState) -> None:
    """Rebuilds the (layer, mode) searchers from the device ring buffer."""
    keys = np.asarray(jax.device_get(memory.keys), np.float32)
    pointer = np.asarray(jax.device_get(memory.pointer))
    count = np.asarray(jax.device_get(memory.count))
    st = self._layer_state(layer, train, keys.shape)
    with self._lock:
      b, h = keys.shape[:2]
      st.mirror[...] = keys
      st.searchers = [[_Searcher() for _ in range(h)] for _ in range(b)]
      jobs = [self._pool.submit(self._build, st.searchers[row][head],
                                st.mirror[row, head, :int(count[row])], keys.shape[2], 32)
              for row in range(b) if count[row] > 0 for head in range(h)]
      for fut in jobs:
        fut.result()
      st.pointer[:], st.count[:] = pointer, count
      st.known[:] = True
      st.fingerprint, st.last_output = None, None

  def clear(self) -> None:
    """Drops every host index (all layers and modes)."""
    with self._lock:
      self._layers.clear()
