"""Corpus size and document-length histograms (in tokens)."""
from __future__ import annotations

from typing import Dict, Iterable, List

import numpy as np


def length_histogram(lengths: Iterable[int]) -> List[Dict[str, int]]:
  """Counts of documents per power-of-two length bucket.

  Returns [{"min": lo, "max": hi, "count": n}, ...] with buckets
  [0, 1), [1, 2), [2, 4), ..., covering the longest document; lo inclusive,
  hi exclusive. Empty buckets at the low end are dropped.
  """
  lengths = np.asarray(list(lengths), dtype=np.int64)
  if lengths.size == 0:
    return []
  top = int(lengths.max())
  edges = [0, 1]
  while edges[-1] <= top:
    edges.append(edges[-1] * 2)
  counts, _ = np.histogram(lengths, bins=np.asarray(edges))
  rows = [{"min": int(lo), "max": int(hi), "count": int(c)}
          for lo, hi, c in zip(edges[:-1], edges[1:], counts)]
  first = next(i for i, r in enumerate(rows) if r["count"])
  return rows[first:]


def _human(n: int) -> str:
  for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
    if n >= size and n % size == 0:
      return f"{n // size}{unit}"
  return str(n)


def format_histogram(histogram: List[Dict[str, int]], unit: str = "tokens") -> str:
  """A small text table of `length_histogram` output, one bucket a line."""
  if not histogram:
    return "  (no documents)"
  total = sum(r["count"] for r in histogram)
  peak = max(r["count"] for r in histogram)
  lines = []
  for r in histogram:
    bar = "#" * max(1 if r["count"] else 0, round(40 * r["count"] / peak))
    lines.append(f"  [{_human(r['min']):>5}, {_human(r['max']):>5}) {unit}: "
                 f"{r['count']:6d} ({100 * r['count'] / total:5.1f}%) {bar}")
  return "\n".join(lines)


def corpus_summary(name: str, lengths_by_split: Dict[str, List[int]],
                   tokenizer_name: str = "bytes") -> str:
  """Lines like `python_stdlib/train: 140 documents, 28,123,456 tokens (bytes)`
  plus one histogram over all splits."""
  lines = []
  every = []
  for split, lengths in lengths_by_split.items():
    every.extend(lengths)
    lines.append(f"{name}/{split}: {len(lengths):,} documents, "
                 f"{int(sum(lengths)):,} tokens ({tokenizer_name})")
  if every:
    q1, median, q3 = (int(x) for x in np.percentile(every, [25, 50, 75]))
    lines.append(f"{name}/all: {len(every):,} documents, {int(sum(every)):,} tokens "
                 f"({tokenizer_name}); length quartiles {q1:,} / {median:,} / {q3:,}")
    lines.append(f"document length histogram, tokens ({tokenizer_name}), median "
                 f"{median:,}:")
    lines.append(format_histogram(length_histogram(every)))
  return "\n".join(lines)
