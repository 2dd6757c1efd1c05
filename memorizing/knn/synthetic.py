"""Synthetic key streams and recall, for tests and benchmarks (scripts/benchmark_knn.py).

Not part of any backend.
"""
from __future__ import annotations

import math
from typing import Tuple

import jax
import jax.numpy as jnp


def synthetic_memory(rng: jax.Array, batch: int, heads: int, size: int, num_queries: int,
                     head_dim: int, num_topics: int = 64, topic_run: int = 256,
                     coarse_every: int = 16, coarse_scale: float = 0.7,
                     fine_scale: float = 0.5) -> Tuple[jax.Array, jax.Array]:
  """Keys and queries with the structure of a document's key stream (tests, benchmarks).

  Positions 0 .. size+num_queries-1 of each (row, head) form one stream; the
  first `size` are keys, the rest queries (the next segment). Position p is
      normalise(topic_centre[t(p // topic_run)]
                + coarse_scale * u[p // coarse_every] + fine_scale * e[p])
  with `num_topics` random unit centres per (row, head), a topic drawn per run
  of `topic_run` positions, u and e Gaussian with unit expected norm. So keys
  cluster by topic and neighbouring positions are correlated, as in real
  streams; uniform random keys would make kNN meaningless.
  Returns keys [B,H,size,D], queries [B,H,num_queries,D], float32, unit norm.
  """
  total = size + num_queries
  r_c, r_t, r_u, r_e = jax.random.split(rng, 4)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  centres = unit(jax.random.normal(r_c, (batch, heads, num_topics, head_dim)))
  runs = -(-total // topic_run)
  topic = jax.random.randint(r_t, (batch, heads, runs), 0, num_topics)
  pos = jnp.arange(total)
  t = topic[:, :, pos // topic_run]                                   # [B,H,total]
  x = jnp.take_along_axis(centres, t[..., None], axis=2)
  coarse = jax.random.normal(r_u, (batch, heads, -(-total // coarse_every), head_dim))
  x = x + coarse_scale / math.sqrt(head_dim) * coarse[:, :, pos // coarse_every]
  x = x + fine_scale / math.sqrt(head_dim) * jax.random.normal(r_e, (batch, heads, total, head_dim))
  x = unit(x).astype(jnp.float32)
  return x[:, :, :size], x[:, :, size:]


def recall(indices: jax.Array, valid: jax.Array, exact_indices: jax.Array,
           exact_valid: jax.Array) -> float:
  """Fraction of the exact valid neighbours that the approximate result holds.

  All arguments [B,H,Q,k]. Invalid entries count on neither side.
  """
  a = jnp.where(valid, indices, -1)[..., :, None]
  e = jnp.where(exact_valid, exact_indices, -2)[..., None, :]
  hit = jnp.any(a == e, axis=-2) & exact_valid                      # [B,H,Q,k]
  return float(hit.sum() / jnp.maximum(exact_valid.sum(), 1))
