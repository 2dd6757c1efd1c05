"""What a memory layer does, measured inside the step: the memory signals.

Per memory layer and head, as sums with their denominators (so that steps and
batches add up; `summarize` divides once):

  gate         sigmoid(b_h) ("gate" combination; for "joint", memory_bias: the
               learned bias b_h of the memory logits); averaged over steps
  mass         attention mass that goes to memory, per query token
  distance     retrieved valid neighbours by how far back they lie, in
               DISTANCE_BUCKETS: inside the XL window (the previous segment,
               also held by the XL cache), then up to 2K, 8K, 32K tokens, beyond
  distance_mass  the same, weighted by the attention mass each neighbour gets
               (fraction of all attention, per query token)
  top1, topk   mean cosine similarity of the best neighbour and of all valid
               neighbours (queries and keys are L2-normalised)
  recall       live recall of the configured backend against exact search, on
               a sample of queries (the fullest row, RECALL_QUERIES per head)

Distances come from the ring buffer alone: its writes are whole segments of
consecutive tokens, so slot s holds the token `slot_distances(mem)[s]` tokens
before the current segment's first token. The same functions serve any tool
that reports what the memory retrieved.
"""
from __future__ import annotations

import math
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

from memorizing.model.memory import MemoryState

DISTANCE_BUCKETS = ("xl", "to2k", "to8k", "to32k", "beyond32k")
DISTANCE_EDGES = (2048, 8192, 32768)
RECALL_QUERIES = 16


def slot_distances(mem: MemoryState) -> jax.Array:
  """[B, N] int32: how many tokens before the segment's first token each slot's
  token lies (1 = the token just before it). Meaningful for valid slots only."""
  n = mem.size
  return (mem.pointer[:, None] - 1 - jnp.arange(n, dtype=jnp.int32)[None, :]) % n + 1


def _neighbour_back(idx: jax.Array, mem: MemoryState) -> jax.Array:
  """idx [B,H,Q,k] -> [B,H,Q,k] slot_distances of the retrieved slots."""
  back = jax.vmap(lambda row, i: row[i])(slot_distances(mem), idx.reshape(idx.shape[0], -1))
  return back.reshape(idx.shape)


def neighbour_distances(idx: jax.Array, mem: MemoryState) -> jax.Array:
  """idx [B,H,Q,k] slots retrieved for the Q queries of a segment -> [B,H,Q,k]
  int32 distance in tokens from each query to its neighbour."""
  return _neighbour_back(idx, mem) + jnp.arange(idx.shape[2], dtype=jnp.int32)[None, None, :, None]


def distance_bucket(idx: jax.Array, mem: MemoryState, segment_length: int,
                    use_xl_cache: bool) -> jax.Array:
  """[B,H,Q,k] int32 index into DISTANCE_BUCKETS."""
  dist = neighbour_distances(idx, mem)
  by_distance = 1 + sum((dist > e).astype(jnp.int32) for e in DISTANCE_EDGES)
  if not use_xl_cache:
    return by_distance
  return jnp.where(_neighbour_back(idx, mem) <= segment_length, 0, by_distance)


def sampled_recall(q: jax.Array, mem: MemoryState, idx: jax.Array, valid: jax.Array,
                   k: int, num_queries: int = RECALL_QUERIES):
  """(hits, total) float32 scalars: of the exact top-k of sampled queries (the
  fullest row, `num_queries` evenly spaced queries, every head), how many the
  backend returned. Ties count: a returned slot whose exact score reaches the
  k-th best score is a hit, so a memory with repeated keys (runs of blanks,
  repeated lines) is not reported as missed when the backend picks a different
  one of several equal keys."""
  length = q.shape[2]
  stride = max(1, length // num_queries)
  r = jnp.argmax(mem.count)
  take = lambda x: jax.lax.dynamic_index_in_dim(x, r, 0, keepdims=False)
  qs = take(q)[:, ::stride]                                        # [H, S, D]
  keys = take(mem.keys)                                            # [H, N, D]
  scores = jnp.einsum("hsd,hnd->hsn", qs.astype(jnp.float32), keys.astype(jnp.float32))
  slot_ok = jnp.arange(mem.size)[None, None, :] < take(mem.count)
  scores = jnp.where(slot_ok, scores, -jnp.inf)
  top, exact = jax.lax.top_k(scores, k)                            # [H, S, k]
  exact_ok = jnp.isfinite(top)
  got, got_ok = take(idx)[:, ::stride], take(valid)[:, ::stride]  # [H, S, k]
  got_scores = jnp.take_along_axis(scores, got, axis=-1)            # [H, S, k]
  kth = jnp.min(jnp.where(exact_ok, top, jnp.inf), axis=-1, keepdims=True)
  # A slot returned twice counts once.
  first = jnp.argmax(got[..., :, None] == got[..., None, :], axis=-1) == jnp.arange(k)
  good = got_ok & first & jnp.isfinite(got_scores) & (got_scores >= kth - 1e-6)
  hits = jnp.minimum(jnp.sum(good, axis=-1), jnp.sum(exact_ok, axis=-1))
  return jnp.sum(hits).astype(jnp.float32), jnp.sum(exact_ok).astype(jnp.float32)


def layer_signals(*, q, sims, valid, idx, mem: MemoryState, mem_probs, mass, gate,
                  segment_length: int, use_xl_cache: bool, recall_k: int,
                  gate_name: str = "gate") -> Dict[str, jax.Array]:
  """The sums of one memory layer for one segment (shapes in the module doc).

  q [B,H,L,D] normalised queries; sims [B,H,L,k] q . key of each retrieved
  key (cosine similarity); valid, idx
  [B,H,L,k]; mem the memory searched (after reset, before append); mem_probs
  [B,H,L,k] each neighbour's share of the query's whole attention; mass
  [B,H,L] the memory's share; gate [H], reported as `gate_name`.
  """
  f32 = jnp.float32
  validf = valid.astype(f32)
  sims = sims.astype(f32)
  has_any = jnp.any(valid, axis=-1)                                # [B,H,L]
  top1 = jnp.max(jnp.where(valid, sims, -jnp.inf), axis=-1)
  bucket = distance_bucket(idx, mem, segment_length, use_xl_cache)
  onehot = (bucket[..., None] == jnp.arange(len(DISTANCE_BUCKETS))).astype(f32)  # [B,H,L,k,nb]
  hits, total = sampled_recall(q, mem, idx, valid, recall_k)
  head_sum = lambda x: jnp.sum(x, axis=(0, 2))                     # [B,H,L,...] -> [H,...]
  return {
      gate_name: gate.astype(f32),
      "steps": jnp.ones((), f32),
      "mass": head_sum(mass.astype(f32)),
      "queries": jnp.full(gate.shape, q.shape[0] * q.shape[2], f32),
      "distance": head_sum(jnp.sum(onehot * validf[..., None], axis=3)),
      "distance_mass": head_sum(jnp.sum(onehot * mem_probs.astype(f32)[..., None], axis=3)),
      "neighbours": head_sum(jnp.sum(validf, axis=-1)),
      "top1": head_sum(jnp.where(has_any, top1, 0.0)),
      "queries_with_memory": head_sum(has_any.astype(f32)),
      "topk": head_sum(jnp.sum(sims * validf, axis=-1)),
      "recall_hits": hits,
      "recall_total": total,
  }


def collect(variables) -> Dict[str, Dict[str, jax.Array]]:
  """The "signals" collection of Decoder.apply -> {"layer_i": sums}."""
  out = {}
  for block, tree in variables.get("signals", {}).items():
    out[f"layer_{block.rsplit('_', 1)[1]}"] = tree["attention"]["memory"][0]
  return out


def _div(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(b > 0, a / np.where(b > 0, b, 1.0), np.nan)


def summarize(sums: Dict[str, Dict[str, np.ndarray]]) -> Dict[str, Dict[str, object]]:
  """{layer: sums (added over steps)} -> {layer: {signal: per-head list, signal_mean}}.

  distance and distance_mass are {bucket: per-head list}; recall is one number.
  """
  out = {}
  for layer, s in sums.items():
    s = {k: np.asarray(v, np.float64) for k, v in s.items()}
    gate_name = "gate" if "gate" in s else "memory_bias"
    per_head = {
        gate_name: s[gate_name] / max(float(s["steps"]), 1.0),
        "mass": _div(s["mass"], s["queries"]),
        "top1": _div(s["top1"], s["queries_with_memory"]),
        "topk": _div(s["topk"], s["neighbours"]),
    }
    dist = _div(s["distance"], s["neighbours"][:, None])          # [H, nb]
    dist_mass = _div(s["distance_mass"], s["queries"][:, None])
    rec = {k: [round(float(x), 5) for x in v] for k, v in per_head.items()}
    rec.update({f"{k}_mean": _mean(v) for k, v in per_head.items()})
    rec["distance"] = {b: _mean(dist[:, i]) for i, b in enumerate(DISTANCE_BUCKETS)}
    rec["distance_mass"] = {b: _mean(dist_mass[:, i]) for i, b in enumerate(DISTANCE_BUCKETS)}
    rec["recall"] = float(_div(s["recall_hits"], s["recall_total"]))
    out[layer] = rec
  return out


def _mean(x) -> float:
  x = np.asarray(x, np.float64)
  x = x[np.isfinite(x)]
  return round(float(x.mean()), 5) if x.size else math.nan


def add(a, b):
  """Elementwise sum of two signal trees (either may be None)."""
  if a is None:
    return b
  return jax.tree_util.tree_map(lambda x, y: np.asarray(x) + np.asarray(y), a, b)


def flat_scalars(summary: Dict[str, Dict[str, object]], prefix: str = "memory") -> Dict[str, float]:
  """Scalars for TensorBoard: memory/<layer>/<signal>[/<head or bucket>]."""
  out = {}
  for layer, rec in summary.items():
    for name, v in rec.items():
      key = f"{prefix}/{layer}/{name}"
      if isinstance(v, dict):
        out.update({f"{key}/{b}": float(x) for b, x in v.items()})
      elif isinstance(v, list):
        out.update({f"{key}/h{i}": float(x) for i, x in enumerate(v)})
      else:
        out[key] = float(v)
  return out
