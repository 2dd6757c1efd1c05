"""Running an opaque search (a host callback, a Pallas kernel) per device on its rows.

Backends and the fused retrieved attention (memory_attention.py) call
`per_device_rows`; the trainer declares its mesh around the traced
step with `mesh_context(mesh)`.
"""
from __future__ import annotations

from typing import Any, Callable, Tuple

import jax
from jax.sharding import PartitionSpec as P

try:
  from jax import shard_map
  _UNCHECKED = {"check_vma": False}
except ImportError:                             # jax < 0.7
  from jax.experimental.shard_map import shard_map
  _UNCHECKED = {"check_rep": False}


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
  spec = P(row_axis)

  def local(*xs):
    return fn(jax.lax.axis_index(row_axis) * (b // n), *xs)

  out_specs = spec if num_outputs == 1 else (spec,) * num_outputs
  return shard_map(local, mesh=mesh, in_specs=(spec,) * len(args), out_specs=out_specs,
                   **_UNCHECKED)(*args)


def mesh_context(mesh):
  """Declares `mesh` to the code traced inside (`with mesh_context(mesh):`),
  so that host and Pallas searches run per device on their rows."""
  set_mesh = getattr(jax, "set_mesh", None) or getattr(jax.sharding, "use_mesh")
  return set_mesh(mesh)
