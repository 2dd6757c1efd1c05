"""Attention of one layer: local (with XL cache) and, in memory layers, kNN memory.

Per segment, a memory layer (docs/design.md):
  1) resets the memory rows whose document starts now;
  2) retrieves the top-k stored keys for every query (L2-normalised dot product;
     the retrieval query carries no gradient);
  3) attends over them (no position bias); a query with no valid neighbour gets
     nothing from memory;
  4) combines with local attention (ModelConfig.memory_combine):
     "gate":  memory attention has its own softmax and
              out = g * memory + (1 - g) * local, g = sigmoid(b_h), b_h init 0
              (the paper);
     "joint": the retrieved logits (plus a learned per-head bias) join the local
              logits in one softmax, so the share of memory is decided per query
              and an empty memory leaves local attention untouched;
  5) appends the segment's keys and values (stop-gradient) to the memory.
The same q/k/v projections serve local and memory attention, so adding memory
to a trained model adds only the gate (or the memory bias); unless
ModelConfig.memory_layer_position_bias is True, the layer also stops using the
relative position bias (its local attention then matches content only).

When the caller makes the "signals" collection mutable, each memory layer sows
its memory signals there (memorizing/model/signals.py).

The kNN backend (memorizing.knn_api.KNNBackend) is passed in by whoever runs
the model: `Decoder(config, backend)`; the model never builds or looks one up.
"""
from __future__ import annotations

from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from memorizing.knn_api import KNNBackend, SearchContext
from memorizing.model.sharding import per_device_rows
from memorizing.model import memory as memory_lib
from memorizing.model import pallas_retrieved
from memorizing.model import signals as signals_lib
from memorizing.model.config import ModelConfig
from memorizing.model.layers import NEG_INF, XLCache, l2_normalize, xl_attention


def retrieve(q: jax.Array, mem: memory_lib.MemoryState, backend: KNNBackend, k: int,
             context: SearchContext):
  """Top-k stored pairs of each query: idx, valid [B,H,L,k]; keys, values [B,H,L,k,D]
  (stop-gradient). q [B,H,L,D] normalised."""
  b, h, length, _ = q.shape
  idx, valid = backend.search(jax.lax.stop_gradient(q), mem, k, context)
  assert idx.shape == (b, h, length, k), (idx.shape, (b, h, length, k))
  keys = jax.lax.stop_gradient(memory_lib.gather(mem.keys, idx))      # [B,H,L,k,D]
  values = jax.lax.stop_gradient(memory_lib.gather(mem.values, idx))  # [B,H,L,k,D]
  return idx, valid, keys, values


def retrieved_attention_implementation(name: str, head_dim: int, k: int, length: int) -> str:
  """ModelConfig.retrieved_attention resolved for a layer of these shapes: "auto"
  is "pallas" (fused kernels, memorizing/model/pallas_retrieved.py) on a GPU
  where the shapes suit them, else "einsum"; "pallas" runs the kernels in
  interpret mode off a GPU."""
  if name != "auto":
    return name
  if jax.default_backend() == "gpu" and pallas_retrieved.supported(head_dim, k, length):
    return "pallas"
  return "einsum"


def retrieved_softmax(sims, valid, scale, bias=None):
  """probs [B,H,L,k] and log-sum-exp [B,H,L] (NEG_INF: no valid neighbour) of
  the logits sims * scale (+ bias), sims [B,H,L,k] float32 (q . key)."""
  logits = sims * scale[None, :, None, None]
  if bias is not None:
    logits = logits + bias[None, :, None, None]
  logits = jnp.where(valid, logits, NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1) * valid
  lse = jnp.where(jnp.any(valid, axis=-1), jax.nn.logsumexp(logits, axis=-1), NEG_INF)
  return probs, lse


def attend_retrieved(q, keys, values, valid, scale, bias=None):
  """Softmax over the retrieved pairs of each query.

  q [B,H,L,D], keys/values [B,H,L,k,D], valid [B,H,L,k], scale [H], bias [H]
  or None (added to every retrieved logit). Returns (out [B,H,L,D], zero where
  no neighbour is valid; probs [B,H,L,k] float32; log-sum-exp [B,H,L] float32,
  NEG_INF where no neighbour is valid).
  """
  sims = jnp.einsum("bhqd,bhqkd->bhqk", q, keys.astype(q.dtype),
                    preferred_element_type=jnp.float32)
  probs, lse = retrieved_softmax(sims, valid, scale, bias)
  out = jnp.einsum("bhqk,bhqkd->bhqd", probs.astype(q.dtype), values.astype(q.dtype))
  return out, probs, lse


def fused_attention_per_device(q, mem: memory_lib.MemoryState, idx, valid, scale, bias=None):
  """pallas_retrieved.fused_retrieved_attention on each device's own rows (the
  kernels are opaque to XLA's partitioner, which would gather sharded rows);
  interpret mode off a GPU. Returns out [B,H,L,D], lse [B,H,L], sims [B,H,L,k]."""
  b, h = q.shape[:2]
  bias = jnp.zeros((h,), jnp.float32) if bias is None else bias
  per_row = lambda x: jnp.broadcast_to(x.astype(jnp.float32)[None], (b, h))
  interpret = jax.default_backend() != "gpu"

  def run(_, q_, keys, values, idx_, valid_, scale_, bias_):
    return pallas_retrieved.fused_retrieved_attention(
        q_, keys, values, idx_, valid_, scale_[0], bias_[0], interpret=interpret)
  return per_device_rows(run, (q, mem.keys, mem.values, idx, valid, per_row(scale),
                               per_row(bias)), 3)


def memory_attention(q: jax.Array, mem: memory_lib.MemoryState, scale: jax.Array,
                     backend: KNNBackend, k: int,
                     context: SearchContext) -> jax.Array:
  """Attention over the k nearest stored pairs of each query (own softmax).

  q [B,H,L,D] (normalised), scale [H]. Returns [B,H,L,D]; zero for queries
  whose neighbours are all invalid (empty memory).
  """
  _, valid, keys, values = retrieve(q, mem, backend, k, context)
  return attend_retrieved(q, keys, values, valid, scale)[0]


class Attention(nn.Module):
  """Multi-head attention with L2-normalised q/k and a learned per-head scale.

  `layer` is this layer's index; it holds a kNN memory when `has_memory`, searched
  by `backend` (needed when the memory is enabled).
  """
  config: ModelConfig
  layer: int
  has_memory: bool = False
  backend: Optional[KNNBackend] = None

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
    impl = cfg.attention
    joint = self.has_memory and cfg.memory_enabled and cfg.memory_combine == "joint"
    if xl is not None:
      cache_valid = xl.valid & ~start
      assert bias.shape == (cfg.num_heads, length, xl.keys.shape[2] + length), bias.shape
      out = xl_attention(q, k, v, scale, bias, xl.keys, xl.values, cache_valid, impl=impl,
                         return_lse=joint)
      new_xl = XLCache(keys=jax.lax.stop_gradient(k).astype(xl.keys.dtype),
                       values=jax.lax.stop_gradient(v).astype(xl.values.dtype),
                       valid=jnp.ones_like(xl.valid))
    else:
      assert bias.shape == (cfg.num_heads, length, length), bias.shape
      out = xl_attention(q, k, v, scale, bias, impl=impl, return_lse=joint)
      new_xl = None

    new_mem = mem
    if self.has_memory:
      if cfg.memory_combine == "gate":
        gate = jax.nn.sigmoid(self.param("memory_gate", nn.initializers.constant(cfg.memory_gate_init),
                                         (cfg.num_heads,), jnp.float32))
        mem_bias, reported, reported_name = None, gate, "gate"
      else:
        mem_bias = self.param("memory_bias", nn.initializers.constant(cfg.memory_bias_init),
                              (cfg.num_heads,), jnp.float32)
        reported, reported_name = mem_bias, "memory_bias"
      mem = memory_lib.reset(mem, start)
      new_mem = mem
      if cfg.memory_enabled:
        backend = self.backend
        if backend is None:
          raise ValueError("a memory layer needs a kNN backend: Decoder(config, "
                           "memorizing.knn.make_backend(config))")
        context = SearchContext(layer=self.layer, train=train, reset=start,
                                    new_keys=jax.lax.stop_gradient(k))
        impl_r = retrieved_attention_implementation(cfg.retrieved_attention, cfg.head_dim,
                                                    cfg.num_neighbors, length)
        if impl_r == "pallas":
          # Fused kernels read the retrieved rows from the memory by index.
          idx, valid = backend.search(jax.lax.stop_gradient(q), mem, cfg.num_neighbors, context)
          mem_out, mem_lse, sims = fused_attention_per_device(q, mem, idx, valid, scale, mem_bias)
          probs = None
          reads = (mem_out, sims)
        else:
          idx, valid, mem_k, mem_v = retrieve(q, mem, backend, cfg.num_neighbors, context)
          mem_out, probs, mem_lse = attend_retrieved(q, mem_k, mem_v, valid, scale, mem_bias)
          reads = (mem_k, mem_v)
        if joint:
          local_out, local_lse = out
          mass = jax.nn.sigmoid(mem_lse - local_lse)                   # [B,H,L]
          w = mass[..., None]
          out = (w * mem_out.astype(jnp.float32)
                 + (1.0 - w) * local_out.astype(jnp.float32)).astype(local_out.dtype)
        else:
          has_any = jnp.any(valid, axis=-1).astype(jnp.float32)        # [B,H,L]
          mass = gate[None, :, None] * has_any
          g = gate[None, :, None, None]
          out = (g * mem_out.astype(jnp.float32) + (1.0 - g) * out.astype(jnp.float32)).astype(out.dtype)
        signals = None
        if self.is_mutable_collection("signals"):
          if probs is None:
            probs, _ = retrieved_softmax(sims, valid, scale, mem_bias)
          else:
            sims = jnp.einsum("bhqd,bhqkd->bhqk", q.astype(jnp.float32), mem_k.astype(jnp.float32))
          signals = signals_lib.layer_signals(
              q=q, sims=sims, valid=valid, idx=idx, mem=mem, mem_probs=probs * mass[..., None],
              mass=mass, gate=reported, segment_length=cfg.segment_length,
              use_xl_cache=cfg.use_xl_cache, recall_k=cfg.num_neighbors,
              gate_name=reported_name)
          self.sow("signals", "memory", signals)
        # The append after every read of the old memory, so that it writes in place.
        new_mem = memory_lib.append(mem, *memory_lib.after_reads((reads, signals), k, v))
      elif cfg.memory_combine == "gate":
        # Memory disabled: the memory term is zero, local attention keeps (1 - g).
        g = gate[None, :, None, None]
        out = ((1.0 - g) * out.astype(jnp.float32)).astype(out.dtype)

    out = jnp.transpose(out, (0, 2, 1, 3))                         # [B,L,H,D]
    out = nn.DenseGeneral(cfg.d_model, axis=(-2, -1), dtype=cfg.compute_dtype,
                          param_dtype=cfg.params_dtype, use_bias=False,
                          kernel_init=nn.initializers.xavier_uniform(), name="out")(out)
    return out, new_xl, new_mem
