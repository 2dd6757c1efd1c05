"""Reference kNN backend: every dot product, then lax.top_k."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from memorizing.knn_api import KNNBackend
from memorizing.model.memory import MemoryState


def masked_scores(queries: jax.Array, memory: MemoryState) -> jax.Array:
  """[B, H, Q, N] float32 dot products; slots never written are -inf."""
  scores = jnp.einsum("bhqd,bhnd->bhqn", queries, memory.keys,
                      preferred_element_type=jnp.float32)
  return jnp.where(memory.valid_mask()[:, None, None, :], scores, -jnp.inf)


class ExactBackend(KNNBackend):
  """Exact top-k by dot product. Memory O(B H Q N): a reference, not fast."""
  name = "exact"

  def search(self, queries, memory, k, context=None):
    scores = masked_scores(queries, memory)
    top, idx = jax.lax.top_k(scores, k)
    return idx.astype(jnp.int32), jnp.isfinite(top)
