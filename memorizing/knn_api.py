"""The kNN search interface: what a memory layer asks of a backend.

A backend maps queries [batch, heads, queries, head_dim] and a memory's ring
buffer (memorizing.model.memory.MemoryState: keys, values [B, H, N, D],
pointer, count [B]) to int32 slot indices [batch, heads, queries, k] and a
bool validity mask of the same shape. The memory layer gathers the keys and
values itself, on the device. Backends know nothing of Flax modules.

This module is the lowest layer of the model: it imports nothing else of the
package. The backends live in memorizing/knn/ (built by
`memorizing.knn.make_backend(config)`), and whoever runs a model creates one
and passes it in: `Decoder(config, backend)`.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Tuple

import jax


class SearchContext(NamedTuple):
  """What a stateful (host) backend needs besides the queries.

  layer:    index of the memory layer (static)
  train:    whether this is a training or an evaluation pass (static)
  reset:    [batch] bool, rows whose document starts at this segment
  new_keys: [batch, heads, segment, head_dim], the keys appended after search
  Device backends ignore everything here.
  """
  layer: int
  train: bool
  reset: jax.Array
  new_keys: jax.Array


class KNNBackend:
  """Interface. Subclasses implement `search`; host backends also `sync` and `close`."""
  name = "base"

  def search(self, queries: jax.Array, memory: Any, k: int,
             context: SearchContext) -> Tuple[jax.Array, jax.Array]:
    """Returns (indices int32 [B, H, Q, k], valid bool [B, H, Q, k]).

    `memory` (a MemoryState) is the ring buffer after this segment's reset and
    before its append. Slots outside `[0, memory.count)` must never be valid.
    Called under jit; queries carry no gradient.
    """
    raise NotImplementedError

  def sync(self, layer: int, train: bool, memory: Any) -> None:
    """Rebuilds host-side indices from the device ring buffer (after a restore).

    Device backends keep no state of their own, so this does nothing.
    """

  def close(self) -> None:
    """Releases host resources (threads, indices). Device backends hold none."""
