"""kNN search backends behind one interface.

A backend maps queries [batch, heads, queries, head_dim] and a memory's ring
buffer (memorizing.memory.MemoryState) to int32 slot indices
[batch, heads, queries, k] and a bool validity mask of the same shape. The
memory layer gathers the keys and values itself, on the device. Backends know
nothing of Flax modules.

Backends register themselves by name; `get_backend(name, options)` returns
one shared instance per (name, options), so a host backend's searcher cache
lives as long as the process.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, NamedTuple, Tuple

import jax

from memorizing.memory import MemoryState


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
  """Interface. Subclasses implement `search`."""
  name = "base"

  def search(self, queries: jax.Array, memory: MemoryState, k: int,
             context: SearchContext) -> Tuple[jax.Array, jax.Array]:
    """Returns (indices int32 [B, H, Q, k], valid bool [B, H, Q, k]).

    `memory` is the ring buffer after this segment's reset and before its
    append. Slots outside `[0, memory.count)` must never be valid. Called under
    jit; queries carry no gradient.
    """
    raise NotImplementedError

  def sync(self, layer: int, train: bool, memory: MemoryState) -> None:
    """Rebuilds host-side indices from the device ring buffer (after a restore).

    Device backends keep no state of their own, so this does nothing.
    """


# name -> "module:Class" so that optional backends (ScaNN) import lazily.
_REGISTRY: Dict[str, str] = {
    "exact": "memorizing.knn.exact:ExactBackend",
    "device": "memorizing.knn.device:DeviceBackend",
    "scann": "memorizing.knn.scann_host:ScannBackend",
}
_INSTANCES: Dict[Tuple[str, Tuple[Tuple[str, Any], ...]], KNNBackend] = {}


class UnknownBackendError(ValueError):
  pass


def register(name: str, target: str) -> None:
  """Registers a backend class given as "module:Class"."""
  _REGISTRY[name] = target


def available() -> Tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


def get_backend(name: str, options: Tuple[Tuple[str, Any], ...] = ()) -> KNNBackend:
  """The shared backend instance for `name` built with keyword `options`."""
  if isinstance(options, dict):
    options = tuple(sorted(options.items()))
  key = (name, tuple(options))
  if key not in _INSTANCES:
    if name not in _REGISTRY:
      raise UnknownBackendError(
          f"unknown kNN backend {name!r}; choose one of {', '.join(available())}")
    module_name, cls_name = _REGISTRY[name].split(":")
    try:
      module = importlib.import_module(module_name)
    except ImportError as e:
      raise UnknownBackendError(
          f"kNN backend {name!r} cannot be loaded ({e}); "
          + ("install it with `pip install -e .[scann]`" if name == "scann" else "")) from e
    cls: Callable[..., KNNBackend] = getattr(module, cls_name)
    _INSTANCES[key] = cls(**dict(options))
  return _INSTANCES[key]


def gather(table: jax.Array, indices: jax.Array) -> jax.Array:
  """table [B, H, N, D], indices [B, H, Q, k] -> [B, H, Q, k, D]."""
  b, h, q, k = indices.shape
  flat = indices.reshape(b, h, q * k)
  out = jax.vmap(jax.vmap(lambda t, i: t[i]))(table, flat)     # [B, H, Q*k, D]
  return out.reshape(b, h, q, k, table.shape[-1])
