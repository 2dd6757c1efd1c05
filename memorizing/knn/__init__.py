"""kNN search backends behind one interface (memorizing.knn_api.KNNBackend).

    backend = make_backend(model_config)        # one object per run, owned by the caller
    logits, state = Decoder(model_config, backend).apply(...)

Backends are registered by name ("module:Class", so that optional ones such as
ScaNN import lazily); `make_backend` builds a NEW instance from
ModelConfig.knn_backend and ModelConfig.knn_options each time it is called.
Nothing is kept in a module global: a host backend's searcher cache lives as
long as the object its owner (trainer, evaluator, tool) holds.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Dict, Optional, Tuple

from memorizing.errors import ConfigError, UnknownBackendError
from memorizing.model.sharding import mesh_context, per_device_rows
from memorizing.knn_api import KNNBackend, SearchContext
from memorizing.model.config import ModelConfig
from memorizing.model.memory import gather

__all__ = ["KNNBackend", "SearchContext", "UnknownBackendError", "available", "create",
           "gather", "make_backend", "mesh_context", "per_device_rows", "register"]

# name -> "module:Class". Registered names only; instances are never cached here.
_REGISTRY: Dict[str, str] = {
    "exact": "memorizing.knn.exact:ExactBackend",
    "device": "memorizing.knn.device:DeviceBackend",
    "scann": "memorizing.knn.scann_host:ScannBackend",
}


def register(name: str, target: str) -> None:
  """Registers a backend class given as "module:Class"."""
  _REGISTRY[name] = target


def available() -> Tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


def create(name: str, options: Any = ()) -> KNNBackend:
  """A new backend `name` built with keyword `options` (pairs or a dict)."""
  if name not in _REGISTRY:
    raise UnknownBackendError(
        f"unknown kNN backend {name!r}; choose one of {', '.join(available())}")
  module_name, cls_name = _REGISTRY[name].split(":")
  try:
    # Imported by name: ScaNN is an optional dependency, loaded only when chosen.
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise UnknownBackendError(
        f"kNN backend {name!r} cannot be loaded ({e}); "
        + ("install it with `pip install -e .[scann]`" if name == "scann" else "")) from e
  cls: Callable[..., KNNBackend] = getattr(module, cls_name)
  options = dict(options)
  accepted = inspect.signature(cls).parameters
  unknown = sorted(set(options) - set(accepted))
  if unknown:
    raise ConfigError(f"ModelConfig.knn_options: the {name!r} backend has no option "
                      f"{', '.join(unknown)}; its options: {', '.join(accepted)}")
  return cls(**options)


def make_backend(config: ModelConfig) -> Optional[KNNBackend]:
  """The backend `config` asks for (ModelConfig.knn_backend, knn_options), or None
  when the model has no memory layer. The caller owns it (and `close()`s it)."""
  if not config.memory_layers:
    return None
  return create(config.knn_backend, config.knn_options)
