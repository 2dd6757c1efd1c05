"""Plain numpy reference of the decoder (no memory layers), for whole documents.

It shares no code with memorizing/ beyond the parameter tree, so a test that
compares the two checks the model, not itself.
"""
import math

import numpy as np


def layer_norm(x, p, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def gelu(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def bucket(distance, num_buckets, max_distance):
  n = max(distance, 0)
  exact = num_buckets // 2
  if n < exact:
    return n
  large = exact + int(math.log(n / exact) / math.log(max_distance / exact) * (num_buckets - exact))
  return min(large, num_buckets - 1)


def normalize(x):
  return x / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6)


def forward(params, config, tokens, allowed):
  """tokens [T] ints, allowed [T, T] bool (query, key) -> logits [T, V] float64."""
  p = {k: v for k, v in params.items()}
  t = len(tokens)
  rel = np.asarray(p["relative_position_bias"]["rel_embedding"], np.float64)
  bias = np.zeros((config.num_heads, t, t))
  for i in range(t):
    for j in range(t):
      bias[:, i, j] = rel[bucket(i - j, config.relative_position_buckets,
                                 config.relative_position_max_distance)]
  emb = np.asarray(p["embed"]["embedding"], np.float64)
  x = emb[np.asarray(tokens)]
  for layer in range(config.num_layers):
    blk = {k: v for k, v in p[f"block_{layer}"].items()}
    att = blk["attention"]
    h = layer_norm(x, blk["pre_attention_norm"])
    q = normalize(np.einsum("tm,mhd->htd", h, att["query"]["kernel"]))
    k = normalize(np.einsum("tm,mhd->htd", h, att["key"]["kernel"]))
    v = np.einsum("tm,mhd->htd", h, att["value"]["kernel"])
    logits = np.einsum("hqd,hkd->hqk", q, k) * np.asarray(att["logit_scale"])[:, None, None] + bias
    logits = np.where(allowed[None], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    o = np.einsum("hqk,hkd->qhd", probs, v)
    x = x + np.einsum("qhd,hdm->qm", o, att["out"]["kernel"])
    h = layer_norm(x, blk["pre_mlp_norm"])
    mlp = blk["mlp"]
    h = gelu(h @ mlp["wi"]["kernel"] + mlp["wi"]["bias"]) @ mlp["wo"]["kernel"] + mlp["wo"]["bias"]
    x = x + h
  x = layer_norm(x, p["final_norm"])
  return x @ emb.T / math.sqrt(config.d_model)


def xl_window(num_tokens, segment_length):
  """[T, T] bool: each token sees its own segment up to itself and the whole previous one."""
  q = np.arange(num_tokens)[:, None]
  k = np.arange(num_tokens)[None, :]
  first_visible = (q // segment_length - 1) * segment_length
  return (k <= q) & (k >= first_visible)
