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


def per_device_rows(fn: Callable[..., Any], args: Tuple[jax.Array, ...], num_outputs: int,
                    row_axis: str = "data", shard: bool = True):
  """Calls fn(row0, *local_args) on each device's own rows; returns its outputs.

  Every arg and output has the batch rows on axis 0; row0 is the global index
  of the first local row (int32 scalar). Three cases, by the mesh in context
  while the caller is traced (`jax.set_mesh`, as the trainer's step does):
  - inside a caller's `shard_map` (manual mesh axes): one call, row0 =
    (device index over the manual axes, in mesh order) x local rows;
  - a mesh in context with axis `row_axis` over n > 1 devices, n dividing the
    rows, and `shard`: `shard_map` over that mesh, so each device runs fn on
    its own rows only;
  - else (no mesh declared, e.g. evaluation on one device of several; one
    device; uneven rows; shard=False): one call with every row, row0 = 0. Under
    jit XLA places it; an opaque op (a host callback, a Pallas kernel) then
    sees the whole batch, gathered onto one device if it was sharded.
  Unchecked (check_vma=False): a Pallas call's outputs carry no annotation of
  how they vary over the mesh.
  """
  from jax.sharding import PartitionSpec as P
  b = args[0].shape[0]
  get_mesh = getattr(jax.sharding, "get_abstract_mesh", None)
  mesh = get_mesh() if get_mesh else None
  names = tuple(getattr(mesh, "axis_names", ()) or ())
  manual = tuple(getattr(mesh, "manual_axes", ()) or ())
  if manual:
    dev = 0
    for name in names:
      if name in manual:
        dev = dev * mesh.shape[name] + jax.lax.axis_index(name)
    return fn(dev * b, *args)
  n = mesh.shape[row_axis] if row_axis in names else 1
  if not shard or n == 1 or b % n:
    return fn(jax.numpy.int32(0), *args)
  try:
    from jax import shard_map
    unchecked = {"check_vma": False}
  except ImportError:                           # jax < 0.7
    from jax.experimental.shard_map import shard_map
    unchecked = {"check_rep": False}
  spec = P(row_axis)

  def local(*xs):
    return fn(jax.lax.axis_index(row_axis) * (b // n), *xs)

  out_specs = spec if num_outputs == 1 else (spec,) * num_outputs
  return shard_map(local, mesh=mesh, in_specs=(spec,) * len(args), out_specs=out_specs,
                   **unchecked)(*args)


def mesh_context(mesh):
  """Declares `mesh` to the code traced inside (`with knn.mesh_context(mesh):`),
  so that host and Pallas searches run per device on their rows."""
  set_mesh = getattr(jax, "set_mesh", None) or getattr(jax.sharding, "use_mesh")
  return set_mesh(mesh)


def gather(table: jax.Array, indices: jax.Array) -> jax.Array:
  """table [B, H, N, D], indices [B, H, Q, k] -> [B, H, Q, k, D]."""
  b, h, q, k = indices.shape
  flat = indices.reshape(b, h, q * k)
  out = jax.vmap(jax.vmap(lambda t, i: t[i]))(table, flat)     # [B, H, Q*k, D]
  return out.reshape(b, h, q, k, table.shape[-1])
