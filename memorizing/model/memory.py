"""The kNN memory: a FIFO ring buffer of (key, value) pairs per (row, head).

Pure functions over an explicit state, so the trainer can jit, shard,
checkpoint and reset it. All heads of a row are written in lockstep, so the
write pointer and the fill count are kept per row.

Slots are filled from 0 after a reset, so the valid slots of a row are exactly
`[0, count)`; a slot never written is never valid.
"""
from __future__ import annotations

from typing import Any, Tuple

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class MemoryState:
  """Ring buffer of one memory layer.

  keys:    [batch, heads, memory_size, head_dim]  (L2-normalised)
  values:  [batch, heads, memory_size, head_dim]
  pointer: [batch] int32, the next slot to write
  count:   [batch] int32, number of valid slots (<= memory_size)
  """
  keys: jax.Array
  values: jax.Array
  pointer: jax.Array
  count: jax.Array

  @property
  def size(self) -> int:
    return self.keys.shape[2]

  def valid_mask(self) -> jax.Array:
    """[batch, memory_size] bool: which slots hold a stored pair."""
    return jnp.arange(self.size)[None, :] < self.count[:, None]


def init(batch: int, heads: int, size: int, head_dim: int, dtype=jnp.float32) -> MemoryState:
  """An empty memory."""
  shape = (batch, heads, size, head_dim)
  # Two distinct buffers: the trainer donates the state, and a buffer may be donated once.
  return MemoryState(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype),
                     pointer=jnp.zeros((batch,), jnp.int32),
                     count=jnp.zeros((batch,), jnp.int32))


def reset(state: MemoryState, start: jax.Array) -> MemoryState:
  """Empties the rows where `start` [batch] bool is set; other rows untouched."""
  start = start.astype(bool)
  return state.replace(pointer=jnp.where(start, 0, state.pointer),
                       count=jnp.where(start, 0, state.count))


def append_slots(pointer: jax.Array, num_new: int, size: int) -> jax.Array:
  """Slots written by `append` of `num_new` keys: [batch, min(num_new, size)].

  A segment longer than the memory keeps only its newest `size` keys.
  Host backends use this to mirror the ring buffer slot for slot.
  """
  m = min(num_new, size)
  return (pointer[:, None] + jnp.arange(m, dtype=jnp.int32)[None, :]) % size


def append(state: MemoryState, keys: jax.Array, values: jax.Array) -> MemoryState:
  """Writes a segment's keys/values [batch, heads, L, head_dim] after the newest entries."""
  size, length = state.size, keys.shape[2]
  m = min(length, size)
  keys = jax.lax.stop_gradient(keys[:, :, length - m:]).astype(state.keys.dtype)
  values = jax.lax.stop_gradient(values[:, :, length - m:]).astype(state.values.dtype)
  slots = append_slots(state.pointer, length, size)            # [batch, m]

  def write_row(buf, new, idx):                                 # [H,N,D], [H,m,D], [m]
    return buf.at[:, idx].set(new, unique_indices=True)

  new_keys = jax.vmap(write_row)(state.keys, keys, slots)
  new_values = jax.vmap(write_row)(state.values, values, slots)
  return MemoryState(keys=new_keys, values=new_values,
                     pointer=(state.pointer + m) % size,
                     count=jnp.minimum(state.count + m, size))


def after_reads(reads: Any, *arrays: jax.Array) -> Tuple[jax.Array, ...]:
  """`arrays` unchanged, but made to depend on `reads` (arrays read from a memory).

  Give the keys and values of `append` this way after the gathers of the same
  step: XLA writes the ring buffer in place only when the write provably comes
  after every read of the old contents; otherwise it copies the whole memory
  (on the CPU twice per tensor and step). The dependence is a zero computed
  from one element of each read (non-finite values count as 0), so the result
  equals `arrays` (a -0.0 becomes +0.0, which no dot product can tell apart).
  """
  zero = jnp.zeros((), jnp.float32)
  for leaf in jax.tree_util.tree_leaves(reads):
    x = jax.lax.stop_gradient(leaf).reshape(-1)[:1].astype(jnp.float32)
    zero = zero + jnp.sum(jnp.where(jnp.isfinite(x), x, 0.0) * 0.0)
  return tuple(a + zero.astype(a.dtype) for a in arrays)


def gather(table: jax.Array, indices: jax.Array) -> jax.Array:
  """table [B, H, N, D], indices [B, H, Q, k] -> [B, H, Q, k, D]."""
  b, h, q, k = indices.shape
  flat = indices.reshape(b, h, q * k)
  out = jax.vmap(jax.vmap(lambda t, i: t[i]))(table, flat)     # [B, H, Q*k, D]
  return out.reshape(b, h, q, k, table.shape[-1])
