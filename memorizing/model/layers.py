"""Building blocks: relative position bias, MLP, attention with an XL cache.

Shapes: B batch rows, L segment length, C = cache length (L with the XL cache,
else 0), K = C + L keys, H heads, D head_dim, M d_model.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from memorizing.model.config import ConfigError, ModelConfig

NEG_INF = -1e30

# How local attention is computed (see `xl_attention`), ModelConfig.attention:
#   "einsum": two einsums and a float32 softmax; the [B,H,L,K] probabilities are
#             kept for the backward pass. The reference path (CPU default).
#   "remat":  the same under jax.checkpoint: the backward pass recomputes the
#             scores instead of keeping them.
#   "cudnn":  jax.nn.dot_product_attention(implementation="cudnn"), cuDNN's fused
#             flash attention with the position bias and masks as one [1,H,L,K]
#             bias and per-row key lengths; no score matrix in device memory.
#             bfloat16/float16 compute on an NVIDIA GPU only.
#   "xla":    the "cudnn" arrangement through jax.nn.dot_product_attention's
#             XLA implementation (any backend; checks the arrangement on CPU).
#   "auto":   "cudnn" on GPU with a 16-bit compute dtype, else "einsum".
# The choice comes from the config alone; there is no process-wide switch.
ATTENTION_IMPLEMENTATIONS = ("auto", "einsum", "remat", "cudnn", "xla")


def attention_implementation(name: str = "auto", dtype=None) -> str:
  """The implementation `xl_attention` runs for `name` (ModelConfig.attention) and
  inputs of `dtype` on this backend: "auto" resolved, any other name as is."""
  if name not in ATTENTION_IMPLEMENTATIONS:
    raise ConfigError(f"ModelConfig.attention={name!r}; choose one of "
                      f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")
  if name != "auto":
    return name
  if jax.default_backend() == "gpu" and dtype is not None and \
      jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return "cudnn"
  return "einsum"


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


# --- table lookups ----------------------------------------------------------------------
# The one-hot gradient is used where its [N, V] one-hot matrix has at most this
# many entries (ModelConfig.gather_gradient = "auto"). On a GPU up to 2**30,
# which covers the paper preset's 32K pieces x 32 x 512 tokens: there on
# text-like (Zipf) ids one-hot is 59.15 ms per step against the scatter's 69.62,
# on uniform ids 59.34 against 57.27 (docs/benchmark_step.md); XLA fuses the
# one-hot into the matmul (peak memory unchanged). Elsewhere 2**26 (the byte and
# 8K-piece vocabularies at the batch sizes used here, the position-bias table): a
# CPU's scatter has no atomics to contend on, and the matmul is not free there.
ONE_HOT_GRADIENT_MAX_ENTRIES = 1 << 26
ONE_HOT_GRADIENT_MAX_ENTRIES_GPU = 1 << 30


def one_hot_gradient_limit(backend: str) -> int:
  """The most one-hot entries for which "auto" takes the one-hot gradient."""
  return ONE_HOT_GRADIENT_MAX_ENTRIES_GPU if backend == "gpu" else ONE_HOT_GRADIENT_MAX_ENTRIES


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _take_one_hot_grad(table: jax.Array, ids: jax.Array, num_rows: int) -> jax.Array:
  return jnp.take(table, ids, axis=0)


def _take_fwd(table, ids, num_rows):
  return jnp.take(table, ids, axis=0), ids


def _take_bwd(num_rows, ids, g):
  flat = ids.reshape(-1)
  g2 = g.reshape(flat.shape[0], -1)                                   # [N, F]
  one_hot = (flat[:, None] == jnp.arange(num_rows, dtype=flat.dtype)[None, :]).astype(g.dtype)
  grad = jax.lax.dot_general(one_hot, g2, (((0,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)      # [V, F]
  return grad.reshape((num_rows,) + g.shape[ids.ndim:]).astype(g.dtype), None


_take_one_hot_grad.defvjp(_take_fwd, _take_bwd)


def take_rows(table: jax.Array, ids: jax.Array, gradient: str = "auto") -> jax.Array:
  """table[ids]: [V, ...] rows gathered by integer `ids` [...] -> [*ids.shape, ...].

  The forward is `jnp.take`. Its gradient with respect to `table` is a sum over
  the positions of each id: XLA computes it as a scatter-add, whose atomic adds
  serialise on a GPU when ids repeat (text: spaces, newlines, frequent words),
  so the step's time depends on the data. `gradient="one_hot"` computes the same
  sum as one_hot(ids)^T @ g, a matmul with float32 accumulation whose cost does
  not depend on the ids (and which is deterministic); "auto" takes it while the
  one-hot matrix has at most `one_hot_gradient_limit(jax.default_backend())`
  entries (2**30 on a GPU, 2**26 elsewhere).
  """
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"take_rows needs integer ids, got {ids.dtype}")
  if gradient == "auto":
    limit = one_hot_gradient_limit(jax.default_backend())
    gradient = "one_hot" if ids.size * table.shape[0] <= limit else "scatter"
  if gradient == "one_hot":
    return _take_one_hot_grad(table, ids, table.shape[0])
  if gradient == "scatter":
    return jnp.take(table, ids, axis=0)
  raise ValueError(f"gradient={gradient!r}; choose one of auto, one_hot, scatter")


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
  """Learned bias per (bucket, head), shared by all layers as in T5.

  The table starts at std 0.02; the optimizer learns it faster than the other
  weights through TrainConfig.learning_rate_multipliers (parameter name
  `relative_position_bias`).
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, num_queries: int, num_keys: int, query_start=None) -> jax.Array:
    """Returns [H, Q, K] for queries at the last Q of K consecutive positions, or,
    given `query_start` (an int, may be traced), at positions query_start ..
    query_start + Q - 1 of the K (a decoder's one query per step)."""
    cfg = self.config
    table = self.param("rel_embedding", nn.initializers.normal(0.02),
                       (cfg.relative_position_buckets, cfg.num_heads), cfg.params_dtype)
    table = table.astype(jnp.float32)
    start = num_keys - num_queries if query_start is None else query_start
    q_pos = jnp.arange(num_queries) + start
    k_pos = jnp.arange(num_keys)
    buckets = relative_position_bucket(q_pos[:, None] - k_pos[None, :],
                                       cfg.relative_position_buckets,
                                       cfg.relative_position_max_distance)
    bias = take_rows(table, buckets, cfg.gather_gradient)                  # [Q, K, H]
    return jnp.transpose(bias, (2, 0, 1)).astype(jnp.float32)


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


def local_attention(q, k, v, scale, bias, mask, return_lse=False):
  """Softmax attention over the local window.

  q [B,H,L,D], k/v [B,H,K,D], scale [H], bias [H,L,K], mask [B,1|H,L,K] bool.
  Returns [B,H,L,D] in q's dtype; logits and softmax in float32. With
  `return_lse`, also the log-sum-exp of the logits [B,H,L] float32, which lets
  a caller merge this softmax with another one (memory_attention, "joint").
  """
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  logits = logits * scale[None, :, None, None] + bias[None]
  logits = jnp.where(mask, logits, NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v)
  if return_lse:
    return out, jax.nn.logsumexp(logits, axis=-1)
  return out


def local_window(q_len: int, cache_valid: jax.Array | None) -> jax.Array:
  """[B|1, 1, L, C+L] bool: causal over the segment, plus the whole valid cache."""
  causal = jnp.tril(jnp.ones((q_len, q_len), bool))[None, None]
  if cache_valid is None:
    return causal
  cache = jnp.broadcast_to(cache_valid[:, None, None, None],
                           (cache_valid.shape[0], 1, q_len, q_len))
  return jnp.concatenate([cache, jnp.broadcast_to(causal, cache.shape)], axis=-1)


def xl_attention(q, k, v, scale, bias, cache_k=None, cache_v=None, cache_valid=None,
                 impl="auto", return_lse=False):
  """Local attention of a segment over [XL cache | segment], causal in the segment.

  q, k, v [B,H,L,D]; cache_k, cache_v [B,H,C,D] or None; cache_valid [B] bool;
  scale [H]; bias [H,L,C+L] (columns in [cache | segment] order). Returns
  [B,H,L,D] in q's dtype (and the logits' log-sum-exp [B,H,L] with
  `return_lse`, which the fused kernels do not give: then einsum or remat runs).
  `impl` is ModelConfig.attention ("auto" is resolved by `attention_implementation`).
  """
  impl = attention_implementation(impl, q.dtype)
  if return_lse and impl not in ("einsum", "remat"):
    impl = "einsum"
  length = q.shape[2]
  if impl in ("cudnn", "xla"):
    return _fused_xl_attention(q, k, v, scale, bias, cache_k, cache_v, cache_valid, impl)
  if cache_k is not None:
    keys = jnp.concatenate([cache_k.astype(k.dtype), k], axis=2)
    values = jnp.concatenate([cache_v.astype(v.dtype), v], axis=2)
    mask = local_window(length, cache_valid)
  else:
    keys, values, mask = k, v, local_window(length, None)
  fn = functools.partial(local_attention, return_lse=return_lse)
  fn = jax.checkpoint(fn) if impl == "remat" else fn
  return fn(q, keys, values, scale, bias, mask)


def _fused_xl_attention(q, k, v, scale, bias, cache_k, cache_v, cache_valid, implementation):
  """cuDNN flash attention. Keys go in [segment | cache] order, so that a row
  whose cache is invalid is a row of key length L (cuDNN's padding mask) and
  the causal mask and position bias are one static [1,H,L,C+L] bias (whose
  gradient cuDNN returns). The per-head logit scale is folded into q."""
  length = q.shape[2]
  dtype = q.dtype
  causal = jnp.tril(jnp.ones((length, length), bool))
  qs = (q.astype(jnp.float32) * scale[None, :, None, None]).astype(dtype)
  if cache_k is not None:
    c = cache_k.shape[2]
    keys = jnp.concatenate([k, cache_k.astype(dtype)], axis=2)
    values = jnp.concatenate([v, cache_v.astype(dtype)], axis=2)
    bias = jnp.concatenate([bias[:, :, c:], bias[:, :, :c]], axis=-1)
    allowed = jnp.concatenate([causal, jnp.ones((length, c), bool)], axis=-1)
    kv_len = jnp.where(cache_valid, c + length, length).astype(jnp.int32)
  else:
    keys, values, allowed, kv_len = k, v, causal, None
  # Finite (cuDNN mishandles -inf - -inf), as in jax's own combine_bias_and_mask.
  big_neg = -2.0 ** 15 if dtype == jnp.float16 else -2.0 ** 41
  full_bias = jnp.where(allowed[None], bias.astype(jnp.float32), big_neg).astype(dtype)[None]
  to_btnh = lambda t: jnp.transpose(t, (0, 2, 1, 3))
  out = jax.nn.dot_product_attention(
      to_btnh(qs), to_btnh(keys), to_btnh(values), bias=full_bias, scale=1.0,
      key_value_seq_lengths=kv_len, implementation=implementation)
  return jnp.transpose(out, (0, 2, 1, 3))
