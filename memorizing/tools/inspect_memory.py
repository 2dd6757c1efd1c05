"""memorizing-inspect: what the memory retrieved for the tokens it helped most.

Runs one document through the model with memory and with memory disabled
(whole segments, as evaluation does; then once more with memory, capturing the
queries of the chosen targets only, so a book needs no more than a segment's
worth of captured state), picks the N target tokens whose loss the
memory lowers most (or given positions) and reports, for each, per head of
each memory layer: the gate, the attention mass on memory and the top
retrieved neighbours (distance back in tokens, cosine similarity, attention
share, the text around the neighbour). Output: one self-contained HTML file
(PNGs inlined), the PNGs next to it (histogram of retrieval distances; loss
difference along the document) and a short terminal summary.

The retrieval is reconstructed outside the model from the queries of each
memory layer (Flax's captured intermediates) and the memory it searched, with
exact top-k; the model runs with the exact backend for the same reason, so the
report shows what the model attended to. Distances come from
memorizing.model.signals.neighbour_distances, the memory signals' code.
Memory layers combined with "joint" report the memory bias and no mass.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from memorizing.data import registry, tokenizers
from memorizing.errors import UsageError
from memorizing.knn import make_backend
from memorizing.knn_api import SearchContext
from memorizing.model import memory as memory_lib
from memorizing.model import signals
from memorizing.model.config import ModelConfig
from memorizing.model.decoder import Decoder, init_carried_state, layer_name
from memorizing.model.layers import l2_normalize
from memorizing.model.memory_attention import attend_retrieved, retrieve
from memorizing.tools.generate import PromptError, load_run


def _per_token_nll(config, params, ids, on_segment=None):
  """ids [T] -> nll [T-1] float64. With `on_segment`, the queries are captured and
  `on_segment(s, carried_before, intermediates)` is called after each segment
  (nothing is kept, so a book-length document needs one segment's worth)."""
  capture = on_segment is not None
  length = config.segment_length
  total = len(ids)
  segs = -(-total // length)
  padded = np.zeros((segs * length,), np.int32)
  padded[:total] = ids
  backend = make_backend(config) if (config.memory_layers and config.memory_enabled) else None
  model = Decoder(config, backend)

  def run(p, t, st, s):
    if capture:
      return model.apply({"params": p}, t, st, s,
                         capture_intermediates=lambda mdl, _: mdl.name == "query",
                         mutable=["intermediates"])
    return model.apply({"params": p}, t, st, s), {}

  step = jax.jit(run)
  state = init_carried_state(config, 1)
  logits_all = []
  try:
    for s in range(segs):
      before = state
      (logits, state), inter = step(params, jnp.asarray(padded[None, s * length:(s + 1) * length]),
                                    state, jnp.full((1,), s == 0))
      logits_all.append(np.asarray(logits[0], np.float64))
      if capture:
        on_segment(s, before, inter)
  finally:
    if backend is not None:
      backend.close()
  logits = np.concatenate(logits_all)[:total - 1]
  logits = logits - logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return -logp[np.arange(total - 1), ids[1:]]


def inspect_document(config: ModelConfig, params, ids, top: int = 5,
                     positions: Optional[Sequence[int]] = None, neighbours: int = 5) -> Dict:
  """Report dict for document `ids` [T]: per chosen target position, per memory
  layer and head, gate, mass and neighbours. `positions` are target positions
  (token t, predicted from tokens < t); default: the `top` whose loss the memory
  lowers most."""
  ids = np.asarray(ids, np.int32)
  if ids.ndim != 1 or len(ids) < 2:
    raise PromptError("the document needs at least 2 tokens")
  if not config.memory_layers:
    raise UsageError("this model has no memory layer: nothing to inspect")
  cfg = config.replace(knn_backend="exact", knn_options=(), memory_enabled=True)
  nll_mem = _per_token_nll(cfg, params, ids)
  nll_off = _per_token_nll(cfg.replace(memory_enabled=False), params, ids)
  diff = nll_mem - nll_off                                          # [T-1], target t = i + 1
  if positions:
    chosen = [int(p) for p in positions]
    bad = [p for p in chosen if not 1 <= p < len(ids)]
    if bad:
      raise UsageError(f"--positions {bad} outside the document's targets 1..{len(ids) - 1}")
  else:
    chosen = [int(i) + 1 for i in np.argsort(diff, kind="stable")[:top]]
  length = cfg.segment_length
  exact = make_backend(cfg)
  hist_bins = distance_edges(length)
  hist = np.zeros((len(hist_bins) - 1,), np.int64)
  by_pos: Dict[int, Dict] = {p: {"target": p, "loss_memory": float(nll_mem[p - 1]),
                                 "loss_disabled": float(nll_off[p - 1]),
                                 "loss_difference": float(diff[p - 1]), "layers": {}}
                             for p in chosen}

  def on_segment(s, before, inter):
    nonlocal hist
    queries_here = [p - 1 for p in chosen if s * length <= p - 1 < (s + 1) * length]
    for i in cfg.memory_layer_set:
      name = layer_name(i)
      raw = inter["intermediates"][f"block_{i}"]["attention"]["query"]["__call__"][0]
      q = l2_normalize(jnp.transpose(raw, (0, 2, 1, 3)))              # [1,H,L,D]
      mem = memory_lib.reset(before.memory[name], jnp.full((1,), s == 0))
      context = SearchContext(layer=i, train=False, reset=jnp.zeros((1,), bool),
                              new_keys=jnp.zeros(q.shape[:2] + (0,) + q.shape[3:], q.dtype))
      idx, valid, mem_k, mem_v = retrieve(q, mem, exact, cfg.num_neighbors, context)
      attn = params[f"block_{i}"]["attention"]
      scale = jnp.asarray(attn["logit_scale"], jnp.float32)
      if cfg.memory_combine == "gate":
        gate = np.asarray(jax.nn.sigmoid(jnp.asarray(attn["memory_gate"], jnp.float32)))
        _, probs, _ = attend_retrieved(q, mem_k, mem_v, valid, scale)
      else:
        gate = np.asarray(attn["memory_bias"], np.float32)
        _, probs, _ = attend_retrieved(q, mem_k, mem_v, valid, scale,
                                       jnp.asarray(attn["memory_bias"], jnp.float32))
      dist = np.asarray(signals.neighbour_distances(idx, mem))[0]        # [H,L,k]
      sims = np.asarray(jnp.einsum("bhqd,bhqkd->bhqk", q, mem_k))[0]
      validn, probs = np.asarray(valid)[0], np.asarray(probs)[0]
      hist += np.histogram(dist[validn], bins=hist_bins)[0]
      for qp in queries_here:
        j = qp - s * length
        heads = []
        for h in range(cfg.num_heads):
          ok = validn[h, j]
          has_any = bool(ok.any())
          mass = float(gate[h]) * has_any if cfg.memory_combine == "gate" else None
          order = np.argsort(-np.where(ok, sims[h, j], -np.inf), kind="stable")[:neighbours]
          nb = [{"distance": int(dist[h, j, o]), "position": int(qp - dist[h, j, o]),
                 "similarity": float(sims[h, j, o]),
                 "attention": float(probs[h, j, o]) * (mass if mass is not None else 1.0)}
                for o in order if ok[o]]
          heads.append({"gate" if cfg.memory_combine == "gate" else "memory_bias": float(gate[h]),
                        "mass": mass, "neighbours": nb})
        by_pos[qp + 1]["layers"][name] = heads

  try:   # a second pass with memory, now knowing the targets: bounded memory use
    _per_token_nll(cfg, params, ids, on_segment)
  finally:
    exact.close()
  return {"tokens": int(len(ids)), "segment_length": length,
          "memory_size": cfg.memory_size, "xl_window": length if cfg.use_xl_cache else 0,
          "mean_loss_memory": float(nll_mem.mean()), "mean_loss_disabled": float(nll_off.mean()),
          "loss_difference": diff.tolist(),
          "distance_histogram": {"edges": hist_bins.tolist(), "counts": hist.tolist()},
          "targets": [by_pos[p] for p in chosen]}


# --- rendering -----------------------------------------------------------------------
def _text(tok, ids) -> str:
  return tok.decode([int(i) for i in ids])


def _window_html(tok, ids, lo, mark, hi) -> str:
  """Escaped text of ids[lo:hi] with token `mark` highlighted."""
  lo, hi = max(0, lo), min(len(ids), hi)
  before, at, after = _text(tok, ids[lo:mark]), _text(tok, ids[mark:mark + 1]), _text(tok, ids[mark + 1:hi])
  return (f"<pre>{html.escape(before)}<mark>{html.escape(at) or '&#8203;'}</mark>"
          f"{html.escape(after)}</pre>")


def plots(report: Dict) -> Dict[str, bytes]:
  """{filename: PNG bytes}: retrieval distances, loss difference along the document."""
  import matplotlib  # optional dependency ([plots]); imported only to draw
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  out = {}
  edges = report["distance_histogram"]["edges"]
  counts = report["distance_histogram"]["counts"]
  labels = [f"{a}-{b}" if b < (1 << 30) else f"{a}+" for a, b in zip(edges[:-1], edges[1:])]
  fig, ax = plt.subplots(figsize=(6, 3))
  ax.bar(range(len(counts)), counts)
  ax.set_xticks(range(len(counts)), labels, rotation=30, fontsize=7)
  ax.set_xlabel("distance back in tokens"), ax.set_ylabel("retrieved neighbours")
  ax.set_title("Retrieval distances (all queries, heads, memory layers)")
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  plt.close(fig)
  out["distances.png"] = buf.getvalue()
  diff = np.asarray(report["loss_difference"])
  fig, ax = plt.subplots(figsize=(7, 3))
  w = max(1, len(diff) // 200)
  smooth = np.convolve(diff, np.ones(w) / w, mode="valid") if len(diff) >= w else diff
  ax.plot(np.arange(len(smooth)) + w // 2 + 1, smooth, lw=0.8)
  ax.axhline(0, color="k", lw=0.5)
  ax.set_xlabel("target position"), ax.set_ylabel("loss: memory - disabled")
  ax.set_title(f"Loss with memory minus memory disabled ({w}-token running mean)", fontsize=9)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  plt.close(fig)
  out["loss_difference.png"] = buf.getvalue()
  return out


def render_html(report: Dict, tok, ids, images: Dict[str, bytes], context: int = 200,
                title: str = "memory inspection") -> str:
  parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
           "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
           "pre{white-space:pre-wrap;background:#f6f6f6;padding:4px;font-size:12px;margin:2px 0}"
           "mark{background:#ffd54f}table{border-collapse:collapse;font-size:12px}"
           "td,th{border:1px solid #ccc;padding:2px 4px;vertical-align:top}</style></head><body>",
           f"<h1>{html.escape(title)}</h1>",
           f"<p>{report['tokens']} tokens; segment {report['segment_length']}, memory "
           f"{report['memory_size']}; mean loss with memory {report['mean_loss_memory']:.4f}, "
           f"memory disabled {report['mean_loss_disabled']:.4f}.</p>"]
  for name, png in images.items():
    parts.append(f"<img alt='{name}' src='data:image/png;base64,"
                 f"{base64.b64encode(png).decode()}'>")
  for t in report["targets"]:
    p = t["target"]
    parts.append(f"<h2>target {p}: loss {t['loss_memory']:.3f} with memory, "
                 f"{t['loss_disabled']:.3f} disabled ({t['loss_difference']:+.3f})</h2>")
    parts.append(_window_html(tok, ids, p - context, p, p + 1))
    for layer, heads in t["layers"].items():
      parts.append(f"<h3>{layer}</h3><table><tr><th>head</th><th>gate</th><th>mass</th>"
                   "<th>neighbours (distance back, similarity, attention)</th></tr>")
      for h, hd in enumerate(heads):
        g = hd.get("gate", hd.get("memory_bias"))
        mass = "-" if hd["mass"] is None else f"{hd['mass']:.3f}"
        cells = []
        for nb in hd["neighbours"]:
          pos = nb["position"]
          cells.append(f"<div>{nb['distance']} back, sim {nb['similarity']:.3f}, "
                       f"att {nb['attention']:.3f}"
                       + _window_html(tok, ids, pos - context // 4, pos, pos + context // 4)
                       + "</div>")
        parts.append(f"<tr><td>{h}</td><td>{g:.3f}</td><td>{mass}</td>"
                     f"<td>{''.join(cells) or 'none'}</td></tr>")
      parts.append("</table>")
  parts.append("</body></html>")
  return "\n".join(parts)


def distance_edges(segment_length: int) -> np.ndarray:
  """Edges of the report's retrieval-distance histogram, strictly increasing for
  any segment length: one and two segments back (inside the XL window), then the
  memory signals' edges (memorizing.model.signals.DISTANCE_EDGES)."""
  return np.unique(np.array([0, segment_length, 2 * segment_length,
                             *signals.DISTANCE_EDGES, 1 << 30], np.int64))


def summary_lines(report: Dict) -> List[str]:
  lines = [f"{report['tokens']} tokens: mean loss {report['mean_loss_memory']:.4f} with memory, "
           f"{report['mean_loss_disabled']:.4f} disabled"]
  for t in report["targets"]:
    best = None
    for heads in t["layers"].values():
      for hd in heads:
        for nb in hd["neighbours"][:1]:
          if best is None or nb["similarity"] > best["similarity"]:
            best = nb
    nb_text = (f"best neighbour {best['distance']} tokens back (sim {best['similarity']:.3f})"
               if best else "no neighbour")
    lines.append(f"  target {t['target']}: loss {t['loss_difference']:+.3f}; {nb_text}")
  return lines


def main(argv: Sequence[str]) -> int:
  parser = argparse.ArgumentParser(prog="memorizing-inspect",
                                   description="What the memory retrieved, as an HTML report.")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--checkpoint_step", type=int, default=None)
  parser.add_argument("--document", default=None, help="a text file")
  parser.add_argument("--dataset", default=None)
  parser.add_argument("--split", default="validation")
  parser.add_argument("--index", type=int, default=0)
  parser.add_argument("--top", type=int, default=5)
  parser.add_argument("--positions", default=None, help="target positions, comma separated")
  parser.add_argument("--max_tokens", type=int, default=0, help="first N tokens only (0: all)")
  parser.add_argument("--gin_file", action="append", default=[])
  parser.add_argument("--gin_param", action="append", default=[])
  parser.add_argument("--output", required=True, help="report.html (PNGs and JSON next to it)")
  args = parser.parse_args(list(argv))
  if (args.document is None) == (args.dataset is None):
    raise UsageError("give exactly one of --document FILE or --dataset NAME")
  if args.top <= 0:
    raise UsageError(f"--top must be > 0, got {args.top}")
  positions = None
  if args.positions:
    try:
      positions = [int(x) for x in args.positions.split(",") if x.strip()]
    except ValueError as e:
      raise UsageError(f"--positions must be integers separated by commas: {args.positions}") from e
  model_config, train_config, params, step = load_run(args.workdir, args.gin_param,
                                                      args.checkpoint_step, "on", args.gin_file)
  tok = tokenizers.get_tokenizer(train_config.tokenizer)
  if args.document:
    try:
      with open(args.document, "rb") as f:
        text = f.read()
    except OSError as e:
      raise PromptError(f"cannot read document {args.document}: {e.strerror}") from e
    source = args.document
  else:
    docs = registry.load_documents(args.dataset, args.split, train_config.data_dir,
                                   max_documents=args.index + 1)
    if args.index >= len(docs):
      raise UsageError(f"--index {args.index}: split {args.split} of {args.dataset} has "
                       f"{len(docs)} documents")
    text = docs[args.index]
    source = f"{args.dataset}/{args.split}[{args.index}]"
  ids = np.asarray(tok.encode(text), np.int32)
  if args.max_tokens:
    ids = ids[:args.max_tokens]
  report = inspect_document(model_config, params, ids, top=args.top, positions=positions)
  images = plots(report)
  out_dir = os.path.dirname(os.path.abspath(args.output))
  os.makedirs(out_dir, exist_ok=True)
  stem = os.path.splitext(os.path.abspath(args.output))[0]
  for name, png in images.items():
    with open(f"{stem}_{name}", "wb") as f:
      f.write(png)
  with open(args.output, "w", encoding="utf-8") as f:
    f.write(render_html(report, tok, ids, images,
                        title=f"memory inspection: {source}, checkpoint {step}"))
  slim = {k: v for k, v in report.items() if k != "loss_difference"}
  with open(f"{stem}.json", "w") as f:
    json.dump(slim, f, indent=1)
  for line in summary_lines(report):
    print(line)
  print(f"wrote {args.output}, {stem}.json and {', '.join(f'{stem}_{n}' for n in images)}",
        file=sys.stderr)
  return 0
