"""Strided-bucket approximate top-k in plain XLA (memorizing/knn/device.py explains the method).

Slot n of a (row, head) belongs to bucket n % S; per query the best score of
each bucket and its slot are kept, then the top k of the S bucket maxima.
The score matrix goes over queries in chunks so one block stays under
`max_score_elements`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from memorizing.errors import ConfigError
from memorizing.knn.topk import round_up, slot_bias, top_k


def buckets_for_recall(k: int, recall_target: float) -> int:
  """Smallest power of two S >= k with 1 - (k-1)/(2S) >= recall_target."""
  if not 0.0 < recall_target < 1.0:
    raise ConfigError(f"DeviceBackend recall_target must be in (0, 1), got {recall_target}")
  need = (k - 1) / (2.0 * (1.0 - recall_target))
  s = max(k, 16)
  while s < need:
    s *= 2
  return s


def buckets_xla(queries, keys, count, num_buckets, k, score_dtype, max_score_elements,
                 top_k_impl="sort"):
  """queries [B,H,Q,D], keys [B,H,N,D] -> (values [B,H,Q,k] f32, slots [B,H,Q,k])."""
  b, h, q, d = queries.shape
  n = keys.shape[2]
  s = num_buckets
  n_pad = round_up(n, s)
  bias = slot_bias(count, n_pad)                                  # [B, n_pad]
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
