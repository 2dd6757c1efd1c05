"""Attention of one layer: local (with XL cache) and, in memory layers, kNN memory.

Per segment, a memory layer (DESIGN.md section 2):
  1) resets the memory rows whose document starts now;
  2) retrieves the top-k stored keys for every query (L2-normalised dot product;
     the retrieval query carries no gradient);
  3) attends over them with its own softmax (no position bias); a query with no
     valid neighbour gets a zero memory term;
  4) mixes: out = g * memory + (1 - g) * local, g = sigmoid(b_h), b_h init 0;
  5) appends the segment's keys and values (stop-gradient) to the memory.
The same q/k/v projections serve local and memory attention, so adding memory
to a trained model adds only the gate.
"""
from __future__ import annotations

from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from memorizing import knn
from memorizing import memory as memory_lib
from memorizing.config import ModelConfig
from memorizing.layers import NEG_INF, XLCache, l2_normalize, xl_attention


def memory_attention(q: jax.Array, mem: memory_lib.MemoryState, scale: jax.Array,
                     backend: knn.KNNBackend, k: int,
                     context: knn.SearchContext) -> jax.Array:
  """Attention over the k nearest stored pairs of each query.

  q [B,H,L,D] (normalised), scale [H]. Returns [B,H,L,D]; zero for queries
  whose neighbours are all invalid (empty memory).
  """
  b, h, length, d = q.shape
  idx, valid = backend.search(jax.lax.stop_gradient(q), mem, k, context)
  assert idx.shape == (b, h, length, k), (idx.shape, (b, h, length, k))
  keys = jax.lax.stop_gradient(knn.gather(mem.keys, idx))      # [B,H,L,k,D]
  values = jax.lax.stop_gradient(knn.gather(mem.values, idx))  # [B,H,L,k,D]
  logits = jnp.einsum("bhqd,bhqkd->bhqk", q, keys.astype(q.dtype),
                      preferred_element_type=jnp.float32)
  logits = jnp.where(valid, logits * scale[None, :, None, None], NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1) * valid
  out = jnp.einsum("bhqk,bhqkd->bhqd", probs.astype(q.dtype), values.astype(q.dtype))
  return out


class Attention(nn.Module):
  """Multi-head attention with L2-normalised q/k and a learned per-head scale.

  `layer` is this layer's index; it holds a kNN memory when `has_memory`.
  """
  config: ModelConfig
  layer: int
  has_memory: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array, start: jax.Array,
               xl: Optional[XLCache], mem: Optional[memory_lib.MemoryState],
               *, deterministic: bool = True, train: bool = False
               ) -> Tuple[jax.Array, Optional[XLCache], Optional[memory_lib.MemoryState]]:
    """x [B,L,M], bias [H,L,K], start [B] bool -> (out [B,L,M], new xl, new mem)."""
    cfg = self.config
    b, length, _ = x.shape
    proj = lambda name: nn.DenseGeneral((cfg.num_heads, cfg.head_dim), dtype=cfg.compute_dtype,
                                        param_dtype=cfg.params_dtype, use_bias=False,
                                        kernel_init=nn.initializers.xavier_uniform(), name=name)
    to_heads = lambda t: jnp.transpose(t, (0, 2, 1, 3))            # [B,L,H,D] -> [B,H,L,D]
    q = l2_normalize(to_heads(proj("query")(x)))
    k = l2_normalize(to_heads(proj("key")(x)))
    v = to_heads(proj("value")(x))
    scale = self.param("logit_scale", nn.initializers.constant(cfg.initial_logit_scale),
                       (cfg.num_heads,), jnp.float32)

    # Local attention over [previous segment | current segment].
    impl = None if cfg.attention == "auto" else cfg.attention
    if xl is not None:
      cache_valid = xl.valid & ~start
      assert bias.shape == (cfg.num_heads, length, xl.keys.shape[2] + length), bias.shape
      out = xl_attention(q, k, v, scale, bias, xl.keys, xl.values, cache_valid, impl=impl)
      new_xl = XLCache(keys=jax.lax.stop_gradient(k).astype(xl.keys.dtype),
                       values=jax.lax.stop_gradient(v).astype(xl.values.dtype),
                       valid=jnp.ones_like(xl.valid))
    else:
      assert bias.shape == (cfg.num_heads, length, length), bias.shape
      out = xl_attention(q, k, v, scale, bias, impl=impl)
      new_xl = None

    new_mem = mem
    if self.has_memory:
      gate = jax.nn.sigmoid(self.param("memory_gate", nn.initializers.constant(cfg.memory_gate_init),
                                       (cfg.num_heads,), jnp.float32))
      mem = memory_lib.reset(mem, start)
      if cfg.memory_enabled:
        backend = knn.get_backend(cfg.knn_backend, cfg.knn_options)
        context = knn.SearchContext(layer=self.layer, train=train, reset=start,
                                    new_keys=jax.lax.stop_gradient(k))
        mem_out = memory_attention(q, mem, scale, backend, cfg.num_neighbors, context)
        new_mem = memory_lib.append(mem, k, v)
      else:
        mem_out = jnp.zeros_like(out)
        new_mem = mem
      g = gate[None, :, None, None]
      out = (g * mem_out.astype(jnp.float32) + (1.0 - g) * out.astype(jnp.float32)).astype(out.dtype)

    out = jnp.transpose(out, (0, 2, 1, 3))                         # [B,L,H,D]
    out = nn.DenseGeneral(cfg.d_model, axis=(-2, -1), dtype=cfg.compute_dtype,
                          param_dtype=cfg.params_dtype, use_bias=False,
                          kernel_init=nn.initializers.xavier_uniform(), name="out")(out)
    return out, new_xl, new_mem
