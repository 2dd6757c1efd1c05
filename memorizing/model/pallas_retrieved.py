"""Attention over the retrieved pairs as fused Pallas (Triton) kernels for GPUs.

`attend_retrieved` in memorizing/model/memory_attention.py gathers the k
retrieved keys and values of every query into [B,H,L,k,D] arrays (1 GB each
at batch 32 x 512, k 32, D 128, bf16) and attends over them with XLA ops,
which write and read those arrays several times forward and backward. Here
the forward and the backward kernel read the k rows of every query straight
from the memory by index (a gather load per neighbour) and keep everything
else on chip: online softmax forward, the softmax gradient backward. Nothing
of size [B,H,L,k,D] exists in device memory.

    out, lse, sims = fused_retrieved_attention(q, keys, values, idx, valid, scale, bias)

Gradients flow to q, scale and bias (not to the memory: it is stop-gradient
in the model). `sims` (q.k per neighbour, float32) is for the memory signals
and carries no gradient.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from memorizing.errors import ConfigError
from memorizing.model.layers import NEG_INF

# Queries per program and warps: on one H200 at the paper's shapes (batch 32, k 32,
# head dim 128, 65K memory) forward + backward took 1.36 ms at 8 x 4, 1.42-1.60 ms
# at 16 x 4, 16 x 8 and 32 x 8, 2.80 ms at 32 x 4, 4.8 ms at 64 x 4
# (docs/benchmark_step.md; scripts/benchmark_retrieved.py).
BLOCK_Q = 8
NUM_WARPS = 4


def _pow2(x: int) -> bool:
  return x >= 1 and x & (x - 1) == 0


def supported(head_dim: int, k: int, length: int, block_q: int = BLOCK_Q) -> bool:
  """Whether the kernels take these shapes (Triton blocks are powers of two)."""
  return _pow2(head_dim) and _pow2(k) and length % min(
      block_q, length) == 0 and _pow2(min(block_q, length))


def _retrieved_fwd_kernel(q_ref, idx_ref, a_ref, b_ref, k_ref, v_ref, out_ref, lse_ref, s_ref, *,
                          num_k):
  """One program: `block_q` queries of one (row, head).

  q_ref [bq, D], idx_ref [bq, k] int32 (-1: invalid), a_ref, b_ref [bq]
  float32 (logit = a * q.key + b), k_ref/v_ref [N, D] the memory of this
  (row, head). Writes out [bq, D], lse [bq] (NEG_INF: no valid neighbour)
  and s [bq, k], q . key of each neighbour.
  """
  q = q_ref[...].astype(jnp.float32)
  a = a_ref[...]
  b = b_ref[...]
  bq = q.shape[0]
  m = jnp.full((bq,), NEG_INF, jnp.float32)
  l = jnp.zeros((bq,), jnp.float32)
  acc = jnp.zeros(q.shape, jnp.float32)
  for j in range(num_k):
    ij = idx_ref[:, j]
    ok = ij >= 0
    row = jnp.where(ok, ij, 0)
    s = jnp.sum(q * k_ref[row, :].astype(jnp.float32), axis=1)       # [bq]
    s_ref[:, j] = s
    logit = jnp.where(ok, a * s + b, NEG_INF)
    m_new = jnp.maximum(m, logit)
    alpha = jnp.exp(m - m_new)
    p = jnp.where(ok, jnp.exp(logit - m_new), 0.0)
    l = l * alpha + p
    acc = acc * alpha[:, None] + p[:, None] * v_ref[row, :].astype(jnp.float32)
    m = m_new
  has = l > 0
  safe_l = jnp.where(has, l, 1.0)
  out_ref[...] = (acc / safe_l[:, None]).astype(out_ref.dtype)
  lse_ref[...] = jnp.where(has, m + jnp.log(safe_l), NEG_INF)


def _retrieved_bwd_kernel(q_ref, idx_ref, a_ref, b_ref, k_ref, v_ref, out_ref, lse_ref, dout_ref,
                          dlse_ref, dq_ref, da_ref, db_ref, *, num_k):
  """Gradient of one program's queries: dq [bq, D], da, db [bq] (of the
  per-query scale and bias), from d out [bq, D] and d lse [bq].

  d logit_j = p_j (dout . v_j - dout . out + d lse); dq = a sum_j d logit_j k_j,
  da = sum_j d logit_j q . k_j, db = sum_j d logit_j.
  """
  q = q_ref[...].astype(jnp.float32)
  a = a_ref[...]
  b = b_ref[...]
  lse = lse_ref[...]
  dout = dout_ref[...].astype(jnp.float32)
  delta = jnp.sum(dout * out_ref[...].astype(jnp.float32), axis=1) - dlse_ref[...]
  dq = jnp.zeros(q.shape, jnp.float32)
  da = jnp.zeros(b.shape, jnp.float32)
  db = jnp.zeros(b.shape, jnp.float32)
  for j in range(num_k):
    ij = idx_ref[:, j]
    ok = ij >= 0
    row = jnp.where(ok, ij, 0)
    kj = k_ref[row, :].astype(jnp.float32)
    s = jnp.sum(q * kj, axis=1)
    p = jnp.where(ok, jnp.exp(jnp.minimum(a * s + b - lse, 0.0)), 0.0)
    dp = jnp.sum(dout * v_ref[row, :].astype(jnp.float32), axis=1)
    dl = p * (dp - delta)
    dq = dq + dl[:, None] * kj
    da = da + dl * s
    db = db + dl
  dq_ref[...] = dq * a[:, None]
  da_ref[...] = da
  db_ref[...] = db


def _call(kernel, ins, outs, block_q, num_warps, interpret):
  """pallas_call over grid (query blocks, rows x heads). ins/outs: (array or
  ShapeDtypeStruct, kind) with kind "q" (blocked [BH, L, ...]) or "mem" (whole
  [BH, N, D] per program)."""
  from jax.experimental import pallas as pl   # loaded only on this path
  bh, length = ins[0][0].shape[:2]

  def spec(x, kind):
    if kind == "mem":
      return pl.BlockSpec((None,) + x.shape[1:], lambda i, j: (j, 0, 0))
    rest = x.shape[2:]
    return pl.BlockSpec((None, block_q) + rest, lambda i, j: (j, i) + (0,) * len(rest))

  kwargs = {}
  if not interpret:
    from jax.experimental.pallas import triton as plgpu  # GPU only
    kwargs["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
  return pl.pallas_call(
      kernel, grid=(length // block_q, bh),
      in_specs=[spec(x, kind) for x, kind in ins],
      out_specs=[spec(x, kind) for x, kind in outs],
      out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x, _ in outs],
      interpret=interpret, **kwargs)(*[x for x, _ in ins])


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _fused(q, a, b, keys, values, idx, block_q, num_warps, interpret):
  return _forward(q, a, b, keys, values, idx, block_q, num_warps, interpret)[0]


def _forward(q, a, b, keys, values, idx, block_q, num_warps, interpret):
  bh, length, d = q.shape
  k = idx.shape[-1]
  out, lse, s = _call(
      functools.partial(_retrieved_fwd_kernel, num_k=k),
      [(q, "q"), (idx, "q"), (a, "q"), (b, "q"), (keys, "mem"), (values, "mem")],
      [(jax.ShapeDtypeStruct((bh, length, d), jnp.float32), "q"),
       (jax.ShapeDtypeStruct((bh, length), jnp.float32), "q"),
       (jax.ShapeDtypeStruct((bh, length, k), jnp.float32), "q")],
      block_q, num_warps, interpret)
  return (out, lse, s), (q, a, b, keys, values, idx, out, lse)


def _fused_fwd(q, a, b, keys, values, idx, block_q, num_warps, interpret):
  return _forward(q, a, b, keys, values, idx, block_q, num_warps, interpret)


def _fused_bwd(block_q, num_warps, interpret, res, cotangents):
  q, a, b, keys, values, idx, out, lse = res
  dout, dlse, _ = cotangents          # sims carry no gradient
  dq, da, db = _call(
      functools.partial(_retrieved_bwd_kernel, num_k=idx.shape[-1]),
      [(q, "q"), (idx, "q"), (a, "q"), (b, "q"), (keys, "mem"), (values, "mem"), (out, "q"),
       (lse, "q"), (dout.astype(jnp.float32), "q"), (dlse.astype(jnp.float32), "q")],
      [(jax.ShapeDtypeStruct(q.shape, jnp.float32), "q"),
       (jax.ShapeDtypeStruct(a.shape, jnp.float32), "q"),
       (jax.ShapeDtypeStruct(b.shape, jnp.float32), "q")],
      block_q, num_warps, interpret)
  return dq.astype(q.dtype), da, db, None, None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_retrieved_attention(q: jax.Array, keys: jax.Array, values: jax.Array, idx: jax.Array,
                              valid: jax.Array, scale: jax.Array, bias: Optional[jax.Array] = None,
                              block_q: int = BLOCK_Q, num_warps: int = NUM_WARPS,
                              interpret: bool = False
                              ) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Softmax attention of each query over its k retrieved memory slots.

  q [B,H,L,D]; keys, values [B,H,N,D] (the memory; no gradient reaches it);
  idx, valid [B,H,L,k]; scale [H]; bias [H] or None. Returns out [B,H,L,D]
  (q.dtype; zero where no neighbour is valid), lse [B,H,L] float32 (NEG_INF
  there) and sims [B,H,L,k] float32, q . key of each neighbour (no gradient).
  The same as memory_attention.attend_retrieved, whose probs are
  softmax(sims * scale + bias) over the valid neighbours.
  """
  b_, h, length, d = q.shape
  k = idx.shape[-1]
  block_q = min(block_q, length)
  if not supported(d, k, length, block_q):
    raise ConfigError(f"retrieved_attention='pallas' needs head_dim, num_neighbors and a "
                      f"query block dividing the segment that are powers of two; got "
                      f"head_dim={d}, k={k}, segment {length}, block {block_q}")
  rows = lambda x: jnp.broadcast_to(x.astype(jnp.float32)[None, :, None],
                                    (b_, h, length)).reshape(b_ * h, length)
  a = rows(scale)
  b = rows(jnp.zeros((h,), jnp.float32) if bias is None else bias)
  flat = lambda x: jax.lax.stop_gradient(x).reshape(b_ * h, x.shape[2], x.shape[3])
  idx_m = jnp.where(valid, idx, -1).astype(jnp.int32).reshape(b_ * h, length, k)
  out, lse, s = _fused(q.reshape(b_ * h, length, d), a, b, flat(keys), flat(values), idx_m,
                       block_q, num_warps, interpret)
  return (out.reshape(b_, h, length, d).astype(q.dtype), lse.reshape(b_, h, length),
          jax.lax.stop_gradient(s).reshape(b_, h, length, k))
