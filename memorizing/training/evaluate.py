"""Perplexity over whole documents, streamed in document order with memory.

Every target token of every evaluated document is counted once. Besides the
total, perplexity is reported by the target's position inside its document
(POSITION_BUCKETS), so the benefit of memory on long range is visible.

The kNN backend is the caller's (passed in, or made for this evaluation and
closed after it); the jitted step closes over it and lives as long as one
`evaluate` call, so no compiled step outlives the state it was built with.
"""
from __future__ import annotations

import functools
import math
import os
import sys
from typing import Dict, Optional

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from memorizing.errors import DatasetError
from memorizing.knn import make_backend
from memorizing.knn_api import KNNBackend
from memorizing.model import signals
from memorizing.model.config import ModelConfig
from memorizing.model.decoder import Decoder, init_carried_state

# Bucket edges in tokens: [0, 512), [512, 2048), [2048, 8192), [8192, inf).
POSITION_BUCKETS = (0, 512, 2048, 8192)


def bucket_names(edges=POSITION_BUCKETS):
  names = []
  for lo, hi in zip(edges, tuple(edges[1:]) + (None,)):
    names.append(f"{lo}-{hi}" if hi is not None else f"{lo}+")
  return names


def eval_step(params, carried, batch, positions, *, model_config: ModelConfig,
              memory_signals: bool = False, backend: Optional[KNNBackend] = None):
  """-> carried, per-bucket [nll_sum, count] [num_buckets, 2] for one segment,
  and the memory signal sums ({} unless `memory_signals`)."""
  (logits, carried), variables = Decoder(model_config, backend).apply(
      {"params": params}, batch["tokens"], carried, batch["start_of_document"],
      mutable=["signals"] if memory_signals else [])
  logp = jax.nn.log_softmax(logits)
  nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
  w = batch["weights"]
  edges = jnp.asarray(POSITION_BUCKETS)
  bucket = jnp.sum(positions[..., None] >= edges, axis=-1) - 1          # [B, L]
  onehot = jax.nn.one_hot(bucket, len(POSITION_BUCKETS)) * w[..., None]  # [B, L, nb]
  sums = jnp.stack([jnp.einsum("bl,bln->n", nll, onehot), onehot.sum((0, 1))], axis=-1)
  return carried, sums, signals.collect(variables)


def evaluate(model_config: ModelConfig, params, stream, tokenizer,
             max_segments: Optional[int] = None, progress: bool = False,
             memory_signals: bool = True,
             backend: Optional[KNNBackend] = None) -> Dict[str, float]:
  """Streams `stream` (repeat=False) to its end; returns perplexity and friends.

  bits_per_byte divides the total nats by ln 2 and by the UTF-8 bytes of the
  target tokens, estimated with the tokenizer's bytes per token on the
  evaluated documents. `backend` searches the memory; by default one is made
  from `model_config` for this call and closed at its end.
  """
  uses_memory = bool(model_config.memory_layers and model_config.memory_enabled)
  own = backend is None and uses_memory
  if own:
    backend = make_backend(model_config)
  try:
    return _evaluate(model_config, params, stream, tokenizer, max_segments,
                     memory_signals and uses_memory, backend, progress)
  finally:
    if own:
      backend.close()


def _evaluate(model_config, params, stream, tokenizer, max_segments, memory_signals, backend,
              progress):
  batch_rows = stream.rows
  bar = None
  if progress:
    from tqdm import tqdm  # loaded when a progress bar is shown only
    # On a terminal only (disable=None); a log file gets the result lines alone.
    bar = tqdm(unit="segment", desc="evaluating", file=sys.stderr, mininterval=1.0,
               disable=None if not os.environ.get("MEMORIZING_FORCE_BAR") else False,
               leave=False)
  carried = init_carried_state(model_config, batch_rows)
  # The carried state (XL caches, memory) is donated: without that each segment
  # wrote a whole new copy of the memory (as training already avoids).
  step = jax.jit(functools.partial(eval_step, model_config=model_config,
                                   memory_signals=memory_signals, backend=backend),
                 donate_argnums=1)
  signal_sums = None
  offset = np.zeros((batch_rows,), np.int64)
  totals = np.zeros((len(POSITION_BUCKETS), 2), np.float64)
  documents, segments = 0, 0
  length = model_config.segment_length
  for batch in stream:
    start = batch["start_of_document"]
    offset = np.where(start, 0, offset)
    # Target j of the segment predicts document token offset + j + 1.
    positions = offset[:, None] + np.arange(length)[None, :] + 1
    carried, sums, sig = step(params, carried, batch, positions)
    totals += np.asarray(sums, np.float64)
    if sig:
      signal_sums = signals.add(signal_sums, jax.device_get(sig))
    documents += int(np.sum(start & (batch["weights"].sum(1) > 0)))
    offset = offset + length
    segments += 1
    if bar is not None:
      bar.update(1)
    if max_segments and segments >= max_segments:
      break
  if bar is not None:
    bar.close()
  totals = _all_processes_sum(totals)
  nll, count = totals[:, 0].sum(), totals[:, 1].sum()
  if count == 0:
    raise DatasetError("evaluation saw no target tokens: the split is empty or every "
                     "document is shorter than 2 tokens")
  docs = stream.documents
  sample = [docs[i] for i in range(min(len(docs), 32))]
  bpt = tokenizer.bytes_per_token(sample)
  loss = nll / count
  result = {"loss": loss, "perplexity": math.exp(loss),
            "bits_per_byte": loss / math.log(2) / bpt, "bytes_per_token": bpt,
            "tokens": int(count), "documents": documents, "segments": segments,
            "memory_enabled": bool(model_config.memory_enabled),
            "memory_size": model_config.memory_size if model_config.memory_layers else 0}
  if signal_sums is not None:
    result["memory"] = signals.summarize(signal_sums)
  for name, (b_nll, b_count) in zip(bucket_names(), totals):
    result[f"perplexity_{name}"] = math.exp(b_nll / b_count) if b_count else float("nan")
    result[f"tokens_{name}"] = int(b_count)
  return result


def _all_processes_sum(x: np.ndarray) -> np.ndarray:
  if jax.process_count() == 1:
    return x
  return np.asarray(multihost_utils.process_allgather(x)).sum(0)
