"""Building blocks: relative position bias, MLP, attention with an XL cache.

Shapes: B batch rows, L segment length, C = cache length (L with the XL cache,
else 0), K = C + L keys, H heads, D head_dim, M d_model.
"""
from __future__ import annotations

import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from memorizing.config import ModelConfig

NEG_INF = -1e30


@flax.struct.dataclass
class XLCache:
  """Keys and values of the previous segment of each row, for one layer.

  keys, values: [B, H, L, D] (keys L2-normalised)
  valid:        [B] bool, False before a row's first segment or after a reset
  """
  keys: jax.Array
  values: jax.Array
  valid: jax.Array


def init_xl_cache(config: ModelConfig, batch: int) -> XLCache:
  shape = (batch, config.num_heads, config.segment_length, config.head_dim)
  return XLCache(keys=jnp.zeros(shape, config.compute_dtype),
                 values=jnp.zeros(shape, config.compute_dtype), valid=jnp.zeros((batch,), bool))


def relative_position_bucket(distance: jax.Array, num_buckets: int, max_distance: int) -> jax.Array:
  """T5's causal buckets of `distance` = query position - key position (>= 0).

  Half the buckets are exact distances, the rest grow logarithmically up to
  `max_distance`; anything further shares the last bucket.
  """
  n = jnp.maximum(distance, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  log_ratio = jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact) / math.log(max_distance / max_exact)
  large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return jnp.where(is_small, n, large)


class RelativePositionBias(nn.Module):
  """Learned bias per (bucket, head), shared by all layers as in T5."""
  config: ModelConfig

  @nn.compact
  def __call__(self, num_queries: int, num_keys: int) -> jax.Array:
    """Returns [H, Q, K] for queries at the last Q of K consecutive positions."""
    cfg = self.config
    table = self.param("rel_embedding", nn.initializers.normal(0.02),
                       (cfg.relative_position_buckets, cfg.num_heads), cfg.params_dtype)
    q_pos = jnp.arange(num_queries) + (num_keys - num_queries)
    k_pos = jnp.arange(num_keys)
    buckets = relative_position_bucket(q_pos[:, None] - k_pos[None, :],
                                       cfg.relative_position_buckets,
                                       cfg.relative_position_max_distance)
    return jnp.transpose(table[buckets], (2, 0, 1)).astype(jnp.float32)


class MLP(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    cfg = self.config
    dense = lambda n, name: nn.Dense(n, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                                     kernel_init=nn.initializers.xavier_uniform(), name=name)
    h = nn.gelu(dense(cfg.mlp_dim, "wi")(x))
    h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    return dense(cfg.d_model, "wo")(h)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Unit-norm rows along the last axis, computed in float32."""
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def local_attention(q, k, v, scale, bias, mask):
  """Softmax attention over the local window.

  q [B,H,L,D], k/v [B,H,K,D], scale [H], bias [H,L,K], mask [B,1|H,L,K] bool.
  Returns [B,H,L,D] in q's dtype; logits and softmax in float32.
  """
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  logits = logits * scale[None, :, None, None] + bias[None]
  logits = jnp.where(mask, logits, NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v)


def local_window(q_len: int, cache_valid: jax.Array | None) -> jax.Array:
  """[B|1, 1, L, C+L] bool: causal over the segment, plus the whole valid cache."""
  causal = jnp.tril(jnp.ones((q_len, q_len), bool))[None, None]
  if cache_valid is None:
    return causal
  cache = jnp.broadcast_to(cache_valid[:, None, None, None],
                           (cache_valid.shape[0], 1, q_len, q_len))
  return jnp.concatenate([cache, jnp.broadcast_to(causal, cache.shape)], axis=-1)
