"""Strided-bucket top-k as one fused Pallas (Triton) kernel for GPUs.

The kernel walks the memory in blocks of S keys and keeps the running max and
argmax per bucket in registers, so the [Q, N] score matrix is never written to
memory. Same contract as memorizing.knn.buckets.buckets_xla.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from memorizing.errors import ConfigError
from memorizing.knn.topk import round_up, slot_bias, top_k


_OFFSET = 2.0   # packed="offset": scores are stored as the int32 bits of (score + 2)
_FINITE_INVALID = -1e30   # packed="float": the bias of an invalid slot (finite: no NaN)


def _bucket_kernel(q_ref, k_ref, bias_ref, nblk_ref, *out_refs, num_blocks, block_k, chunk, mode,
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
  mode "float":    per bucket the float max of the score with its low
                   `index_bits` mantissa bits replaced by j: one and/or and one
                   float max per score, any finite score (the replaced bits
                   change a score by at most 2^(index_bits-23) of itself, and
                   keep the order of scores that differ in the kept bits).
                   nblk_ref [2] = (blocks whose slots are all valid, blocks
                   with any valid slot): the bias (0 or -1e30, never -inf, so no
                   NaN can form) is added only in between, and blocks past the
                   second are skipped.
  """
  # Imported when the kernel is built: Pallas (and Triton) load only on this path.
  from jax.experimental import pallas as pl
  q = q_ref[...]
  block_q = q.shape[0]
  parts = block_k // chunk

  def scores(j, c, with_bias=True):
    start = pl.multiple_of(j * block_k + c * chunk, chunk)
    kb = k_ref[pl.ds(start, chunk), :]                              # [chunk, D]
    sc = jax.lax.dot_general(q, kb, (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)    # [block_q, chunk]
    return sc + bias_ref[pl.ds(start, chunk)][None, :] if with_bias else sc

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

  if mode == "float":
    # Two loops: blocks [0, full) hold only valid slots and skip the bias;
    # blocks [full, live) hold the row's last valid slots (bias 0 or -1e30);
    # blocks from `live` on hold none and are not read at all.
    (key_ref,) = out_refs
    full, live = nblk_ref[0], nblk_ref[1]

    def step(with_bias):
      def body(j, carry):
        out = []
        for c in range(parts):
          sc = scores(j, c, with_bias)
          bits = (jax.lax.bitcast_convert_type(sc, jnp.int32) & keep) | j
          out.append(jnp.maximum(carry[c], jax.lax.bitcast_convert_type(bits, jnp.float32)))
        return tuple(out)
      return body
    init = tuple(jnp.full((block_q, chunk), -jnp.inf, jnp.float32) for _ in range(parts))
    state = jax.lax.fori_loop(0, full, step(False), init)
    state = jax.lax.fori_loop(full, live, step(True), state)
    for c in range(parts):
      key_ref[:, pl.ds(c * chunk, chunk)] = state[c]
    return

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


def _float_top_k_by_keys(state, k, s, index_bits):
  """The top k of the float state [..., S] (top_k_impl="keys") by a sort of one
  array instead of (value, index) pairs: each bucket's float with its low
  ceil(log2(S)) bits replaced by the bucket number is its own sort key, and
  the bucket number comes back out of the low bits. The order is the state's
  up to those bits (the state has already dropped its low index_bits)."""
  cmask = jnp.int32((1 << max(1, (s - 1).bit_length())) - 1)
  low = jnp.int32((1 << index_bits) - 1)
  axis = state.ndim - 1
  bits = jax.lax.bitcast_convert_type(jnp.maximum(state, -3e38), jnp.int32)   # no -inf: no NaN
  bucket_ids = jax.lax.broadcasted_iota(jnp.int32, state.shape, axis)
  keys = jax.lax.bitcast_convert_type((bits & ~cmask) | bucket_ids, jnp.float32)
  top = -jax.lax.sort(-keys, dimension=axis)[..., :k]                          # descending
  bucket = jax.lax.bitcast_convert_type(top, jnp.int32) & cmask
  chosen = jnp.take_along_axis(bits, bucket, axis=axis)
  vals = jax.lax.bitcast_convert_type(chosen & ~low, jnp.float32)
  vals = jnp.where(vals > _FINITE_INVALID / 2, vals, -jnp.inf)     # no valid slot in the bucket
  return vals, ((chosen & low) * s + bucket).astype(jnp.int32)


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
      raise ConfigError(f"DeviceBackend chunk={chunk} must be a power of two dividing "
                       f"num_buckets={num_buckets}")
    return chunk
  c = 128
  while c > 1 and num_buckets % c:
    c //= 2
  return c


# The kernel's two tilings (block_q, num_warps) and the time of one program of
# each relative to the first, measured on an H200 at 65536 x 128, S=256, packed
# "float" (docs/knn.md: 0.305 against 0.585 ms of kernel time per wave).
TILINGS = ((128, 16, 1.0), (64, 8, 0.52))


def auto_tiling(rows_heads: int, queries: int, cores: Optional[int]) -> Tuple[int, int]:
  """(block_q, num_warps) of the tiling whose grid finishes first.

  A grid of P programs on `cores` multiprocessors (one program each at a
  time: the kernel's registers and shared memory allow no more) runs in
  ceil(P / cores) waves; the last wave of a grid that is a little over a whole
  number of waves runs nearly empty. So the cost of a tiling is its waves times
  its program time: 128 queries a program unless 64 fill the waves better (e.g.
  6 rows x 8 heads x 512 queries on 132 SMs: 192 programs of 128 take 2 waves,
  384 of 64 take 3 waves of half the time). Unknown `cores`: 128.
  """
  if not cores:
    return TILINGS[0][:2]
  def cost(tiling):
    block_q, _, rel = tiling
    programs = rows_heads * -(-queries // block_q)
    return -(-programs // cores) * rel
  return min(TILINGS, key=cost)[:2]


def device_cores() -> Optional[int]:
  """Multiprocessors of the first local device (None where jax does not say)."""
  return getattr(jax.local_devices()[0], "core_count", None)


def packed_mode(packed) -> str:
  if packed in (False, None, "pair"):
    return "pair"
  if packed in (True, "sortable"):
    return "sortable"
  if packed in ("offset", "float"):
    return packed
  raise ConfigError(f"DeviceBackend packed={packed!r}; choose 'float', 'offset', "
                    "True (sortable) or False (pair)")


def buckets_pallas(queries, keys, count, num_buckets, k, compute_dtype, block_q,
                    num_warps, num_stages, interpret, packed=False, top_k_impl="sort",
                    grid_order="queries", chunk=None):
  """Same contract as _buckets_xla, fused; S must be a multiple of 16."""
  # Imported when the kernel is built: Pallas (and Triton) load only on this path.
  from jax.experimental import pallas as pl
  b, h, q, d = queries.shape
  n = keys.shape[2]
  s = num_buckets
  chunk = pallas_chunk(s, chunk)
  if chunk < 16:
    raise ConfigError(f"DeviceBackend pallas needs num_buckets a multiple of 16, got {s}")
  mode = "max" if packed == "max" else packed_mode(packed)
  if block_q is None:
    block_q, auto_warps = auto_tiling(b * h, q, None if interpret else device_cores())
    num_warps = num_warps or auto_warps
  num_warps = num_warps or dict((t[0], t[1]) for t in TILINGS).get(block_q, 4)
  n_pad = round_up(n, s)
  q_pad = round_up(q, block_q)
  bias = slot_bias(count, n_pad)                                   # [B, n_pad]
  if mode == "offset":
    bias = bias + _OFFSET
  if mode == "float":
    bias = jnp.maximum(bias, _FINITE_INVALID)
  nblk = jnp.stack([count // s, -(-count // s)], axis=1).astype(jnp.int32)   # [B, 2]
  keys = jnp.pad(keys, ((0, 0), (0, 0), (0, n_pad - n), (0, 0))).astype(compute_dtype)
  queries = jnp.pad(queries, ((0, 0), (0, 0), (0, q_pad - q), (0, 0))).astype(compute_dtype)
  qf = queries.reshape(b * h, q_pad, d)
  kf = keys.reshape(b * h, n_pad, d)

  kwargs = {}
  if not interpret:
    from jax.experimental.pallas import triton as plgpu  # GPU only, loaded on this path
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
    raise ConfigError(f"DeviceBackend grid_order={grid_order!r}; choose queries or rows")
  qspec = pl.BlockSpec((None, block_q, d), lambda i, j: (*rowhead(i, j), 0))
  kspec = pl.BlockSpec((None, n_pad, d), lambda i, j: (rowhead(i, j)[0], 0, 0))
  bspec = pl.BlockSpec((None, n_pad), lambda i, j: (rowhead(i, j)[0] // h, 0))
  nspec = pl.BlockSpec((None, 2), lambda i, j: (rowhead(i, j)[0] // h, 0))
  ospec = pl.BlockSpec((None, block_q, s), lambda i, j: (*rowhead(i, j), 0))
  out_shape = {"pair": [jnp.float32, jnp.int32], "max": [jnp.float32],
               "float": [jnp.float32]}.get(mode, [jnp.int32])
  outs = pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=[qspec, kspec, bspec, nspec],
      out_specs=[ospec] * len(out_shape),
      out_shape=[jax.ShapeDtypeStruct((b * h, q_pad, s), t) for t in out_shape],
      interpret=interpret,
      **kwargs,
  )(qf, kf, bias, nblk)
  outs = [o.reshape(b, h, q_pad, s)[:, :, :q] for o in outs]
  if mode == "max":
    vals, bucket = top_k(outs[0], min(k, s), top_k_impl)
    return vals, bucket.astype(jnp.int32)
  if mode == "pair":
    best, arg = outs
    vals, bucket = top_k(best, min(k, s), top_k_impl)
    slots = jnp.take_along_axis(arg, bucket, axis=-1) * s + bucket
    return vals, slots.astype(jnp.int32)
  if mode == "float" and top_k_impl == "keys":
    return _float_top_k_by_keys(outs[0], min(k, s), s, index_bits)
  keyv, bucket = top_k(outs[0], min(k, s), "sort" if top_k_impl == "keys" else top_k_impl)
  low = jnp.int32((1 << index_bits) - 1)
  if mode == "float":
    bits = jax.lax.bitcast_convert_type(keyv, jnp.int32)
    vals = jax.lax.bitcast_convert_type(bits & ~low, jnp.float32)
    vals = jnp.where(vals > _FINITE_INVALID / 2, vals, -jnp.inf)   # no valid slot in the bucket
    return vals, ((bits & low) * s + bucket).astype(jnp.int32)
  if mode == "sortable":
    vals = _unsortable(keyv & ~low)
    vals = jnp.where(vals > -1e30, vals, -jnp.inf)      # -inf comes back as NaN: invalid
  else:
    vals = jax.lax.bitcast_convert_type(keyv & ~low, jnp.float32) - _OFFSET
    vals = jnp.where(keyv >= 0, vals, -jnp.inf)         # negative: an invalid slot
  slots = (keyv & low) * s + bucket
  return vals, slots.astype(jnp.int32)
