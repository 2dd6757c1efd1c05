"""Top-k helpers of the device kNN search: a partition-friendly top_k, padding, slot masks."""
from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp


def round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def top_k(x: jax.Array, k: int, impl: str = "sort") -> Tuple[jax.Array, jax.Array]:
  """(values, indices) of the k largest entries of the last axis, like lax.top_k.

  impl "sort": a stable descending sort of (value, index) pairs, then the first
  k. Unlike lax.top_k (the HLO TopK op, which the SPMD partitioner all-gathers
  over the batch dimensions, seen with jax 0.10 on CPU), a sort partitions
  along its other axes, so rows sharded over devices stay on their device.
  impl "lax": lax.top_k. Ties: the lower index first in both.
  """
  if impl == "lax":
    return jax.lax.top_k(x, k)
  axis = x.ndim - 1
  idx = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis)
  flip = jnp.bitwise_not if jnp.issubdtype(x.dtype, jnp.integer) else jnp.negative
  v, i = jax.lax.sort((flip(x), idx), dimension=axis, num_keys=1, is_stable=True)
  return flip(v[..., :k]), i[..., :k]


def top_k_padded(scores: jax.Array, k: int, impl: str = "sort") -> Tuple[jax.Array, jax.Array]:
  """top_k over the last axis that also works when it is shorter than k.

  scores [..., n] float32 (-inf marks invalid). Returns (values, indices) [..., k].
  """
  n = scores.shape[-1]
  if n < k:
    pad = [(0, 0)] * (scores.ndim - 1) + [(0, k - n)]
    scores = jnp.pad(scores, pad, constant_values=-jnp.inf)
  return top_k(scores, k, impl)


def slot_bias(count: jax.Array, n_pad: int) -> jax.Array:
  """[B, n_pad] float32: 0 for valid slots [0, count), -inf otherwise."""
  valid = jnp.arange(n_pad)[None, :] < count[:, None]
  return jnp.where(valid, 0.0, -jnp.inf).astype(jnp.float32)
