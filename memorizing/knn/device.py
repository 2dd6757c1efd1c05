"""On-device approximate top-k by strided buckets.

The memory of one (row, head) has N slots. Slot n belongs to bucket n % S
("strided": neighbouring slots, which hold neighbouring positions of a
document and so tend to be alike, land in different buckets). For every query
we keep the best score of each bucket and its slot, then take the top k of
those S bucket maxima. A true neighbour is lost only when a better true
neighbour shares its bucket; with the k true neighbours spread at random over
S buckets the expected recall is about

    recall ~= 1 - (k - 1) / (2 S)          (k = 32: S = 128 -> 0.88, 256 -> 0.94)

so `num_buckets` defaults to the smallest power of two meeting
`recall_target` by that formula. Keys with positional locality do better than
the formula (neighbours are spread over buckets more evenly than at random).

Two implementations of the same computation:
  "xla":    score matmul [B,H,Qc,N], masked, reshaped to [.., N/S, S], max and
            argmax over N/S, then top_k over S. Queries go in chunks of Qc so
            the score block stays under `max_score_elements`.
  "pallas": a fused Pallas (Triton) kernel for GPUs that walks the memory in
            blocks of S keys and keeps the running max/argmax per bucket in
            registers, so the [Q, N] score matrix is never written to memory.
  "auto":   "pallas" on GPU (when the shapes suit it), approx_max_k on TPU,
            "xla" elsewhere.

Retrieval is not differentiable: the result is computed on stop_gradient'ed
inputs and only integer indices leave this module.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from memorizing import knn
from memorizing.memory import MemoryState

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def buckets_for_recall(k: int, recall_target: float) -> int:
  """Smallest power of two S >= k with 1 - (k-1)/(2S) >= recall_target."""
  if not 0.0 < recall_target < 1.0:
    raise ValueError(f"DeviceBackend recall_target must be in (0, 1), got {recall_target}")
  need = (k - 1) / (2.0 * (1.0 - recall_target))
  s = max(k, 16)
  while s < need:
    s *= 2
  return s


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def top_k(x: jax.Array, k: int, impl: str = "sort") -> Tuple[jax.Array, jax.Array]:
  """(values, indices) of the k largest entries of the last axis, like lax.top_k.

  impl "sort": a stable descending sort of (value, index) pairs, then the first
  k. Unlike lax.top_k (the HLO TopK op, which the SPMD partitioner all-gathers
  over the batch dimensions, seen with jax 0.10 on CPU), a sort partitions
  along its other axes, so rows sharded over devices stay on their device.
  impl "lax": lax.top_k. Ties: the lower index first in both.
  """
  if impl == "lax":
    return jax.lax.top_k(x, k)
  axis = x.ndim - 1
  idx = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis)
  flip = jnp.bitwise_not if jnp.issubdtype(x.dtype, jnp.integer) else jnp.negative
  v, i = jax.lax.sort((flip(x), idx), dimension=axis, num_keys=1, is_stable=True)
  return flip(v[..., :k]), i[..., :k]


def _top_k_padded(scores: jax.Array, k: int, impl: str = "sort") -> Tuple[jax.Array, jax.Array]:
  """top_k over the last axis that also works when it is shorter than k.

  scores [..., n] float32 (-inf marks invalid). Returns (values, indices) [..., k].
  """
  n = scores.shape[-1]
  if n < k:
    pad = [(0, 0)] * (scores.ndim - 1) + [(0, k - n)]
    scores = jnp.pad(scores, pad, constant_values=-jnp.inf)
  return top_k(scores, k, impl)


def _slot_bias(count: jax.Array, n_pad: int) -> jax.Array:
  """[B, n_pad] float32: 0 for valid slots [0, count), -inf otherwise."""
  valid = jnp.arange(n_pad)[None, :] < count[:, None]
  return jnp.where(valid, 0.0, -jnp.inf).astype(jnp.float32)


# --------------------------------------------------------------------------
# XLA implementation


def _buckets_xla(queries, keys, count, num_buckets, k, score_dtype, max_score_elements,
                 top_k_impl="sort"):
  """queries [B,H,Q,D], keys [B,H,N,D] -> (values [B,H,Q,k] f32, slots [B,H,Q,k])."""
  b, h, q, d = queries.shape
  n = keys.shape[2]
  s = num_buckets
  n_pad = _round_up(n, s)
  bias = _slot_bias(count, n_pad)                                  # [B, n_pad]
  if n_pad != n:
    keys = jnp.pad(keys, ((0, 0), (0, 0), (0, n_pad - n), (0, 0)))

  def one_chunk(qc):                                              # [B,H,c,D]
    scores = jnp.einsum("bhqd,bhnd->bhqn", qc, keys,
                        preferred_element_type=score_dtype)
    scores = scores.astype(jnp.float32) + bias[:, None, None, :]
    c = qc.shape[2]
    blocks = scores.reshape(b, h, c, n_pad // s, s)                # slot = j*S + bucket
    arg = jnp.argmax(blocks, axis=3)                                # [B,H,c,S]
    best = jnp.max(blocks, axis=3)
    vals, bucket = top_k(best, min(k, s), top_k_impl)
    slots = jnp.take_along_axis(arg, bucket, axis=-1) * s + bucket
    return vals, slots.astype(jnp.int32)

  chunk = max(1, min(q, max_score_elements // max(1, b * h * n_pad)))
  while q % chunk:
    chunk -= 1
  if chunk == q:
    return one_chunk(queries)
  qs = queries.reshape(b, h, q // chunk, chunk, d).transpose(2, 0, 1, 3, 4)
  vals, slots = jax.lax.map(one_chunk, qs)                          # [q/c,B,H,c,k]
  merge = lambda x: x.transpose(1, 2, 0, 3, 4).reshape(b, h, q, x.shape[-1])
  return merge(vals), merge(slots)


# --------------------------------------------------------------------------
# Fused Pallas (Triton) implementation for GPUs


_OFFSET = 2.0   # packed="offset": scores are stored as the int32 bits of (score + 2)


def _bucket_kernel(q_ref, k_ref, bias_ref, *out_refs, num_blocks, block_k, chunk, mode,
                   index_bits):
  """One program: `block_q` queries of one (row, head) against all its keys.

  q_ref [block_q, D], k_ref [n_pad, D], bias_ref [n_pad]. The memory is walked
  in blocks of S = block_k keys; bucket c of block j is slot j*S + c. Each
  block's [block_q, S] scores are computed in column chunks of `chunk`
  (a power of two; S need not be one), each with its own running state.
  mode "pair":     out_refs = (max [block_q, S] f32, arg [block_q, S] int32 =
                   the block number j of the max): compare + 2 selects per score.
  mode "sortable": out_refs = (key [block_q, S] int32,): per bucket the max of
                   (order-preserving int32 of the score, low `index_bits` bits
                   replaced by j): one integer max per score, any float.
  mode "offset":   like "sortable" with the int32 bits of (score + 2) instead:
                   positive floats order like their bits, so a score costs one
                   add (the bias array holds 2 or -inf), one and/or, one
                   integer max; exact order for scores > -2 (unit-norm queries
                   and keys have scores in [-1, 1]); invalid slots come out negative.
  """
  from jax.experimental import pallas as pl
  q = q_ref[...]
  block_q = q.shape[0]
  parts = block_k // chunk

  def scores(j, c):
    start = pl.multiple_of(j * block_k + c * chunk, chunk)
    kb = k_ref[pl.ds(start, chunk), :]                              # [chunk, D]
    sc = jax.lax.dot_general(q, kb, (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)    # [block_q, chunk]
    return sc + bias_ref[pl.ds(start, chunk)][None, :]

  if mode == "pair":
    def body(j, carry):
      out = []
      for c in range(parts):
        best, arg = carry[c]
        sc = scores(j, c)
        better = sc > best
        out.append((jnp.where(better, sc, best), jnp.where(better, j, arg)))
      return tuple(out)
    init = tuple((jnp.full((block_q, chunk), -jnp.inf, jnp.float32),
                  jnp.zeros((block_q, chunk), jnp.int32)) for _ in range(parts))
    state = jax.lax.fori_loop(0, num_blocks, body, init)
    max_ref, arg_ref = out_refs
    for c in range(parts):
      max_ref[:, pl.ds(c * chunk, chunk)] = state[c][0]
      arg_ref[:, pl.ds(c * chunk, chunk)] = state[c][1]
    return

  if mode == "max":              # benchmark floor only: bucket maxima, no slot
    def body(j, carry):
      return tuple(jnp.maximum(carry[c], scores(j, c)) for c in range(parts))
    init = tuple(jnp.full((block_q, chunk), -jnp.inf, jnp.float32) for _ in range(parts))
    state = jax.lax.fori_loop(0, num_blocks, body, init)
    (max_ref,) = out_refs
    for c in range(parts):
      max_ref[:, pl.ds(c * chunk, chunk)] = state[c]
    return

  keep = jnp.int32(~((1 << index_bits) - 1))

  def body(j, carry):
    out = []
    for c in range(parts):
      sc = scores(j, c)
      key = (_sortable_int(sc) if mode == "sortable"
             else jax.lax.bitcast_convert_type(sc, jnp.int32))
      out.append(jnp.maximum(carry[c], (key & keep) | j))
    return tuple(out)
  init = tuple(jnp.full((block_q, chunk), jnp.iinfo(jnp.int32).min, jnp.int32)
               for _ in range(parts))
  state = jax.lax.fori_loop(0, num_blocks, body, init)
  (key_ref,) = out_refs
  for c in range(parts):
    key_ref[:, pl.ds(c * chunk, chunk)] = state[c]


def _sortable_int(x: jax.Array) -> jax.Array:
  """float32 -> int32 with the same order (and back: it is its own inverse)."""
  bits = jax.lax.bitcast_convert_type(x, jnp.int32)
  return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _unsortable(key: jax.Array) -> jax.Array:
  bits = jnp.where(key < 0, key ^ jnp.int32(0x7FFFFFFF), key)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def pallas_chunk(num_buckets: int, chunk: Optional[int] = None) -> int:
  """Column chunk of the Pallas kernel: `chunk` if given, else the largest power
  of two <= 128 dividing S."""
  if chunk:
    if num_buckets % chunk or chunk & (chunk - 1):
      raise ValueError(f"DeviceBackend chunk={chunk} must be a power of two dividing "
                       f"num_buckets={num_buckets}")
    return chunk
  c = 128
  while c > 1 and num_buckets % c:
    c //= 2
  return c


def _packed_mode(packed) -> str:
  if packed in (False, None, "pair"):
    return "pair"
  if packed in (True, "sortable"):
    return "sortable"
  if packed == "offset":
    return "offset"
  raise ValueError(f"DeviceBackend packed={packed!r}; choose False, True (sortable) or 'offset'")


def _buckets_pallas(queries, keys, count, num_buckets, k, compute_dtype, block_q,
                    num_warps, num_stages, interpret, packed=False, top_k_impl="sort",
                    grid_order="queries", chunk=None):
  """Same contract as _buckets_xla, fused; S must be a multiple of 16."""
  from jax.experimental import pallas as pl
  b, h, q, d = queries.shape
  n = keys.shape[2]
  s = num_buckets
  chunk = pallas_chunk(s, chunk)
  if chunk < 16:
    raise ValueError(f"DeviceBackend pallas needs num_buckets a multiple of 16, got {s}")
  mode = "max" if packed == "max" else _packed_mode(packed)
  n_pad = _round_up(n, s)
  q_pad = _round_up(q, block_q)
  bias = _slot_bias(count, n_pad)                                   # [B, n_pad]
  if mode == "offset":
    bias = bias + _OFFSET
  keys = jnp.pad(keys, ((0, 0), (0, 0), (0, n_pad - n), (0, 0))).astype(compute_dtype)
  queries = jnp.pad(queries, ((0, 0), (0, 0), (0, q_pad - q), (0, 0))).astype(compute_dtype)
  qf = queries.reshape(b * h, q_pad, d)
  kf = keys.reshape(b * h, n_pad, d)

  kwargs = {}
  if not interpret:
    from jax.experimental.pallas import triton as plgpu
    kwargs["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  num_blocks = n_pad // s
  index_bits = max(1, (num_blocks - 1).bit_length())
  kernel = functools.partial(_bucket_kernel, num_blocks=num_blocks, block_k=s, chunk=chunk,
                             mode=mode, index_bits=index_bits)
  nq = q_pad // block_q
  if grid_order == "queries":
    # The query blocks of one (row, head) run next to each other (grid axis 0
    # is the fastest-varying launch axis), so they read its keys from L2.
    grid = (nq, b * h)
    rowhead = lambda i, j: (j, i)
  elif grid_order == "rows":
    grid = (b * h, nq)
    rowhead = lambda i, j: (i, j)
  else:
    raise ValueError(f"DeviceBackend grid_order={grid_order!r}; choose queries or rows")
  qspec = pl.BlockSpec((None, block_q, d), lambda i, j: (*rowhead(i, j), 0))
  kspec = pl.BlockSpec((None, n_pad, d), lambda i, j: (rowhead(i, j)[0], 0, 0))
  bspec = pl.BlockSpec((None, n_pad), lambda i, j: (rowhead(i, j)[0] // h, 0))
  ospec = pl.BlockSpec((None, block_q, s), lambda i, j: (*rowhead(i, j), 0))
  out_shape = {"pair": [jnp.float32, jnp.int32], "max": [jnp.float32]}.get(mode, [jnp.int32])
  outs = pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=[qspec, kspec, bspec],
      out_specs=[ospec] * len(out_shape),
      out_shape=[jax.ShapeDtypeStruct((b * h, q_pad, s), t) for t in out_shape],
      interpret=interpret,
      **kwargs,
  )(qf, kf, bias)
  outs = [o.reshape(b, h, q_pad, s)[:, :, :q] for o in outs]
  if mode == "max":
    vals, bucket = top_k(outs[0], min(k, s), top_k_impl)
    return vals, bucket.astype(jnp.int32)
  if mode == "pair":
    best, arg = outs
    vals, bucket = top_k(best, min(k, s), top_k_impl)
    slots = jnp.take_along_axis(arg, bucket, axis=-1) * s + bucket
    return vals, slots.astype(jnp.int32)
  keyv, bucket = top_k(outs[0], min(k, s), top_k_impl)
  low = jnp.int32((1 << index_bits) - 1)
  if mode == "sortable":
    vals = _unsortable(keyv & ~low)
    vals = jnp.where(vals > -1e30, vals, -jnp.inf)      # -inf comes back as NaN: invalid
  else:
    vals = jax.lax.bitcast_convert_type(keyv & ~low, jnp.float32) - _OFFSET
    vals = jnp.where(keyv >= 0, vals, -jnp.inf)         # negative: an invalid slot
  slots = (keyv & low) * s + bucket
  return vals, slots.astype(jnp.int32)


# --------------------------------------------------------------------------


class DeviceBackend(knn.KNNBackend):
  """Approximate top-k on the accelerator by strided bucket maxima.

  Options (ModelConfig.knn_options):
    recall_target:  0.9; sets num_buckets when that is None.
    num_buckets:    None (derived: 256 for k=32 at 0.9) or an int S >= k.
    impl:           "auto" | "xla" | "pallas" | "approx_max_k" (TPU) | "exact".
    compute_dtype:  "auto" (bfloat16 on GPU/TPU, float32 on CPU) or a dtype
                    name; queries and keys are cast to it for the score matmul,
                    which accumulates in float32.
    max_score_elements: 2**30; the xla path goes over queries in chunks so
                    that one [B,H,chunk,N] score block stays under this.
    block_q, num_warps, num_stages: Pallas tiling (128, 16, 3; tuned on an
                    H200, docs/knn.md).
    interpret:      False; True runs the Pallas kernel in interpret mode (CPU tests).
    packed:         what the Pallas kernel keeps per bucket (see _bucket_kernel):
                    "offset" (default): one int32, the bits of (score + 2) with
                    the block number in the low ceil(log2(N/S)) bits (score
                    error <= 2^(bits-22)); exact order for scores > -2, which
                    holds for the memory layer's unit-norm queries and keys.
                    True: the same with an order-preserving int32 of any float.
                    False: the float max and its block number (two arrays).
    top_k_impl:     for the final top k of the bucket maxima (see `top_k`):
                    "auto" (default): "sort" when the process sees more than
                    one device (rows may be sharded), else "lax"; "sort"
                    (partitions over sharded rows; 3x slower than lax.top_k
                    in the tiny CPU training step); "lax" (lax.top_k).
    grid_order:     "queries" (default): a (row, head)'s query blocks are
                    launched next to each other and share its keys in L2;
                    "rows": the other way round.
    chunk:          None; the kernel computes a block's S scores in column
                    chunks of this power of two (default: largest <= 128
                    dividing S), so S need not be a power of two.
    shard_rows:     "auto"; when the caller declares a mesh with axis
                    `row_axis` (knn.mesh_context, as the trainer's step does),
                    the Pallas kernel runs once per device on its own rows
                    (knn.per_device_rows) instead of on rows XLA gathers;
                    "off": one kernel over the whole batch.
    row_axis:       "data"; the mesh axis name of the rows (the trainer's mesh).
  """
  name = "device"

  def __init__(self, recall_target: float = 0.9, num_buckets: Optional[int] = None,
               impl: str = "auto", compute_dtype: str = "auto",
               max_score_elements: int = 2 ** 30, block_q: int = 128,
               num_warps: int = 16, num_stages: int = 3, interpret: bool = False,
               packed="offset", top_k_impl: str = "auto", grid_order: str = "queries",
               chunk: Optional[int] = None, shard_rows: str = "auto",
               row_axis: str = "data"):
    if shard_rows not in ("auto", "off"):
      raise ValueError(f"DeviceBackend shard_rows={shard_rows!r}; choose auto or off")
    self.shard_rows = shard_rows
    self.row_axis = row_axis
    self.chunk = chunk
    _packed_mode(packed)                    # validates
    if grid_order not in ("queries", "rows"):
      raise ValueError(f"DeviceBackend grid_order={grid_order!r}; choose queries or rows")
    self.grid_order = grid_order
    if top_k_impl not in ("auto", "sort", "lax"):
      raise ValueError(f"DeviceBackend top_k_impl={top_k_impl!r}; choose auto, sort or lax")
    self._top_k_impl = top_k_impl
    if impl not in ("auto", "xla", "pallas", "approx_max_k", "exact"):
      raise ValueError(f"DeviceBackend impl={impl!r}; choose auto, xla, pallas, approx_max_k or exact")
    if compute_dtype != "auto" and compute_dtype not in _DTYPES:
      raise ValueError(f"DeviceBackend compute_dtype={compute_dtype!r}; choose auto or one of {sorted(_DTYPES)}")
    if num_buckets is not None and num_buckets < 1:
      raise ValueError(f"DeviceBackend num_buckets must be >= 1, got {num_buckets}")
    buckets_for_recall(32, recall_target)  # validates the target
    self.recall_target = recall_target
    self.num_buckets = num_buckets
    self.impl = impl
    self.compute_dtype = compute_dtype
    self.max_score_elements = max_score_elements
    self.block_q = block_q
    self.num_warps = num_warps
    self.num_stages = num_stages
    self.interpret = interpret
    self.packed = packed

  @property
  def top_k_impl(self) -> str:
    """The resolved final top-k implementation ("sort" or "lax")."""
    if self._top_k_impl != "auto":
      return self._top_k_impl
    return "sort" if jax.device_count() > 1 else "lax"

  def buckets(self, k: int) -> int:
    return self.num_buckets or buckets_for_recall(k, self.recall_target)

  def resolved_impl(self, head_dim: int, k: int) -> str:
    """Which implementation `search` runs on the current default backend."""
    if self.impl != "auto":
      return self.impl
    platform = jax.default_backend()
    if platform == "tpu":
      return "approx_max_k"
    s = self.buckets(k)
    pow2 = lambda x: x >= 16 and x & (x - 1) == 0
    if platform == "gpu" and pallas_chunk(s, self.chunk) >= 16 and pow2(head_dim) and pow2(self.block_q):
      return "pallas"
    return "xla"

  def _dtype(self):
    if self.compute_dtype != "auto":
      return _DTYPES[self.compute_dtype]
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16

  def search(self, queries, memory: MemoryState, k: int, context=None):
    """queries [B,H,Q,D] -> (indices int32 [B,H,Q,k], valid bool [B,H,Q,k])."""
    queries = jax.lax.stop_gradient(queries)
    keys = jax.lax.stop_gradient(memory.keys)
    count = memory.count
    n, d = keys.shape[2], keys.shape[3]
    s = self.buckets(k)
    impl = self.resolved_impl(d, k)
    dtype = self._dtype()

    if impl == "exact" or n <= s:
      # Every bucket would hold at most one slot: exact search is as cheap.
      scores = jnp.einsum("bhqd,bhnd->bhqn", queries.astype(dtype), keys.astype(dtype),
                          preferred_element_type=jnp.float32)
      scores = scores + _slot_bias(count, n)[:, None, None, :]
      vals, idx = _top_k_padded(scores, k, self.top_k_impl)
    elif impl == "approx_max_k":
      scores = jnp.einsum("bhqd,bhnd->bhqn", queries.astype(dtype), keys.astype(dtype),
                          preferred_element_type=jnp.float32)
      scores = scores + _slot_bias(count, n)[:, None, None, :]
      vals, idx = jax.lax.approx_max_k(scores, min(k, n), recall_target=self.recall_target)
    elif impl == "pallas":
      # The kernel is opaque to XLA's partitioner, which would gather sharded
      # rows onto every device: run it per device on its own rows instead.
      run = lambda _, q_, k_, c_: _buckets_pallas(
          q_, k_, c_, s, k, dtype, self.block_q, self.num_warps, self.num_stages,
          self.interpret, self.packed, self.top_k_impl, self.grid_order, self.chunk)
      vals, idx = knn.per_device_rows(run, (queries, keys, count), 2, self.row_axis,
                                      self.shard_rows == "auto")
    else:
      score_dtype = jnp.float32 if dtype == jnp.float32 else dtype
      vals, idx = _buckets_xla(queries.astype(dtype), keys.astype(dtype), count, s, k,
                               score_dtype, self.max_score_elements, self.top_k_impl)
    if vals.shape[-1] < k:                    # fewer buckets (or slots) than k
      pad = [(0, 0)] * 3 + [(0, k - vals.shape[-1])]
      vals = jnp.pad(vals, pad, constant_values=-jnp.inf)
      idx = jnp.pad(idx, pad)
    valid = jnp.isfinite(vals)
    # Belt and braces: a slot outside [0, count) is never valid.
    valid = valid & (idx < count[:, None, None, None]) & (idx >= 0)
    idx = jnp.where(valid, idx, 0).astype(jnp.int32)
    return idx, valid


def synthetic_memory(rng: jax.Array, batch: int, heads: int, size: int, num_queries: int,
                     head_dim: int, num_topics: int = 64, topic_run: int = 256,
                     coarse_every: int = 16, coarse_scale: float = 0.7,
                     fine_scale: float = 0.5) -> Tuple[jax.Array, jax.Array]:
  """Keys and queries with the structure of a document's key stream (tests, benchmarks).

  Positions 0 .. size+num_queries-1 of each (row, head) form one stream; the
  first `size` are keys, the rest queries (the next segment). Position p is
      normalise(topic_centre[t(p // topic_run)]
                + coarse_scale * u[p // coarse_every] + fine_scale * e[p])
  with `num_topics` random unit centres per (row, head), a topic drawn per run
  of `topic_run` positions, u and e Gaussian with unit expected norm. So keys
  cluster by topic and neighbouring positions are correlated, as in real
  streams; uniform random keys would make kNN meaningless.
  Returns keys [B,H,size,D], queries [B,H,num_queries,D], float32, unit norm.
  """
  total = size + num_queries
  r_c, r_t, r_u, r_e = jax.random.split(rng, 4)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  centres = unit(jax.random.normal(r_c, (batch, heads, num_topics, head_dim)))
  runs = -(-total // topic_run)
  topic = jax.random.randint(r_t, (batch, heads, runs), 0, num_topics)
  pos = jnp.arange(total)
  t = topic[:, :, pos // topic_run]                                   # [B,H,total]
  x = jnp.take_along_axis(centres, t[..., None], axis=2)
  coarse = jax.random.normal(r_u, (batch, heads, -(-total // coarse_every), head_dim))
  x = x + coarse_scale / math.sqrt(head_dim) * coarse[:, :, pos // coarse_every]
  x = x + fine_scale / math.sqrt(head_dim) * jax.random.normal(r_e, (batch, heads, total, head_dim))
  x = unit(x).astype(jnp.float32)
  return x[:, :, :size], x[:, :, size:]


def recall(indices: jax.Array, valid: jax.Array, exact_indices: jax.Array,
           exact_valid: jax.Array) -> float:
  """Fraction of the exact valid neighbours that the approximate result holds.

  All arguments [B,H,Q,k]. Invalid entries count on neither side.
  """
  a = jnp.where(valid, indices, -1)[..., :, None]
  e = jnp.where(exact_valid, exact_indices, -2)[..., None, :]
  hit = jnp.any(a == e, axis=-2) & exact_valid                      # [B,H,Q,k]
  return float(hit.sum() / jnp.maximum(exact_valid.sum(), 1))
