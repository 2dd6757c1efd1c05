"""Capture a memory layer's real keys and queries from a model run.

Recall of an approximate kNN backend depends on the structure of the keys, so
it is best measured on keys a trained model actually stores. This runs the
model over a few segments of documents and returns, for one memory layer, the
ring buffer it built and the (L2-normalised) queries of the segment that
follows: exactly what the layer's backend is asked to search.
"""
from __future__ import annotations

from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

from memorizing.knn import make_backend
from memorizing.knn_api import KNNBackend
from memorizing.model import memory as memory_lib
from memorizing.model.config import ConfigError, ModelConfig
from memorizing.model.decoder import Decoder, init_carried_state, layer_name
from memorizing.model.layers import l2_normalize


def capture(model_config: ModelConfig, params, batches, num_segments: int,
            layer: int | None = None, backend: KNNBackend | None = None
            ) -> Dict[str, np.ndarray]:
  """Runs `num_segments` batches, then captures the next batch's queries.

  `backend` searches the memory while the model runs (default: a new one from
  `make_backend(model_config)`, closed at the end).

  batches: iterator of Batch dicts (tokens [B,L], start_of_document [B], ...).
  Returns {"keys": [B,H,N,D], "values": [B,H,N,D], "count": [B],
  "queries": [B,H,L,D]} as numpy float32, for `layer` (default: the first
  memory layer). Fill the memory by choosing num_segments >= N / L.
  """
  layer = model_config.memory_layer_set[0] if layer is None else layer % model_config.num_layers
  if layer not in model_config.memory_layer_set:
    raise ConfigError(f"layer {layer} holds no memory; memory layers: {model_config.memory_layer_set}")
  own = backend is None
  backend = make_backend(model_config) if own else backend
  try:
    return _capture(model_config, params, batches, num_segments, layer, backend)
  finally:
    if own and backend is not None:
      backend.close()


def _capture(model_config, params, batches, num_segments, layer, backend):
  model = Decoder(model_config, backend)
  query_name = f"block_{layer}"

  @jax.jit
  def step(carried, batch):
    _, carried = model.apply({"params": params}, batch["tokens"], carried,
                             batch["start_of_document"])
    return carried

  @jax.jit
  def queries_of(carried, batch):
    _, state = model.apply({"params": params}, batch["tokens"], carried,
                           batch["start_of_document"],
                           capture_intermediates=lambda mdl, _: mdl.name == "query",
                           mutable=["intermediates"])
    q = state["intermediates"][query_name]["attention"]["query"]["__call__"][0]  # [B,L,H,D]
    return l2_normalize(jnp.transpose(q, (0, 2, 1, 3)))

  first = next(batches)
  carried = init_carried_state(model_config, first["tokens"].shape[0])
  batch = first
  for _ in range(num_segments):
    carried = step(carried, batch)
    batch = next(batches)
  queries = queries_of(carried, batch)
  # The search of the next segment sees the memory after that segment's reset.
  mem = memory_lib.reset(carried.memory[layer_name(layer)], batch["start_of_document"])
  as_np = lambda x: np.asarray(jax.device_get(x), np.float32)
  return {"keys": as_np(mem.keys), "values": as_np(mem.values),
          "count": np.asarray(mem.count), "queries": as_np(queries)}
