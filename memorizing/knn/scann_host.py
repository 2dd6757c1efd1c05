"""ScaNN searchers on the host, as a cache of the device ring buffer.

One searcher per (layer, mode train/eval, row, head). The device ring buffer
(memorizing.memory.MemoryState) stays the truth and the only checkpointed
state; the host keeps, per (layer, mode) and per GLOBAL row index, a float32
mirror of that row's keys [H, N, D], its searchers and the (pointer, count) it
has seen.
A searcher's datapoint index IS the ring-buffer slot: slots are filled from 0
after a reset (appended in order) and later overwritten in place with
`upsert`, so search returns slots directly.

Per layer and step, `search` makes ONE host call (jax.experimental.io_callback:
it changes host state, which jax.pure_callback must not) that
  1. empties the rows with count 0 (the memory passed in is post-reset),
  2. searches every (row, head) with count > 0, in parallel threads
     (ScaNN releases the GIL),
  3. writes the segment's new keys at `append_slots(pointer, L, N)`,
so reset -> search -> insert is ordered by construction. The insert is part of
the call whose output the layer uses, so XLA cannot drop it.

Order between calls. The callback is `ordered=False`: jax refuses ordered
effects inside shard_map and vmap, where the per-device calls below run. The
order of the calls is enforced by data dependence instead: the call of a layer
at step t+1 takes that layer's memory (pointer, count) as produced by step t,
so it cannot run before step t's program (including its callback) has
finished, and one layer makes one call per step. The host also checks that
its (pointer, count) of every row matches the device's and fails loudly if a
call was skipped or reordered (see Consistency).

Sharding. Under plain jit a host callback runs once, on one device, with the
whole (gathered) batch. So when the caller declares a mesh with axis
`row_axis` ("data", the trainer's mesh, memorizing.training.train.make_mesh; declared
with memorizing.knn.mesh_context around the traced step), the host call is wrapped in
`shard_map` over it (per_device_rows): each device calls the host with
only its own rows, plus their global row indices, and each process keeps
searchers for its own rows only. Inside a caller's own `shard_map` (all mesh
axes manual) the call is already per device; the global row index is then
(linear device index over the manual axes) * local rows + i, i.e. the batch
is assumed split over the manual axes in mesh order.

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

Consistency. A host call may be repeated with the same inputs (e.g. a
rematerialised or retried program). The host remembers a fingerprint of the inputs of its
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
from jax.experimental import io_callback

from memorizing.errors import ConfigError
from memorizing.knn_api import KNNBackend, SearchContext
from memorizing.model.sharding import per_device_rows
from memorizing.model.memory import MemoryState


class ScannBackendError(RuntimeError):
  """A failure of the ScaNN host backend; the message names the cause and fix."""


def _import_scann():
  # Imported when a ScannBackend is built: ScaNN is an optional dependency.
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


class _RowState:
  """Host cache of one row of one (layer, mode): mirror, searchers, position."""

  def __init__(self, heads: int, size: int, dim: int):
    self.mirror = np.zeros((heads, size, dim), np.float32)
    self.searchers = [_Searcher() for _ in range(heads)]
    self.pointer = 0
    self.count = 0


class _LayerState:
  """Host cache of one (layer, mode): the rows this process serves, by global index."""

  def __init__(self, heads: int, size: int, dim: int):
    self.shape = (heads, size, dim)
    self.rows: Dict[int, _RowState] = {}
    # Per set of rows served by one call (one device's shard): the fingerprint
    # of its last call's inputs and that call's output, and a lock.
    self.last: Dict[Tuple[int, ...], Tuple[tuple, tuple]] = {}
    self.locks: Dict[Tuple[int, ...], threading.Lock] = {}


class ScannBackend(KNNBackend):
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
    shard_rows:  "auto"; with a declared mesh (see Sharding above), one host
                 call per device with its own rows when the batch divides
                 evenly; "off": one call with the whole batch on one device
                 (single-process only).
    row_axis:    "data"; the mesh axis name of the rows.
  Timings of the last host call are in `self.last_timing` (seconds); `self.stats`
  counts host calls, repeated calls and tree builds, and sums the seconds of the
  calls that ran (host_s = search_s + insert_s + the reset's bookkeeping).
  """
  name = "scann"

  def __init__(self, tree_min_size: int = 4096, leaf_fraction: float = 0.2,
               min_leaves_to_search: int = 8, leaves_per_sqrt: float = 1.0,
               tail_fraction: float = 0.25, training_iterations: int = 10,
               num_threads: Optional[int] = None, shard_rows: str = "auto",
               row_axis: str = "data"):
    self._scann = _import_scann()
    if shard_rows not in ("auto", "off"):
      raise ConfigError(f"ScannBackend shard_rows={shard_rows!r}; choose auto or off")
    self.shard_rows = shard_rows
    self.row_axis = row_axis
    if tree_min_size < 64:
      raise ConfigError(f"ScannBackend tree_min_size must be >= 64, got {tree_min_size}")
    if not 0.0 < leaf_fraction <= 1.0:
      raise ConfigError(f"ScannBackend leaf_fraction must be in (0, 1], got {leaf_fraction}")
    self.tree_min_size = tree_min_size
    self.leaf_fraction = leaf_fraction
    self.min_leaves_to_search = min_leaves_to_search
    self.leaves_per_sqrt = leaves_per_sqrt
    if not 0.0 < tail_fraction <= 0.5:
      raise ConfigError(f"ScannBackend tail_fraction must be in (0, 0.5], got {tail_fraction}")
    self.tail_fraction = tail_fraction
    self.training_iterations = training_iterations
    self.num_threads = num_threads or os.cpu_count() or 1
    self._pool = concurrent.futures.ThreadPoolExecutor(
        self.num_threads, thread_name_prefix="scann-knn")
    self._layers: Dict[Tuple[int, bool], _LayerState] = {}
    self._lock = threading.Lock()
    self.last_timing: Dict[str, float] = {}
    self.stats = {"host_calls": 0, "repeated_calls": 0, "tree_builds": 0,
                  "host_s": 0.0, "search_s": 0.0, "insert_s": 0.0}

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
    with self._lock:
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

  def _insert_one(self, r: _RowState, h: int, slots: np.ndarray, new: np.ndarray,
                  new_count: int, k: int) -> None:
    """Writes new [m, D] at `slots` [m] of head h of row r: mirror, then tail or rebuild."""
    n = r.mirror.shape[1]
    r.mirror[h, slots] = new
    s = r.searchers[h]
    tail_after = len(s.tail_slots) + len(slots) if s.tail is not None else None
    if (s.tail is None                                                   # empty row
        or (s.tree is None and new_count >= self.tree_min_size)          # grew big enough
        or (s.tree is not None and tail_after > self.tail_fraction * new_count)):
      self._build(s, r.mirror[h, :new_count], n, k)
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
                                f"the {size} filled ones of a row")
      s.tail.upsert([ids[i] for i in order], np.ascontiguousarray(new[order], np.float32),
                    len(order))
      s.tail_slots = np.arange(size + len(appended), dtype=np.int64)
      return
    s.tail.upsert([None] * len(slots), np.ascontiguousarray(new, np.float32), len(slots))
    s.tail_slots = np.concatenate([s.tail_slots, slots.astype(np.int64)])
    hit = slots[slots < s.built_size]
    s.num_stale += int((~s.stale[hit]).sum())
    s.stale[hit] = True

  # ------------------------------------------------------------------ host call

  def _host_step(self, layer: int, train: bool, k: int, shape, rows, queries, reset,
                 new_keys, pointer, count):
    """The host side of `search` for the rows `rows` (global indices): reset,
    search, insert. Returns (idx, valid) for those rows."""
    try:
      rows = tuple(int(x) for x in np.asarray(rows))
      st = self._layer_state(layer, train, shape)
      with self._lock:
        lock = st.locks.setdefault(rows, threading.Lock())
      with lock:     # calls for other rows (other devices) run concurrently
        return self._host_step_locked(st, layer, train, k, rows, np.asarray(queries),
                                      np.asarray(reset), np.asarray(new_keys),
                                      np.asarray(pointer), np.asarray(count))
    except ScannBackendError:
      raise
    except Exception as e:  # surface a clear error, never a hang
      raise ScannBackendError(
          f"ScannBackend host call failed (layer {layer}, "
          f"{'train' if train else 'eval'}): {type(e).__name__}: {e}") from e

  def _host_step_locked(self, st, layer, train, k, rows, queries, reset, new_keys, pointer,
                        count):
    b, h, q, d = queries.shape
    seg = new_keys.shape[2]
    n = st.shape[1]
    fingerprint = (k, queries.shape, new_keys.shape, pointer.tobytes(), count.tobytes(),
                   reset.tobytes(), float(queries.reshape(-1)[::61].sum(dtype=np.float64)),
                   float(new_keys.reshape(-1)[::61].sum(dtype=np.float64)))
    last = st.last.get(rows)
    with self._lock:
      self.stats["host_calls"] += 1
      if last is not None and last[0] == fingerprint:
        self.stats["repeated_calls"] += 1
        return last[1]
    t0 = time.perf_counter()

    # 1. reset: rows with count 0 are empty, whatever the host held.
    states = []
    for i, row in enumerate(rows):
      r = st.rows.get(row)
      if count[i] == 0:
        r = st.rows[row] = _RowState(*st.shape)
      elif r is None or r.pointer != pointer[i] or r.count != count[i]:
        raise ScannBackendError(
            f"ScannBackend: host index of layer {layer} "
            f"({'train' if train else 'eval'}) row {row} holds pointer/count "
            + ("nothing (never synced)" if r is None else f"{r.pointer}/{r.count}")
            + f", but the device memory has {int(pointer[i])}/{int(count[i])}. After "
            f"restoring a checkpoint or changing the memory outside the model, call "
            f"backend.sync(layer={layer}, train={train}, memory=...).")
      states.append(r)

    # 2. search every non-empty (row, head) in parallel.
    idx = np.zeros((b, h, q, k), np.int32)
    valid = np.zeros((b, h, q, k), bool)
    jobs = {}
    for i, r in enumerate(states):
      if count[i] > 0:
        for head in range(h):
          jobs[(i, head)] = self._pool.submit(
              self._search_one, r.searchers[head],
              np.ascontiguousarray(queries[i, head], np.float32), k, int(count[i]))
    for (i, head), fut in jobs.items():
      idx[i, head], valid[i, head] = fut.result()
    t1 = time.perf_counter()

    # 3. insert the segment's keys at the ring-buffer slots.
    m = min(seg, n)
    new_pointer = (pointer.astype(np.int64) + m) % n
    new_count = np.minimum(count.astype(np.int64) + m, n)
    jobs = []
    for i, r in enumerate(states if m > 0 else ()):   # a search with no new keys inserts nothing
      slots = (int(pointer[i]) + np.arange(m)) % n
      for head in range(h):
        jobs.append(self._pool.submit(
            self._insert_one, r, head, slots,
            np.ascontiguousarray(new_keys[i, head, seg - m:], np.float32),
            int(new_count[i]), k))
    for fut in jobs:
      fut.result()
    for i, r in enumerate(states):
      r.pointer, r.count = int(new_pointer[i]), int(new_count[i])
    t2 = time.perf_counter()

    st.last[rows] = (fingerprint, (idx, valid))
    self.last_timing = {"search_s": t1 - t0, "insert_s": t2 - t1, "total_s": t2 - t0,
                        "rows": len(rows)}
    with self._lock:
      for key, seconds in (("host_s", t2 - t0), ("search_s", t1 - t0), ("insert_s", t2 - t1)):
        self.stats[key] += seconds
    return idx, valid

  # ------------------------------------------------------------------ interface

  def _layer_state(self, layer: int, train: bool, shape) -> _LayerState:
    """The (layer, mode) cache for rows of shape (heads, size, dim); a new one if
    the shape changed."""
    key = (layer, bool(train))
    with self._lock:
      st = self._layers.get(key)
      if st is None or st.shape != tuple(shape):
        st = _LayerState(*shape)
        self._layers[key] = st
    return st

  def row_state(self, layer: int, train: bool, row: int) -> _RowState:
    """The host cache of one global row (tests and tools)."""
    return self._layers[(layer, bool(train))].rows[row]

  def search(self, queries, memory: MemoryState, k: int, context: SearchContext):
    """queries [B,H,Q,D] -> (indices int32 [B,H,Q,k], valid bool [B,H,Q,k]).

    Also inserts context.new_keys [B,H,L,D] at append_slots(memory.pointer, L, N)
    on the host, after the search (memory is post-reset, pre-append).
    """
    if context is None:
      raise ScannBackendError("ScannBackend.search needs a SearchContext (layer, train, reset, new_keys)")
    sg = jax.lax.stop_gradient
    args = (sg(queries).astype(jnp.float32), sg(context.reset).astype(bool),
            sg(context.new_keys).astype(jnp.float32),
            sg(memory.pointer).astype(jnp.int32), sg(memory.count).astype(jnp.int32))
    shape = tuple(memory.keys.shape[1:])
    host = functools.partial(self._host_step, int(context.layer), bool(context.train), int(k),
                             shape)

    def call(row0, *local):
      b, h, q, _ = local[0].shape
      rows = row0 + jnp.arange(b, dtype=jnp.int32)
      out_shapes = (jax.ShapeDtypeStruct((b, h, q, k), jnp.int32),
                    jax.ShapeDtypeStruct((b, h, q, k), jnp.bool_))
      # Unordered (see "Order between calls" above): ordered effects are refused
      # under shard_map/vmap; data dependence orders the calls.
      return io_callback(host, out_shapes, rows, *local, ordered=False)

    return per_device_rows(call, args, 2, self.row_axis, self.shard_rows == "auto")

  def sync(self, layer: int, train: bool, memory: MemoryState) -> None:
    """Rebuilds the (layer, mode) searchers of this process's rows from the device
    ring buffer (the rows of `memory` held by this process's devices)."""
    keys = _local_rows(memory.keys)
    pointer = _local_rows(memory.pointer)
    count = _local_rows(memory.count)
    shape = next(iter(keys.values())).shape if keys else None
    if shape is None:
      return
    st = self._layer_state(layer, train, shape)
    with self._lock:
      st.rows.clear()
      st.last.clear()
      for row, kr in keys.items():
        r = st.rows[row] = _RowState(*shape)
        r.mirror[...] = kr
        r.pointer, r.count = int(pointer[row]), int(count[row])
    jobs = [self._pool.submit(self._build, r.searchers[head], r.mirror[head, :r.count],
                              shape[1], 32)
            for r in st.rows.values() if r.count > 0 for head in range(shape[0])]
    for fut in jobs:
      fut.result()

  def clear(self) -> None:
    """Drops every host index (all layers and modes)."""
    with self._lock:
      self._layers.clear()

  def close(self) -> None:
    """Drops the host indices and stops the search threads."""
    self.clear()
    self._pool.shutdown(wait=True)


def _local_rows(x) -> Dict[int, np.ndarray]:
  """{global row: that row of x} for the rows this process holds.

  x: a numpy array (all rows) or a jax.Array, possibly sharded over rows and
  over processes (then only the rows of this process's devices are read).
  """
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    data = np.asarray(jax.device_get(x))
    return {i: data[i] for i in range(data.shape[0])}
  out = {}
  for shard in x.addressable_shards:
    first = shard.index[0] if shard.index else slice(None)
    start = first.start or 0
    data = np.asarray(shard.data)
    for i in range(data.shape[0]):
      out.setdefault(start + i, data[i])
  return out
