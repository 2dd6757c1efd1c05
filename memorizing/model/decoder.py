"""The decoder-only transformer and its carried state.

    backend = memorizing.knn.make_backend(config)     # the caller owns it
    logits, state = Decoder(config, backend).apply(params, tokens, state, start_of_document)

`state` (CarriedState) holds per layer the XL cache of the previous segment and
per memory layer the kNN ring buffer. It goes in and comes out of every call,
so the trainer can jit, shard, checkpoint and reset it; rows whose
`start_of_document` is set are cleared inside the call.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from memorizing.knn_api import KNNBackend
from memorizing.model import memory as memory_lib
from memorizing.model.config import ModelConfig
from memorizing.model.layers import MLP, RelativePositionBias, XLCache, init_xl_cache, take_rows
from memorizing.model.memory_attention import Attention


@flax.struct.dataclass
class CarriedState:
  """xl: {"layer_i": XLCache} (empty without the XL cache);
  memory: {"layer_i": MemoryState} for each memory layer."""
  xl: Dict[str, XLCache]
  memory: Dict[str, memory_lib.MemoryState]


def layer_name(i: int) -> str:
  return f"layer_{i}"


def init_carried_state(config: ModelConfig, batch: int) -> CarriedState:
  """Empty caches and memories for `batch` rows."""
  xl = {layer_name(i): init_xl_cache(config, batch)
        for i in range(config.num_layers)} if config.use_xl_cache else {}
  mem = {layer_name(i): memory_lib.init(batch, config.num_heads, config.memory_size,
                                        config.head_dim, config.compute_dtype)
         for i in config.memory_layer_set}
  return CarriedState(xl=xl, memory=mem)


def carried_state_bytes(config: ModelConfig, batch: int) -> int:
  """Device bytes of the carried state: the arithmetic for memory-fit checks."""
  itemsize = jnp.dtype(config.compute_dtype).itemsize
  per_row_head = config.head_dim * 2 * itemsize                   # a key and a value
  xl = config.num_layers * config.segment_length if config.use_xl_cache else 0
  mem = len(config.memory_layer_set) * config.memory_size
  return batch * config.num_heads * per_row_head * (xl + mem)


class DecoderBlock(nn.Module):
  config: ModelConfig
  layer: int
  backend: Optional[KNNBackend] = None

  @nn.compact
  def __call__(self, x, bias, start, xl, mem, *, deterministic, train):
    cfg = self.config
    ln = lambda name: nn.LayerNorm(epsilon=1e-6, dtype=cfg.compute_dtype,
                                   param_dtype=cfg.params_dtype, name=name)
    h, xl, mem = Attention(cfg, self.layer, has_memory=mem is not None, backend=self.backend,
                          name="attention")(
        ln("pre_attention_norm")(x), bias, start, xl, mem,
        deterministic=deterministic, train=train)
    x = x + nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    h = MLP(cfg, name="mlp")(ln("pre_mlp_norm")(x), deterministic)
    x = x + nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    return x, xl, mem


class Decoder(nn.Module):
  """Pre-LayerNorm decoder; kNN memory at `config.memory_layers`, searched by `backend`."""
  config: ModelConfig
  backend: Optional[KNNBackend] = None

  @nn.compact
  def __call__(self, tokens: jax.Array, state: CarriedState, start_of_document: jax.Array,
               *, deterministic: bool = True, train: bool = False
               ) -> Tuple[jax.Array, CarriedState]:
    """tokens [B,L] int32, start_of_document [B] bool -> logits [B,L,V] float32, state."""
    cfg = self.config
    b, length = tokens.shape
    if length != cfg.segment_length:
      raise ValueError(f"tokens have segment length {length}, ModelConfig.segment_length "
                       f"is {cfg.segment_length}")
    start = start_of_document.astype(bool)
    embed = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=nn.initializers.normal(1.0),
                     param_dtype=cfg.params_dtype, dtype=cfg.compute_dtype, name="embed")
    # embed(tokens), with the lookup's gradient chosen by ModelConfig.gather_gradient
    x = take_rows(embed.embedding.astype(cfg.compute_dtype), tokens, cfg.gather_gradient)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    num_keys = length * (2 if cfg.use_xl_cache else 1)
    bias = RelativePositionBias(cfg, name="relative_position_bias")(length, num_keys)

    new_xl, new_mem = {}, {}
    for i in range(cfg.num_layers):
      name = layer_name(i)
      xl = state.xl.get(name) if cfg.use_xl_cache else None
      mem = state.memory.get(name)
      if (i in cfg.memory_layer_set) != (mem is not None):
        raise ValueError(f"carried state has no memory for layer {i}; build it with "
                         "init_carried_state(config, batch)")
      layer_bias = bias
      if mem is not None and not cfg.memory_layer_position_bias:
        layer_bias = jnp.zeros_like(bias)
      x, xl, mem = DecoderBlock(cfg, i, backend=self.backend, name=f"block_{i}")(
          x, layer_bias, start, xl, mem, deterministic=deterministic, train=train)
      if xl is not None:
        new_xl[name] = xl
      if mem is not None:
        new_mem[name] = mem

    return output_logits(cfg, embed, x), CarriedState(xl=new_xl, memory=new_mem)


def output_logits(cfg: ModelConfig, embed: nn.Embed, x: jax.Array) -> jax.Array:
  """Final LayerNorm and logits [B,L,V] float32 of x [B,L,M]. Called inside a
  compact __call__ (Decoder, IncrementalDecoder): its submodules, "final_norm"
  and "logits", belong to the caller, so both decoders share one parameter tree."""
  x = nn.LayerNorm(epsilon=1e-6, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                   name="final_norm")(x)
  if cfg.tie_embeddings:
    logits = embed.attend(x) / jnp.sqrt(cfg.d_model).astype(x.dtype)
  else:
    logits = nn.Dense(cfg.vocab_size, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                      use_bias=False, name="logits")(x)
  return logits.astype(jnp.float32)


def init_params(config: ModelConfig, rng: jax.Array, batch: int = 1) -> Dict:
  """Parameters for `config` (shape-only inputs; no data, no kNN backend needed).

  Initialised with the memory disabled: a memory layer creates the same
  parameters either way (its gate or bias comes before retrieval), so no search
  runs during initialisation.
  """
  config = config.replace(memory_enabled=False)
  tokens = jnp.zeros((batch, config.segment_length), jnp.int32)
  state = init_carried_state(config, batch)
  return Decoder(config).init(rng, tokens, state, jnp.ones((batch,), bool))["params"]


def count_params(params) -> int:
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
