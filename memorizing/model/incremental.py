"""Incremental (token by token) decoding that computes what the Decoder computes.

The Decoder processes a whole segment of `segment_length` tokens at a time.
For generation, the token at position p of the current segment must see
exactly what it sees in training: the XL cache (the previous segment), the
tokens 0..p of the current segment (causal), and the kNN memory (which does
not change inside a segment). So per layer we keep a fixed-size key/value
buffer of the current segment, [B, H, L, D], and a position p:

  step(token at p):  write its k/v at p, attend over [XL | buffer[0..p]] with
                     row p of the relative position bias, retrieve from the
                     memory as the Decoder does, combine (gate or joint);
  commit (p == L):   the buffer becomes the XL cache and its keys/values are
                     appended to the memory (FIFO), as after a Decoder call.

Shapes never depend on p (it is a traced int32), so `step` compiles once per
(batch, config). All rows are at the same position. `IncrementalDecoder` has
the Decoder's parameter tree (same module names), so it runs the Decoder's
checkpoints; tests/test_incremental.py checks its logits against the Decoder's.

Host kNN backends (ScaNN) see the memory through `search` only: a token step
searches with zero new keys (nothing inserted), and `commit` makes one search
call whose new keys are the segment's, so the host index follows the device
ring buffer exactly as in training.
"""
from __future__ import annotations

import functools
from typing import Dict, Optional, Tuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from memorizing.knn_api import KNNBackend, SearchContext
from memorizing.model import memory as memory_lib
from memorizing.model.config import ModelConfig
from memorizing.model.decoder import CarriedState, init_carried_state, layer_name, output_logits
from memorizing.model.layers import MLP, RelativePositionBias, XLCache, l2_normalize, local_attention
from memorizing.model.memory_attention import attend_retrieved, retrieve


@flax.struct.dataclass
class SegmentBuffer:
  """Keys/values of the tokens of the current (partial) segment, per layer.

  keys, values: {"layer_i": [B, H, L, D]}; only slots [0, position) are meaningful.
  """
  keys: Dict[str, jax.Array]
  values: Dict[str, jax.Array]


@flax.struct.dataclass
class DecodeState:
  """What incremental decoding carries: the Decoder's state and the segment buffer.

  position: int32 scalar, tokens of the current segment already written (0..L).
  """
  carried: CarriedState
  segment: SegmentBuffer
  position: jax.Array


def init_segment_buffer(config: ModelConfig, batch: int) -> SegmentBuffer:
  shape = (batch, config.num_heads, config.segment_length, config.head_dim)
  names = [layer_name(i) for i in range(config.num_layers)]
  return SegmentBuffer(keys={n: jnp.zeros(shape, config.compute_dtype) for n in names},
                       values={n: jnp.zeros(shape, config.compute_dtype) for n in names})


def init_decode_state(config: ModelConfig, batch: int,
                      carried: Optional[CarriedState] = None) -> DecodeState:
  """A state at a segment boundary: `carried` (default: empty, a new document)."""
  carried = init_carried_state(config, batch) if carried is None else carried
  return DecodeState(carried=carried, segment=init_segment_buffer(config, batch),
                     position=jnp.zeros((), jnp.int32))


class IncrementalAttention(nn.Module):
  """One token of memory_attention.Attention (same parameters)."""
  config: ModelConfig
  layer: int
  has_memory: bool = False
  backend: Optional[KNNBackend] = None

  @nn.compact
  def __call__(self, x, bias_row, position, xl: Optional[XLCache], seg_k, seg_v,
               mem: Optional[memory_lib.MemoryState]):
    """x [B,1,M], bias_row [H,1,K] -> (out [B,1,M], new seg_k, new seg_v)."""
    cfg = self.config
    b = x.shape[0]
    length = cfg.segment_length
    proj = lambda name: nn.DenseGeneral((cfg.num_heads, cfg.head_dim), dtype=cfg.compute_dtype,
                                        param_dtype=cfg.params_dtype, use_bias=False,
                                        kernel_init=nn.initializers.xavier_uniform(), name=name)
    to_heads = lambda t: jnp.transpose(t, (0, 2, 1, 3))
    q = l2_normalize(to_heads(proj("query")(x)))                     # [B,H,1,D]
    k = l2_normalize(to_heads(proj("key")(x)))
    v = to_heads(proj("value")(x))
    scale = self.param("logit_scale", nn.initializers.constant(cfg.initial_logit_scale),
                       (cfg.num_heads,), jnp.float32)
    seg_k = jax.lax.dynamic_update_slice(seg_k, k.astype(seg_k.dtype), (0, 0, position, 0))
    seg_v = jax.lax.dynamic_update_slice(seg_v, v.astype(seg_v.dtype), (0, 0, position, 0))

    joint = self.has_memory and cfg.memory_enabled and cfg.memory_combine == "joint"
    in_segment = jnp.arange(length) <= position                          # [L]
    if xl is not None:
      keys = jnp.concatenate([xl.keys.astype(k.dtype), seg_k.astype(k.dtype)], axis=2)
      values = jnp.concatenate([xl.values.astype(v.dtype), seg_v.astype(v.dtype)], axis=2)
      mask = jnp.concatenate([jnp.broadcast_to(xl.valid[:, None], (b, xl.keys.shape[2])),
                              jnp.broadcast_to(in_segment[None], (b, length))], axis=1)
    else:
      keys, values = seg_k.astype(k.dtype), seg_v.astype(v.dtype)
      mask = jnp.broadcast_to(in_segment[None], (b, length))
    out = local_attention(q, keys, values, scale, bias_row, mask[:, None, None, :],
                          return_lse=joint)

    if self.has_memory:
      if cfg.memory_combine == "gate":
        gate = jax.nn.sigmoid(self.param("memory_gate",
                                         nn.initializers.constant(cfg.memory_gate_init),
                                         (cfg.num_heads,), jnp.float32))
        mem_bias = None
      else:
        mem_bias = self.param("memory_bias", nn.initializers.constant(cfg.memory_bias_init),
                              (cfg.num_heads,), jnp.float32)
      if cfg.memory_enabled:
        if self.backend is None:
          raise ValueError("a memory layer needs a kNN backend: IncrementalDecoder(config, "
                           "memorizing.knn.make_backend(config))")
        # No new keys: the memory changes only at commit, as in the Decoder.
        context = SearchContext(layer=self.layer, train=False,
                                reset=jnp.zeros((b,), bool),
                                new_keys=jnp.zeros(k.shape[:2] + (0,) + k.shape[3:], k.dtype))
        _, valid, mem_k, mem_v = retrieve(q, mem, self.backend, cfg.num_neighbors, context)
        mem_out, _, mem_lse = attend_retrieved(q, mem_k, mem_v, valid, scale, mem_bias)
        if joint:
          local_out, local_lse = out
          w = jax.nn.sigmoid(mem_lse - local_lse)[..., None]
          out = (w * mem_out.astype(jnp.float32)
                 + (1.0 - w) * local_out.astype(jnp.float32)).astype(local_out.dtype)
        else:
          g = gate[None, :, None, None]
          out = (g * mem_out.astype(jnp.float32)
                 + (1.0 - g) * out.astype(jnp.float32)).astype(out.dtype)
      elif cfg.memory_combine == "gate":
        g = gate[None, :, None, None]
        out = ((1.0 - g) * out.astype(jnp.float32)).astype(out.dtype)

    out = jnp.transpose(out, (0, 2, 1, 3))
    out = nn.DenseGeneral(cfg.d_model, axis=(-2, -1), dtype=cfg.compute_dtype,
                          param_dtype=cfg.params_dtype, use_bias=False,
                          kernel_init=nn.initializers.xavier_uniform(), name="out")(out)
    return out, seg_k, seg_v


class IncrementalBlock(nn.Module):
  config: ModelConfig
  layer: int
  backend: Optional[KNNBackend] = None

  @nn.compact
  def __call__(self, x, bias_row, position, xl, seg_k, seg_v, mem):
    cfg = self.config
    ln = lambda name: nn.LayerNorm(epsilon=1e-6, dtype=cfg.compute_dtype,
                                   param_dtype=cfg.params_dtype, name=name)
    h, seg_k, seg_v = IncrementalAttention(cfg, self.layer, has_memory=mem is not None,
                                           backend=self.backend, name="attention")(
        ln("pre_attention_norm")(x), bias_row, position, xl, seg_k, seg_v, mem)
    x = x + h
    x = x + MLP(cfg, name="mlp")(ln("pre_mlp_norm")(x), True)
    return x, seg_k, seg_v


class IncrementalDecoder(nn.Module):
  """One token per row at `state.position`; the Decoder's parameters.

  __call__(tokens [B] int32, state: DecodeState) -> (logits [B, V] float32,
  DecodeState with the token written and position + 1). When position reaches
  segment_length, call `commit` before the next step.
  """
  config: ModelConfig
  backend: Optional[KNNBackend] = None

  @nn.compact
  def __call__(self, tokens: jax.Array, state: DecodeState) -> Tuple[jax.Array, DecodeState]:
    cfg = self.config
    length = cfg.segment_length
    position = state.position
    embed = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=nn.initializers.normal(1.0),
                     param_dtype=cfg.params_dtype, dtype=cfg.compute_dtype, name="embed")
    x = embed(tokens[:, None])                                       # [B,1,M]
    num_keys = length * (2 if cfg.use_xl_cache else 1)
    bias_row = RelativePositionBias(cfg, name="relative_position_bias")(   # [H,1,K]: the
        1, num_keys, query_start=num_keys - length + position)             # query's row only
    new_k, new_v = {}, {}
    for i in range(cfg.num_layers):
      name = layer_name(i)
      xl = state.carried.xl.get(name) if cfg.use_xl_cache else None
      mem = state.carried.memory.get(name)
      row = bias_row
      if mem is not None and not cfg.memory_layer_position_bias:
        row = jnp.zeros_like(bias_row)
      x, new_k[name], new_v[name] = IncrementalBlock(cfg, i, backend=self.backend,
                                                     name=f"block_{i}")(
          x, row, position, xl, state.segment.keys[name], state.segment.values[name], mem)
    logits = output_logits(cfg, embed, x)
    new_state = state.replace(segment=SegmentBuffer(keys=new_k, values=new_v),
                              position=position + 1)
    return logits[:, 0], new_state


def commit(config: ModelConfig, backend: Optional[KNNBackend], state: DecodeState) -> DecodeState:
  """A full segment buffer becomes the XL cache and goes into the memory (FIFO);
  position back to 0. What the Decoder does at the end of a segment."""
  xl, mem = dict(state.carried.xl), dict(state.carried.memory)
  for i in range(config.num_layers):
    name = layer_name(i)
    seg_k, seg_v = state.segment.keys[name], state.segment.values[name]
    batch = seg_k.shape[0]
    if config.use_xl_cache:
      old = xl[name]
      xl[name] = XLCache(keys=seg_k.astype(old.keys.dtype), values=seg_v.astype(old.values.dtype),
                         valid=jnp.ones_like(old.valid))
    if name in mem and config.memory_enabled:
      m = mem[name]
      if backend is not None:
        # Host backends insert the new keys in their search call; the result is unused.
        context = SearchContext(layer=i, train=False, reset=jnp.zeros((batch,), bool),
                                new_keys=seg_k)
        idx, _ = backend.search(seg_k[:, :, :1], m, config.num_neighbors, context)
        # Keep the call (and its insert) alive: the new pointer depends on its
        # result (slots are >= 0, so this adds 0, which the compiler cannot know).
        dep = jnp.minimum(jnp.min(idx), 0)
        m = m.replace(pointer=m.pointer + dep.astype(m.pointer.dtype))
      mem[name] = memory_lib.append(m, seg_k, seg_v)
  return DecodeState(carried=CarriedState(xl=xl, memory=mem),
                     segment=state.segment, position=jnp.zeros((), jnp.int32))


class Stepper:
  """Jitted step and commit for one (config, backend); compiled once per batch size.

    stepper = Stepper(config, backend)
    logits, state = stepper.step(params, tokens, state)   # commits a full segment first
  """

  def __init__(self, config: ModelConfig, backend: Optional[KNNBackend]):
    self.config = config
    self.backend = backend
    model = IncrementalDecoder(config, backend)

    def decode_token(p, t, s):          # named: the profiler's module is jit_decode_token
      return model.apply({"params": p}, t, s)
    # The state is donated: without that, every token copied the whole memory
    # (keys and values) from the old state into the new one, though only the
    # current segment's caches change (memorizing/tools/profile_ops.py showed it).
    self._step = jax.jit(decode_token, donate_argnums=2)
    self._commit = jax.jit(functools.partial(commit, config, backend), donate_argnums=0)

  def commit(self, state: DecodeState) -> DecodeState:
    return self._commit(state)

  def step(self, params, tokens: jax.Array, state: DecodeState,
           position: Optional[int] = None) -> Tuple[jax.Array, DecodeState]:
    """One token per row. `position` (host int, the state's) saves a device read."""
    if position is None:
      position = int(state.position)
    if position == self.config.segment_length:
      state = self._commit(state)
    return self._step(params, jnp.asarray(tokens, jnp.int32), state)
