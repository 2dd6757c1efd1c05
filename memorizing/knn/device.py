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

Implementations of the same computation (DeviceBackend `impl`):
  "xla":    (memorizing/knn/buckets.py) score matmul [B,H,Qc,N], masked, reshaped to [.., N/S, S], max and
            argmax over N/S, then top_k over S. Queries go in chunks of Qc so
            the score block stays under `max_score_elements`.
  "pallas": (memorizing/knn/pallas_buckets.py) a fused Pallas (Triton) kernel for GPUs that walks the memory in
            blocks of S keys and keeps the running max/argmax per bucket in
            registers, so the [Q, N] score matrix is never written to memory.
  "approx_max_k": lax.approx_max_k over all scores (TPU);
  "exact":  every score, then top k;
  "auto":   "pallas" on GPU (when the shapes suit it), approx_max_k on TPU,
            "xla" elsewhere.

Retrieval is not differentiable: the result is computed on stop_gradient'ed
inputs and only integer indices leave this module.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from memorizing.errors import ConfigError
from memorizing.knn.buckets import buckets_for_recall, buckets_xla
from memorizing.knn.pallas_buckets import buckets_pallas, packed_mode, pallas_chunk
from memorizing.model.sharding import per_device_rows
from memorizing.knn.topk import slot_bias, top_k_padded
from memorizing.knn_api import KNNBackend
from memorizing.model.memory import MemoryState

__all__ = ["DeviceBackend", "buckets_for_recall"]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# Fewer queries per (row, head) than this (decoding: 1) take the XLA bucket search:
# the Pallas kernel pads them to a block of `block_q` (128) queries, so one query
# would pay for 128 queries' scores; the XLA path computes only the real ones.
MIN_PALLAS_QUERIES = 16


class DeviceBackend(KNNBackend):
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
    block_q, num_warps, num_stages: Pallas tiling (None, None, 3; tuned on
                    an H200, docs/knn.md). block_q None: 128 queries a program
                    (16 warps), or 64 (8 warps) when that grid fills the GPU's
                    multiprocessors in fewer program-times
                    (pallas_buckets.auto_tiling: few rows). num_warps None: 16
                    for block_q 128, 8 for 64, else 4.
    interpret:      False; True runs the Pallas kernel in interpret mode (CPU tests).
    packed:         what the Pallas kernel keeps per bucket (see _bucket_kernel):
                    "float" (default): one float32, the score with its low
                    ceil(log2(N/S)) mantissa bits replaced by the block
                    number (relative error <= 2^(bits-23)); a score costs an
                    and/or and a float max. Slots past the row's count are
                    masked only in the block that holds the last valid slot;
                    blocks after it are not read (a partly filled memory is
                    searched in proportion to its count). 16% faster than
                    "offset" at 65536 x 128 on an H200 (docs/knn.md).
                    "offset": one int32, the bits of (score + 2) with
                    the block number in the low ceil(log2(N/S)) bits (score
                    error <= 2^(bits-22)); exact order for scores > -2, which
                    holds for the memory layer's unit-norm queries and keys.
                    True: the same with an order-preserving int32 of any float.
                    False: the float max and its block number (two arrays).
    top_k_impl:     for the final top k of the bucket maxima (see `top_k`):
                    "auto" (default): "sort" when the process sees more than
                    one device (rows may be sharded), else "lax"; "sort"
                    (partitions over sharded rows; 3x slower than lax.top_k
                    in the tiny CPU training step); "lax" (lax.top_k);
                    "keys" (packed "float" Pallas path only, elsewhere
                    "sort"): one sort of a single array whose low bits carry
                    the bucket number instead of (value, index) pairs. Not yet
                    timed on a GPU.
    grid_order:     "queries" (default): a (row, head)'s query blocks are
                    launched next to each other and share its keys in L2;
                    "rows": the other way round.
    chunk:          None; the kernel computes a block's S scores in column
                    chunks of this power of two (default: largest <= 128
                    dividing S), so S need not be a power of two.
    shard_rows:     "auto"; when the caller declares a mesh with axis
                    `row_axis` (memorizing.knn.mesh_context, as the trainer's step does),
                    the Pallas kernel runs once per device on its own rows
                    (per_device_rows) instead of on rows XLA gathers;
                    "off": one kernel over the whole batch.
    row_axis:       "data"; the mesh axis name of the rows (the trainer's mesh).
  """
  name = "device"

  def __init__(self, recall_target: float = 0.9, num_buckets: Optional[int] = None,
               impl: str = "auto", compute_dtype: str = "auto",
               max_score_elements: int = 2 ** 30, block_q: Optional[int] = None,
               num_warps: Optional[int] = None, num_stages: int = 3, interpret: bool = False,
               packed="float", top_k_impl: str = "auto", grid_order: str = "queries",
               chunk: Optional[int] = None, shard_rows: str = "auto",
               row_axis: str = "data"):
    if shard_rows not in ("auto", "off"):
      raise ConfigError(f"DeviceBackend shard_rows={shard_rows!r}; choose auto or off")
    self.shard_rows = shard_rows
    self.row_axis = row_axis
    self.chunk = chunk
    packed_mode(packed)                    # validates
    if grid_order not in ("queries", "rows"):
      raise ConfigError(f"DeviceBackend grid_order={grid_order!r}; choose queries or rows")
    self.grid_order = grid_order
    if top_k_impl not in ("auto", "sort", "lax", "keys"):
      raise ConfigError(f"DeviceBackend top_k_impl={top_k_impl!r}; choose auto, sort, lax or keys")
    self._top_k_impl = top_k_impl
    if impl not in ("auto", "xla", "pallas", "approx_max_k", "exact"):
      raise ConfigError(f"DeviceBackend impl={impl!r}; choose auto, xla, pallas, approx_max_k or exact")
    if compute_dtype != "auto" and compute_dtype not in _DTYPES:
      raise ConfigError(f"DeviceBackend compute_dtype={compute_dtype!r}; choose auto or one of {sorted(_DTYPES)}")
    if num_buckets is not None and num_buckets < 1:
      raise ConfigError(f"DeviceBackend num_buckets must be >= 1, got {num_buckets}")
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

  def _plain_top_k(self) -> str:
    """top_k_impl for the paths without the float state ("keys" needs it)."""
    return "sort" if self.top_k_impl == "keys" else self.top_k_impl

  def buckets(self, k: int) -> int:
    return self.num_buckets or buckets_for_recall(k, self.recall_target)

  def resolved_impl(self, head_dim: int, k: int, num_queries: Optional[int] = None) -> str:
    """Which implementation `search` runs on the current default backend, for
    `num_queries` queries per (row, head) (None: a whole segment)."""
    if self.impl != "auto":
      return self.impl
    platform = jax.default_backend()
    if platform == "tpu":
      return "approx_max_k"
    s = self.buckets(k)
    pow2 = lambda x: x >= 16 and x & (x - 1) == 0
    few = num_queries is not None and num_queries < MIN_PALLAS_QUERIES
    if (platform == "gpu" and not few and pallas_chunk(s, self.chunk) >= 16 and pow2(head_dim)
        and (self.block_q is None or pow2(self.block_q))):
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
    impl = self.resolved_impl(d, k, queries.shape[2])
    dtype = self._dtype()

    if impl == "exact" or n <= s:
      # Every bucket would hold at most one slot: exact search is as cheap.
      scores = jnp.einsum("bhqd,bhnd->bhqn", queries.astype(dtype), keys.astype(dtype),
                          preferred_element_type=jnp.float32)
      scores = scores + slot_bias(count, n)[:, None, None, :]
      vals, idx = top_k_padded(scores, k, self._plain_top_k())
    elif impl == "approx_max_k":
      scores = jnp.einsum("bhqd,bhnd->bhqn", queries.astype(dtype), keys.astype(dtype),
                          preferred_element_type=jnp.float32)
      scores = scores + slot_bias(count, n)[:, None, None, :]
      vals, idx = jax.lax.approx_max_k(scores, min(k, n), recall_target=self.recall_target)
    elif impl == "pallas":
      # The kernel is opaque to XLA's partitioner, which would gather sharded
      # rows onto every device: run it per device on its own rows instead.
      run = lambda _, q_, k_, c_: buckets_pallas(
          q_, k_, c_, s, k, dtype, self.block_q, self.num_warps, self.num_stages,
          self.interpret, self.packed, self.top_k_impl, self.grid_order, self.chunk)
      vals, idx = per_device_rows(run, (queries, keys, count), 2, self.row_axis,
                                      self.shard_rows == "auto")
    else:
      score_dtype = jnp.float32 if dtype == jnp.float32 else dtype
      vals, idx = buckets_xla(queries.astype(dtype), keys.astype(dtype), count, s, k,
                               score_dtype, self.max_score_elements, self._plain_top_k())
    if vals.shape[-1] < k:                    # fewer buckets (or slots) than k
      pad = [(0, 0)] * 3 + [(0, k - vals.shape[-1])]
      vals = jnp.pad(vals, pad, constant_values=-jnp.inf)
      idx = jnp.pad(idx, pad)
    valid = jnp.isfinite(vals)
    # Belt and braces: a slot outside [0, count) is never valid.
    valid = valid & (idx < count[:, None, None, None]) & (idx >= 0)
    idx = jnp.where(valid, idx, 0).astype(jnp.int32)
    return idx, valid
